"""How fresh an answer is: `extensions.freshness` on every query's response.

`{"position": <the log position every read model has applied>, "head": <the log's last
position>, "lagSeconds": <seconds since the oldest event not yet applied was first seen;
0 when caught up>}`, so that a client can show "as of" and decide whether to pass
`consistentWith`. Positions are decimal strings, as the schema's Position scalar sends
them (and `consistentWith` takes them). The position is taken as the answer is completed: a query that passed
`consistentWith: P` reports P or later.

Everything comes from what the process knows in memory, without a database round trip
per request: the read store's checkpoints (moved by this process's projector, by the
projector process it watches, or by PostgreSQL's notifications), this process's commits,
and the event hub's position, which follows the log's head (it is polled, or notified, for
other processes' commits). With the projector in another process on SQLite (`--projector
off`), the checkpoints are learned only when a query waits for one.
"""

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from strawberry.extensions import SchemaExtension
from strawberry.types.graphql import OperationType

from orderstream.infrastructure.live.event_hub import EventHub
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.persistence.read_store import ReadStore

MAX_RISES = 10_000


class Freshness:
    """The read models' position against the log's head, and how long they have lagged."""

    def __init__(self, store: EventStore, read: ReadStore, hub: EventHub,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.read, self.hub, self.clock = read, hub, clock
        self._committed = 0  # this process's last commit
        # (head, when first seen) for every rise of the head not yet applied by every read
        # model, oldest first: the first entry past the read models' position dates the
        # oldest event they lack. Emptied as they catch up.
        self._rises: deque[tuple[int, float]] = deque()
        store.on_append(self._appended)

    def _appended(self, position: int) -> None:
        self._committed = max(self._committed, position)
        self._seen(position)

    def _seen(self, head: int) -> None:
        # Bounded: a projector stopped for good would otherwise add one for every commit.
        if (not self._rises or head > self._rises[-1][0]) and len(self._rises) < MAX_RISES:
            self._rises.append((head, self.clock()))

    def now(self) -> dict[str, Any]:
        """`{"position", "head", "lagSeconds"}` as of now."""
        positions = self.read.positions
        position = min(positions.values()) if positions else 0
        head = max(self._committed, self.hub.position, position)
        self._seen(head)
        rises = self._rises
        while rises and rises[0][0] <= position:
            rises.popleft()
        lag = self.clock() - rises[0][1] if rises else 0.0
        return {"position": str(position), "head": str(head), "lagSeconds": round(max(lag, 0.0), 3)}

    def extension(self) -> Callable[[], SchemaExtension]:
        """For `strawberry.Schema(extensions=[...])`."""
        return lambda: FreshnessExtension(self)


class FreshnessExtension(SchemaExtension):
    """Adds `freshness` to the extensions of every query that ran (a document refused before
    execution reflects no read model)."""

    def __init__(self, freshness: Freshness) -> None:
        self.freshness = freshness

    def get_results(self) -> dict[str, Any]:
        context = self.execution_context
        if context.result is None:  # refused before execution: strawberry sets the result as it executes
            return {}
        return {"freshness": self.freshness.now()} if context.operation_type == OperationType.QUERY else {}
