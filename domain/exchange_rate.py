"""Exchange rates: what one unit of a currency is worth in another, from a moment on.

A pair's stream (id ``USD-EUR``) records every rate ever set for it, late entries and
corrections included: the read side takes, for any moment, the rate whose ``valid_from``
is the latest at or before it, and of two events with the same ``valid_from`` the later.
"""

from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation

from orderstream.domain.aggregate import Aggregate
from orderstream.domain.errors import ValidationError
from orderstream.domain.values import currency_code
from orderstream.events import Event, ExchangeRateSet

SIGNIFICANT_DIGITS = 12
# Bounds that keep any order's converted amount within a 64-bit count of minor units.
MIN_RATE = Decimal("0.000001")
MAX_RATE = Decimal("1000000")
# Rates are published ahead of time, but not far: a day covers every time zone's tomorrow.
MAX_AHEAD = timedelta(days=1)

_INVERSE = Context(prec=SIGNIFICANT_DIGITS, rounding=ROUND_HALF_EVEN)


def pair_id(base: str, quote: str) -> str:
    """The stream id of a pair, e.g. ``USD-EUR``."""
    base = currency_code(base, "base")
    quote = currency_code(quote, "quote")
    if base == quote:
        raise ValidationError("SAME_CURRENCY", "base and quote must be different currencies", "quote")
    return f"{base}-{quote}"


def rate_syntax(value: Decimal | str, field: str = "rate") -> Decimal:
    """A positive decimal of at most 12 significant digits, within the bounds above."""
    try:
        rate = Decimal(value)
    except InvalidOperation:
        raise ValidationError("INVALID_RATE", f"{value!r} is not a decimal number", field) from None
    if not rate.is_finite() or rate <= 0:
        raise ValidationError("INVALID_RATE", "a rate must be a positive number", field)
    if len(rate.normalize().as_tuple().digits) > SIGNIFICANT_DIGITS:
        raise ValidationError("INVALID_RATE", f"a rate has at most {SIGNIFICANT_DIGITS} significant digits",
                              field)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValidationError("INVALID_RATE", f"a rate must lie between {MIN_RATE} and {MAX_RATE}", field)
    return rate


def inverse(rate: Decimal) -> Decimal:
    """1/rate, rounded half-even to 12 significant digits."""
    return _INVERSE.divide(Decimal(1), rate)


def plain(number: Decimal) -> str:
    """Without trailing zeros and without an exponent: 0.92130 -> "0.9213", 1E+2 -> "100"."""
    return format(number.normalize(), "f")


class ExchangeRate(Aggregate):
    """The rates of one currency pair over time; the stream id is ``BASE-QUOTE``."""

    STREAM_TYPE = "ExchangeRate"

    def __init__(self, id: str) -> None:
        super().__init__(id)
        # No rule looks at earlier rates (a correction is a rate like any other): the last
        # one set is kept for reading only.
        self.last_set: tuple[str, str] | None = None  # (valid_from, rate)

    def set(self, rate: Decimal | str, valid_from: datetime, now: datetime) -> None:
        """Record `rate` from `valid_from` on; a past `valid_from` corrects the reports it covers."""
        base, _, quote = self.id.partition("-")
        rate = rate_syntax(rate)
        if valid_from.tzinfo is None:
            raise ValidationError("INVALID_TIME", "validFrom needs a UTC offset, e.g. 2026-03-09T00:00:00Z",
                                  "validFrom")
        try:
            valid_from = valid_from.astimezone(UTC)
        except OverflowError:
            raise ValidationError("INVALID_TIME", "validFrom must lie within the years 1 to 9999 in UTC",
                                  "validFrom") from None
        if valid_from > now + MAX_AHEAD:
            raise ValidationError("TOO_FAR_AHEAD", "validFrom may lie at most one day in the future",
                                  "validFrom")
        self._record(ExchangeRateSet(base=base, quote=quote, rate=plain(rate), inverse_rate=plain(inverse(rate)),
                                     valid_from=valid_from.isoformat()))

    def apply(self, event: Event) -> None:
        match event:
            case ExchangeRateSet():
                self.last_set = (event.valid_from, event.rate)
