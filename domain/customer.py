from orderstream.domain.aggregate import Aggregate
from orderstream.domain.errors import BusinessRuleViolation, ValidationError
from orderstream.domain.values import country, email, text
from orderstream.events import CustomerForgotten, CustomerRegistered, Event

LOCALE_SYNTAX = "a BCP-47 tag such as 'de-DE' or 'en'"


class Customer(Aggregate):
    STREAM_TYPE = "Customer"

    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.name: str | None = None
        self.email: str | None = None
        self.country: str | None = None
        self.locale: str | None = None
        self.forgotten = False

    def register(self, name: str, email_address: str, country_code: str, locale: str | None) -> None:
        if self.exists:
            raise BusinessRuleViolation("ALREADY_REGISTERED", f"customer {self.id} exists")
        if locale is not None:
            locale = text(locale, "locale", max_length=35)
            if not all(part.isalnum() for part in locale.replace("_", "-").split("-")):
                raise ValidationError("INVALID_LOCALE", f"locale must be {LOCALE_SYNTAX}", "locale")
        self._record(
            CustomerRegistered(
                customer_id=self.id,
                name=text(name, "name", max_length=200),
                email=email(email_address),
                country=country(country_code),
                locale=locale,
            )
        )

    def forget(self) -> None:
        """Erase the customer's personal data: the key that seals it is destroyed."""
        if self.forgotten:
            raise BusinessRuleViolation("ALREADY_FORGOTTEN", f"customer {self.id} was forgotten already")
        self._record(CustomerForgotten(customer_id=self.id))

    def ensure_can_order(self) -> None:
        if self.forgotten:
            raise BusinessRuleViolation("CUSTOMER_FORGOTTEN", f"customer {self.id} was forgotten")

    def apply(self, event: Event) -> None:
        match event:
            case CustomerRegistered():
                self.name, self.email = event.name, event.email
                self.country, self.locale = event.country, event.locale
            case CustomerForgotten():
                self.name = self.email = None
                self.forgotten = True
