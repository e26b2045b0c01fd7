"""Where orderstream leans on strawberry's and graphql-core's internals, named once.

Shared execution of subscriptions, the per-event subfield memo, prepared inputs and the
query bounds reach past both libraries' documented APIs. Every such name is imported
here, and modules take it from here, never from the libraries' inner modules. Beyond the
names, the reaches are attributes and hooks (listed below); tests/test_internals.py checks
each of them and fails naming the one an upgrade moved. pyproject bounds both libraries
below their next minor release for the same reason.

Reached on instances and classes, beyond the imports:
- graphql-core `Executor._relevant_sub_fields` and `build_per_event_executor`
  (web.graphql_execution.PerEventMemo);
- strawberry `Schema._schema`, `Schema.schema_converter.type_map` and
  `.scalar_registry`, `StrawberryField.resolve_type(type_definition=)`, the
  `StrawberryObjectDefinition.from_input` hook and `InputContext.convert`
  (web.graphql_execution.prepare_inputs, web.limits, web.documents);
- strawberry's `ExecutionContext.parse_options`, `.graphql_document`,
  `.pre_execution_errors` and `.validation_rules`, as a SchemaExtension sees them
  (web.limits);
- strawberry's graphql-transport-ws handler's `operations` (each with its `task`), the
  legacy graphql-ws handler's `tasks`, and both handlers' `schema`, `view` and `websocket`
  (live.multiplex);
- strawberry's graphql-transport-ws handler's `handle_subscribe` and the legacy handler's
  `handle_start`, each with its `connection_acknowledged` and `send_message` (live.multiplex);
- starlette's `WebSocket._send`, the ASGI send beneath `WebSocket.send`, which a group
  writes its frames with (live.multiplex);
- uvicorn's httptools request cycle and websockets-sansio protocol behind the server's
  send, whose transport a group writes its frames to (live.direct, checked by
  tests/test_direct_writes.py);
- strawberry's ASGI view hooks `parse_http_body`, `execute_single`, `process_result`,
  `should_render_graphql_ide` and `decode_json`, which web.graphql_http's `respond` calls
  for an HTTP request in place of strawberry's `run`.
"""

from graphql.validation.rules.max_introspection_depth_rule import MaxIntrospectionDepthRule
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext, validate_document
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import BaseGraphQLTransportWSHandler
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler
from strawberry.types.arguments import InputContext
from strawberry.types.base import StrawberryList, StrawberryMaybe, StrawberryObjectDefinition, StrawberryOptional

__all__ = [
    "BaseGraphQLTransportWSHandler", "BaseGraphQLWSHandler", "InputContext", "MaxIntrospectionDepthRule",
    "StrawberryGraphQLCoreExecutionContext", "StrawberryList", "StrawberryMaybe", "StrawberryObjectDefinition",
    "StrawberryOptional", "validate_document",
]
