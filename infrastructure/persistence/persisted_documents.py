"""GraphQL documents registered by clients (automatic persisted queries), by the SHA-256 hex
of their text, in the read database: every process serving on it knows a document any of
them was sent. The table is a cache, bounded by `most`: the oldest entries give way, and a
client whose hash was dropped is asked for the text again."""

from datetime import UTC, datetime

from sqlalchemy import Column, Connection, MetaData, String, Table, Text, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from orderstream.infrastructure.persistence.database import UTCDateTime

metadata = MetaData()
persisted_documents = Table(
    "persisted_documents",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("document", Text, nullable=False),
    Column("stored_at", UTCDateTime, nullable=False, index=True),
)


def document_of(sha256: str, conn: Connection) -> str | None:
    """The text registered under `sha256`, if it is (still) kept."""
    return conn.execute(select(persisted_documents.c.document)
                        .where(persisted_documents.c.sha256 == sha256)).scalar_one_or_none()


def persist(sha256: str, document: str, most: int, conn: Connection) -> None:
    """Keeps `document` under `sha256` (a text already there stays), then drops the oldest
    entries beyond `most`."""
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    inserted = conn.execute(insert(persisted_documents).values(
        sha256=sha256, document=document, stored_at=datetime.now(UTC)).on_conflict_do_nothing())
    if inserted.rowcount:
        beyond = (select(persisted_documents.c.sha256).order_by(persisted_documents.c.stored_at.desc(),
                                                               persisted_documents.c.sha256)
                  .offset(most))
        conn.execute(delete(persisted_documents).where(persisted_documents.c.sha256.in_(beyond)))
