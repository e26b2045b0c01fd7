// GraphiQL for /graphql, with every script, style and font served by the service itself.
// Queries and mutations go over HTTP; subscriptions over graphql-transport-ws, with the
// Headers tab as the connection_init payload (a browser cannot set headers on a WebSocket).
import { explorerPlugin } from "@graphiql/plugin-explorer";
import { createGraphiQLFetcher, type Fetcher } from "@graphiql/toolkit";
import { setNonce } from "get-nonce";
import { GraphiQL } from "graphiql";
import { type DocumentNode, parse } from "graphql";
import { createRoot } from "react-dom/client";

import "graphiql/graphiql.css";
import "@graphiql/plugin-explorer/dist/style.css";
import "./playground.css";

const root = document.getElementById("graphiql") as HTMLElement;
// GraphiQL's menus and dialogs add a <style> element while open: with the nonce that the
// page's Content-Security-Policy allows for this response.
if (root.dataset.styleNonce) setNonce(root.dataset.styleNonce);
// Set by the server, in development only: where a token comes from.
const headersHint = root.dataset.headersHint ?? "";
const endpoint = new URL(root.dataset.endpoint ?? "/graphql", window.location.href);
const socket = new URL(endpoint);
socket.protocol = endpoint.protocol === "https:" ? "wss:" : "ws:";

// In production the server runs a request over HTTP only if it carries a header that a
// page on another site could not send without the browser asking first (CSRF).
const send = createGraphiQLFetcher({
  url: endpoint.href,
  subscriptionUrl: socket.href,
  headers: { "GraphQL-Require-Preflight": "1" },
});

// The hint, left as it was, is no token: it is not sent, so that queries which need no
// token still run before one is pasted.
const hintedAuthorization = headersHint ? JSON.parse(headersHint).Authorization : undefined;
const fetcher: Fetcher = (params, options) => {
  const headers = { ...(options?.headers ?? {}) };
  if (hintedAuthorization !== undefined && headers.Authorization === hintedAuthorization) {
    delete headers.Authorization;
  }
  // The document as sent decides between HTTP and WebSocket: GraphiQL's own parse of the
  // editor lags a keystroke behind, and a subscription run at once went out over HTTP.
  return send(params, { ...options, headers, documentAST: parsed(params.query) ?? options?.documentAST });
};

function parsed(query: string): DocumentNode | undefined {
  try {
    return parse(query);
  } catch {
    return undefined;
  }
}

const plugins = [explorerPlugin()];
const defaultQuery = `# orderstream: queries and mutations run over HTTP, subscriptions over WebSocket.
# Commands and most queries need a token in the Headers tab below:
#   orderstream token --role staff
# Run with Ctrl-Enter; the Docs and the Explorer on the left show every type and field.

query Catalogue {
  products(first: 10) {
    totalCount
    edges { node { sku name price { formatted } stockAvailable } }
  }
}

subscription Live {
  events { position type streamId occurredAt data }
}
`;

createRoot(root).render(
  <GraphiQL
    fetcher={fetcher}
    plugins={plugins}
    defaultQuery={defaultQuery}
    defaultHeaders={headersHint || undefined}
    defaultEditorToolsVisibility={headersHint ? "headers" : undefined}
    shouldPersistHeaders={false}
  />,
);
