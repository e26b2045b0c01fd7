from typing import ClassVar

from events import Event


class Aggregate:
    """State rebuilt from a stream of events.

    Every change goes through ``_record``, which applies the event exactly as a replay
    would, so live changes and replays run the same code.
    """

    STREAM_TYPE: ClassVar[str]

    def __init__(self, id: str) -> None:
        self.id = id
        self.version = 0
        self.pending: list[Event] = []

    def replay(self, event: Event) -> None:
        self.apply(event)
        self.version += 1

    def _record(self, event: Event) -> None:
        self.replay(event)
        self.pending.append(event)

    def apply(self, event: Event) -> None:
        raise NotImplementedError

    @property
    def exists(self) -> bool:
        return self.version > 0
