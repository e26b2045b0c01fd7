"""Persisted and trusted documents: which GraphQL document a request runs when it names one
by its hash instead of sending the text, and which documents may run at all.

A request names a document in one of two ways:
- Apollo's automatic persisted queries (APQ): `extensions.persistedQuery = {"version": 1,
  "sha256Hash": "<64 hex digits>"}`. Sent with its `query`, the text is checked against
  the hash (PERSISTED_QUERY_HASH_MISMATCH, 400) and, once it parses and validates,
  registered. Sent alone, the hash runs the registered text; an unknown hash answers
  PERSISTED_QUERY_NOT_FOUND with HTTP 200, on which Apollo's clients send both.
- the GraphQL-over-HTTP appendix's `documentId`: `"sha256:<64 hex digits>"`, the hash of a
  trusted or registered text (an unknown one: PERSISTED_QUERY_NOT_FOUND, 400).

Registered documents are kept in this process (an LRU of IN_MEMORY texts) and in the read
database (infrastructure.persistence.persisted_documents, at most IN_DATABASE), which
every process serving on it shares: a hash registered with one process runs on any.

A `Manifest` of trusted documents is read, checked, parsed, validated and costed once, at
start (QueryBounds.keep): a request that names one of its documents meets none of that
work. With `enforce` (production) only its documents run, by hash or by text; any other
is refused with PERSISTED_QUERY_NOT_IN_LIST (400), and APQ registers nothing. Without
`enforce` the others run too, and each is logged once as untrusted.

Every transport calls `Documents.query_of(params)` with the request's parameters, as they
came (an HTTP body, a GET's query parameters with `variables` and `extensions` decoded, a
WebSocket subscribe payload), and runs the text it returns as the `query`; a refusal is
raised as a `Refusal` carrying its HTTP status and code, and `refusal_error` makes it the
GraphQL error of a transport without statuses. An SSE request (graphql-sse, distinct
connections) calls it the same way with its body or query parameters, before it opens
the stream: a refusal is then answered as a plain HTTP response, with its status.
"""

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import strawberry
from cachetools import LRUCache
from graphql import GraphQLError
from sqlalchemy.exc import SQLAlchemyError

from orderstream.infrastructure.errors import SettingsError
from orderstream.infrastructure.persistence.persisted_documents import document_of, persist
from orderstream.infrastructure.persistence.read_store import ReadStore
from orderstream.infrastructure.web.graphql_http import Refusal
from orderstream.infrastructure.web.limits import QueryBounds

log = logging.getLogger("orderstream.documents")

IN_MEMORY = 1_000  # registered texts this process keeps at hand
IN_DATABASE = 10_000  # registered texts the read database keeps, for every process
LOGGED_AT_MOST = 10_000  # untrusted documents remembered as logged, before starting over
SHA256 = re.compile(r"[0-9a-fA-F]{64}")
APOLLO_FORMAT = "apollo-persisted-query-manifest"
SETTING = "ORDERSTREAM_TRUSTED_DOCUMENTS"
# An APQ miss must reach the client, never a cache between them.
NOT_CACHED = {"Cache-Control": "private, no-cache, must-revalidate"}


def sha256_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def refusal_error(refusal: Refusal) -> GraphQLError:
    """The refusal as a GraphQL error, for a transport without HTTP statuses (WebSocket)."""
    return GraphQLError(refusal.reason, extensions={"code": refusal.code, **refusal.extensions})


class ManifestError(SettingsError):
    """A manifest of trusted documents that cannot be used: names the file, the entry and
    what is wrong with it."""


@dataclass(frozen=True)
class Manifest:
    """Trusted documents by the SHA-256 hex (lowercase) of their text."""

    path: Path
    documents: Mapping[str, str]

    @classmethod
    def load(cls, path: Path, schema: strawberry.Schema, bounds: QueryBounds) -> "Manifest":
        """Reads the manifest at `path`, in either format: GraphQL Code Generator's (an object
        of texts by their SHA-256 hex) or Apollo's persisted-query manifest. Every document
        must match its hash, parse, validate against `schema` and stay within `bounds`,
        which keep it prepared; else ManifestError."""
        def wrong(what: str, entry: str | None = None) -> ManifestError:
            return ManifestError(f"{SETTING}: {path}: {entry + ': ' if entry else ''}{what}")

        try:
            content = json.loads(path.read_bytes())
        except OSError as error:
            raise wrong(f"cannot be read ({error.strerror})") from None
        except ValueError as error:
            raise wrong(f"is not JSON in UTF-8 ({error})") from None
        if not isinstance(content, dict):
            raise wrong("expected a JSON object of documents by their SHA-256 hex, or Apollo's "
                        f'{{"format": "{APOLLO_FORMAT}", "version": 1, "operations": [...]}}')
        entries = cls._apollo_entries(content, wrong) if "format" in content else [
            (f"entry {json.dumps(key)}", key, text) for key, text in content.items()]
        if not entries:
            raise wrong("lists no documents")
        documents: dict[str, str] = {}
        for entry, key, text in entries:
            sha256 = key.removeprefix("sha256:").lower() if isinstance(key, str) else ""
            if not SHA256.fullmatch(sha256):
                raise wrong(f"the key must be the document's SHA-256 as 64 hex digits, not {json.dumps(key)[:80]}",
                            entry)
            if not isinstance(text, str):
                raise wrong(f"the document must be a string of GraphQL, not {json.dumps(text)[:80]}", entry)
            if sha256_of(text) != sha256:
                raise wrong(f"the document's SHA-256 is {sha256_of(text)}, not its key", entry)
            errors = bounds.keep(schema._schema, text)
            if errors:
                raise wrong("; ".join(error.message for error in errors), entry)
            documents[sha256] = text
        return cls(path, documents)

    @staticmethod
    def _apollo_entries(content: dict, wrong) -> list[tuple[str, object, object]]:
        if content.get("format") != APOLLO_FORMAT or content.get("version") != 1:
            raise wrong(f'expected "format": "{APOLLO_FORMAT}" and "version": 1, not '
                        f'{json.dumps(content.get("format"))[:80]} and {json.dumps(content.get("version"))[:20]}')
        operations = content.get("operations")
        if not isinstance(operations, list):
            raise wrong('"operations" must be a list of {"id", "name", "type", "body"}')
        entries = []
        for index, operation in enumerate(operations):
            if not isinstance(operation, dict):
                raise wrong('expected an object with "id" and "body"', f"operations[{index}]")
            entries.append((f"operations[{index}]", operation.get("id"), operation.get("body")))
        return entries


@dataclass(eq=False)
class Documents:
    """Finds the document a request names, registers APQ documents, and holds requests to the
    manifest when there is one (see the module). `read`: the read store shared registrations
    are kept in; None keeps them in this process only."""

    schema: strawberry.Schema
    bounds: QueryBounds
    read: ReadStore | None = None
    manifest: Manifest | None = None
    enforce: bool = False
    _registered: LRUCache = field(default_factory=lambda: LRUCache(IN_MEMORY))
    _logged: set[str] = field(default_factory=set)

    async def query_of(self, params: Mapping[str, Any]) -> object:
        """The document to run for a request's `params`: the text a `documentId` or an APQ
        hash names, else the `query` as sent (whatever its type: the transport checks it).
        Raises Refusal for a document the request may not run, or cannot name."""
        query = params.get("query")
        document_id = params.get("documentId")
        extensions = params.get("extensions")
        persisted = extensions.get("persistedQuery") if isinstance(extensions, dict) else None
        if document_id is not None:
            sha256 = self._document_id(document_id)
            if query is not None:
                raise Refusal(400, "send either `query` or `documentId`, not both")
            return await self._named(sha256, apq=False)
        if persisted is not None:
            sha256 = self._apq_hash(persisted)
            if query is None:
                return await self._named(sha256, apq=True)
            if not isinstance(query, str):
                return query
            if sha256_of(query) != sha256:
                raise Refusal(400, "the query's SHA-256 is not extensions.persistedQuery.sha256Hash",
                              "PERSISTED_QUERY_HASH_MISMATCH")
            if not self._trusted(query, sha256):
                await self._register(sha256, query)
            return query
        if isinstance(query, str) and self.manifest is not None:
            self._trusted(query, sha256_of(query))
        return query

    @staticmethod
    def _document_id(document_id: object) -> str:
        if not isinstance(document_id, str):
            raise Refusal(400, f"`documentId` must be a string, not {json.dumps(document_id)[:40]}")
        scheme, colon, sha256 = document_id.partition(":")
        if not colon or scheme != "sha256":
            raise Refusal(400, f"`documentId` must be sha256:<64 hex digits>; {json.dumps(document_id[:80])} "
                               f"names no scheme this server knows (only sha256)")
        if not SHA256.fullmatch(sha256):
            raise Refusal(400, "`documentId` must be sha256:<64 hex digits>")
        return sha256.lower()

    @staticmethod
    def _apq_hash(persisted: object) -> str:
        version = persisted.get("version") if isinstance(persisted, dict) else None
        if version != 1 or isinstance(version, bool):
            raise Refusal(400, 'extensions.persistedQuery must be {"version": 1, "sha256Hash": "<64 hex digits>"}')
        sha256 = persisted.get("sha256Hash")
        if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
            raise Refusal(400, "extensions.persistedQuery.sha256Hash must be a SHA-256 as 64 hex digits")
        return sha256.lower()

    def _trusted(self, query: str, sha256: str) -> bool:
        """Whether `query` is in the manifest; if not, refused when enforcing, else logged once."""
        if self.manifest is None:
            return False
        if sha256 in self.manifest.documents:
            return True
        self._untrusted(sha256)
        return False

    def _untrusted(self, sha256: str) -> None:
        """Refuses a document outside the manifest when enforcing, else logs it (once)."""
        if self.enforce:
            raise Refusal(400, "this server runs only the documents of its trusted-documents manifest",
                          "PERSISTED_QUERY_NOT_IN_LIST")
        if sha256 not in self._logged:
            if len(self._logged) >= LOGGED_AT_MOST:
                self._logged.clear()
            self._logged.add(sha256)
            log.warning("an untrusted document ran: sha256:%s is not in %s", sha256, self.manifest.path)

    async def _named(self, sha256: str, apq: bool) -> str:
        if self.manifest is not None:
            text = self.manifest.documents.get(sha256)
            if text is not None:
                return text
            if self.enforce:
                self._untrusted(sha256)
        text = self._registered.get(sha256)
        if text is None and self.read is not None:
            text = await self.read.read(partial(document_of, sha256))
            if text is not None:
                self._registered[sha256] = text
        if text is not None:
            if self.manifest is not None:
                self._untrusted(sha256)
            return text
        if apq:
            raise Refusal(200, "PersistedQueryNotFound", "PERSISTED_QUERY_NOT_FOUND", headers=NOT_CACHED)
        raise Refusal(400, f"no document is known as sha256:{sha256}", "PERSISTED_QUERY_NOT_FOUND")

    async def _register(self, sha256: str, query: str) -> None:
        """Keeps a document that parses and validates (the request reports any other)."""
        if sha256 in self._registered:
            return
        try:
            document = self.bounds.parse(query, **self.bounds.parse_options)
        except GraphQLError:
            return
        if self.bounds.verdict(self.schema._schema, document, self.bounds.request_rules).errors:
            return
        self._registered[sha256] = query
        if self.read is not None:
            try:
                await self.read.write(partial(persist, sha256, query, IN_DATABASE))
            except SQLAlchemyError:
                # A cache: the request runs all the same, and the client sends the text again.
                log.warning("a persisted query could not be stored in the read database", exc_info=True)
