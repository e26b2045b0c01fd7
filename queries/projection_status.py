"""How far each projection has come, against the head of the log."""

from dataclasses import dataclass

from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.persistence.read_store import ReadStore
from orderstream.infrastructure.security.auth import Actor


@dataclass(frozen=True)
class Status:
    name: str
    position: int
    head: int
    rebuilding: bool
    error: str | None

    @property
    def lag(self) -> int:
        return max(self.head - self.position, 0)


async def projection_status(store: EventStore, read: ReadStore, actor: Actor | None) -> list[Status]:
    """Staff only; `actor` None is the command line, run by whoever owns the files."""
    if actor is not None:
        actor.require_staff()
    head = await store.head()
    return [Status(c.name, c.position, head, c.rebuilding, c.error)
            for c in sorted((await read.checkpoints()).values(), key=lambda c: c.name)]
