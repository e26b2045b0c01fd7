// Runs one operation with the graphql-sse client (distinct connections mode) and writes
// what it received to stdout as one JSON object: {results, completed, error}.
//
// Usage: node graphql_sse_client.mjs <url> <token or ""> <results to wait for> <document> [variables as JSON]
// graphql-sse is installed in stream_clients/ beside this file (npm ci there).

import { createRequire } from 'node:module';

const require = createRequire(new URL('./stream_clients/package.json', import.meta.url));
const { createClient } = require('graphql-sse');

const [url, token, count, query, variables] = process.argv.slice(2);
const client = createClient({
  url,
  headers: token ? { Authorization: `Bearer ${token}` } : {},
  retryAttempts: 0,
});
const results = [];
const outcome = await new Promise((resolve) => {
  const dispose = client.subscribe(
    { query, variables: variables ? JSON.parse(variables) : undefined },
    {
      next: (result) => {
        results.push(result);
        if (results.length >= Number(count)) {
          dispose();
          resolve({ completed: false, error: null });
        }
      },
      error: (error) => resolve({ completed: false, error: String(error) }),
      complete: () => resolve({ completed: true, error: null }),
    },
  );
});
client.dispose();
process.stdout.write(JSON.stringify({ results, ...outcome }));
