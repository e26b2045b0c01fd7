"""Value objects and the syntax rules shared by the aggregates."""

import re
import uuid
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cache

from babel.numbers import get_currency_precision, list_currencies

from orderstream.domain.errors import ValidationError

MAX_AMOUNT = Decimal("1000000000")

# ISO 3166-1 alpha-2, officially assigned codes.
COUNTRY_CODES = frozenset(
    """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO
    BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ
    DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP
    GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG
    KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML
    MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE
    PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL
    SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM
    US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW
    """.split()
)

# Pragmatic address syntax: one @, no spaces or control characters, a dotted domain.
EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+$")
# Control characters, and lone UTF-16 surrogates (valid JSON escapes, but not text: no
# encoder can write them).
CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


@cache
def _currencies() -> frozenset[str]:
    return frozenset(list_currencies())


def text(value: str, field: str, *, max_length: int, required: bool = True) -> str:
    """Trimmed text without control characters, within a length bound."""
    value = value.strip()
    if required and not value:
        raise ValidationError("REQUIRED", f"{field} must not be empty", field)
    if len(value) > max_length:
        raise ValidationError("TOO_LONG", f"{field} is longer than {max_length} characters", field)
    if CONTROL.search(value):
        raise ValidationError("INVALID_CHARACTERS", f"{field} contains control characters", field)
    return value


def uuid_syntax(value: str, field: str) -> str:
    """The canonical form of a UUID given by a client."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValidationError("INVALID_ID", f"{field} must be a UUID", field) from None


def country(code: str, field: str = "country") -> str:
    if code not in COUNTRY_CODES:
        raise ValidationError(
            "INVALID_COUNTRY", f"{code!r} is not an ISO-3166 alpha-2 country code", field
        )
    return code


def email(address: str, field: str = "email") -> str:
    address = address.strip()
    if len(address) > 254 or not EMAIL.fullmatch(address):
        raise ValidationError("INVALID_EMAIL", f"{address!r} is not a valid e-mail address", field)
    return address


def quantity(value: int, field: str = "quantity", *, maximum: int = 1_000_000) -> int:
    if value < 1:
        raise ValidationError("INVALID_QUANTITY", f"{field} must be at least 1", field)
    if value > maximum:
        raise ValidationError("INVALID_QUANTITY", f"{field} must be at most {maximum}", field)
    return value


def currency_code(code: str, field: str = "currency") -> str:
    if code not in _currencies():
        raise ValidationError("INVALID_CURRENCY", f"{code!r} is not an ISO-4217 currency code", field)
    return code


@dataclass(frozen=True)
class Money:
    amount: Decimal
    currency: str

    @classmethod
    def parse(cls, amount: Decimal | str, currency: str, field: str = "price") -> "Money":
        """A positive amount in a known ISO-4217 currency, within its minor units."""
        currency_code(currency, f"{field}.currency")
        try:
            amount = Decimal(amount)
        except InvalidOperation:
            raise ValidationError(
                "INVALID_AMOUNT", f"{amount!r} is not a decimal number", f"{field}.amount"
            ) from None
        if not amount.is_finite() or amount <= 0 or amount > MAX_AMOUNT:
            raise ValidationError(
                "INVALID_AMOUNT", f"amount must be above 0 and at most {MAX_AMOUNT}",
                f"{field}.amount",
            )
        places = get_currency_precision(currency)
        if amount != amount.quantize(Decimal(1).scaleb(-places)):
            raise ValidationError(
                "INVALID_AMOUNT", f"{currency} amounts have at most {places} decimal places",
                f"{field}.amount",
            )
        return cls(amount.quantize(Decimal(1).scaleb(-places)), currency)

    def __str__(self) -> str:
        return f"{self.amount} {self.currency}"


@dataclass(frozen=True)
class Address:
    name: str
    line1: str
    line2: str | None
    city: str
    postal_code: str
    country: str

    @classmethod
    def parse(
        cls, name: str, line1: str, line2: str | None, city: str, postal_code: str,
        country_code: str, field: str = "shippingAddress",
    ) -> "Address":
        return cls(
            name=text(name, f"{field}.name", max_length=200),
            line1=text(line1, f"{field}.line1", max_length=200),
            line2=text(line2, f"{field}.line2", max_length=200, required=False) or None
            if line2 is not None else None,
            city=text(city, f"{field}.city", max_length=100),
            postal_code=text(postal_code, f"{field}.postalCode", max_length=20),
            country=country(country_code, f"{field}.country"),
        )

    def to_data(self) -> dict:
        return {
            "name": self.name, "line1": self.line1, "line2": self.line2, "city": self.city,
            "postal_code": self.postal_code, "country": self.country,
        }
