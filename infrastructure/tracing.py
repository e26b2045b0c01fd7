"""The process's traces, in OpenTelemetry's terms: one span per GraphQL operation
(web.observed), and inside it the command (commands.dispatcher) and its append; then, wherever
they run, the projector batch that applies the command's events (projection.projector) and
each live delivery of them to a subscriber (live.event_hub).

A command's trace context goes into the metadata of every event it appends, as a W3C
`traceparent`: the projector (in a child process on SQLite, or another process on
PostgreSQL) and the event hubs of every process read it from there and join the command's
trace. A batch that applies the events of several commands sits in the first one's trace and
links to every other one.

One TracerProvider per process, made by the composition root and never OpenTelemetry's
global one, so that each app (and each test) records for itself. Without one tracing is off:
every method returns at once, spans are neither made nor entered, no traceparent is written.

No attribute takes personal data: names of operations and commands, error codes, positions,
counts and the database's kind, never a document, a variable, an id or an exception's message.
"""

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from opentelemetry import context as contexts
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__all__ = ["MAX_LINKS", "PROTOCOLS", "SpanKind", "Tracing", "exporting_provider", "failed", "parent_of"]

Protocol = Literal["grpc", "http/protobuf"]
PROTOCOLS: tuple[Protocol, ...] = ("http/protobuf", "grpc")

# W3C Trace Context: the `traceparent` header, and the same text in the events' metadata.
_PROPAGATOR = TraceContextTextMapPropagator()
# The SDK keeps 128 links a span by default; a batch of more commands links to the first ones.
MAX_LINKS = 128


def exporting_provider(protocol: Protocol, service_name: str = "orderstream") -> "TracerProvider":
    """A provider that sends its spans in batches over OTLP with `protocol`. The exporter reads
    the standard OTEL_EXPORTER_OTLP_* variables itself (endpoint, headers, certificate,
    timeout); OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name the service."""
    # Imported here: a process that does not trace does not load the SDK.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    resource = Resource.create()
    if resource.attributes["service.name"].startswith("unknown_service"):  # the SDK's stand-in
        resource = resource.merge(Resource({"service.name": service_name}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def parent_of(traceparent: str | None) -> SpanContext | None:
    """The span context a W3C `traceparent` names; None for none, or one that is not valid."""
    if not traceparent:
        return None
    found = trace.get_current_span(_PROPAGATOR.extract({"traceparent": traceparent})).get_span_context()
    return found if found.is_valid else None


class Tracing:
    """The spans of this process, made by `provider`'s tracer; off (None) makes none."""

    def __init__(self, provider: "TracerProvider | None" = None) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("orderstream") if provider is not None else None

    @property
    def on(self) -> bool:
        return self.tracer is not None

    def span(self, name: str, attributes: Mapping[str, str | int | bool] | None = None,
             kind: SpanKind = SpanKind.INTERNAL, context: Context | None = None,
             links: Iterable[Link] = ()) -> AbstractContextManager[Span | None]:
        """A span around a block, current inside it (the parent of the spans the block makes),
        a child of `context` if given, else of the current span. An exception that leaves
        the block marks it failed, its `error.type` the exception's `code` if it has one
        (the public errors'), else its class: never its message, which may quote data."""
        if self.tracer is None:
            return nullcontext()
        return self._span(name, attributes, kind, context, links)

    def _span(self, name: str, attributes: Mapping[str, str | int | bool] | None, kind: SpanKind,
              context: Context | None, links: Iterable[Link]) -> "_Current":
        return _Current(self.tracer.start_span(name, context, kind, attributes, links))

    def incoming(self, headers: Mapping[str, str]) -> Context | None:
        """The trace context of a request's `traceparent` header, if it carries a valid one."""
        if self.tracer is None or "traceparent" not in headers:
            return None
        return _PROPAGATOR.extract({"traceparent": headers["traceparent"]})

    def traceparent(self) -> str | None:
        """The current span's context as a W3C `traceparent`: what the events a command
        appends carry in their metadata. None when off or outside a recorded span."""
        if self.tracer is None:
            return None
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return carrier.get("traceparent")

    def on_behalf(self, name: str, traceparents: Iterable[str | None],
                  attributes: Mapping[str, str | int | bool] | None = None) -> AbstractContextManager[Span | None]:
        """`span` for work done for the commands whose events carry `traceparents` (in
        order, repeats and None allowed): in the first one's trace, linked to every other.
        The first of those a sampler recorded comes first: the span is recorded if any is."""
        if self.tracer is None:
            return nullcontext()
        parents = [parent for traceparent in dict.fromkeys(traceparents)  # each command once, in order
                   if (parent := parent_of(traceparent)) is not None]
        parents.sort(key=lambda parent: not parent.trace_flags.sampled)
        if not parents:
            return self._span(name, attributes, SpanKind.INTERNAL, None, ())
        first, *others = parents
        return self._span(name, attributes, SpanKind.INTERNAL, trace.set_span_in_context(NonRecordingSpan(first)),
                          [Link(other) for other in others[:MAX_LINKS]])

    def start(self, name: str, traceparent: str | None,
              attributes: Mapping[str, str | int | bool] | None = None) -> Span | None:
        """A span in the trace `traceparent` names, started now, not made current: the
        caller ends it. None when off."""
        if self.tracer is None:
            return None
        parent = parent_of(traceparent)
        context = trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None
        return self.tracer.start_span(name, context, attributes=attributes)

    def shutdown(self) -> None:
        """Send what is still buffered and stop: at the end of the process."""
        if self.provider is not None:
            self.provider.shutdown()


class _Current(AbstractContextManager):
    """A started span, current inside the block and ended after it. In place of the SDK's
    `start_as_current_span`, whose two nested generator-based context managers took about
    a third of a span's cost on the command path (bench/observability.py, py-spy)."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span) -> None:
        self.span = span

    def __enter__(self) -> Span:
        self.token = contexts.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if isinstance(error, Exception):
            failed(self.span, getattr(error, "code", None) or type(error).__name__)
        contexts.detach(self.token)
        self.span.end()


def failed(span: Span, error_type: str) -> None:
    """Mark `span` failed with `error_type` (an error code or an exception's class)."""
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR))
