"""Bounds on what one GraphQL document may ask for: depth, tokens, aliases, directives,
repeated fields and cost.

`QueryBounds` is built once, with the schema, and keeps each document's verdict (its
validation errors, and its cost where no variable sets it) for every request that sends
the same text: strawberry's parse cache hands out one document object per text, so a
verdict is found by the document's identity. (strawberry's ValidationCache hashes the
whole document, which graphql-core does node by node, on every request.)

Documents that are known in advance (a manifest of trusted documents) are `keep`-ed at
start: parsed, validated and costed then, and held outside the caches' bounds.

The cost limit needs the request's variables (`first: $n`), which validation never sees, so
an operation whose list sizes are variables is costed per request, right after the
validation, on valid documents only.

Directives and repeated fields are counted before validation (`shape_error`), and a
document over those bounds gets that one error and no validation: each repeat would
otherwise cost a validation error of its own (`@aa@aa...` gives one "Unknown directive" per
repeat) or a comparison with every other (500 times `__typename` is 125,000 field pairs
for the rule that merges fields).
"""

import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSchema,
    GraphQLSyntaxError,
    InlineFragmentNode,
    IntValueNode,
    Node,
    OperationDefinitionNode,
    SelectionSetNode,
    ValidationRule,
    VariableNode,
    get_named_type,
    get_nullable_type,
    get_operation_ast,
    is_list_type,
    specified_rules,
)
from graphql.language import SKIP
from graphql.validation import NoSchemaIntrospectionCustomRule
from strawberry.extensions import ParserCache, SchemaExtension

from orderstream.infrastructure.internals import MaxIntrospectionDepthRule, validate_document

# What graphql-core appends to an error that guesses at a name ("Did you mean 'orders'?").
SUGGESTION = re.compile(r" Did you mean .*\?$", re.DOTALL)
# How graphql-core words the parser's token and comment limits.
TOKEN_LIMIT_HIT = re.compile(r"Document contains more than \d+ (tokens|comments)")


@dataclass(frozen=True)
class QueryLimits:
    """How big a GraphQL document may be and what it may ask for."""

    # Levels of nested fields, introspection included: the standard introspection query
    # (graphql-core's, types 9 levels deep) nests 15.
    max_depth: int = 15
    # Lexical tokens (and, separately, comments) the parser reads before giving up.
    max_tokens: int = 2_000
    # Aliased fields per operation, counting a fragment once for every place it is spread.
    max_aliases: int = 15
    # Directives in the whole document (graphql-armor's default).
    max_directives: int = 50
    # How often one selection set may select the same field (response name) itself: the
    # repeats add nothing to the answer, only work.
    max_field_repeats: int = 10
    # The most values a response may hold: see `QueryCost`.
    max_cost: int = 20_000
    # What a list field without `first` is assumed to hold.
    unpaged_list_size: int = 100
    introspection: bool = True
    # "Did you mean ...?" in error messages: they spell out the schema to whoever guesses.
    suggestions: bool = True
    # Documents kept parsed and validated (strawberry's LRU caches).
    cache_size: int = 128


@dataclass
class _Verdict:
    """What one document of one schema was found to be."""

    document: Any  # held, so that its id is not reused while the verdict is kept
    schema: GraphQLSchema
    rules: tuple
    errors: list[GraphQLError]
    costs: dict[str | None, int]  # by operation name, for operations whose cost no variable sets


class QueryBounds:
    """The limits of one schema: validation rules made once, the extension that applies them,
    the parse cache and each document's verdict, and a count of full validations (a document
    seen before skips the rules, so it shows the verdicts being kept)."""

    def __init__(self, limits: QueryLimits) -> None:
        self.limits = limits
        self.validations = 0
        self.parse_options = {"max_lexical_tokens": limits.max_tokens, "max_comments": limits.max_tokens}
        introspection = MaxIntrospectionDepthRule if limits.introspection else IntrospectionDisabled
        self.rules = (
            _bound(ValidationCounter, bounds=self),
            _bound(DepthLimit, max_depth=limits.max_depth),
            _bound(AliasLimit, max_aliases=limits.max_aliases),
            introspection,
        )
        # The rules every request validates with: strawberry's (ExecutionContext's default) and these.
        self.request_rules = tuple(specified_rules) + self.rules
        # strawberry's LRU cache, shared by every request (and every schema of this size).
        self.cached_parse = ParserCache(maxsize=limits.cache_size).cached_parse_document
        self._verdicts: dict[int, _Verdict] = {}  # by id(document), the oldest first
        self._kept: dict[str, Any] = {}  # documents by their text, for as long as the bounds live
        self._kept_verdicts: dict[int, _Verdict] = {}

    def parse(self, text: str, **options: Any):
        """The document of `text`, parsed once while it is cached or kept."""
        kept = self._kept.get(text)
        return kept if kept is not None else self.cached_parse(text, **options)

    def keep(self, schema: GraphQLSchema, text: str) -> list[GraphQLError]:
        """Parses and validates `text` for requests with the rules they use, and costs each of
        its operations whose cost no variable sets, now; keeps all of it for as long as
        these bounds live. The errors a request sending `text` would get (any variables
        aside); the document is kept only when there are none."""
        try:
            document = self.cached_parse(text, **self.parse_options)
        except GraphQLError as error:
            return [error]
        verdict = self.verdict(schema, document, self.request_rules)
        errors = list(verdict.errors)
        if not errors:
            for operation in document.definitions:
                if isinstance(operation, OperationDefinitionNode):
                    name = operation.name.value if operation.name else None
                    error = self.cost_error(verdict, name, {})
                    if error is not None and name in verdict.costs:
                        errors.append(error)
        if not errors:
            self._kept[text] = document
            self._kept_verdicts[id(document)] = verdict
        return errors

    def verdict(self, schema: GraphQLSchema, document, rules: tuple) -> _Verdict:
        """The document validated against `schema` with `rules`, once while it is kept."""
        # The verdict holds its document, so no other document can have the same id meanwhile.
        known = self._verdicts.get(id(document)) or self._kept_verdicts.get(id(document))
        if known is None or known.schema is not schema or known.rules != rules:
            if len(self._verdicts) >= self.limits.cache_size:
                self._verdicts.pop(next(iter(self._verdicts)))
            refused = shape_error(schema, document, self.limits)
            errors = [refused] if refused else validate_document(schema, document, rules)
            known = self._verdicts[id(document)] = _Verdict(document, schema, rules, errors, {})
        return known

    def extension(self) -> Callable[[], SchemaExtension]:
        """For `strawberry.Schema(extensions=[...])`."""
        return lambda: EnforceBounds(self)

    def cost_error(self, verdict: _Verdict, operation_name: str | None,
                   variables: Mapping[str, Any] | None) -> GraphQLError | None:
        document = verdict.document
        cost = verdict.costs.get(operation_name)
        if cost is None:
            operation = get_operation_ast(document, operation_name)
            if operation is None:
                return None  # execution reports the unknown operation
            counting = QueryCost(verdict.schema, document, operation, variables or {}, self.limits.unpaged_list_size)
            cost = counting.total()
            if not counting.read_variables:
                verdict.costs[operation_name] = cost
        if cost <= self.limits.max_cost:
            return None
        return GraphQLError(
            f"This query may return up to {cost:,} values; the limit is {self.limits.max_cost:,}. "
            "Ask for fewer items with `first`, or for fewer fields.",
            get_operation_ast(document, operation_name),
            extensions={"code": "QUERY_TOO_EXPENSIVE", "cost": cost, "maxCost": self.limits.max_cost})

    def public(self, error: GraphQLError) -> GraphQLError:
        """The error as the client may see it: without suggestions when they are off."""
        if self.limits.suggestions or not SUGGESTION.search(error.message):
            return error
        # A new error: validation errors are shared by every request with the same document.
        return GraphQLError(SUGGESTION.sub("", error.message), nodes=error.nodes, source=error.source,
                            positions=error.positions, path=error.path, original_error=error.original_error,
                            extensions=error.extensions)


class EnforceBounds(SchemaExtension):
    """Made per request (strawberry's rule) around the shared, once-built QueryBounds.

    It parses and validates the document itself, through the shared caches, in its one hook:
    strawberry skips its own parse and validation when the document and the errors are set
    already. Each hook an extension has costs every request a context manager built for
    it; one hook instead of the five that ParserCache, ValidationCache and separate steps
    would take is a measurable share of a small request's time.
    """

    def __init__(self, bounds: QueryBounds) -> None:
        self.bounds = bounds

    def on_operation(self) -> Iterator[None]:
        context = self.execution_context
        context.parse_options.update(self.bounds.parse_options)
        # An equal tuple for every request: the verdicts kept hold for the next one.
        context.validation_rules = context.validation_rules + self.bounds.rules
        if context.query and context.graphql_document is None:
            self._parse_and_validate(context)
        yield
        for error in context.pre_execution_errors or ():
            if isinstance(error, GraphQLSyntaxError) and TOKEN_LIMIT_HIT.search(error.message):
                # A fresh error, parsed by strawberry for this request: safe to amend.
                # Other syntax errors get ErrorCodes' code for a bad document.
                error.extensions = {**(error.extensions or {}), "code": "TOO_MANY_TOKENS"}
        result = context.result
        if result is not None and result.errors:
            result.errors = [self.bounds.public(error) for error in result.errors]

    def _parse_and_validate(self, context) -> None:
        try:
            document = self.bounds.parse(context.query, **context.parse_options)
        except GraphQLError:
            # Left unparsed: strawberry parses it again and reports the syntax error the
            # usual way (a cached parse would raise the same error object for every request).
            return
        context.graphql_document = document
        verdict = self.bounds.verdict(context.schema._schema, document, context.validation_rules)
        errors = verdict.errors
        if not errors:
            cost_error = self.bounds.cost_error(verdict, context.operation_name, context.variables)
            errors = [cost_error] if cost_error else []
        context.pre_execution_errors = errors

    def on_stream_result(self, result) -> Iterator[None]:
        # Subscriptions: each result before it is sent (they leave on_operation only at the end).
        if result.errors:
            result.errors = [self.bounds.public(error) for error in result.errors]
        yield


# ---------------------------------------------------------------- before validation


def shape_error(schema: GraphQLSchema, document: DocumentNode, limits: QueryLimits) -> GraphQLError | None:
    """The first bound on directives or repeated fields `document` breaks, as the one error
    to answer it with; None if it keeps them all. A directive may appear once in a place
    (on a field, a fragment, an operation...) unless the schema declares it repeatable,
    and `max_directives` times in the document; a selection set may select a field itself
    at most `max_field_repeats` times."""
    directives = 0
    for node in _nodes(document):
        used = getattr(node, "directives", None)
        if used:
            directives += len(used)
            if directives > limits.max_directives:
                return GraphQLError(
                    f"This document uses more than {limits.max_directives} directives, the limit.", node,
                    extensions={"code": "TOO_MANY_DIRECTIVES", "maxDirectives": limits.max_directives})
            names = Counter(directive.name.value for directive in used)
            for name, times in names.items():
                declared = schema.get_directive(name)
                if times > 1 and not (declared and declared.is_repeatable):
                    return GraphQLError(
                        f"The directive @{name} appears {times} times in one place; it may appear once.",
                        [d for d in used if d.name.value == name],
                        extensions={"code": "DUPLICATE_DIRECTIVE", "directive": name, "times": times})
        if isinstance(node, SelectionSetNode):
            keys = Counter((s.alias or s.name).value for s in node.selections if isinstance(s, FieldNode))
            key, times = keys.most_common(1)[0] if keys else ("", 0)
            if times > limits.max_field_repeats:
                return GraphQLError(
                    f"This selection asks for `{key}` {times} times; a field may be selected at most "
                    f"{limits.max_field_repeats} times in one place (once is enough: the answer holds it once).",
                    node, extensions={"code": "REPEATED_FIELD", "field": key, "times": times,
                                      "maxFieldRepeats": limits.max_field_repeats})
    return None


def _nodes(node: Node) -> Iterator[Node]:
    """`node` and every node under it, depth first, on a stack of its own: no recursion,
    however deeply the document nests (its depth is bounded only by the validation after)."""
    pending = [node]
    while pending:
        node = pending.pop()
        yield node
        for key in node.keys:
            value = getattr(node, key, None)
            if isinstance(value, Node):
                pending.append(value)
            elif isinstance(value, tuple | list):
                pending.extend(item for item in value if isinstance(item, Node))


# ---------------------------------------------------------------- validation rules


def _bound(rule: type[ValidationRule], **settings: Any) -> type[ValidationRule]:
    """A subclass of `rule` with its settings as class attributes: graphql-core makes rules
    from their class alone."""
    return type(rule.__name__, (rule,), settings)


class ValidationCounter(ValidationRule):
    bounds: QueryBounds

    def __init__(self, context) -> None:
        super().__init__(context)
        self.bounds.validations += 1


class DepthLimit(ValidationRule):
    """Each operation's fields nest at most `max_depth` levels, through fragments too."""

    max_depth: int

    def enter_operation_definition(self, node: OperationDefinitionNode, *_args: Any) -> object:
        depth = _Walk(self.context.document).depth(node.selection_set)
        if depth > self.max_depth:
            self.report_error(GraphQLError(
                f"This query nests fields {depth} levels deep; the limit is {self.max_depth}.", node,
                extensions={"code": "QUERY_TOO_DEEP", "depth": depth, "maxDepth": self.max_depth}))
        return SKIP


class AliasLimit(ValidationRule):
    """At most `max_aliases` aliased fields per operation: each alias repeats a field's work."""

    max_aliases: int

    def enter_operation_definition(self, node: OperationDefinitionNode, *_args: Any) -> object:
        aliases = _Walk(self.context.document).aliases(node.selection_set)
        if aliases > self.max_aliases:
            self.report_error(GraphQLError(
                f"This operation uses {aliases} aliases; the limit is {self.max_aliases}.", node,
                extensions={"code": "TOO_MANY_ALIASES", "aliases": aliases, "maxAliases": self.max_aliases}))
        return SKIP


class IntrospectionDisabled(NoSchemaIntrospectionCustomRule):
    def report_error(self, error: GraphQLError) -> None:
        super().report_error(GraphQLError(error.message, error.nodes, extensions={"code": "INTROSPECTION_DISABLED"}))


class _Walk:
    """Walks selection sets through their fragments, each fragment measured once (a document
    can spread one fragment many times, or in a cycle, which validation reports)."""

    def __init__(self, document) -> None:
        self.fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
        self.memo: dict[tuple[str, str], int] = {}
        self.open: set[str] = set()

    def depth(self, selection_set: SelectionSetNode | None) -> int:
        deepest = 0
        for selection in selection_set.selections if selection_set else ():
            if isinstance(selection, FieldNode):
                deepest = max(deepest, 1 + self.depth(selection.selection_set))
            elif isinstance(selection, InlineFragmentNode):
                deepest = max(deepest, self.depth(selection.selection_set))
            else:
                deepest = max(deepest, self._fragment("depth", selection, self.depth))
        return deepest

    def aliases(self, selection_set: SelectionSetNode | None) -> int:
        count = 0
        for selection in selection_set.selections if selection_set else ():
            if isinstance(selection, FieldNode):
                count += (selection.alias is not None) + self.aliases(selection.selection_set)
            elif isinstance(selection, InlineFragmentNode):
                count += self.aliases(selection.selection_set)
            else:
                count += self._fragment("aliases", selection, self.aliases)
        return count

    def _fragment(self, measure: str, spread: FragmentSpreadNode, measured: Callable[..., int]) -> int:
        name = spread.name.value
        fragment = self.fragments.get(name)
        if fragment is None or name in self.open:
            return 0
        key = (measure, name)
        if key not in self.memo:
            self.open.add(name)
            self.memo[key] = measured(fragment.selection_set)
            self.open.discard(name)
        return self.memo[key]


# ---------------------------------------------------------------- cost


class QueryCost:
    """`total()`: the most values the operation's response can hold: every field counts 1,
    and a list field counts its selections once per item. A list holds `first` items when
    the field takes a `first` argument, or when the field that holds it does (a
    connection's `edges`); any other list is assumed to hold `unpaged_list_size`. @skip and
    @include are ignored. Introspection fields count 1: the schema bounds them, and
    MaxIntrospectionDepthRule. Only for valid documents: it trusts the fields and fragments
    to exist. `read_variables` afterwards: whether the total depends on the variables."""

    def __init__(self, schema: GraphQLSchema, document, operation: OperationDefinitionNode,
                 variables: Mapping[str, Any], unpaged_list_size: int) -> None:
        self.schema, self.variables, self.unpaged = schema, variables, unpaged_list_size
        self.operation = operation
        self.read_variables = False  # a `first` was a variable: the cost is this request's alone
        self.defaults = {d.variable.name.value: d.default_value for d in operation.variable_definitions or ()}
        self.fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
        self.memo: dict[tuple[str, int | None], int] = {}

    def total(self) -> int:
        return self.of(self.operation.selection_set, self.schema.get_root_type(self.operation.operation), None)

    def of(self, selection_set: SelectionSetNode, parent_type, page: int | None) -> int:
        total = 0
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                total += self._field(selection, parent_type, page)
            elif isinstance(selection, InlineFragmentNode):
                condition = selection.type_condition
                inner = self.schema.get_type(condition.name.value) if condition else parent_type
                total += self.of(selection.selection_set, inner, page)
            else:
                key = (selection.name.value, page)
                if key not in self.memo:
                    fragment = self.fragments[selection.name.value]
                    inner = self.schema.get_type(fragment.type_condition.name.value)
                    self.memo[key] = self.of(fragment.selection_set, inner, page)
                total += self.memo[key]
        return total

    def _field(self, node: FieldNode, parent_type, page: int | None) -> int:
        if node.name.value.startswith("__"):
            return 1
        definition = parent_type.fields[node.name.value]
        first = self._first(node, definition)
        if is_list_type(get_nullable_type(definition.type)):
            size = first if first is not None else page if page is not None else self.unpaged
            item = self.of(node.selection_set, get_named_type(definition.type), None) if node.selection_set else 1
            return 1 + size * item
        if node.selection_set is None:
            return 1
        return 1 + self.of(node.selection_set, get_named_type(definition.type), first)

    def _first(self, node: FieldNode, definition) -> int | None:
        argument = definition.args.get("first")
        if argument is None:
            return None
        value = next((a.value for a in node.arguments or () if a.name.value == "first"), None)
        if isinstance(value, VariableNode):
            self.read_variables = True
            name = value.name.value
            value = self.variables[name] if name in self.variables else self.defaults.get(name)
        if isinstance(value, IntValueNode):
            value = int(value.value)
        if not isinstance(value, int) or isinstance(value, bool):
            # Absent, null or of the wrong type (coercion will say so): the argument's default.
            value = argument.default_value if isinstance(argument.default_value, int) else self.unpaged
        return max(value, 0)
