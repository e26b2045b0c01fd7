"""Payment deadlines: an order left unpaid past its due time is cancelled, its stock released.

The deadlines are kept in the log (each OrderPlaced carries its `payment_due_at`) and in
the `payment_deadlines` table, a projection the projector fills and checkpoints like any
other: a row per order whose deadline is still open, gone once the order is paid or
cancelled. Nothing is kept only in memory, so a deadline that fell due while no process
ran fires as soon as one starts.

`PaymentDeadlines.run` sends each due order a `CancelOrder` through the dispatcher, with
the reason PAYMENT_TIMEOUT, the idempotency key `payment-timeout:<orderId>` and the
order's version as placed for expected version. The version decides the race with a late
payment: whichever lands first moves it, and the other is refused. The key makes the
cancel take effect once however many processes, or restarts, send it.
"""

import asyncio
import logging
from collections.abc import Callable, Sequence
from contextlib import suppress
from datetime import datetime

from sqlalchemy import Column, Connection, Index, Integer, String, Table, bindparam, delete, func, insert, select

from orderstream import events
from orderstream.commands.dispatcher import Accepted, Dispatcher
from orderstream.commands.order import CancelOrder
from orderstream.domain.order import PAYMENT_TIMEOUT
from orderstream.infrastructure.persistence.database import UTCDateTime
from orderstream.infrastructure.persistence.event_store import RecordedEvent
from orderstream.infrastructure.persistence.read_store import ReadStore, read_model_metadata
from orderstream.infrastructure.persistence.statements import Statement
from orderstream.infrastructure.projection.projector import Projection, Tables
from orderstream.infrastructure.security.auth import Actor

log = logging.getLogger("orderstream.payment_deadlines")

# The advisory lock that one process per deployment holds (see persistence.postgres.Leadership).
DEADLINES_LOCK = 0x6475652D6174  # "due-at"
# Who the cancels are recorded as sent by; their idempotency keys are scoped to it.
ACTOR = Actor(subject="payment-deadlines", role="staff")

metadata = read_model_metadata()

payment_deadlines = Table(
    "payment_deadlines",
    metadata,
    Column("order_id", String(36), primary_key=True),
    Column("due_at", UTCDateTime, nullable=False),
    # The order's version as placed: a cancel at any other version is refused.
    Column("placed_version", Integer, nullable=False),
    Index(None, "due_at"),
)


_OPEN = Statement(insert, [column.name for column in payment_deadlines.columns])
_CLOSE = Statement(lambda table: delete(table).where(table.c.order_id == bindparam("closed_order")),
                   ["closed_order"])


def project(conn: Connection, recorded: RecordedEvent, t: Tables) -> None:
    project_many(conn, (recorded,), t)


def project_many(conn: Connection, batch: Sequence[RecordedEvent], t: Tables) -> None:
    """The deadlines a batch opens and closes, each kind with one statement. A deadline
    opened and closed within the batch is never written."""
    opened: dict[str, tuple[str, datetime, int]] = {}
    closed: list[tuple[str]] = []
    for recorded in batch:
        if recorded.stream_type != "Order" or recorded.type not in ("OrderPlaced", "OrderPaid", "OrderCancelled"):
            continue  # decoding an event costs more than telling it is none of these
        match events.from_data(recorded.type, recorded.schema_version, recorded.data):
            case events.OrderPlaced(payment_due_at=str(due)):
                opened[recorded.stream_id] = (recorded.stream_id, datetime.fromisoformat(due), recorded.version)
            case events.OrderPaid() | events.OrderCancelled():
                if opened.pop(recorded.stream_id, None) is None:
                    closed.append((recorded.stream_id,))
    _CLOSE.run_many(conn, t["payment_deadlines"], closed)
    _OPEN.run_many(conn, t["payment_deadlines"], list(opened.values()))


PROJECTION = Projection("payment_deadlines", (payment_deadlines,), project, project_many)

_DUE = (select(payment_deadlines).where(payment_deadlines.c.due_at <= bindparam("now"))
        .order_by(payment_deadlines.c.due_at).limit(bindparam("limit")))
_NEXT = select(func.min(payment_deadlines.c.due_at))


def cancel(order_id: str, placed_version: int) -> CancelOrder:
    """The cancel a passed deadline sends: the same command every time, for the same order."""
    return CancelOrder(order_id, PAYMENT_TIMEOUT, expected_version=placed_version,
                       idempotency_key=f"payment-timeout:{order_id}")


class PaymentDeadlines:
    """Cancels the orders whose deadline has passed, by `clock`, until stopped."""

    def __init__(self, read: ReadStore, dispatcher: Dispatcher, clock: Callable[[], datetime],
                 poll_interval: float = 1.0, batch_size: int = 100) -> None:
        """`poll_interval`: the longest wait between two looks at the deadlines, in seconds."""
        self.read, self.dispatcher, self.clock = read, dispatcher, clock
        self.poll_interval, self.batch_size = poll_interval, batch_size
        # Orders sent their cancel whose row the projector has not removed yet: not sent
        # again meanwhile. Only a saving: sent again, the cancel would change nothing.
        self._sent: set[str] = set()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()

    def wake(self, _moved: object = None) -> None:
        """Called when the projections move: a deadline may have come or gone."""
        self._wake.set()

    def stop(self) -> None:
        """Let `run` return after the cancel in hand."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Cancel what is due now, then wait for the next deadline (at most `poll_interval`).
        A `stop` before the start counts: the next `run` starts afresh."""
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                try:
                    if await self.cancel_due() >= self.batch_size:
                        continue
                    pause = await self._until_next()
                except Exception:
                    log.exception("payment deadlines: a pass failed; trying again in %.1f s", self.poll_interval)
                    pause = self.poll_interval
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), pause)
        finally:
            self._stopping.clear()

    async def cancel_due(self) -> int:
        """Send the cancel of every order due by now (a batch at most); how many were sent."""
        now = self.clock()
        due = await self.read.read(lambda conn: conn.execute(_DUE, {"now": now, "limit": self.batch_size}).all())
        self._sent &= {row.order_id for row in due}
        sent = 0
        for row in due:
            if self._stopping.is_set():
                break
            if row.order_id in self._sent:
                continue
            outcome = await self.dispatcher.execute(cancel(row.order_id, row.placed_version), ACTOR)
            self._sent.add(row.order_id)
            sent += 1
            if isinstance(outcome, Accepted):
                log.info("order %s: unpaid at %s, cancelled (%s)", row.order_id, row.due_at.isoformat(),
                         PAYMENT_TIMEOUT)
            else:  # paid (or cancelled) first: the order moved on
                log.debug("order %s: its deadline passed after it moved on (%s)", row.order_id, outcome.code)
        return sent

    async def _until_next(self) -> float:
        """Seconds until the next deadline, at most `poll_interval`."""
        following = await self.read.read(lambda conn: conn.execute(_NEXT).scalar())
        if following is None:
            return self.poll_interval
        return min(max((following - self.clock()).total_seconds(), 0.01), self.poll_interval)

