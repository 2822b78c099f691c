"""Both backends for tests: a SQLite file, or a PostgreSQL database made for one test and dropped after.

The PostgreSQL server is the one at ``MUSICBOT_TEST_POSTGRES`` (default: the machine's, at
127.0.0.1:5432 with trust authentication). Each database has a unique name; no test touches another.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

from bot.jobs.db import is_postgres
from bot.jobs.pgdb import numbered

SERVER = os.environ.get("MUSICBOT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@asynccontextmanager
async def fresh_postgres() -> AsyncIterator[str]:
    """The URL of a new, empty database, dropped (with its connections) when the block ends."""
    name = f"musicbot_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(SERVER, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise RuntimeError(
            f"the tests need a PostgreSQL server at {SERVER} (set MUSICBOT_TEST_POSTGRES): {exc}"
        ) from None
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base, _, _ = SERVER.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        admin = await asyncpg.connect(SERVER, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def query(database: str | Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of one statement (``?`` placeholders), straight from the database, as tuples."""
    if is_postgres(database):
        conn = await asyncpg.connect(str(database), timeout=10)
        try:
            return [tuple(row) for row in await conn.fetch(numbered(sql), *params)]
        finally:
            await conn.close()

    def run() -> list[tuple[Any, ...]]:
        with sqlite3.connect(database) as conn:
            return [tuple(row) for row in conn.execute(sql, params).fetchall()]

    return await asyncio.to_thread(run)


async def states(database: str | Path) -> dict[int, str]:
    return {int(job_id): state for job_id, state in await query(database, "SELECT id, state FROM jobs")}


async def _check() -> None:
    try:
        conn = await asyncpg.connect(SERVER, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise SystemExit(
            f"no PostgreSQL server answers at {SERVER} ({exc}): the tests need one; start it, or point"
            " MUSICBOT_TEST_POSTGRES at one"
        ) from None
    version = await conn.fetchval("SHOW server_version")
    await conn.close()
    print(f"PostgreSQL {version} answers at {SERVER}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--check"]:
        asyncio.run(_check())
