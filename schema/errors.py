"""The contract's error types: domain failures as members of each result union."""

import strawberry

from orderstream.domain import errors


@strawberry.interface(description="A command refused for a reason the client can act on.")
class DomainError:
    code: str = strawberry.field(description="Stable, machine-readable reason.")
    message: str = strawberry.field(description="What went wrong and what to do, in English.")


@strawberry.type(description="The input is malformed; `field` names the offending input path.")
class ValidationError(DomainError):
    field: str | None = None


@strawberry.type(description="An aggregate the command refers to does not exist.")
class NotFoundError(DomainError):
    id: strawberry.ID


@strawberry.type(description="The command breaks a business rule, e.g. an order cannot be "
                             "shipped before it is paid (INVALID_TRANSITION).")
class BusinessRuleViolation(DomainError):
    pass


@strawberry.type(description="Not enough stock of `sku` to reserve what the order asks for.")
class InsufficientStockError(DomainError):
    sku: str
    requested: int
    available: int


@strawberry.type(description="The aggregate changed since expectedVersion (optimistic "
                             "concurrency): reload it and decide again.")
class ConcurrencyConflict(DomainError):
    stream_id: strawberry.ID
    expected_version: int
    actual_version: int


def to_graphql(error: errors.DomainError) -> DomainError:
    match error:
        case errors.ValidationError():
            return ValidationError(code=error.code, message=error.message, field=error.field)
        case errors.NotFoundError():
            return NotFoundError(code=error.code, message=error.message, id=strawberry.ID(error.id))
        case errors.InsufficientStockError():
            return InsufficientStockError(code=error.code, message=error.message, sku=error.sku,
                                          requested=error.requested, available=error.available)
        case errors.ConcurrencyConflict():
            return ConcurrencyConflict(
                code=error.code, message=error.message, stream_id=strawberry.ID(error.stream_id),
                expected_version=error.expected_version, actual_version=error.actual_version,
            )
        case errors.BusinessRuleViolation():
            return BusinessRuleViolation(code=error.code, message=error.message)
    raise TypeError(f"no GraphQL type for {type(error).__name__}")
