"""One small SQLite table of a content cache (file digests, reward scores, judge replies)."""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def open_table(path: Path, schema: str):
    """A connection to `path` with `schema` (CREATE TABLE IF NOT EXISTS statements, `;`-separated) applied; commits on
    success, rolls back on an error, and always closes. The 60 s timeout lets processes share the file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=60)
    try:
        with db:
            for statement in schema.split(";"):  # one or more CREATE ... IF NOT EXISTS statements
                if statement.strip():
                    db.execute(statement)
            yield db
    finally:
        db.close()
