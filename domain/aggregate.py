import copy
from typing import ClassVar, Self

from orderstream.events import Event


class Aggregate:
    """State rebuilt from a stream of events.

    Every change goes through ``_record``, which applies the event exactly as a replay
    would, so live changes and replays run the same code. ``apply`` assigns attributes and
    never changes in place what one holds (a list, a dict), so that ``copy`` is cheap.
    """

    STREAM_TYPE: ClassVar[str]
    # Streams that grow without bound keep a snapshot every SNAPSHOT_EVERY events, so a
    # load that misses the cache replays at most that many. None: no snapshots (short
    # streams, and personal data that must stay inside its sealed events). Bump
    # SNAPSHOT_SCHEMA when `snapshot()` changes shape: older snapshots are then ignored.
    SNAPSHOT_EVERY: ClassVar[int | None] = None
    SNAPSHOT_SCHEMA: ClassVar[int] = 1

    def __init__(self, id: str) -> None:
        self.id = id
        self.version = 0
        self.pending: list[Event] = []

    def copy(self) -> Self:
        """A separate aggregate in the same state, with nothing pending."""
        clone = copy.copy(self)
        clone.pending = []
        return clone

    def replay(self, event: Event) -> None:
        self.apply(event)
        self.version += 1

    def _record(self, event: Event) -> None:
        self.replay(event)
        self.pending.append(event)

    def apply(self, event: Event) -> None:
        raise NotImplementedError

    def snapshot(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} keeps no snapshots")

    def restore(self, version: int, state: dict) -> None:
        raise NotImplementedError(f"{type(self).__name__} keeps no snapshots")

    @property
    def exists(self) -> bool:
        return self.version > 0
