import uuid
from dataclasses import dataclass

from commands.dispatcher import UnitOfWork
from domain.customer import Customer


@dataclass(frozen=True)
class RegisterCustomer:
    name: str
    email: str
    country: str
    locale: str | None = None
    idempotency_key: str | None = None


async def register_customer(command: RegisterCustomer, uow: UnitOfWork) -> Customer:
    # Anyone may sign up: no role check.
    customer = await uow.load(Customer, str(uuid.uuid4()))
    customer.register(command.name, command.email, command.country, command.locale)
    return customer
