"""Moving a bot's database: SQLite into PostgreSQL (``musicbot copy-db``) and back (``musicbot backup``
of a PostgreSQL database), every job, track, limit and setting kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.jobs import DatabaseError, Origin
from bot.jobs.transfer import backup_shared, copy_database
from tests.databases import fresh_postgres, query
from tests.jobs.fakes import FakeModels, RecordingListener, make_settings, request, running_service

TABLES = ("jobs", "tracks", "job_audio", "settings", "default_limits", "user_limits", "fair_turns")


async def fill(database: str) -> list[int]:
    listener = RecordingListener()
    async with running_service(make_settings(database), FakeModels(), listener=listener) as service:
        jobs = [await service.submit(request(f"song {i}", variations=2), Origin(i % 3)) for i in range(5)]
        await listener.wait_settled(job.id for job in jobs)
        await service.set_limits(7, max_queued=1)
        await service.set_limits(None, daily_seconds=900)
    return [job.id for job in jobs]


async def snapshot(database: str) -> dict[str, list[tuple[object, ...]]]:
    found = {}
    for table in TABLES:
        rows = await query(database, f"SELECT * FROM {table}")
        found[table] = sorted(
            (tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in rows), key=repr
        )
    return found


async def test_sqlite_into_postgresql_and_back_keeps_every_row(tmp_path: Path) -> None:
    source = str(tmp_path / "bot.sqlite3")
    ids = await fill(source)
    async with fresh_postgres() as url:
        moved = await copy_database(source, url)
        # The moved bot goes on where it stopped: its new jobs follow the copied ids.
        listener = RecordingListener()
        async with running_service(make_settings(url), FakeModels(), listener=listener) as service:
            new = await service.submit(request("after the move"), Origin(1))
            await listener.wait_settled([new.id])
            old = await service.tracks(ids[0])
            limits = await service.limits(7)
        backup = tmp_path / "backup.sqlite3"
        saved = await backup_shared(url, backup)
        in_postgres = await snapshot(url)

    assert moved.jobs == 5 and moved.rows["tracks"] == 10
    assert saved.jobs == 6 and backup.stat().st_mode & 0o077 == 0
    assert new.id == max(ids) + 1 and listener.outcome(new.id) == "finished"
    assert len(old) == 2 and old[0].audio.samples.shape == (1, 2 * 8000)
    assert limits.max_queued == 1 and limits.daily_seconds == 900
    in_backup = await snapshot(str(backup))
    assert in_backup == in_postgres


async def test_copying_into_a_database_that_holds_jobs_is_refused(tmp_path: Path) -> None:
    source, target = str(tmp_path / "a.sqlite3"), str(tmp_path / "b.sqlite3")
    await fill(source)
    await fill(target)
    with pytest.raises(DatabaseError, match="already holds 5 jobs"):
        await copy_database(source, target)
    assert len(await query(target, "SELECT id FROM jobs")) == 5


async def test_a_backup_never_overwrites_a_file(tmp_path: Path) -> None:
    existing = tmp_path / "taken.sqlite3"
    existing.write_bytes(b"keep me")
    async with fresh_postgres() as url:
        with pytest.raises(DatabaseError, match="already exists"):
            await backup_shared(url, existing)
    assert existing.read_bytes() == b"keep me"
