// The live order board at /live: a projection of the event log, kept in the browser.
//
// It subscribes to `events` from the start of the log (order and customer events only),
// so that the counters and today's paid total are exact, then stays live. After a dropped
// connection it subscribes again after the last position it applied: the server replays
// what was missed, and a position at or below that one is never applied twice.
// Staff and admins see every order; a customer's token sees that customer's orders only
// (the server filters the events, the page only says so).
import { type Client, createClient } from "graphql-ws";

import "./live.css";

type Status = "PENDING" | "PAID" | "SHIPPED" | "DELIVERED" | "CANCELLED";
const STATUSES: Status[] = ["PENDING", "PAID", "SHIPPED", "DELIVERED", "CANCELLED"];
const STATUS_AFTER: Record<string, Status> = {
  OrderPlaced: "PENDING", OrderPaid: "PAID", OrderShipped: "SHIPPED", OrderDelivered: "DELIVERED",
  OrderCancelled: "CANCELLED",
};
const EVENT_TYPES = [...Object.keys(STATUS_AFTER), "CustomerRegistered", "CustomerForgotten"];
const SUBSCRIPTION = `subscription LiveBoard($after: Position, $types: [String!]) {
  events(after: $after, eventTypes: $types) { position type streamId occurredAt data }
}`;
// Rows shown; every order still counts in the counters and the paid total.
const MAX_ROWS = 200;
const TOKEN_KEY = "orderstream.token";
// Money is summed exactly, in millionths, as BigInt.
const SCALE = 6;

interface LogEvent {
  position: string;
  type: string;
  streamId: string;
  occurredAt: string;
  data: Record<string, any>;
}

interface Order {
  id: string;
  customerId: string;
  total: string;
  currency: string;
  status: Status;
  placedAt: Date;
  placedPosition: number;
  paid?: { amount: string; currency: string };
  row?: HTMLTableRowElement;
  // Changed since its row was last drawn.
  dirty: boolean;
}

const orders = new Map<string, Order>();
const customers = new Map<string, string | null>();
// Day (YYYY-MM-DD in the browser's zone) -> currency -> millionths paid that day.
const paidByDay = new Map<string, Map<string, bigint>>();
let lastPosition = 0;
let client: Client | null = null;
let retryDelay = 250;
let retryTimer: number | undefined;
let renderQueued = false;

const board = document.getElementById("board") as HTMLElement;
const locale = navigator.language;

// ---------------------------------------------------------------- the page

function element<K extends keyof HTMLElementTagNameMap>(tag: K, attributes: Record<string, string> = {},
                                                        ...children: (Node | string)[]): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

const connection = element("span", { id: "connection", "data-state": "idle", role: "status" }, "not connected");
const tokenInput = element("input", { id: "token", type: "password", autocomplete: "off", spellcheck: "false",
                                      placeholder: "paste the output of: orderstream token --role staff" });
const tokenForm = element("form", { id: "token-form" },
  element("label", { for: "token" }, "Token"), tokenInput, element("button", { type: "submit" }, "Connect"),
  element("button", { type: "button", id: "forget" }, "Forget token"));
const message = element("p", { id: "message", role: "alert" });
const audience = element("span", { id: "audience" });
const counters = element("dl", { id: "counters" });
const counterValues = new Map<Status, HTMLElement>();
for (const status of STATUSES) {
  const value = element("dd", { "data-status": status }, "0");
  counterValues.set(status, value);
  counters.append(element("div", { class: "counter" }, element("dt", {}, status), value));
}
const paidToday = element("span", { id: "paid-today" }, "none");
const rows = element("tbody");
const table = element("table", { id: "orders" },
  element("thead", {}, element("tr", {},
    ...["Order", "Customer", "Total", "Status", "Placed"].map((h) => element("th", { scope: "col" }, h)))),
  rows);

board.append(
  element("header", {}, element("h1", {}, "Live orders"), audience, connection),
  tokenForm, message,
  element("section", { "aria-label": "counts" }, counters,
    element("p", { class: "paid" }, "Paid today: ", paidToday)),
  table,
);

function showConnection(state: "idle" | "connecting" | "live" | "disconnected", text: string): void {
  connection.dataset.state = state;
  connection.textContent = text;
}

function showMessage(text: string): void {
  message.textContent = text;
  message.hidden = !text;
}

// ---------------------------------------------------------------- money and days

function toMillionths(amount: string): bigint {
  const negative = amount.startsWith("-");
  const [whole, fraction = ""] = amount.replace(/^[-+]/, "").split(".");
  const value = BigInt(whole || "0") * 10n ** BigInt(SCALE) + BigInt((fraction + "0".repeat(SCALE)).slice(0, SCALE));
  return negative ? -value : value;
}

function fromMillionths(value: bigint): string {
  const negative = value < 0n;
  const digits = (negative ? -value : value).toString().padStart(SCALE + 1, "0");
  return `${negative ? "-" : ""}${digits.slice(0, -SCALE)}.${digits.slice(-SCALE)}`;
}

function formatMoney(amount: string, currency: string): string {
  try {
    // A decimal string keeps every digit (Intl.NumberFormat reads it exactly).
    return new Intl.NumberFormat(locale, { style: "currency", currency }).format(amount as unknown as number);
  } catch {
    return `${amount} ${currency}`;
  }
}

function localDay(date: Date): string {
  const pad = (n: number) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
}

function addPaid(at: Date, currency: string, amount: bigint): void {
  const day = localDay(at);
  const byCurrency = paidByDay.get(day) ?? new Map<string, bigint>();
  byCurrency.set(currency, (byCurrency.get(currency) ?? 0n) + amount);
  paidByDay.set(day, byCurrency);
}

// ---------------------------------------------------------------- applying events

function apply(event: LogEvent): void {
  const position = Number(event.position);
  if (position <= lastPosition) return; // replayed after a reconnect: applied already
  lastPosition = position;
  const at = new Date(event.occurredAt);
  const data = event.data ?? {};
  if (event.type === "CustomerRegistered" || event.type === "CustomerForgotten") {
    customers.set(event.streamId, event.type === "CustomerRegistered" ? data.name ?? null : null);
    for (const order of orders.values()) if (order.customerId === event.streamId) order.dirty = true;
    return;
  }
  const status = STATUS_AFTER[event.type];
  if (status === undefined) return;
  if (event.type === "OrderPlaced") {
    orders.set(event.streamId, {
      id: event.streamId, customerId: data.customer_id, total: data.total, currency: data.currency,
      status, placedAt: at, placedPosition: position, dirty: true,
    });
    return;
  }
  const order = orders.get(event.streamId);
  if (order === undefined) return;
  order.status = status;
  order.dirty = true;
  if (event.type === "OrderPaid") {
    order.paid = { amount: data.amount, currency: data.currency };
    addPaid(at, data.currency, toMillionths(data.amount));
  } else if (event.type === "OrderCancelled" && order.paid) {
    // As the sales report counts it: a paid order cancelled is taken off on the day of cancelling.
    addPaid(at, order.paid.currency, -toMillionths(order.paid.amount));
  }
}

// ---------------------------------------------------------------- rendering, once a frame

function queueRender(): void {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    render();
  });
}

function customerLabel(customerId: string): string {
  const name = customers.get(customerId);
  return name ?? (customers.has(customerId) ? "(forgotten)" : customerId.slice(0, 8));
}

function rowOf(order: Order): HTMLTableRowElement {
  if (order.row && !order.dirty) return order.row;
  const row = order.row ?? element("tr", { "data-order-id": order.id });
  row.dataset.status = order.status;
  row.replaceChildren(
    element("td", { class: "id", title: order.id }, order.id.slice(0, 8)),
    element("td", { class: "customer", title: order.customerId }, customerLabel(order.customerId)),
    element("td", { class: "total" }, formatMoney(order.total, order.currency)),
    element("td", { class: "status" }, element("span", { class: "badge" }, order.status)),
    element("td", { class: "placed" }, order.placedAt.toLocaleString(locale, { dateStyle: "short", timeStyle: "medium" })),
  );
  order.row = row;
  order.dirty = false;
  return row;
}

function render(): void {
  const newest = [...orders.values()].sort((a, b) => b.placedPosition - a.placedPosition).slice(0, MAX_ROWS);
  const shown = new Set(newest);
  for (const order of orders.values()) {
    if (order.row && !shown.has(order)) {
      order.row = undefined;
      order.dirty = true;
    }
  }
  rows.replaceChildren(...newest.map(rowOf));

  const counts = new Map<Status, number>(STATUSES.map((s) => [s, 0]));
  for (const order of orders.values()) counts.set(order.status, (counts.get(order.status) ?? 0) + 1);
  for (const [status, value] of counterValues) value.textContent = String(counts.get(status));

  const today = paidByDay.get(localDay(new Date()));
  const totals = today ? [...today].filter(([, amount]) => amount !== 0n) : [];
  paidToday.textContent = totals.length
    ? totals.map(([currency, amount]) => formatMoney(fromMillionths(amount), currency)).join(" + ")
    : "none";
}

// ---------------------------------------------------------------- the token and the connection

function tokenRole(token: string): string | undefined {
  // For the heading only: the server checks the token on every event it sends.
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload)).role;
  } catch {
    return undefined;
  }
}

function tokenFromFragment(): string | null {
  const fragment = new URLSearchParams(window.location.hash.slice(1));
  const token = fragment.get("token");
  if (token) {
    // Out of the address bar and the history; the fragment never reached the server.
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  return token;
}

function disconnect(): void {
  window.clearTimeout(retryTimer);
  retryTimer = undefined;
  const old = client;
  client = null;
  old?.dispose();
}

function start(token: string): void {
  disconnect();
  // Another token may see other orders: start again from the beginning of the log.
  orders.clear();
  customers.clear();
  paidByDay.clear();
  lastPosition = 0;
  retryDelay = 250;
  render();
  const role = tokenRole(token);
  audience.textContent = role === "customer" ? "your orders only" : role ? `all orders (${role})` : "";
  subscribe(token);
}

function subscribe(token: string): void {
  const url = new URL("/graphql", window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  showConnection("connecting", lastPosition ? "reconnecting…" : "connecting…");
  // No retries inside the client: it would subscribe again with the first `after`. The page
  // subscribes again itself, after the last position it applied.
  const current = createClient({
    url: url.href,
    connectionParams: { authorization: `Bearer ${token}` },
    retryAttempts: 0,
    keepAlive: 10_000,
    on: {
      connected: () => {
        retryDelay = 250;
        showMessage("");
        showConnection("live", "live");
      },
    },
  });
  client = current;
  current.subscribe<{ events: LogEvent }>(
    { query: SUBSCRIPTION, variables: { after: String(lastPosition), types: EVENT_TYPES } },
    {
      next: (result) => {
        if (result.errors?.length) {
          showMessage(result.errors.map((e) => e.message).join("; "));
          return;
        }
        if (result.data) {
          apply(result.data.events);
          queueRender();
        }
      },
      error: (error) => dropped(current, token, error),
      complete: () => dropped(current, token, null),
    },
  );
}

function dropped(which: Client, token: string, error: unknown): void {
  if (which !== client) return; // replaced or stopped on purpose
  const code = (error as CloseEvent | null)?.code;
  if (code === 4401 || code === 4403) {
    disconnect();
    showConnection("disconnected", "disconnected");
    showMessage(code === 4401 ? "The token has expired: paste a new one." :
      `The token was refused (${(error as CloseEvent).reason || "not valid"}): paste another.`);
    return;
  }
  if (Array.isArray(error)) showMessage(error.map((e) => e.message).join("; "));
  showConnection("disconnected", "disconnected: reconnecting…");
  client = null;
  which.dispose();
  retryTimer = window.setTimeout(() => subscribe(token), retryDelay);
  retryDelay = Math.min(retryDelay * 2, 2000);
}

tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const token = tokenInput.value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  tokenInput.value = "";
  start(token);
});
document.getElementById("forget")?.addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  disconnect();
  audience.textContent = "";
  showConnection("idle", "not connected");
});
window.addEventListener("hashchange", () => {
  const token = tokenFromFragment();
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    start(token);
  }
});

const fromFragment = tokenFromFragment();
if (fromFragment) sessionStorage.setItem(TOKEN_KEY, fromFragment);
const token = fromFragment ?? sessionStorage.getItem(TOKEN_KEY);
showMessage(token ? "" : "Paste a staff token to watch orders live (orderstream token --role staff).");
render();
if (token) start(token);
