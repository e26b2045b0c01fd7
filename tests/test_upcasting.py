"""Events evolve (guarantee 9): a payload stored under an old schema version is upcast step
by step to the current shape when read, so an old log replays under new code."""

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar

import pytest

from orderstream.events import EVENT_TYPES, Event, UpcastContext, from_data
from orderstream.infrastructure.persistence.event_store import NewEvent, StreamWrite


@dataclass(frozen=True)
class ContactChanged(Event):
    """A payload that changed twice: v1 had `name`, v2 split it, v3 added `country`."""

    SCHEMA_VERSION: ClassVar[int] = 3
    first_name: str
    last_name: str
    country: str


TYPES = {**EVENT_TYPES, "ContactChanged": ContactChanged}


def split_name(data: dict, _context: UpcastContext) -> dict:
    first, _, last = data["name"].partition(" ")
    return {"first_name": first, "last_name": last}


UPCASTERS = {
    ("ContactChanged", 1): split_name,
    ("ContactChanged", 2): lambda data, _context: {**data, "country": "DE"},
}
CONTEXT = UpcastContext(datetime(2026, 3, 2, tzinfo=UTC), payment_timeout=None)


@pytest.mark.parametrize(("version", "stored"), [
    (1, {"name": "Ann Example"}),
    (2, {"first_name": "Ann", "last_name": "Example"}),
    (3, {"first_name": "Ann", "last_name": "Example", "country": "DE"}),
])
def test_every_old_version_reads_as_the_current_shape(version, stored):
    assert from_data("ContactChanged", version, stored, TYPES, UPCASTERS, CONTEXT) == \
        ContactChanged("Ann", "Example", "DE")


def test_a_missing_step_or_a_newer_payload_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match="ContactChanged v2 has no upcaster to v3"):
        from_data("ContactChanged", 1, {"name": "Ann Example"}, TYPES, {("ContactChanged", 1): split_name}, CONTEXT)
    with pytest.raises(ValueError, match="newer than this code's v3: deploy the newer code"):
        from_data("ContactChanged", 4, {}, TYPES, UPCASTERS)
    with pytest.raises(ValueError, match="ContactChanged v1 needs upcasting with the time it occurred"):
        from_data("ContactChanged", 1, {"name": "Ann Example"}, TYPES, UPCASTERS)


async def test_an_old_log_replays_under_new_code(store):
    await store.append([StreamWrite("contact-1", "Contact", 0, [
        NewEvent("ContactChanged", {"name": "Ann Example"}, schema_version=1),
        NewEvent("ContactChanged", {"first_name": "Bob", "last_name": "Sample"}, schema_version=2),
    ])])

    replayed = [from_data(e.type, e.schema_version, e.data, TYPES, UPCASTERS, UpcastContext(e.recorded_at, None))
                for e in await store.load("contact-1")]

    assert replayed == [ContactChanged("Ann", "Example", "DE"), ContactChanged("Bob", "Sample", "DE")]
