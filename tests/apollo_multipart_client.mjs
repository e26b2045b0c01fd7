// Runs one subscription with Apollo Client over multipart HTTP (its HttpLink) and writes what
// it received to stdout as one JSON object: {results, completed, error}.
//
// Usage: node apollo_multipart_client.mjs <url> <token> <results to wait for> <document> [variables as JSON]
// @apollo/client is installed in stream_clients/ beside this file (npm ci there).

import { createRequire } from 'node:module';

const require = createRequire(new URL('./stream_clients/package.json', import.meta.url));
const { ApolloClient, HttpLink, InMemoryCache, gql } = await import(require.resolve('@apollo/client'));

const [url, token, count, query, variables] = process.argv.slice(2);
const client = new ApolloClient({
  link: new HttpLink({ uri: url, headers: token ? { Authorization: `Bearer ${token}` } : {} }),
  cache: new InMemoryCache(),
});
const results = [];
const outcome = await new Promise((resolve) => {
  const subscription = client
    .subscribe({ query: gql(query), variables: variables ? JSON.parse(variables) : undefined, fetchPolicy: 'no-cache' })
    .subscribe({
      next: (result) => {
        results.push({ data: result.data ?? null, error: result.error ? String(result.error) : null });
        if (results.length >= Number(count)) {
          subscription.unsubscribe();
          resolve({ completed: false, error: null });
        }
      },
      error: (error) => resolve({ completed: false, error: String(error) }),
      complete: () => resolve({ completed: true, error: null }),
    });
});
client.stop();
process.stdout.write(JSON.stringify({ results, ...outcome }));
