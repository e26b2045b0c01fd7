"""Consistent copies of SQLite databases while they take writes.

SQLite's online backup API copies a database page by page, a step at a time, so that the
writers are never held up for long. A backup restarts whenever another connection writes
to the source between two steps, which under steady writes could go on for ever; a read
transaction held open on the source across every step pins the one moment it began (WAL
mode keeps that snapshot for its reader while writers go on), so the copy is that moment,
whole, and never restarts.
"""

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import make_url

STEP_PAGES = 1024


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite database URL; None for any other database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def copy_database(source: Path, target: Path, progress: Callable[[int, int], None]) -> int:
    """Copy the SQLite database `source` to `target`, as it was when the copy began, while
    others go on writing to it; `progress(pages done, pages in all)` after each step.
    The copy is written beside `target` and renamed into place once whole, so `target`
    never holds half a database. Returns the pages copied."""
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    reader = sqlite3.connect(source, isolation_level=None)
    copy = sqlite3.connect(partial)
    pages = 0
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the snapshot starts here

        def step(_status: int, remaining: int, total: int) -> None:
            nonlocal pages
            pages = total
            progress(total - remaining, total)

        reader.backup(copy, pages=STEP_PAGES, progress=step)
        reader.execute("COMMIT")
        # The copy keeps the source's journal mode; it is checked and closed before it is named.
        if copy.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            raise RuntimeError(f"the copy of {source} failed SQLite's integrity check")
    finally:
        reader.close()
        copy.close()
    os.replace(partial, target)
    return pages
