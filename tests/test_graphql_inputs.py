"""Input objects built from the field lists of infrastructure.web.graphql_execution.prepare_inputs
are the ones strawberry's own conversion builds, for every input type of the schema."""

from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import strawberry
from strawberry.types.arguments import convert_argument
from strawberry.types.base import StrawberryList, StrawberryObjectDefinition, StrawberryOptional

from orderstream.schema.app import build_schema

SAMPLES = {str: "text", int: 3, strawberry.ID: "7d7c8c0e-0f4a-4b6e-9d2e-3b1f0c2a9e11", Decimal: Decimal("12.50"),
           datetime: datetime(2026, 3, 9, tzinfo=UTC)}


def input_definitions(schema: strawberry.Schema) -> list[StrawberryObjectDefinition]:
    return [known.definition for known in schema.schema_converter.type_map.values()
            if isinstance(known.definition, StrawberryObjectDefinition) and known.definition.is_input]


def sample(schema: strawberry.Schema, type_: Any, full: bool) -> Any:
    """An input value of `type_` as graphql-core hands it on: every field set (`full`), or
    the required ones alone and explicit nulls for the optional ones."""
    if isinstance(type_, StrawberryOptional):
        return sample(schema, type_.of_type, full) if full else None
    if isinstance(type_, StrawberryList):
        return [sample(schema, type_.of_type, full), sample(schema, type_.of_type, not full)]
    definition = getattr(type_, "__strawberry_definition__", None)
    if definition is not None:
        return {schema.config.name_converter.from_field(field):
                sample(schema, field.resolve_type(type_definition=definition), full)
                for field in definition.fields}
    assert type_ in SAMPLES, f"no sample value for {type_!r}: add one to SAMPLES"
    return SAMPLES[type_]


def required_only(value: dict[str, Any]) -> dict[str, Any]:
    return {name: item for name, item in value.items() if item is not None}


@contextmanager
def strawberry_conversion(schema: strawberry.Schema):
    """strawberry's own conversion of input objects, for the time being."""
    definitions = input_definitions(schema)
    prepared = [definition.from_input for definition in definitions]
    for definition in definitions:
        definition.from_input = None
    try:
        yield
    finally:
        for definition, from_input in zip(definitions, prepared, strict=True):
            definition.from_input = from_input


def convert(schema: strawberry.Schema, value: Any, cls: type) -> Any:
    return convert_argument(value, cls, schema.schema_converter.scalar_registry, schema.config)


SCHEMA = build_schema()


@pytest.mark.parametrize("definition", input_definitions(SCHEMA), ids=lambda definition: definition.name)
@pytest.mark.parametrize("shape", ["every field", "nulls", "omitted"])
def test_a_prepared_input_is_what_strawberry_builds(definition, shape):
    assert definition.from_input is not None, "build_schema prepares every input type"
    value = sample(SCHEMA, definition.origin, full=shape == "every field")
    if shape == "omitted":
        value = required_only(value)
    built = convert(SCHEMA, value, definition.origin)
    with strawberry_conversion(SCHEMA):
        expected = convert(SCHEMA, value, definition.origin)
    assert built == expected
    assert type(built) is definition.origin
