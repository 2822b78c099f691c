"""The SQLite database: one aiosqlite connection, WAL, migrations by ``PRAGMA user_version``.

Every statement goes through a lock: a transaction on the one connection never interleaves with
another coroutine's statements (SQLite has no per-coroutine transactions).

The file is its owner's only (it holds prompts, user ids and 15-minute interaction tokens); SQLite
gives the ``-wal`` and ``-shm`` files the same mode, and temporary tables stay in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import aiosqlite

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
PRIVATE_MODE = 0o600
# The WAL is folded into the database and emptied this often (and when the database is closed).
CHECKPOINT_INTERVAL = 600.0
# After a checkpoint the WAL file is cut back to this size (SQLite keeps reusing it otherwise).
WAL_SIZE_LIMIT = 16 * 2**20

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
    """
    -- Commands acknowledged but not yet queued or refused: after a crash their users are told.
    CREATE TABLE pending_requests (
        id                     INTEGER PRIMARY KEY,
        user_id                INTEGER NOT NULL,
        guild_id               INTEGER,
        channel_id             INTEGER,
        application_id         INTEGER,
        interaction_token      TEXT,
        interaction_created_at TEXT,
        status_message_id      INTEGER,
        created_at             TEXT NOT NULL
    );
    """,
    """
    -- Workers in processes of their own: who runs a job (worker_id, attempts fence its writes), until
    -- when its lease holds, how far it is; which bot process owns its replies (owner_id); the fair
    -- turn that claimed it.
    ALTER TABLE jobs ADD COLUMN worker_id TEXT;
    ALTER TABLE jobs ADD COLUMN lease_until TEXT;
    ALTER TABLE jobs ADD COLUMN progress_done INTEGER;
    ALTER TABLE jobs ADD COLUMN progress_total INTEGER;
    ALTER TABLE jobs ADD COLUMN owner_id TEXT;
    ALTER TABLE jobs ADD COLUMN turn INTEGER;
    ALTER TABLE pending_requests ADD COLUMN owner_id TEXT;
    CREATE INDEX jobs_worker ON jobs (worker_id) WHERE state = 'running';
    CREATE TABLE workers (
        id           TEXT PRIMARY KEY,
        host         TEXT NOT NULL,
        pid          INTEGER NOT NULL,
        device       TEXT NOT NULL,
        model        TEXT,
        model_info   TEXT CHECK (model_info IS NULL OR json_valid(model_info)),
        batch        TEXT CHECK (batch IS NULL OR json_valid(batch)),
        started_at   TEXT NOT NULL,
        heartbeat_at TEXT NOT NULL,
        stopped_at   TEXT,
        last_error   TEXT
    );
    CREATE TABLE bots (
        id           TEXT PRIMARY KEY,
        host         TEXT NOT NULL,
        pid          INTEGER NOT NULL,
        shards       TEXT,
        started_at   TEXT NOT NULL,
        heartbeat_at TEXT NOT NULL,
        stopped_at   TEXT
    );
    -- Whose turn it is, shared by every worker: the claim that served each user last.
    CREATE TABLE fair_turns (
        user_id     INTEGER PRIMARY KEY,
        last_served INTEGER NOT NULL
    );
    """,
    """
    -- What the engine did that was not asked for (a mono original widened to stereo), as a JSON list.
    ALTER TABLE jobs ADD COLUMN notes TEXT CHECK (notes IS NULL OR json_valid(notes));
    """,
)


class DatabaseError(Exception):
    """The database file cannot be used (damaged, locked, unreadable, or from a newer bot); says why."""


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

    kind = "sqlite"
    # One bot per file (``sole_bot``): whatever another bot process left is its own to take over.
    shared = False

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()
        self._subscribers: list[asyncio.Event] = []
        self.path = path
        self.url: str | None = None

    def subscribe(self) -> asyncio.Event:
        """An event set whenever a change commits in this process (SQLite cannot notify another
        process: readers there poll). The subscriber clears it before it reads again."""
        event = asyncio.Event()
        self._subscribers.append(event)
        return event

    def unsubscribe(self, event: asyncio.Event) -> None:
        self._subscribers.remove(event)

    def changed(self) -> None:
        for event in self._subscribers:
            event.set()

    @classmethod
    async def open(cls, path: Path | str, *, busy_timeout_ms: int | None = None) -> Database:
        """Connect, set the pragmas, bring the schema up to date and check that it can be written.

        A file that is damaged, locked by another program or unreadable raises ``DatabaseError``
        with one line that says so.
        """
        path = Path(path)
        busy = BUSY_TIMEOUT_MS if busy_timeout_ms is None else busy_timeout_ms
        _make_private(path)
        try:
            conn = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise DatabaseError(_unusable(path, exc)) from None
        try:
            conn.row_factory = sqlite3.Row
            await conn.execute(f"PRAGMA busy_timeout = {int(busy)}")
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            await conn.execute("PRAGMA temp_store = MEMORY")
            await conn.execute("PRAGMA foreign_keys = ON")
            await _migrate(conn)
            # Take the write lock once: a file another program holds locked is found now, not mid-job.
            await conn.execute("BEGIN IMMEDIATE")
            await conn.execute("ROLLBACK")
        except BaseException as exc:
            await conn.close()
            if isinstance(exc, sqlite3.Error):
                raise DatabaseError(_unusable(path, exc)) from None
            raise
        _make_private(path, created=False)
        return cls(conn, path)

    async def checkpoint(self) -> None:
        """Fold the WAL into the database file and empty it (waits for no one but our own lock)."""
        async with self._lock:
            await _checkpoint(self._conn)

    async def checkpoint_every(self, interval: float) -> None:
        """Checkpoint every ``interval`` seconds until cancelled; a failure is logged and retried."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.checkpoint()
            except sqlite3.Error as exc:
                log.warning("checkpointing the database failed: %s", exc)

    async def close(self) -> None:
        """Checkpoint (the WAL ends empty) and close."""
        async with self._lock:
            try:
                await _checkpoint(self._conn)
            except sqlite3.Error as exc:
                log.warning("the last checkpoint of the database failed: %s", exc)
            await self._conn.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """A write transaction (``BEGIN IMMEDIATE``): takes the write lock first, so reads in it stay true."""
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            tx = Tx(self._conn)
            try:
                yield tx
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")
        if tx.notified:
            self.changed()

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
        self.notified = False

    async def lock(self, key: int) -> None:
        """Nothing to take: ``BEGIN IMMEDIATE`` already holds the one write lock of the file."""

    async def notify(self) -> None:
        """Waiters in this process wake when the transaction commits (others poll)."""
        self.notified = True

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


class JobsDatabase(Protocol):
    """What the store needs of a database: SQLite's ``Database`` and PostgreSQL's ``PgDatabase``."""

    kind: str
    shared: bool
    path: Path | None
    url: str | None

    def transaction(self) -> AbstractAsyncContextManager[Any]: ...

    def snapshot(self) -> AbstractAsyncContextManager[Any]: ...

    def subscribe(self) -> asyncio.Event: ...

    def unsubscribe(self, event: asyncio.Event) -> None: ...

    def changed(self) -> None: ...

    async def close(self) -> None: ...


async def wait_changed(event: asyncio.Event, seconds: float) -> None:
    """Until ``event`` (from ``subscribe``) is set, or ``seconds`` pass; then it is cleared."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    event.clear()


def is_postgres(target: Path | str) -> bool:
    """Whether ``MUSICBOT_DB`` names a PostgreSQL server rather than a SQLite file."""
    return str(target).startswith(("postgresql://", "postgres://"))


@asynccontextmanager
async def open_database(
    target: Path | str, *, checkpoint_every: float | None = CHECKPOINT_INTERVAL
) -> AsyncIterator[Any]:
    """The database: a PostgreSQL URL, or a SQLite file checkpointed every ``checkpoint_every`` seconds
    while open (None: only at close)."""
    if is_postgres(target):
        from bot.jobs.pgdb import SCHEMA, PgDatabase

        pg = await PgDatabase.open(str(target), schema=SCHEMA)
        try:
            yield pg
        finally:
            await pg.close()
        return
    db = await Database.open(target)
    checkpoints = None
    if checkpoint_every is not None:
        checkpoints = asyncio.create_task(db.checkpoint_every(checkpoint_every), name="db-checkpoints")
    try:
        yield db
    finally:
        if checkpoints is not None:
            checkpoints.cancel()
            await asyncio.wait([checkpoints])
        await db.close()


@contextmanager
def sole_bot(path: Path) -> Iterator[None]:
    """Hold ``<database>.lock`` while the bot runs: a second bot on the same database stops at once.

    Two bots on one database would both take the queued jobs, and every request would be answered
    twice. The lock is the kernel's (``flock``), so it goes with the process however that ends,
    SIGKILL included, and a restart never finds a stale one. ``musicbot backup`` does not take it.
    """
    if os.name != "posix" or str(path) == ":memory:" or str(path).startswith("file:"):
        yield
        return
    import fcntl

    lock = Path(f"{Path(path).resolve()}.lock")  # a link to the database finds the same lock
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
        writable = True
    except PermissionError:  # left by another user (flock needs only a read descriptor)
        fd, writable = _open_readable(lock), False
    except OSError as exc:
        raise DatabaseError(f"cannot create the lock file {lock}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise DatabaseError(
                f"another musicbot{who} is already running on {path}: stop it first, or give this one"
                " its own MUSICBOT_DB"
            ) from None
        except OSError as exc:  # e.g. a file system without locks
            raise DatabaseError(f"cannot lock {lock}: {exc.strerror or exc}") from None
        if writable:
            with contextlib.suppress(OSError):  # the pid is for the message above, not the lock
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def _open_readable(lock: Path) -> int:
    try:
        return os.open(lock, os.O_RDONLY)
    except OSError as exc:
        raise DatabaseError(f"cannot open the lock file {lock}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class BackupInfo:
    path: Path
    jobs: int
    bytes: int


def backup_database(source: Path, target: Path) -> BackupInfo:
    """A consistent copy of the database, made with SQLite's online backup while the bot may be writing.

    The copy is taken in one read transaction: in WAL mode that is one snapshot, and the bot's writes
    go on meanwhile. It is written to a private temporary file beside ``target``, checked with
    ``integrity_check`` and then renamed, so ``target`` is either absent or a whole, good copy.
    """
    if not source.is_file():
        raise DatabaseError(f"there is no database at {source} (set MUSICBOT_DB, or run from its directory)")
    if target.exists():
        raise DatabaseError(f"{target} already exists; choose a new name for the backup")
    temporary = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        _create_private(temporary)
        # mode=rw: a wrong path must not leave an empty database behind.
        src = sqlite3.connect(
            f"{source.resolve().as_uri()}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_MS / 1000
        )
        with contextlib.closing(src), contextlib.closing(sqlite3.connect(temporary)) as dst:
            src.backup(dst)
            # A self-contained file: no -wal beside it to lose when it is copied or renamed.
            dst.execute("PRAGMA journal_mode = DELETE")
            check = dst.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise DatabaseError(
                    f"the copy failed its integrity check ({check}); the database may be damaged"
                )
            jobs = int(dst.execute("SELECT count(*) FROM jobs").fetchone()[0])
        os.replace(temporary, target)
    except sqlite3.Error as exc:
        raise DatabaseError(_unusable(source, exc)) from None
    except OSError as exc:
        raise DatabaseError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        temporary.unlink(missing_ok=True)
    return BackupInfo(target, jobs, target.stat().st_size)


async def _checkpoint(conn: aiosqlite.Connection) -> None:
    async with conn.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cursor:
        row = await cursor.fetchone()
    if row is not None and row[0]:
        log.debug("the checkpoint could not finish: another program is reading the database")


def _make_private(path: Path, *, created: bool = True) -> None:
    """Create the file for the owner only (``created``); else tighten it and its -wal and -shm."""
    if os.name != "posix" or str(path) == ":memory:" or str(path).startswith("file:"):
        return
    if created:
        try:
            _create_private(path)
        except FileExistsError:
            pass
        except OSError as exc:
            raise DatabaseError(f"cannot create the database {path}: {exc.strerror or exc}") from None
        return
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            mode = file.stat().st_mode & 0o777
            if mode & 0o077:
                os.chmod(file, PRIVATE_MODE)
                log.warning("made %s readable by its owner only (it was %o)", file, mode)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("could not make %s private: %s", file, exc)


def _create_private(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE))


def _unusable(path: Path, exc: sqlite3.Error) -> str:
    """One line that says what is wrong with the database file and what to do."""
    text = str(exc)
    if "locked" in text or "busy" in text:
        return (
            f"the database {path} is locked by another program (another musicbot on the same file, or a"
            " database tool with an open transaction); stop it and start again"
        )
    if isinstance(exc, sqlite3.OperationalError) and "unable to open" in text:
        return f"cannot open the database {path}: check that its directory exists and is writable"
    if "readonly" in text:
        return f"the database {path} is read-only: musicbot needs to write to it (check its permissions)"
    return (
        f"the database {path} is damaged ({text}): restore a copy made with `musicbot backup`, or move the"
        " file away to start with an empty one"
    )


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
