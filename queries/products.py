"""The product catalogue: price, stock available and reserved, searchable by name."""

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Column, Connection, Integer, String, Table, bindparam, func, insert, select, update
from sqlalchemy.engine import Row

from orderstream import events
from orderstream.infrastructure.errors import BadUserInput
from orderstream.infrastructure.persistence.database import UTCDateTime
from orderstream.infrastructure.persistence.event_store import RecordedEvent
from orderstream.infrastructure.persistence.read_store import ReadStore, read_model_metadata
from orderstream.infrastructure.persistence.statements import Statement
from orderstream.infrastructure.projection.projector import Projection, Tables
from orderstream.queries.pagination import decode_cursor, encode_cursor, page_size

metadata = read_model_metadata()

products = Table(
    "products",
    metadata,
    Column("sku", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    # casefold()ed name: search matches case-insensitively, beyond ASCII too.
    Column("name_folded", String(200), nullable=False),
    Column("price", String(32), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("stock_available", Integer, nullable=False),
    Column("stock_reserved", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

MAX_SEARCH_WORDS = 10


_ADD = Statement(insert, [column.name for column in products.columns])
_CHANGE_PRICE = Statement(
    lambda table: update(table).where(table.c.sku == bindparam("changed_sku")).values(
        price=bindparam("new_price"), currency=bindparam("new_currency"), version=bindparam("new_version"),
        updated_at=bindparam("changed_at")),
    ["changed_sku", "new_price", "new_currency", "new_version", "changed_at"])
# Every stock movement (one per order line).
_MOVE_STOCK = Statement(
    lambda table: update(table).where(table.c.sku == bindparam("moved_sku")).values(
        stock_available=table.c.stock_available + bindparam("available"),
        stock_reserved=table.c.stock_reserved + bindparam("reserved"),
        version=bindparam("moved_version"), updated_at=bindparam("moved_at")),
    ["moved_sku", "available", "reserved", "moved_version", "moved_at"])


def project(conn: Connection, recorded: RecordedEvent, t: Tables) -> None:
    project_many(conn, (recorded,), t)


def project_many(conn: Connection, batch: Sequence[RecordedEvent], t: Tables) -> None:
    """The events of a batch, in order; consecutive stock movements (with what this
    projection ignores in between) in one statement, not one per order line."""
    table = t["products"]
    moves: list[tuple] = []
    for recorded in batch:
        if recorded.stream_type != "Product":
            continue  # decoding an event costs more than telling it is not a product's
        event = events.from_data(recorded.type, recorded.schema_version, recorded.data)
        if (moved := _stock_movement(recorded, event)) is not None:
            moves.append(moved)
            continue
        _MOVE_STOCK.run_many(conn, table, moves)  # before what may change the same rows
        moves = []
        if isinstance(event, events.ProductAdded):
            _ADD.run(conn, table, (event.sku, event.name, event.name.casefold(), event.price, event.currency,
                                   event.initial_stock, 0, recorded.version, recorded.recorded_at))
        elif isinstance(event, events.ProductPriceChanged):
            _CHANGE_PRICE.run(conn, table, (recorded.stream_id, event.price, event.currency, recorded.version,
                                            recorded.recorded_at))
    _MOVE_STOCK.run_many(conn, table, moves)


def _stock_movement(recorded: RecordedEvent, event: events.Event) -> tuple | None:
    """The parameters of `_MOVE_STOCK` for a stock movement; None for other events."""
    match event:
        case events.ProductRestocked():
            available, reserved = event.quantity, 0
        case events.StockReserved():
            available, reserved = -event.quantity, event.quantity
        case events.StockReleased():
            available, reserved = event.quantity, -event.quantity
        case _:
            return None
    return recorded.stream_id, available, reserved, recorded.version, recorded.recorded_at


PROJECTION = Projection("products", (products,), project, project_many)


@dataclass(frozen=True)
class Page:
    rows: list[Row]
    cursors: list[str]
    total: int
    has_next: bool


async def product(read: ReadStore, sku: str, consistent_with: int | None = None) -> Row | None:
    await read.wait_for(consistent_with, ("products",))
    query = select(products).where(products.c.sku == sku)
    return await read.read(lambda conn: conn.execute(query).first())


async def search_products(read: ReadStore, first: int | None, after: str | None, search: str | None,
                          consistent_with: int | None = None) -> Page:
    """Products by SKU; with `search`, only those whose name holds every word of it."""
    first = page_size(first)
    after_sku = decode_cursor(after, str)
    words = (search or "").casefold().split()
    if len(words) > MAX_SEARCH_WORDS or any(len(word) > 100 for word in words):
        raise BadUserInput(f"search takes at most {MAX_SEARCH_WORDS} words of up to 100 characters")
    matching = [products.c.name_folded.contains(word, autoescape=True) for word in words]
    await read.wait_for(consistent_with, ("products",))
    query = select(products).where(*matching).order_by(products.c.sku).limit(first + 1)
    if after_sku is not None:
        query = query.where(products.c.sku > after_sku)

    def page(conn: Connection) -> tuple[int, list[Row]]:
        # One snapshot: the count and the page agree.
        return (conn.execute(select(func.count()).select_from(products).where(*matching)).scalar_one(),
                conn.execute(query).all())

    # The count (and a search by name) reads the whole catalogue.
    total, rows = await read.scan(page)
    return Page(rows[:first], [encode_cursor(row.sku) for row in rows[:first]], total,
                len(rows) > first)
