"""The database file: pragmas, migrations by user_version, refusing a newer schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bot.jobs import DatabaseError, open_database
from bot.jobs.db import MIGRATIONS


async def test_a_new_database_is_migrated_with_wal_and_foreign_keys(db_path: Path) -> None:
    async with open_database(db_path) as db, db.snapshot() as tx:
        foreign_keys = (await tx.fetchone("PRAGMA foreign_keys"))[0]  # type: ignore[index]
        busy = (await tx.fetchone("PRAGMA busy_timeout"))[0]  # type: ignore[index]
    with sqlite3.connect(db_path) as conn:
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    assert (foreign_keys, journal, version) == (1, "wal", len(MIGRATIONS))
    assert busy >= 1000
    assert {"jobs", "tracks", "job_audio", "settings", "default_limits", "user_limits"} <= tables


async def test_opening_again_keeps_the_data(db_path: Path) -> None:
    async with open_database(db_path) as db, db.transaction() as tx:
        await tx.execute("INSERT INTO settings (key, value, updated_at) VALUES ('k', 'v', 'now')")
    async with open_database(db_path) as db, db.snapshot() as tx:
        row = await tx.fetchone("SELECT value FROM settings WHERE key = 'k'")

    assert row is not None and row["value"] == "v"


async def test_a_failed_transaction_leaves_nothing_behind(db_path: Path) -> None:
    async with open_database(db_path) as db:
        with pytest.raises(RuntimeError):
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO settings (key, value, updated_at) VALUES ('k', 'v', 'now')")
                raise RuntimeError("boom")
        async with db.snapshot() as tx:
            row = await tx.fetchone("SELECT count(*) FROM settings")

    assert row is not None and row[0] == 0


async def test_a_database_from_a_newer_bot_is_refused(db_path: Path) -> None:
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")

    with pytest.raises(DatabaseError, match="newer"):
        async with open_database(db_path):
            pass
