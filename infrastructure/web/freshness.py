"""How fresh an answer is: `extensions.freshness` on every query's response.

`{"position": ..., "head": ..., "lagSeconds": ...}`, so that a client can show "as of" and
decide whether to pass `consistentWith`:
- `position`: a log position the answer reflects at least. It is the position every read
  model had applied when the query began, or, if the query waited with `consistentWith`,
  the lowest position it waited for, when that is higher. (A query that mixes fields with
  and without `consistentWith` is reported at the position its waits reached.)
- `head`: the log's last position, as the answer is sent;
- `lagSeconds`: how long the read models have lacked the oldest event they lack, as the
  answer is sent, counted from when this process first saw it; 0 when caught up.
Positions are decimal strings, as the schema's Position scalar sends them (and
`consistentWith` takes them).

Everything comes from what the process knows in memory, without a database round trip
per request: the read store's checkpoints (moved by this process's projector, by the
projector process it watches, or by PostgreSQL's notifications), the waits of the query
itself (ReadStore.wait_for notes them in REACHED), this process's commits, and the event
hub's position, which follows the log's head (it is polled, or notified, for other
processes' commits). With the projector in another process on SQLite (`--projector off`),
the checkpoints are learned only when a query waits for one.
"""

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from strawberry.extensions import SchemaExtension
from strawberry.types.graphql import OperationType

from orderstream.infrastructure.live.event_hub import EventHub
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.persistence.read_store import REACHED, ReadStore

MAX_RISES = 10_000


class Freshness:
    """The read models' position against the log's head, and how long they have lagged."""

    def __init__(self, store: EventStore, read: ReadStore, hub: EventHub,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.read, self.hub, self.clock = store, read, hub, clock
        # (head, when first seen) for every rise of the head not yet applied by every read
        # model, oldest first: the first entry past the read models' position dates the
        # oldest event they lack. Emptied as they catch up.
        self._rises: deque[tuple[int, float]] = deque()
        store.on_append(self._seen)

    def _seen(self, head: int) -> None:
        # Bounded: a projector stopped for good would otherwise add one for every commit.
        if (not self._rises or head > self._rises[-1][0]) and len(self._rises) < MAX_RISES:
            self._rises.append((head, self.clock()))

    def position(self) -> int:
        """The position every read model has applied, as this process knows it."""
        positions = self.read.positions
        return min(positions.values()) if positions else 0

    def now(self, reflected: int | None = None) -> dict[str, Any]:
        """`{"position", "head", "lagSeconds"}` as of now; `reflected`: the position to report,
        if not the read models' current one."""
        position = self.position()
        head = max(self.store.known_head, self.hub.position, position)
        self._seen(head)
        rises = self._rises
        while rises and rises[0][0] <= position:
            rises.popleft()
        lag = self.clock() - rises[0][1] if rises else 0.0
        reported = position if reflected is None else reflected
        return {"position": str(reported), "head": str(max(head, reported)), "lagSeconds": round(max(lag, 0.0), 3)}

    def extension(self) -> Callable[[], SchemaExtension]:
        """For `strawberry.Schema(extensions=[...])`."""
        return lambda: FreshnessExtension(self)


class FreshnessExtension(SchemaExtension):
    """Adds `freshness` to the extensions of every query that ran (a document refused before
    execution reflects no read model). To run after web.limits.EnforceBounds, which parses
    the document in its own on_operation."""

    def __init__(self, freshness: Freshness) -> None:
        self.freshness = freshness
        self.began_at: int | None = None  # None: not a query
        self.reached: list[int] = []

    def on_operation(self) -> Iterator[None]:
        context = self.execution_context
        try:
            query = context.graphql_document is not None and context.operation_type == OperationType.QUERY
        except RuntimeError:  # no such operation in the document
            query = False
        if not query:
            yield
            return
        self.began_at = self.freshness.position()
        token = REACHED.set(self.reached)
        try:
            yield
        finally:
            REACHED.reset(token)

    def get_results(self) -> dict[str, Any]:
        # The result is set only once execution has begun: none for a document refused before.
        if self.began_at is None or self.execution_context.result is None:
            return {}
        reflected = max(self.began_at, min(self.reached)) if self.reached else self.began_at
        return {"freshness": self.freshness.now(reflected)}
