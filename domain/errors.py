"""Typed domain failures. Handlers return them as data; the schema maps each onto the
GraphQL error type of the same name."""


class DomainError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ValidationError(DomainError):
    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(code, message)
        self.field = field


class NotFoundError(DomainError):
    def __init__(self, what: str, id: str) -> None:
        super().__init__("NOT_FOUND", f"{what} {id!r} does not exist")
        self.id = id


class BusinessRuleViolation(DomainError):
    pass


class InsufficientStockError(DomainError):
    def __init__(self, sku: str, requested: int, available: int) -> None:
        super().__init__(
            "INSUFFICIENT_STOCK",
            f"{requested} of {sku!r} requested, {available} available",
        )
        self.sku = sku
        self.requested = requested
        self.available = available


class ConcurrencyConflict(DomainError):
    def __init__(self, stream_id: str, expected_version: int, actual_version: int) -> None:
        super().__init__(
            "CONCURRENCY_CONFLICT",
            f"{stream_id!r} is at version {actual_version}, not {expected_version}: "
            "reload it and decide again",
        )
        self.stream_id = stream_id
        self.expected_version = expected_version
        self.actual_version = actual_version
