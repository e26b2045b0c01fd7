"""The domain events: one frozen dataclass per event type, past tense, flat fields.

Money travels as a decimal string plus an ISO-4217 code, never as a float. Fields named
in an event's ``PERSONAL`` are sealed with the key of the customer named by ``SUBJECT``
before they reach the log (see ``infrastructure.persistence.personal_data``); an event with ``SHREDS``
destroys that key as it is appended, and from then on those fields read back as ``None``.
"""

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, ClassVar


@dataclass(frozen=True)
class Event:
    SCHEMA_VERSION: ClassVar[int] = 1
    PERSONAL: ClassVar[tuple[str, ...]] = ()
    SUBJECT: ClassVar[str | None] = None
    # The field naming a data subject whose key this event destroys, in its own transaction.
    SHREDS: ClassVar[str | None] = None


# ---------------------------------------------------------------- Customer stream


@dataclass(frozen=True)
class CustomerRegistered(Event):
    PERSONAL: ClassVar[tuple[str, ...]] = ("name", "email")
    SUBJECT: ClassVar[str | None] = "customer_id"
    customer_id: str
    name: str | None  # None once the customer's key is destroyed
    email: str | None
    country: str
    locale: str | None


@dataclass(frozen=True)
class CustomerForgotten(Event):
    SHREDS: ClassVar[str | None] = "customer_id"
    customer_id: str


# ---------------------------------------------------------------- Product stream


@dataclass(frozen=True)
class ProductAdded(Event):
    sku: str
    name: str
    price: str
    currency: str
    initial_stock: int


@dataclass(frozen=True)
class ProductPriceChanged(Event):
    sku: str
    price: str
    currency: str


@dataclass(frozen=True)
class ProductRestocked(Event):
    sku: str
    quantity: int


@dataclass(frozen=True)
class StockReserved(Event):
    sku: str
    order_id: str
    quantity: int


@dataclass(frozen=True)
class StockReleased(Event):
    sku: str
    order_id: str
    quantity: int


# ---------------------------------------------------------------- Order stream


@dataclass(frozen=True)
class OrderPlaced(Event):
    """Version 2 added `payment_due_at`; version-1 events get it from their upcaster."""

    SCHEMA_VERSION: ClassVar[int] = 2
    PERSONAL: ClassVar[tuple[str, ...]] = ("shipping_address",)
    SUBJECT: ClassVar[str | None] = "customer_id"
    order_id: str
    customer_id: str
    # Each line: {"sku", "name", "quantity", "unit_price"}; prices as at placing.
    lines: list[dict[str, Any]]
    total: str
    currency: str
    # {"name", "line1", "line2", "city", "postal_code", "country"}, or None once forgotten.
    shipping_address: dict[str, Any] | None
    # ISO-8601, UTC: unpaid by then, the order is cancelled (PAYMENT_TIMEOUT); None: no deadline.
    payment_due_at: str | None = None


@dataclass(frozen=True)
class OrderPaid(Event):
    order_id: str
    amount: str
    currency: str


@dataclass(frozen=True)
class OrderShipped(Event):
    order_id: str
    tracking_number: str


@dataclass(frozen=True)
class OrderDelivered(Event):
    order_id: str


@dataclass(frozen=True)
class OrderCancelled(Event):
    order_id: str
    reason: str


# ---------------------------------------------------------------- ExchangeRate stream


@dataclass(frozen=True)
class ExchangeRateSet(Event):
    """One unit of `base` is worth `rate` units of `quote` from `valid_from` on (ISO-8601,
    UTC), until a later `valid_from` of the same pair; `inverse_rate` is 1/rate to the same
    precision, the quote-to-base rate unless that pair is set on its own."""

    base: str
    quote: str
    rate: str
    inverse_rate: str
    valid_from: str


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        CustomerRegistered,
        CustomerForgotten,
        ProductAdded,
        ProductPriceChanged,
        ProductRestocked,
        StockReserved,
        StockReleased,
        OrderPlaced,
        OrderPaid,
        OrderShipped,
        OrderDelivered,
        OrderCancelled,
        ExchangeRateSet,
    )
}


def event_type(event: Event) -> str:
    return type(event).__name__


def to_data(event: Event) -> dict[str, Any]:
    # Field by field rather than dataclasses.asdict, which deep-copies every value (a
    # measurable share of a command's CPU) to no purpose: an event's values are never
    # changed in place.
    return {name: getattr(event, name) for name in _field_names(type(event))}


@functools.cache
def _field_names(cls: type[Event]) -> tuple[str, ...]:
    return tuple(field.name for field in fields(cls))


@dataclass(frozen=True)
class UpcastContext:
    """What an upcaster may need beside the stored payload: when the event occurred, and the
    settings in force where it is read."""

    occurred_at: datetime
    # ORDERSTREAM_PAYMENT_TIMEOUT; None when payment deadlines are off.
    payment_timeout: timedelta | None


def order_placed_v1(data: dict[str, Any], context: UpcastContext) -> dict[str, Any]:
    """Version 1 had no due time: the placing time plus the timeout in force, as if the order
    had been placed under today's settings."""
    due = context.occurred_at + context.payment_timeout if context.payment_timeout else None
    return {**data, "payment_due_at": due.isoformat() if due else None}


# Upcasters, by (event type, the schema version they read): each turns a stored payload of
# that version into the next version's shape. When an event's fields change, raise its
# SCHEMA_VERSION and add the step from the old version here; old logs then replay as they
# are.
Upcaster = Callable[[dict[str, Any], UpcastContext], dict[str, Any]]
UPCASTERS: dict[tuple[str, int], Upcaster] = {
    ("OrderPlaced", 1): order_placed_v1,
}


def upcast(type_name: str, schema_version: int, data: dict[str, Any], context: UpcastContext,
           types: Mapping[str, type[Event]] = EVENT_TYPES,
           upcasters: Mapping[tuple[str, int], Upcaster] = UPCASTERS) -> tuple[int, dict[str, Any]]:
    """A stored payload in its event type's current shape, step by step, and that version.
    Types this code does not know, and payloads already current, come back as they are."""
    cls = types.get(type_name)
    if cls is None:
        return schema_version, data
    version = schema_version
    while version < cls.SCHEMA_VERSION:
        step = upcasters.get((type_name, version))
        if step is None:
            raise ValueError(f"{type_name} v{version} has no upcaster to v{version + 1}")
        data, version = step(data, context), version + 1
    if version != cls.SCHEMA_VERSION:
        raise ValueError(f"{type_name} v{schema_version} is newer than this code's v{cls.SCHEMA_VERSION}: "
                         "deploy the newer code")
    return version, data


def from_data(type_name: str, schema_version: int, data: dict[str, Any],
              types: Mapping[str, type[Event]] = EVENT_TYPES,
              upcasters: Mapping[tuple[str, int], Upcaster] = UPCASTERS,
              context: UpcastContext | None = None) -> Event:
    """Rebuild an event from its stored form, upcast to its current version.

    The event store hands out payloads upcast already (its `upcast`, wired in
    orderstream.bootstrap, passes the context); a payload of an older version needs the
    `context` its upcasters read."""
    cls = types[type_name]
    if schema_version != cls.SCHEMA_VERSION:
        if context is None and schema_version < cls.SCHEMA_VERSION:
            raise ValueError(f"{type_name} v{schema_version} needs upcasting with the time it occurred and the "
                             "settings in force: read it through an event store that upcasts")
        schema_version, data = upcast(type_name, schema_version, data, context, types, upcasters)
    return cls(**data)
