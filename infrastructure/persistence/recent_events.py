"""The latest events of the log kept in memory, so that the projector and the event hub
read a commit right after it without a trip to the database."""

import itertools
from collections import deque
from collections.abc import Sequence

from orderstream.infrastructure.persistence.log import RecordedEvent


class RecentEvents:
    """A run of committed events at consecutive positions: the latest this process
    committed, or was given by `remember`."""

    def __init__(self, capacity: int) -> None:
        self._events: deque[RecordedEvent] = deque(maxlen=capacity)

    def after(self, after: int, limit: int) -> list[RecordedEvent] | None:
        """Up to `limit` events after position `after`; None if those kept do not reach
        back to `after`."""
        kept = self._events
        if not (kept and kept[0].position - 1 <= after < kept[-1].position):
            return None
        # Every position is taken by one event, so the ones kept here from `after` on are
        # the log's own (perhaps not all of it: another process may have appended since;
        # the caller reads on from the last one).
        start = after + 1 - kept[0].position
        stop = min(start + limit, len(kept))
        if start <= len(kept) - start:
            return list(itertools.islice(kept, start, stop))
        # Readers mostly ask for the newest few of thousands kept: walked to from the
        # right, not past every older one from the left.
        found = list(itertools.islice(reversed(kept), len(kept) - stop, len(kept) - start))
        found.reverse()
        return found

    def remember(self, events: Sequence[RecordedEvent]) -> None:
        """Keep committed events, consecutive in the log. Events that do not follow the
        ones kept start a new run; none at all (a commit whose events were not given, such
        as one that destroyed a key) leave nothing kept: what was may hold personal data
        no longer readable in the log."""
        kept = self._events
        if not events or kept and kept[-1].position + 1 != events[0].position:
            kept.clear()
        kept.extend(events)

    def clear(self) -> None:
        """Forget every event kept: what they hold is unsealed, and a key destroyed since
        must leave it unreadable here too, as in the log."""
        self._events.clear()
