"""The SQLite database: one aiosqlite connection, WAL, migrations by ``PRAGMA user_version``.

Every statement goes through a lock: a transaction on the one connection never interleaves with
another coroutine's statements (SQLite has no per-coroutine transactions).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

# Plain SQL, one script per schema version; never edit a released one, append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id                     INTEGER PRIMARY KEY,
        user_id                INTEGER NOT NULL,
        guild_id               INTEGER,
        channel_id             INTEGER,
        kind                   TEXT NOT NULL
                               CHECK (kind IN ('new', 'variations', 'extend', 'regenerate')),
        parent_id              INTEGER REFERENCES jobs (id) ON DELETE SET NULL,
        parent_track           INTEGER,
        request                TEXT NOT NULL CHECK (json_valid(request)),
        seconds                REAL NOT NULL CHECK (seconds > 0),
        has_melody             INTEGER NOT NULL DEFAULT 0,
        state                  TEXT NOT NULL DEFAULT 'queued'
                               CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        attempts               INTEGER NOT NULL DEFAULT 0,
        created_at             TEXT NOT NULL,
        started_at             TEXT,
        finished_at            TEXT,
        model                  TEXT,
        error                  TEXT,
        result_seconds         REAL,
        sample_rate            INTEGER,
        seeds                  TEXT CHECK (seeds IS NULL OR json_valid(seeds)),
        elapsed                REAL,
        application_id         INTEGER,
        interaction_token      TEXT,
        interaction_created_at TEXT,
        status_message_id      INTEGER,
        result_message_id      INTEGER,
        thread_id              INTEGER,
        delivered_at           TEXT
    );
    CREATE INDEX jobs_active ON jobs (state) WHERE state IN ('queued', 'running');
    CREATE INDEX jobs_user_created ON jobs (user_id, created_at);
    CREATE INDEX jobs_thread ON jobs (thread_id) WHERE thread_id IS NOT NULL;
    CREATE INDEX jobs_undelivered ON jobs (id)
        WHERE delivered_at IS NULL AND state IN ('done', 'failed');

    -- Result audio, so an undelivered result survives a crash and a track can be extended later.
    CREATE TABLE tracks (
        job_id      INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        idx         INTEGER NOT NULL CHECK (idx >= 0),
        seed        INTEGER NOT NULL,
        sample_rate INTEGER NOT NULL,
        samples     INTEGER NOT NULL,
        flac        BLOB NOT NULL,
        PRIMARY KEY (job_id, idx)
    );

    -- Audio a job was given (a melody reference), loaded again when the job runs.
    CREATE TABLE job_audio (
        job_id INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        role   TEXT NOT NULL CHECK (role IN ('melody')),
        flac   BLOB NOT NULL,
        PRIMARY KEY (job_id, role)
    );

    CREATE TABLE settings (
        key        TEXT PRIMARY KEY,
        value      TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );

    CREATE TABLE default_limits (
        id            INTEGER PRIMARY KEY CHECK (id = 1),
        max_queued    INTEGER CHECK (max_queued >= 0),
        daily_seconds INTEGER CHECK (daily_seconds >= 0),
        max_duration  INTEGER CHECK (max_duration >= 1),
        updated_at    TEXT NOT NULL
    );

    CREATE TABLE user_limits (
        user_id       INTEGER PRIMARY KEY,
        max_queued    INTEGER CHECK (max_queued >= 0),
        daily_seconds INTEGER CHECK (daily_seconds >= 0),
        max_duration  INTEGER CHECK (max_duration >= 1),
        updated_at    TEXT NOT NULL
    );
    """,
)


class DatabaseError(Exception):
    """The database file cannot be used by this version of the bot."""


def to_db_time(moment: datetime) -> str:
    """A UTC timestamp of fixed width, so text order is time order."""
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment.astimezone(UTC).strftime(TIMESTAMP_FORMAT)


def from_db_time(text: str | None) -> datetime | None:
    if text is None:
        return None
    return datetime.strptime(text, TIMESTAMP_FORMAT).replace(tzinfo=UTC)


class Database:
    """One connection and the lock that keeps its transactions apart."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()
        self.path = path

    @classmethod
    async def open(cls, path: Path | str) -> Database:
        """Connect, set the pragmas and bring the schema up to date."""
        path = Path(path)
        conn = await aiosqlite.connect(path, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA foreign_keys = ON")
            await _migrate(conn)
        except BaseException:
            await conn.close()
            raise
        return cls(conn, path)

    async def close(self) -> None:
        async with self._lock:
            await self._conn.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """A write transaction (``BEGIN IMMEDIATE``): takes the write lock first, so reads in it stay true."""
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(self._conn)
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Tx]:
        """A read transaction: every read in it sees the same state."""
        async with self._lock:
            await self._conn.execute("BEGIN")
            try:
                yield Tx(self._conn)
            finally:
                await self._conn.execute("ROLLBACK")


class Tx:
    """Statements inside one transaction."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        async with self._conn.execute(sql, params) as cursor:
            return cursor.rowcount

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        cursor = await self._conn.executemany(sql, rows)
        await cursor.close()

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        async with self._conn.execute(sql, params) as cursor:
            return await cursor.fetchone()

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return list(await self._conn.execute_fetchall(sql, params))


@asynccontextmanager
async def open_database(path: Path | str) -> AsyncIterator[Database]:
    db = await Database.open(path)
    try:
        yield db
    finally:
        await db.close()


async def _migrate(conn: aiosqlite.Connection) -> None:
    async with conn.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    version = int(row[0]) if row else 0
    if version > len(MIGRATIONS):
        raise DatabaseError(
            f"the database is at schema version {version}, newer than this bot knows ({len(MIGRATIONS)});"
            " update the bot"
        )
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        log.info("migrating the database to schema version %d", number)
        try:
            # user_version cannot be a bound parameter; ``number`` is our own integer.
            await conn.executescript(
                f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number:d};\nCOMMIT;"
            )
        except BaseException:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
            raise
