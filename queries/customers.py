"""Customers: one row per registered customer."""

from collections.abc import Sequence

from sqlalchemy import Boolean, Column, Connection, String, Table, bindparam, insert, null, select, true, update
from sqlalchemy.engine import Row

from orderstream import events
from orderstream.infrastructure.persistence.database import UTCDateTime
from orderstream.infrastructure.persistence.event_store import RecordedEvent
from orderstream.infrastructure.persistence.read_store import ReadStore, read_model_metadata
from orderstream.infrastructure.persistence.statements import Statement
from orderstream.infrastructure.projection.projector import Projection, Tables
from orderstream.infrastructure.security.auth import Actor

metadata = read_model_metadata()

customers = Table(
    "customers",
    metadata,
    Column("customer_id", String(36), primary_key=True),
    Column("name", String(200)),
    Column("email", String(254)),
    Column("country", String(2), nullable=False),
    Column("locale", String(35)),
    Column("registered_at", UTCDateTime, nullable=False),
    Column("forgotten", Boolean, nullable=False),
)


_REGISTER = Statement(insert, [column.name for column in customers.columns])
_FORGET = Statement(lambda table: update(table).where(table.c.customer_id == bindparam("forgotten_customer"))
                    .values(name=null(), email=null(), forgotten=true()), ["forgotten_customer"])


def project(conn: Connection, recorded: RecordedEvent, t: Tables) -> None:
    project_many(conn, (recorded,), t)


def project_many(conn: Connection, batch: Sequence[RecordedEvent], t: Tables) -> None:
    """The events of a batch, in order; consecutive registrations go in with one statement."""
    table = t["customers"]
    registered: list[tuple] = []
    for recorded in batch:
        if recorded.type not in ("CustomerRegistered", "CustomerForgotten"):
            continue  # decoding an event costs more than telling it is none of these
        match events.from_data(recorded.type, recorded.schema_version, recorded.data):
            case events.CustomerRegistered() as e:
                registered.append((e.customer_id, e.name, e.email, e.country, e.locale, recorded.recorded_at, False))
            case events.CustomerForgotten() as e:
                _REGISTER.run_many(conn, table, registered)  # before what may change the same rows
                registered = []
                _FORGET.run(conn, table, (e.customer_id,))
    _REGISTER.run_many(conn, table, registered)


PROJECTION = Projection("customers", (customers,), project, project_many)


async def customer(read: ReadStore, actor: Actor, customer_id: str,
                   consistent_with: int | None = None) -> Row | None:
    """Staff, or the customer themself."""
    actor.require_owner_or_staff(customer_id)
    await read.wait_for(consistent_with, ("customers",))
    query = select(customers).where(customers.c.customer_id == customer_id)
    return await read.read(lambda conn: conn.execute(query).first())
