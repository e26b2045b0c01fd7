"""Every reach into strawberry's and graphql-core's internals (infrastructure/internals.py)
still finds what it relies on. Each check is named after the internal: after an upgrade,
a failure here says which one moved, before the behaviour built on it fails elsewhere."""

import dataclasses
import inspect

import pytest
import strawberry
from graphql import GraphQLSchema
from graphql.execution.executor import Executor
from strawberry.asgi import GraphQL
from strawberry.types.execution import ExecutionContext

from orderstream.infrastructure import internals
from orderstream.infrastructure.web.graphql_http import GraphQLOverHTTP
from orderstream.schema.app import build_schema


@pytest.fixture(scope="module")
def schema() -> strawberry.Schema:
    return build_schema()


def assigned_in_init(cls: type, *attributes: str) -> list[str]:
    """Those of `attributes` that `cls.__init__` no longer assigns to `self`."""
    source = inspect.getsource(cls.__init__)
    return [name for name in attributes if f"self.{name}" not in source]


def test_every_internal_name_imports():
    for name in internals.__all__:
        assert getattr(internals, name, None) is not None, f"internals.{name} no longer imports"


def test_graphql_core_executor_keeps_a_subfield_memo_per_executor():
    assert not assigned_in_init(Executor, "_relevant_sub_fields"), \
        "graphql-core Executor._relevant_sub_fields is gone (PerEventMemo resets it per event)"
    assert callable(getattr(Executor, "build_per_event_executor", None)), \
        "graphql-core Executor.build_per_event_executor is gone (PerEventMemo overrides it)"
    assert issubclass(internals.StrawberryGraphQLCoreExecutionContext, Executor)


def test_strawberry_schema_exposes_its_graphql_core_schema_and_converter(schema):
    assert isinstance(schema._schema, GraphQLSchema), "strawberry Schema._schema is no GraphQLSchema"
    converter = schema.schema_converter
    assert isinstance(converter.type_map, dict), "strawberry Schema.schema_converter.type_map"
    assert str in converter.scalar_registry, "strawberry Schema.schema_converter.scalar_registry"
    assert callable(schema.config.name_converter.from_field), "strawberry NameConverter.from_field"


def test_strawberry_fields_resolve_their_type_for_a_definition(schema):
    parameters = inspect.signature(strawberry.types.field.StrawberryField.resolve_type).parameters
    assert "type_definition" in parameters, "strawberry StrawberryField.resolve_type(type_definition=)"
    assert callable(getattr(internals.InputContext, "convert", None)), "strawberry InputContext.convert"


def test_strawberry_builds_input_objects_through_the_from_input_hook():
    @strawberry.input
    class Pair:
        left: int
        right: int

    @strawberry.type
    class Query:
        @strawberry.field
        def total(self, pair: Pair) -> int:
            return pair.left + pair.right

    built = []

    def from_input(cls, value, context):
        built.append(dict(value))
        return cls(left=value["left"] * 10, right=value["right"])

    Pair.__strawberry_definition__.from_input = from_input
    result = strawberry.Schema(query=Query).execute_sync("{ total(pair: {left: 2, right: 3}) }")
    assert result.errors is None, result.errors
    assert built == [{"left": 2, "right": 3}], \
        "strawberry no longer calls StrawberryObjectDefinition.from_input (prepare_inputs sets it)"
    assert result.data == {"total": 23}
    assert isinstance(Pair.__strawberry_definition__, internals.StrawberryObjectDefinition)


def test_strawberry_execution_context_has_the_fields_the_bounds_set():
    names = {field.name for field in dataclasses.fields(ExecutionContext)}
    missing = {"parse_options", "graphql_document", "pre_execution_errors", "validation_rules", "result"} - names
    assert not missing, f"strawberry ExecutionContext lost {sorted(missing)} (web.limits sets them)"
    assert list(inspect.signature(internals.validate_document).parameters)[:3] == ["schema", "document",
                                                                                  "validation_rules"]


def test_websocket_handlers_keep_their_operations_where_multiplex_finds_them():
    missing = assigned_in_init(internals.BaseGraphQLTransportWSHandler, "operations", "schema", "view", "websocket")
    assert not missing, f"strawberry graphql-transport-ws handler no longer sets {missing}"
    missing = assigned_in_init(internals.BaseGraphQLWSHandler, "tasks", "schema", "view", "websocket")
    assert not missing, f"strawberry graphql-ws handler no longer sets {missing}"
    from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import Operation
    assert not assigned_in_init(Operation, "task"), "strawberry graphql-transport-ws Operation.task"


def test_starlette_websockets_keep_the_asgi_send_beneath_their_checks():
    from starlette.websockets import WebSocket
    assert not assigned_in_init(WebSocket, "_send"), "starlette WebSocket._send (live.multiplex writes frames with it)"
    assert "await self._send(message)" in inspect.getsource(WebSocket.send), "starlette WebSocket.send"


def test_the_http_view_hooks_we_override_are_still_called_by_that_name():
    for hook in ("parse_http_body", "execute_single", "process_result", "decode_json",
                 "should_render_graphql_ide"):
        assert hook in vars(GraphQLOverHTTP), hook
        ours = inspect.signature(getattr(GraphQLOverHTTP, hook)).parameters
        theirs = inspect.signature(getattr(GraphQL, hook)).parameters
        assert list(ours) == list(theirs), f"strawberry view hook {hook}{tuple(theirs)} changed its parameters"


def test_websocket_handlers_take_each_operation_through_the_methods_we_wrap():
    # live.multiplex resolves a persisted or trusted document before strawberry reads `query`.
    for handler, method in ((internals.BaseGraphQLTransportWSHandler, "handle_subscribe"),
                            (internals.BaseGraphQLWSHandler, "handle_start")):
        assert list(inspect.signature(getattr(handler, method)).parameters) == ["self", "message"], \
            f"strawberry {handler.__name__}.{method}(message) changed"
        source = inspect.getsource(handler)
        assert f"await self.{method}(message)" in source, f"strawberry {handler.__name__} no longer calls {method}"
        assert "self.connection_acknowledged" in source and callable(handler.send_message), \
            f"strawberry {handler.__name__}.connection_acknowledged or send_message"
