"""Given data of the shop at the command side: a staff actor, a shipping address, and
commands that must be accepted."""

from typing import Any

from orderstream.commands.dispatcher import Accepted, Dispatcher
from orderstream.commands.order import ShippingAddress
from orderstream.infrastructure.security.auth import Actor

STAFF = Actor(subject="staff-1", role="staff")
ADDRESS = ShippingAddress("Ann Example", "Hauptstr. 1", None, "Berlin", "10115", "DE")


async def succeed(dispatcher: Dispatcher, command: Any) -> Accepted:
    result = await dispatcher.execute(command, STAFF)
    assert isinstance(result, Accepted), result
    return result
