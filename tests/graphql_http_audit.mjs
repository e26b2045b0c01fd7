// Runs the server audits of the graphql-http package against a GraphQL endpoint and
// writes their results to stdout as one JSON array of {id, name, status, reason}.
//
// Usage: node graphql_http_audit.mjs <folder graphql-http is installed in> <url>

import { createRequire } from 'node:module';
import { join } from 'node:path';

const [installFolder, url] = process.argv.slice(2);
const require = createRequire(join(installFolder, 'package.json'));
const { serverAudits } = require('graphql-http');

const results = [];
for (const audit of serverAudits({ url })) {
  try {
    const { id, name, status, reason } = await audit.fn();
    results.push({ id, name, status, reason: reason ?? null });
  } catch (error) {
    // Not a failed assertion but a crash of the audit itself, e.g. a refused connection.
    results.push({ id: audit.id, name: audit.name, status: 'error', reason: String(error) });
  }
}
process.stdout.write(JSON.stringify(results));
