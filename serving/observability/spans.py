"""A tracer whose spans record into plain slots and reach the SDK's span processor, as
the SDK's own ``ReadableSpan``, only when they end.

The SDK's tracer validates every attribute as it is set (a ``BoundedAttributes`` per
span, and another inside the sampler's result), asks the sampler again for each child
and builds its span through several layers: about 17 us a span, most of a traced
request's cost. Here a child of a recording span is recorded without asking (every
sampler the gateway offers records the children of a sampled parent), a root's decision
is the one ``tracing.new_root`` made, and an attribute of a plain type (str, bool, int,
float) is stored as it is; anything else goes through the API's own validation. What
reaches the exporter is the SDK's ``ReadableSpan`` with the same fields the SDK's span
would have given it, under the same ``OTEL_SPAN_*`` limits.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from time import time_ns
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.span import TraceState

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, SpanLimits, SpanProcessor
    from opentelemetry.sdk.trace.id_generator import IdGenerator
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.sdk.util import BoundedList
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.util.types import Attributes, AttributeValue

__all__ = ["SlotSpan", "SlotTracer"]

#: Attribute value types stored without validation (the API accepts them as they are).
_PLAIN = frozenset({str, bool, int, float})
_KEYS = frozenset({str})
_EMPTY_STATE = TraceState()
#: A new span's status (``Status`` is immutable: one serves them all).
_UNSET = Status(StatusCode.UNSET)


def _flags(sampled: bool, random_id: bool) -> TraceFlags:
    """As the SDK sets them: sampled or not, and W3C's flag for a random trace id."""
    flags = TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT
    return TraceFlags(flags | TraceFlags.RANDOM_TRACE_ID if random_id else flags)


class SlotTracer(trace.Tracer):
    """Starts ``SlotSpan``s for one provider's sampler, id generator, resource, limits and
    processor."""

    def __init__(
        self,
        *,
        sampler: Sampler,
        ids: IdGenerator,
        resource: Resource,
        processor: SpanProcessor,
        scope: InstrumentationScope,
        limits: SpanLimits,
    ) -> None:
        # The SDK's classes, imported here: importing this module loads no SDK.
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.util import BoundedList

        self.sampler = sampler
        self.ids = ids
        #: Whether a root's trace id is random: W3C's flag on the roots, as the SDK sets it.
        self.random_roots = ids.is_trace_id_random()
        self.resource = resource
        self.processor = processor
        self.scope = scope
        self.limits = limits
        self.event = Event
        self.readable_span = ReadableSpan
        self.bounded_list = BoundedList

    def start_root(
        self,
        name: str,
        trace_id: int,
        *,
        sampled: bool,
        kind: SpanKind,
        attributes: Attributes = None,
    ) -> trace.Span:
        """A root span in trace ``trace_id``, recorded when ``sampled``: the sampler's
        decision for that trace, which the caller has already made."""
        flags = _flags(sampled, self.random_roots)
        ctx = SpanContext(trace_id, self.ids.generate_span_id(), False, flags, _EMPTY_STATE)
        if not sampled:
            return NonRecordingSpan(ctx)
        return SlotSpan(self, name, ctx, None, kind, attributes, ())

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        """As the SDK's ``Tracer.start_span``; a child of a recording ``SlotSpan`` skips
        the sampler and is recorded, as every sampler ``tracing`` configures would decide
        (a parent-based one by the parent's flag, a ratio by the trace id its parent had).

        ``record_exception`` and ``set_status_on_exception`` apply where the span is used
        as a context manager, which gateway code never does (``start_as_current_span``
        passes them to ``trace.use_span`` instead).
        """
        parent_span = trace.get_current_span(context)
        parent = parent_span.get_span_context()
        if isinstance(parent_span, SlotSpan) and parent_span.is_recording():
            flags, state = parent.trace_flags, parent.trace_state
            ctx = SpanContext(parent.trace_id, self.ids.generate_span_id(), False, flags, state)
            return SlotSpan(self, name, ctx, parent, kind, attributes, links or (), start_time)
        if parent.is_valid:
            remote: SpanContext | None = parent
            trace_id, random_id = parent.trace_id, parent.trace_flags.random_trace_id
        else:
            remote, trace_id, random_id = None, self.ids.generate_trace_id(), self.random_roots
        result = self.sampler.should_sample(context, trace_id, name, kind, attributes, links)
        sampled: bool = result.decision.is_sampled()  # type: ignore[no-untyped-call]
        flags = _flags(sampled, random_id)
        ctx = SpanContext(trace_id, self.ids.generate_span_id(), False, flags, result.trace_state)
        if not result.decision.is_recording():  # type: ignore[no-untyped-call]
            return NonRecordingSpan(ctx)
        return SlotSpan(self, name, ctx, remote, kind, result.attributes, links or (), start_time)

    def start_child(
        self,
        parent: trace.Span,
        name: str,
        attributes: Mapping[str, AttributeValue] | None = None,
        links: Sequence[Link] = (),
    ) -> trace.Span:
        """An internal span under ``parent``: what ``start_span`` gives with ``parent``
        current, without building a context to carry it (the gateway's own child spans:
        route, queue, batch, executor run)."""
        if isinstance(parent, SlotSpan) and parent._end is None:
            context = parent._context
            ctx = SpanContext(
                context.trace_id,
                self.ids.generate_span_id(),
                False,
                context.trace_flags,
                context.trace_state,
            )
            return SlotSpan(self, name, ctx, context, SpanKind.INTERNAL, attributes, links)
        return self.start_span(
            name, trace.set_span_in_context(parent), attributes=attributes, links=links
        )

    def start_as_current_span(  # type: ignore[override]  # the API's own manager type is private
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> AbstractContextManager[trace.Span]:
        """As the SDK's: the span is current inside the block and ended after it."""
        span = self.start_span(name, context, kind, attributes, links, start_time)
        return trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        )


class SlotSpan(trace.Span):
    """A recording span kept in plain slots; ``end`` hands a ``ReadableSpan`` on.

    Unlike the SDK's span it takes no lock: each of Fermion's spans is started, changed
    and ended by one thread (the gateway's event loop, or a Ray replica's call).
    """

    __slots__ = (
        "_attributes",
        "_context",
        "_dropped",
        "_end",
        "_events",
        "_kind",
        "_links",
        "_name",
        "_parent",
        "_start",
        "_status",
        "_tracer",
    )

    def __init__(
        self,
        tracer: SlotTracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Attributes,
        links: Sequence[Link],
        start_time: int | None = None,
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes: dict[str, AttributeValue] = {}
        self._dropped = 0
        # Bounded lists (which count what they drop) only where there is something to bound.
        self._events: BoundedList[Event] | tuple[()] = ()
        self._links: BoundedList[Link] | tuple[()] = ()
        if links:
            limits = tracer.limits
            self._links = tracer.bounded_list.from_seq(
                limits.max_links,
                [  # as the SDK: valid links only, their attributes bounded; the last ones kept
                    Link(
                        link.context,
                        BoundedAttributes(
                            limits.max_link_attributes,
                            link.attributes,
                            max_value_len=limits.max_attribute_length,
                            immutable=True,
                        ),
                    )
                    for link in links
                    if link.context.is_valid or link.attributes or link.context.trace_state
                ],
            )
        self._status = _UNSET
        self._end: int | None = None
        self._start = start_time or time_ns()
        if attributes:
            self.set_attributes(attributes)

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end is None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._end is not None:
            return
        if type(value) in _PLAIN and type(key) is str and key:
            limit = self._tracer.limits.max_span_attribute_length
            if limit is not None and type(value) is str:
                value = value[:limit]
        else:  # the API's own check: drops (with its warning) what it would refuse
            checked = BoundedAttributes(
                attributes={key: value},
                max_value_len=self._tracer.limits.max_span_attribute_length,
            )
            if key not in checked:
                self._dropped += checked.dropped  # (an invalid key counts, as the SDK's)
                return
            value = checked[key]
        attributes = self._attributes
        limit = self._tracer.limits.max_span_attributes
        if limit is not None and key not in attributes and len(attributes) >= limit:
            if limit == 0:
                self._dropped += 1
                return
            del attributes[next(iter(attributes))]  # as BoundedAttributes: the oldest goes
            self._dropped += 1
        attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if not self._attributes and type(attributes) is dict and self._plain(attributes):
            self._attributes.update(attributes)  # (a new span's, the gateway's usual case)
            return
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def _plain(self, attributes: dict[str, AttributeValue]) -> bool:
        """Whether ``attributes`` would be stored as they are, one by one: str keys and
        plain values, within the count limit, with no length limit to cut a str to."""
        limits = self._tracer.limits
        if self._end is not None or limits.max_span_attribute_length is not None:
            return False
        count = limits.max_span_attributes
        return (
            (count is None or len(attributes) <= count)
            and _PLAIN.issuperset(map(type, attributes.values()))
            and _KEYS.issuperset(map(type, attributes))
            and "" not in attributes
        )

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._end is not None:
            return
        limits = self._tracer.limits
        bounded = BoundedAttributes(
            limits.max_event_attributes,
            attributes,
            immutable=True,
            max_value_len=limits.max_attribute_length,
        )
        if isinstance(self._events, tuple):  # the first event
            self._events = self._tracer.bounded_list(limits.max_events)
        # A bounded list: past its limit the oldest event goes, and is counted as dropped.
        self._events.append(self._tracer.event(name, bounded, timestamp or time_ns()))

    def update_name(self, name: str) -> None:
        if self._end is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # As the SDK: OK is final, and UNSET is never set.
        if self._end is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        named = f"{module}.{qualname}" if module and module != "builtins" else qualname
        event: dict[str, Any] = {
            "exception.type": named,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end is not None:
            return
        self._end = end_time or time_ns()
        tracer = self._tracer
        attributes: Mapping[str, AttributeValue] = self._attributes
        if self._dropped:  # rare: kept as BoundedAttributes, which report what was dropped
            bounded = BoundedAttributes(
                tracer.limits.max_span_attributes, self._attributes, immutable=True
            )
            bounded.dropped += self._dropped
            attributes = bounded
        tracer.processor.on_end(
            tracer.readable_span(
                name=self._name,
                context=self._context,
                parent=self._parent,
                resource=tracer.resource,
                attributes=attributes,
                events=self._events,
                links=self._links,
                kind=self._kind,
                status=self._status,
                start_time=self._start,
                end_time=self._end,
                instrumentation_scope=tracer.scope,
            )
        )
