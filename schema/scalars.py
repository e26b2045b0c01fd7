"""Scalars of the contract that strawberry does not define the way the contract does."""

from decimal import Decimal, InvalidOperation
from typing import NewType

import strawberry
from graphql import GraphQLError

Position = NewType("Position", int)


def _parse_position(value: object) -> Position:
    # isascii(): str.isdigit() also accepts digits such as "²" that int() refuses.
    if isinstance(value, str) and value.isascii() and value.isdigit() or isinstance(value, int) and value >= 0:
        return Position(int(value))
    raise GraphQLError("a Position is a non-negative integer in a string, e.g. \"42\"")


def _parse_decimal(value: object) -> Decimal:
    # Floats are refused: 19.99 as a JSON number has already lost its exact value.
    if isinstance(value, int | str) and not isinstance(value, bool):
        try:
            return Decimal(value)
        except InvalidOperation:
            pass
    raise GraphQLError('a Decimal is a decimal number in a string, e.g. "19.99"')


SCALARS = {
    Position: strawberry.scalar(
        name="Position",
        description="Global position of an event in the event log: a non-negative integer, "
        "serialized as a decimal string.",
        serialize=str,
        parse_value=_parse_position,
    ),
    Decimal: strawberry.scalar(
        name="Decimal",
        description='Exact decimal number serialized as a string, e.g. "19.99". Never a float.',
        serialize=str,
        parse_value=_parse_decimal,
    ),
}
