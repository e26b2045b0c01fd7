"""How strawberry executes our schema: memory per subscription event, time per input and
per operation."""

import contextlib
import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Mapping
from functools import cache, partial
from typing import Any

import strawberry
from strawberry.extensions import SchemaExtension
from strawberry.extensions.context import (
    ExecutingContextManager,
    OperationContextManager,
    ParsingContextManager,
    ValidationContextManager,
    WrappedHook,
)
from strawberry.extensions.runner import SchemaExtensionsRunner
from strawberry.relay.types import GlobalID

from orderstream.infrastructure.internals import (
    InputContext,
    StrawberryGraphQLCoreExecutionContext,
    StrawberryList,
    StrawberryMaybe,
    StrawberryObjectDefinition,
    StrawberryOptional,
)


class PerEventMemo(StrawberryGraphQLCoreExecutionContext):
    """graphql-core 3.3's executor, with what it keeps alive after an operation let go.

    It runs each subscription event on a shallow copy of the subscription's executor, so
    every copy shares one subfield memo. The memo is keyed by the identity of lists built
    afresh for each event and keeps them alive: it grows with every delivered event for as
    long as the subscription lives. Each event gets its own memo.

    And the executor holds its own bound methods (`async_helpers`): a reference cycle,
    through which everything an operation touched (its context, the HTTP request, every
    intermediate value) outlives it until the garbage collector comes by. Under load the
    collector then walks and frees a hundred objects per request in pauses that hold up
    every request in flight. Dropped once the operation has its result, they are freed at
    once."""

    def build_per_event_executor(self, payload: Any):
        executor = super().build_per_event_executor(payload)
        executor._relevant_sub_fields = {}
        return executor

    def execute_operation(self, serially: bool | None = None) -> Any:
        result = super().execute_operation(serially)
        if self.is_awaitable(result):
            return self._let_go_after(result)
        self.async_helpers = None
        return result

    async def _let_go_after(self, result: Awaitable[Any]) -> Any:
        try:
            return await result
        finally:
            self.async_helpers = None


def prepare_inputs(schema: strawberry.Schema) -> None:
    """Build the schema's input objects from field lists made once, here.

    For every field of every input object of every request, strawberry looks up the
    field's GraphQL name and resolves its type annotation again: across placeOrder's twelve
    input fields, a measurable share of the server's time per order. Both are fixed once
    the schema is built. Each input type's definition gets a `from_input`
    (strawberry's hook for building an input value) that takes them from its list, with a
    converter for each value made here too: scalars, which graphql-core has parsed
    already, are taken as they are (as strawberry does), lists and nested input objects
    converted item by item, anything else by strawberry. The definitions belong to the
    classes, so every schema built from them shares the lists; building another is
    harmless."""
    names = schema.config.name_converter
    scalars = schema.schema_converter.scalar_registry
    for known in schema.schema_converter.type_map.values():
        definition = known.definition
        if not isinstance(definition, StrawberryObjectDefinition) or not definition.is_input:
            continue
        fields = [(names.from_field(field), field.python_name,
                   _converter(field.resolve_type(type_definition=definition), scalars)) for field in definition.fields]
        # As strawberry does: a field without a default is None until the input sets it
        # (graphql-core has already refused an input that leaves out a required one).
        unset = {field.python_name: None for field in definition.fields
                 if field.default_value is dataclasses.MISSING and field.default_factory is dataclasses.MISSING}
        definition.from_input = partial(_input_object, fields, unset)


Converter = Callable[[Any, InputContext], Any]


def _converter(type_: Any, scalars: Mapping[object, Any]) -> Converter | None:
    """How an input value of `type_` becomes its Python value: None to take it as it is."""
    if isinstance(type_, StrawberryOptional) and not isinstance(type_, StrawberryMaybe):
        inner = _converter(type_.of_type, scalars)
        return inner and (lambda value, context: None if value is None else inner(value, context))
    if type_ is not GlobalID and any(type_ is scalar for scalar in scalars):
        return None
    if isinstance(type_, StrawberryList):
        inner = _converter(type_.of_type, scalars)
        if inner is None:
            # A copy all the same: graphql-core hands every request the same default list.
            return lambda value, context: list(value)
        return lambda value, context: [inner(item, context) for item in value]
    definition = getattr(type_, "__strawberry_definition__", None)
    if isinstance(definition, StrawberryObjectDefinition) and definition.is_input:
        # Its own `from_input`, looked up when called: it may be set after this one's.
        return lambda value, context: definition.from_input(type_, value, context)
    return lambda value, context: context.convert(value, type_)


def _input_object(fields: list[tuple[str, str, Converter | None]], unset: dict[str, None], cls: type,
                  value: Mapping[str, Any], context: InputContext) -> Any:
    """`cls` from the input `value`: its fields' (GraphQL name, Python name, converter)."""
    arguments = dict(unset)
    for graphql_name, python_name, convert in fields:
        if graphql_name in value:
            item = value[graphql_name]
            arguments[python_name] = item if convert is None else convert(item, context)
    return cls(**arguments)


class Schema(strawberry.Schema):
    """strawberry's schema, whose operations find their extensions' hooks prepared.

    For every operation strawberry looks up each of the four hooks (operation, parsing,
    validation, execution) on each extension, inspects what kind of function it is and
    wraps it in a new context-manager function (functools.wraps and all): with our four
    extensions, a measurable share of a small operation's time, for an answer that depends
    on the extension's class alone. Here it is found once per class and hook; entering and
    leaving the hooks is strawberry's own code, unchanged."""

    def create_extensions_runner(self, execution_context, extensions: list[SchemaExtension]):
        return PreparedHooksRunner(execution_context=execution_context, extensions=extensions)


@cache
def _hook(extension_class: type, name: str) -> tuple[Callable[[SchemaExtension], Any] | None, bool] | None:
    """The hook `name` of `extension_class` as a context-manager factory taking the
    extension, and whether it is async; None if the class does not have the hook;
    (None, False) for a hook of another kind (a plain function), left to strawberry."""
    hook = getattr(extension_class, name)
    if hook is getattr(SchemaExtension, name):
        return None
    if inspect.isgeneratorfunction(hook):
        return contextlib.contextmanager(hook), False
    if inspect.isasyncgenfunction(hook):
        return contextlib.asynccontextmanager(hook), True
    return None, False


class _PreparedHooks:
    """The hooks of `extensions` for one stage of an operation (HOOK_NAME), from `_hook`."""

    def __init__(self, extensions: list[SchemaExtension]) -> None:
        self.hooks = []
        for extension in extensions:
            found = _hook(type(extension), self.HOOK_NAME)
            if found is None:
                continue
            factory, is_async = found
            hook = (self.get_hook(extension) if factory is None
                    else WrappedHook(extension=extension, hook=partial(factory, extension), is_async=is_async))
            self.hooks.append(hook)


class _Operation(_PreparedHooks, OperationContextManager):
    pass


class _Parsing(_PreparedHooks, ParsingContextManager):
    pass


class _Validation(_PreparedHooks, ValidationContextManager):
    pass


class _Executing(_PreparedHooks, ExecutingContextManager):
    pass


class PreparedHooksRunner(SchemaExtensionsRunner):
    def operation(self) -> OperationContextManager:
        return _Operation(self.extensions)

    def parsing(self) -> ParsingContextManager:
        return _Parsing(self.extensions)

    def validation(self) -> ValidationContextManager:
        return _Validation(self.extensions)

    def executing(self) -> ExecutingContextManager:
        return _Executing(self.extensions)
