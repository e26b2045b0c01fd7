"""The events kept after a commit are served from either end of what is kept: every
position asked for, every limit, the same events as the log's own order gives."""

from datetime import UTC, datetime

from orderstream.infrastructure.persistence.log import RecordedEvent
from orderstream.infrastructure.persistence.recent_events import RecentEvents


def recorded(position: int) -> RecordedEvent:
    return RecordedEvent(position, f"id-{position}", "s", "Counter", position, "Counted", 1, {"n": position},
                         None, None, None, None, datetime(2026, 1, 1, tzinfo=UTC))


def test_any_position_and_limit_gives_the_kept_events_in_order():
    # Capacity 50 after 120 events: positions 71..120 kept.
    recent = RecentEvents(50)
    for first in range(1, 121, 7):
        recent.remember([recorded(p) for p in range(first, min(first + 7, 121))])

    for after in range(0, 125):
        for limit in (1, 3, 20, 49, 50, 1000):
            found = recent.after(after, limit)
            if not 70 <= after < 120:
                assert found is None, (after, limit)
                continue
            assert [e.position for e in found] == list(range(after + 1, min(after + limit, 120) + 1)), (after, limit)


def test_a_new_run_and_a_clear_leave_nothing_older_to_serve():
    recent = RecentEvents(10)
    recent.remember([recorded(p) for p in (1, 2, 3)])
    recent.remember([recorded(p) for p in (7, 8)])  # not following 3: a new run
    assert recent.after(2, 10) is None
    assert [e.position for e in recent.after(6, 10)] == [7, 8]
    recent.clear()
    assert recent.after(6, 10) is None
