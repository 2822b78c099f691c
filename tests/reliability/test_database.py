"""The database survives: private files, the WAL checkpointed and emptied, a clear one-line start-up error
for a damaged or locked file or a second bot on it, and ``musicbot backup`` taking a good copy while the
bot writes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import sys
from pathlib import Path

import pytest

import bot.jobs.db
from bot.jobs import Database, DatabaseError, sole_bot
from bot.runner import StartupError, run
from bot.settings import Settings
from generation import GenerationWorker
from tests.discord_emulator import DiscordEmulator
from tests.reliability.harness import (
    ROOT,
    FaultyModels,
    answered,
    bot_running,
    child_bot,
    child_env,
    file_mode,
    rows,
    settings_for,
    wal_bytes,
)


async def musicbot(*args: str, db_path: Path, cwd: Path, **env: str) -> tuple[int, str, str]:
    """The real command line in a child process: (exit code, stdout, stderr)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MUSICBOT_", "DISCORD_"))}
    environ.update(PYTHONPATH=str(ROOT), MUSICBOT_DB=str(db_path), **env)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        *args,
        cwd=cwd,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode(), err.decode()


async def test_the_database_and_its_wal_and_shm_are_private_to_the_owner(
    emu: DiscordEmulator, db_path: Path, models: FaultyModels
) -> None:
    async with bot_running(emu, settings_for(db_path, emu.guild_id), models):
        await answered(
            emu,
            await emu.invoke_command("music", {"prompt": "x", "duration": 1.0}),
            lambda m: bool(m.attachments),
        )
        modes = {name: file_mode(Path(f"{db_path}{name}")) for name in ("", "-wal", "-shm")}

    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}


async def test_a_database_made_by_an_older_version_with_open_permissions_is_made_private(
    db_path: Path,
) -> None:
    sqlite3.connect(db_path).close()
    os.chmod(db_path, 0o644)
    db = await Database.open(db_path)
    await db.close()

    assert file_mode(db_path) == 0o600


async def test_the_wal_is_checkpointed_while_running_and_emptied_at_close(
    emu: DiscordEmulator, db_path: Path, models: FaultyModels
) -> None:
    written = 0

    async def watch_wal() -> None:
        nonlocal written
        while True:
            written = max(written, wal_bytes(db_path))
            await asyncio.sleep(0.01)

    async with bot_running(emu, settings_for(db_path, emu.guild_id), models, checkpoint_every=0.2) as bot:
        watcher = asyncio.create_task(watch_wal())
        for n in range(3):
            interaction = await emu.invoke_command("music", {"prompt": f"song {n}", "duration": 2.0})
            await answered(emu, interaction, lambda m: bool(m.attachments))
        watcher.cancel()
        await emu.wait_for(lambda: wal_bytes(db_path) == 0, timeout=3)
        # While the bot runs, another program sees every job in the database file itself.
        seen = rows(db_path, "SELECT count(*) FROM jobs WHERE state = 'done'")
        await bot.service.usage(emu.member.id)

    assert written > 0 and seen == [(3,)]
    assert wal_bytes(db_path) == 0
    assert rows(db_path, "PRAGMA integrity_check") == [("ok",)]


def damage(db_path: Path, *, pages: tuple[int, int] | None = None) -> None:
    """Overwrite the whole file with text, or only the pages ``[first, last)`` with garbage."""
    if pages is None:
        db_path.write_bytes(b"this is a text file, not a database\n" * 200)
        return
    page = 4096
    data = bytearray(db_path.read_bytes())
    data[pages[0] * page : pages[1] * page] = b"\xde\xad\xbe\xef" * (page * (pages[1] - pages[0]) // 4)
    db_path.write_bytes(bytes(data))


def with_token(settings: Settings, token: str) -> Settings:
    return dataclasses.replace(settings, discord_token=token)


def exists(path: Path) -> bool:
    return path.exists()


async def test_a_file_that_is_not_a_database_stops_the_start_with_one_line(
    db_path: Path, tmp_path: Path
) -> None:
    damage(db_path)
    code, out, err = await musicbot("run", db_path=db_path, cwd=tmp_path, DISCORD_TOKEN="x.y.z")

    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"musicbot: the database {db_path} is damaged (file is not a database): restore a copy made"
        " with `musicbot backup`, or move the file away to start with an empty one"
    ]


async def test_a_database_with_damaged_pages_stops_the_start_with_one_line(
    emu: DiscordEmulator, db_path: Path, models: FaultyModels
) -> None:
    settings = with_token(settings_for(db_path, emu.guild_id), emu.token)
    async with bot_running(emu, settings, models):
        for n in range(30):
            user = emu.add_user(f"user {n}")
            await emu.invoke_command("music", {"prompt": f"{n} " + "x" * 390, "duration": 1.0}, user=user)
        await emu.wait_for(lambda: rows(db_path, "SELECT count(*) FROM jobs") == [(30,)], timeout=10)
    # The header and the schema are intact (it opens), the pages of the jobs table are not.
    damage(db_path, pages=(2, 12))
    with pytest.raises(StartupError) as stopped:
        await run(settings, worker_factory=lambda: GenerationWorker(models))

    message = str(stopped.value)
    assert "\n" not in message and message.startswith(f"the database {db_path} is damaged (")
    assert message.endswith(
        "restore a copy made with `musicbot backup`, or move the file away to start with an empty one"
    )


async def test_a_locked_database_says_so_in_one_line(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await (await Database.open(db_path)).close()
    monkeypatch.setattr(bot.jobs.db, "BUSY_TIMEOUT_MS", 100)
    # Another program in the middle of writing (a second bot, a `sqlite3` shell in a transaction).
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(DatabaseError) as opened:
            await Database.open(db_path)
        settings = settings_for(db_path, None)
        with pytest.raises(StartupError) as started:
            await run(with_token(settings, "x.y.z"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    message = (
        f"the database {db_path} is locked by another program (another musicbot on the same file, or a"
        " database tool with an open transaction); stop it and start again"
    )
    assert str(opened.value) == str(started.value) == message


async def test_a_second_bot_on_the_same_database_stops_at_once_and_the_first_goes_on(
    emu: DiscordEmulator, db_path: Path, tmp_path: Path
) -> None:
    async with child_bot(emu, child_env(emu, db_path), cwd=tmp_path) as first:
        identified = emu.identify_count
        code, out, err = await musicbot("run", db_path=db_path, cwd=tmp_path, DISCORD_TOKEN=emu.token)
        interaction = await emu.invoke_command("music", {"prompt": "still here", "duration": 1.0})
        reply = await answered(emu, interaction, lambda m: bool(m.attachments))
        pid = first.process.pid

    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"musicbot: another musicbot (pid {pid}) is already running on {db_path}: stop it first, or give"
        " this one its own MUSICBOT_DB"
    ]
    assert emu.identify_count == identified  # the second never connected
    assert len(reply.attachments) == 1
    assert rows(db_path, "SELECT count(*) FROM jobs") == [(1,)]


def test_the_bot_lock_is_private_and_free_again_once_released(db_path: Path) -> None:
    taken = rf"another musicbot \(pid {os.getpid()}\) is already running on {db_path}"
    with sole_bot(db_path), pytest.raises(DatabaseError, match=taken), sole_bot(db_path):
        pass
    with sole_bot(db_path):
        pass

    assert file_mode(Path(f"{db_path}.lock")) == 0o600


def test_the_bot_lock_holds_through_a_link_and_says_why_it_cannot_be_had(
    db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import fcntl

    link = tmp_path / "elsewhere.sqlite3"
    link.symlink_to(db_path)
    with sole_bot(db_path), pytest.raises(DatabaseError, match="already running"), sole_bot(link):
        pass

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)  # e.g. a network file system without a lock daemon
    with pytest.raises(DatabaseError, match=r"cannot lock .*\.lock: No locks available"), sole_bot(db_path):
        pass


def test_a_lock_file_left_by_another_user_still_locks(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Path(f"{db_path}.lock").write_text("")
    real_open = os.open

    def read_only(path: str, flags: int, *args: int) -> int:
        if str(path).endswith(".lock") and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied")  # as for a 0600 file of another owner
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with sole_bot(db_path), pytest.raises(DatabaseError, match="already running"), sole_bot(db_path):
        pass


async def test_backup_while_the_bot_runs_and_writes_gives_a_good_private_copy(
    emu: DiscordEmulator, db_path: Path, tmp_path: Path, models: FaultyModels
) -> None:
    copies = [tmp_path / "backup-1.sqlite3", tmp_path / "backup-2.sqlite3"]
    writing = True

    async def keep_writing() -> int:
        """Users asking for music all the while: jobs inserted, run, their tracks stored."""
        sent = 0
        while writing:
            user = emu.add_user(f"user {sent}")
            await emu.invoke_command("music", {"prompt": f"song {sent}", "duration": 1.0}, user=user)
            sent += 1
            await asyncio.sleep(0.01)
        return sent

    async with bot_running(emu, settings_for(db_path, emu.guild_id, max_batch=1), models):
        writer = asyncio.create_task(keep_writing())
        outputs = []
        for copy in copies:
            await asyncio.sleep(0.2)
            outputs.append(await musicbot("backup", str(copy), db_path=db_path, cwd=tmp_path))
        writing = False
        sent = await writer
        refused = await musicbot("backup", str(copies[0]), db_path=db_path, cwd=tmp_path)

    counts = []
    for (code, out, err), copy in zip(outputs, copies, strict=True):
        assert code == 0 and err == "", err
        assert out.startswith(f"backed up {db_path} to {copy}: ") and "integrity check ok" in out
        assert file_mode(copy) == 0o600 and not exists(Path(f"{copy}-wal"))
        assert rows(copy, "PRAGMA integrity_check") == [("ok",)]
        # A consistent snapshot: jobs 1..n, and every job done by then has its track.
        ids = [row[0] for row in rows(copy, "SELECT id FROM jobs ORDER BY id")]
        assert ids == list(range(1, len(ids) + 1))
        assert rows(
            copy, "SELECT count(*) FROM jobs WHERE state = 'done' AND id NOT IN (SELECT job_id FROM tracks)"
        ) == [(0,)]
        counts.append(len(ids))
        # The bot can run on it.
        await (await Database.open(copy)).close()
    assert 0 < counts[0] < counts[1] <= sent
    assert refused[0] == 1
    assert refused[2].strip() == f"musicbot: {copies[0]} already exists; choose a new name for the backup"
    assert not any(exists(tmp_path / f".{copy.name}.partial") for copy in copies)
