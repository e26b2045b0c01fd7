from dataclasses import dataclass

from orderstream.commands.dispatcher import UnitOfWork
from orderstream.domain.customer import Customer
from orderstream.domain.values import uuid_syntax


@dataclass(frozen=True)
class RegisterCustomer:
    name: str
    email: str
    country: str
    locale: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class ForgetCustomer:
    customer_id: str
    idempotency_key: str | None = None


async def register_customer(command: RegisterCustomer, uow: UnitOfWork) -> Customer:
    # Anyone may sign up: no role check.
    customer = uow.create(Customer)
    customer.register(command.name, command.email, command.country, command.locale)
    return customer


async def forget_customer(command: ForgetCustomer, uow: UnitOfWork) -> Customer:
    customer_id = uuid_syntax(command.customer_id, "customerId")
    uow.actor.require_owner_or_admin(customer_id)
    customer = await uow.get(Customer, customer_id)
    customer.forget()
    return customer
