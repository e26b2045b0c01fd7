from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from orderstream.commands.dispatcher import UnitOfWork
from orderstream.domain.errors import NotFoundError, ValidationError
from orderstream.domain.exchange_rate import ExchangeRate, pair_id


@dataclass(frozen=True)
class SetExchangeRate:
    base: str
    quote: str
    rate: Decimal
    valid_from: datetime
    idempotency_key: str | None = None


async def set_exchange_rate(command: SetExchangeRate, uow: UnitOfWork) -> ExchangeRate:
    uow.actor.require_staff()
    try:
        pair = await uow.load(ExchangeRate, pair_id(command.base, command.quote))
    except NotFoundError:
        # A SKU may look like a pair: that stream is a product's.
        raise ValidationError("PAIR_TAKEN", f"'{command.base}-{command.quote}' is the id of another stream",
                              "quote") from None
    pair.set(command.rate, command.valid_from, now=uow.store.clock())
    return pair
