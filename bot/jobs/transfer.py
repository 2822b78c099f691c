"""Copy a whole database between backends: SQLite into PostgreSQL (moving a bot to many machines),
PostgreSQL into a SQLite file (``musicbot backup`` of a shared database), or either into a new one.

Both backends hold the same tables at the same schema version, with times as the same text, so rows
copy as they are. The source is read in one snapshot (PostgreSQL's repeatable read: a consistent copy
while bots and workers write); the target is filled in one transaction and must hold no jobs yet.
Which worker or bot process was alive is not copied: that belongs to the processes, not the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.jobs.db import BackupInfo, DatabaseError, JobsDatabase, is_postgres, open_database

log = logging.getLogger(__name__)

# In the order foreign keys need (a job's parent has a smaller id, so jobs go by id).
TABLES = (
    ("jobs", "id"),
    ("tracks", "job_id, idx"),
    ("job_audio", "job_id, role"),
    ("settings", "key"),
    ("default_limits", "id"),
    ("user_limits", "user_id"),
    ("pending_requests", "id"),
    ("fair_turns", "user_id"),
)
CHUNK = 200


@dataclass(frozen=True)
class CopyInfo:
    rows: dict[str, int]

    @property
    def jobs(self) -> int:
        return self.rows.get("jobs", 0)


async def copy_database(source: str | Path, target: str | Path) -> CopyInfo:
    """Copy every job, track, limit and setting of ``source`` into the empty ``target``."""
    if str(source) == str(target):
        raise DatabaseError("the source and the target are the same database")
    if not is_postgres(source) and not await asyncio.to_thread(Path(source).is_file):
        raise DatabaseError(f"there is no database at {source}")
    async with (
        open_database(source, checkpoint_every=None) as src,
        open_database(target, checkpoint_every=None) as dst,
    ):
        return await copy_rows(src, dst)


async def copy_rows(src: JobsDatabase, dst: JobsDatabase) -> CopyInfo:
    async with dst.snapshot() as tx:
        row = await tx.fetchone("SELECT count(*) FROM jobs")
    if row is not None and row[0]:
        raise DatabaseError(f"the target already holds {row[0]} jobs; copy into a new, empty database")
    counts: dict[str, int] = {}
    async with src.snapshot() as read, dst.transaction() as write:
        for table, order in TABLES:
            counts[table] = 0
            offset = 0
            while True:
                rows = await read.fetchall(
                    f"SELECT * FROM {table} ORDER BY {order} LIMIT ? OFFSET ?", (CHUNK, offset)
                )
                if not rows:
                    break
                columns = list(rows[0].keys())
                await write.executemany(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                    [tuple(_value(row[column]) for column in columns) for row in rows],
                )
                counts[table] += len(rows)
                offset += len(rows)
        if dst.kind == "postgresql" and counts["jobs"]:
            # New jobs continue after the copied ids.
            await write.execute(
                "SELECT setval(pg_get_serial_sequence('jobs', 'id'), (SELECT max(id) FROM jobs))"
            )
    log.info("copied %s", ", ".join(f"{n} {table}" for table, n in counts.items()))
    return CopyInfo(counts)


def _value(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


async def backup_shared(source: str, target: Path) -> BackupInfo:
    """``musicbot backup`` of a PostgreSQL database: a consistent SQLite copy, checked, then named
    ``target`` (restore it with ``musicbot copy-db FILE postgresql://...`` into an empty database)."""
    if await asyncio.to_thread(target.exists):
        raise DatabaseError(f"{target} already exists; choose a new name for the backup")
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        info = await copy_database(source, partial)
        await asyncio.to_thread(_check_and_name, partial, target)
    finally:
        await asyncio.to_thread(_remove, partial)
    return BackupInfo(target, info.jobs, target.stat().st_size)  # noqa: ASYNC240 (one stat)


def _check_and_name(partial: Path, target: Path) -> None:
    with contextlib.closing(sqlite3.connect(partial)) as conn:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
    if check != "ok":
        raise DatabaseError(f"the copy failed its integrity check ({check})")
    os.replace(partial, target)


def _remove(partial: Path) -> None:
    for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
        leftover.unlink(missing_ok=True)
