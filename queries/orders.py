"""Orders with their lines: one order's details, and a customer's orders newest first."""

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    bindparam,
    func,
    insert,
    null,
    select,
    update,
)
from sqlalchemy.engine import Row

from orderstream import events
from orderstream.infrastructure.errors import BadUserInput
from orderstream.infrastructure.persistence.database import UTCDateTime
from orderstream.infrastructure.persistence.event_store import EventStore, RecordedEvent
from orderstream.infrastructure.persistence.read_store import ReadStore, read_model_metadata
from orderstream.infrastructure.persistence.statements import Statement
from orderstream.infrastructure.projection.projector import Projection, Tables
from orderstream.infrastructure.security.auth import Actor
from orderstream.queries.pagination import decode_cursor, encode_cursor, page_size

metadata = read_model_metadata()

orders = Table(
    "orders",
    metadata,
    Column("order_id", String(36), primary_key=True),
    Column("customer_id", String(36), nullable=False),
    Column("status", String(10), nullable=False),
    Column("total", String(32), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("ship_name", String(200)),
    Column("ship_line1", String(200)),
    Column("ship_line2", String(200)),
    Column("ship_city", String(100)),
    Column("ship_postal_code", String(20)),
    Column("ship_country", String(2)),
    Column("tracking_number", String(100)),
    Column("cancel_reason", String(500)),
    Column("placed_at", UTCDateTime, nullable=False),
    # The OrderPlaced position: a stable, unique sort key for the customer's list.
    Column("placed_position", BigInteger, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("version", Integer, nullable=False),
    # Unpaid by then, the order is cancelled; NULL: no deadline. Last, where migration 0004
    # adds it: a rebuild makes the table in this order.
    Column("payment_due_at", UTCDateTime),
    Index(None, "customer_id", "placed_position"),
    Index(None, "customer_id", "status", "placed_position"),
)

order_lines = Table(
    "order_lines",
    metadata,
    Column("order_id", String(36), nullable=False),
    Column("line_no", Integer, nullable=False),
    Column("sku", String(64), nullable=False),
    Column("name", String(200), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("unit_price", String(32), nullable=False),
    Column("currency", String(3), nullable=False),
    PrimaryKeyConstraint("order_id", "line_no"),
)


def placed(recorded: RecordedEvent, e: events.OrderPlaced) -> tuple[dict, list[dict]]:
    """The order's row and its lines as OrderPlaced leaves them."""
    address = e.shipping_address or {}
    row = {
        "order_id": e.order_id, "customer_id": e.customer_id, "status": "PENDING",
        "total": e.total, "currency": e.currency,
        "ship_name": address.get("name"), "ship_line1": address.get("line1"),
        "ship_line2": address.get("line2"), "ship_city": address.get("city"),
        "ship_postal_code": address.get("postal_code"), "ship_country": address.get("country"),
        "tracking_number": None, "cancel_reason": None, "placed_at": recorded.recorded_at,
        "payment_due_at": datetime.fromisoformat(e.payment_due_at) if e.payment_due_at else None,
        "placed_position": recorded.position, "updated_at": recorded.recorded_at,
        "version": recorded.version,
    }
    lines = [
        {"order_id": e.order_id, "line_no": number, "sku": line["sku"], "name": line["name"],
         "quantity": line["quantity"], "unit_price": line["unit_price"], "currency": e.currency}
        for number, line in enumerate(e.lines, start=1)
    ]
    return row, lines


def changes(recorded: RecordedEvent, event: events.Event) -> dict[str, Any] | None:
    """What a later event of the order changes in its row; None for other events."""
    match event:
        case events.OrderPaid():
            change = {"status": "PAID"}
        case events.OrderShipped():
            change = {"status": "SHIPPED", "tracking_number": event.tracking_number}
        case events.OrderDelivered():
            change = {"status": "DELIVERED"}
        case events.OrderCancelled():
            change = {"status": "CANCELLED", "cancel_reason": event.reason}
        case _:
            return None
    return {**change, "updated_at": recorded.recorded_at, "version": recorded.version}


SHIPPING_ADDRESS = ("ship_name", "ship_line1", "ship_line2", "ship_city", "ship_postal_code", "ship_country")
ORDER_COLUMNS = tuple(column.name for column in orders.columns)
LINE_COLUMNS = tuple(column.name for column in order_lines.columns)

_PLACE = Statement(insert, ORDER_COLUMNS)
_ADD_LINES = Statement(insert, LINE_COLUMNS)
_FORGET_ADDRESSES = Statement(
    lambda table: update(table).where(table.c.customer_id == bindparam("forgotten_customer"))
    .values(dict.fromkeys(SHIPPING_ADDRESS, null())), ["forgotten_customer"])


def project(conn: Connection, recorded: RecordedEvent, t: Tables) -> None:
    project_many(conn, (recorded,), t)


def project_many(conn: Connection, batch: Sequence[RecordedEvent], t: Tables) -> None:
    """The events of a batch, in order. Each later event of an order sets its row's columns
    to values of its own, so the changes to one order fold into one (into its new row, if
    the batch placed it); rows, lines and changes are written with one statement per table
    and kind of change, before what touches many rows (CustomerForgotten) and at the end."""
    rows: dict[str, dict] = {}
    lines: list[dict] = []
    changed: dict[str, dict] = {}
    for recorded in batch:
        if recorded.type != "CustomerForgotten" and recorded.stream_type != "Order":
            continue
        event = events.from_data(recorded.type, recorded.schema_version, recorded.data)
        if isinstance(event, events.OrderPlaced):
            row, its_lines = placed(recorded, event)
            rows[row["order_id"]] = row
            lines += its_lines
        elif isinstance(event, events.CustomerForgotten):
            _write(conn, t, rows, lines, changed)  # before what may change the same rows
            rows, lines, changed = {}, [], {}
            _FORGET_ADDRESSES.run(conn, t["orders"], (recorded.stream_id,))
        elif (change := changes(recorded, event)) is not None:
            if (row := rows.get(recorded.stream_id)) is not None:
                row.update(change)
            else:
                changed.setdefault(recorded.stream_id, {}).update(change)
    _write(conn, t, rows, lines, changed)


_order_row = itemgetter(*ORDER_COLUMNS)
_line_row = itemgetter(*LINE_COLUMNS)


def _write(conn: Connection, t: Tables, rows: dict[str, dict], lines: list[dict],
           changed: dict[str, dict]) -> None:
    _PLACE.run_many(conn, t["orders"], [_order_row(row) for row in rows.values()])
    _ADD_LINES.run_many(conn, t["order_lines"], [_line_row(line) for line in lines])
    by_columns: dict[tuple[str, ...], list[tuple]] = {}
    for order_id, change in changed.items():
        columns = tuple(sorted(change))
        by_columns.setdefault(columns, []).append((order_id, *(change[column] for column in columns)))
    for columns, params in by_columns.items():
        _change(columns).run_many(conn, t["orders"], params)


@functools.cache
def _change(columns: tuple[str, ...]) -> Statement:
    """The update of an order's `columns`, made once per set of columns (a few kinds of
    change: see `changes`); its parameters are the order's id, then the columns' values."""
    return Statement(lambda table: update(table).where(table.c.order_id == bindparam("changed_order")).values(
        {column: bindparam(f"new_{column}") for column in columns}),
        ["changed_order", *(f"new_{column}" for column in columns)])


PROJECTION = Projection("orders", (orders, order_lines), project, project_many)


@dataclass(frozen=True)
class OrderView:
    """An order row with its lines, from the read model or folded from the log."""

    row: Any
    lines: list[Any] | None = None  # None: load them (batched) when asked


@dataclass(frozen=True)
class Page:
    orders: list[OrderView]
    cursors: list[str]
    total: int
    has_next: bool


# The query behind every order(id) and read-your-writes check: built once.
_ORDER = select(orders).where(orders.c.order_id == bindparam("order_id"))


def _order_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise BadUserInput("orderId must be a UUID") from None


async def order(read: ReadStore, actor: Actor, order_id: str,
                consistent_with: int | None = None) -> OrderView | None:
    """Staff, or the order's customer."""
    actor.require_signed_in()
    order_id = _order_id(order_id)
    await read.wait_for(consistent_with, ("orders",))
    row = await read.read(lambda conn: conn.execute(_ORDER, {"order_id": order_id}).first())
    if row is None:
        return None
    actor.require_owner_or_staff(row.customer_id)
    return OrderView(_Record(row._asdict()))


def next_state(view: OrderView, recorded: RecordedEvent) -> OrderView | None:
    """The order as `recorded` leaves it, from its state just before; None if the event is not
    one of the order's later changes."""
    change = changes(recorded, events.from_data(recorded.type, recorded.schema_version, recorded.data))
    if change is None:
        return None
    return OrderView(_Record({**view.row, **change}), view.lines)


async def customer_orders(read: ReadStore, actor: Actor, customer_id: str, first: int | None,
                          after: str | None, status: str | None = None,
                          consistent_with: int | None = None) -> Page:
    """A customer's orders, newest first; cursors stay valid while new orders arrive."""
    actor.require_owner_or_staff(customer_id)
    first = page_size(first)
    before_position = decode_cursor(after, int)
    where = [orders.c.customer_id == customer_id]
    if status is not None:
        where.append(orders.c.status == status)
    await read.wait_for(consistent_with, ("orders",))
    query = select(orders).where(*where).order_by(orders.c.placed_position.desc()).limit(first + 1)
    if before_position is not None:
        query = query.where(orders.c.placed_position < before_position)

    def page(conn: Connection) -> tuple[int, list[Row]]:
        # One snapshot: the count and the page agree.
        return (conn.execute(select(func.count()).select_from(orders).where(*where)).scalar_one(),
                conn.execute(query).all())

    total, rows = await read.read(page)
    return Page([OrderView(row) for row in rows[:first]],
                [encode_cursor(row.placed_position) for row in rows[:first]], total, len(rows) > first)


async def lines_of(read: ReadStore, order_ids: list[str]) -> list[list[Row]]:
    """The lines of many orders in one query (the DataLoader's batch function)."""
    query = (select(order_lines).where(order_lines.c.order_id.in_(order_ids))
             .order_by(order_lines.c.order_id, order_lines.c.line_no))
    rows = await read.read(lambda conn: conn.execute(query).all())
    by_order: dict[str, list[Row]] = {order_id: [] for order_id in order_ids}
    for row in rows:
        by_order[row.order_id].append(row)
    return [by_order[order_id] for order_id in order_ids]


async def order_as_of(store: EventStore, actor: Actor, order_id: str, at: datetime) -> OrderView | None:
    """The order as it stood at `at`, replayed from its stream in the log."""
    actor.require_signed_in()
    history = await store.load(_order_id(order_id), until=at)
    if not history or history[0].stream_type != "Order":
        return None
    first = events.from_data(history[0].type, history[0].schema_version, history[0].data)
    row, lines = placed(history[0], first)
    actor.require_owner_or_staff(row["customer_id"])
    for recorded in history[1:]:
        change = changes(recorded, events.from_data(recorded.type, recorded.schema_version, recorded.data))
        row.update(change or {})
    return OrderView(_Record(row), [_Record(line) for line in lines])


class _Record(dict):
    """A dict readable like a database row (`record.status`)."""

    __getattr__ = dict.__getitem__
