"""``musicbot run`` as its owner starts it: a subprocess, settings from the environment."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from tests.bot.harness import audio_of, wait_result
from tests.discord_emulator import DiscordEmulator

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MUSICBOT_", "DISCORD_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
        MUSICBOT_DB=str(tmp_path / "bot.sqlite3"),
        **settings,
    )
    return env


@contextlib.asynccontextmanager
async def musicbot_run(
    emu: DiscordEmulator, env: dict[str, str], cwd: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.bot.run_against_emulator",
        emu.api_url,
        emu.gateway_url,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_run_without_a_token_says_how_to_get_one_and_exits(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "run",
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert err.decode().strip().splitlines() == [
        "musicbot: DISCORD_TOKEN is not set: copy the bot token from your application's Bot page in the"
        " Discord developer portal into .env or the environment (see README)"
    ]
    assert out == b"" and not (tmp_path / "bot.sqlite3").exists()


async def _music_once(
    emu: DiscordEmulator, process: asyncio.subprocess.Process, options: dict[str, object]
) -> tuple[Any, str]:
    """Wait for the bot to connect, ask for music once, stop it with SIGINT: the result and stderr."""
    await emu.wait_for(lambda: emu.identify_count >= 1 or process.returncode is not None, timeout=90)
    if process.returncode is not None:
        _, err = await process.communicate()
        raise AssertionError(f"musicbot run ended ({process.returncode}): {err.decode()[-3000:]}")
    result = await wait_result(emu, await emu.invoke_command("music", options), timeout=60)
    process.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    return result, err.decode()


async def test_run_with_a_rejected_token_says_so_without_showing_it(
    emu: DiscordEmulator, tmp_path: Path
) -> None:
    secret = "MTIzNDU2Nzg5.wrong.T0KEN-secret-part"
    async with musicbot_run(emu, _env(tmp_path, DISCORD_TOKEN=secret), tmp_path) as process:
        out, err = await asyncio.wait_for(process.communicate(), 60)

    assert process.returncode == 2
    assert "musicbot: Discord rejected DISCORD_TOKEN (401 Unauthorized)" in err.decode()
    assert "Traceback" not in err.decode()
    assert secret not in (out + err).decode() and "secret-part" not in (out + err).decode()
    assert emu.calls[-1].path == "/users/@me" and emu.calls[-1].status == 401


async def test_run_in_a_server_the_bot_is_not_in_says_what_to_do(
    emu: DiscordEmulator, tmp_path: Path, tiny_model_dir: Path
) -> None:
    other = emu.guild_id + 1
    env = _env(
        tmp_path,
        DISCORD_TOKEN=emu.token,
        MUSICBOT_GUILD_ID=str(other),
        MUSICBOT_MODEL_SMALL=str(tiny_model_dir),
        MUSICBOT_DEVICE="cpu",
    )
    async with musicbot_run(emu, env, tmp_path) as process:
        _, err = await asyncio.wait_for(process.communicate(), 90)

    assert process.returncode == 2
    assert (
        f"musicbot: Discord refused the command sync for server {other} (MUSICBOT_GUILD_ID) (403 Missing"
        " Access): invite the bot to that server with the bot and applications.commands scopes"
    ) in err.decode()
    assert "Traceback" not in err.decode() and emu.token not in err.decode()


async def test_run_syncs_to_the_guild_and_makes_music(
    emu: DiscordEmulator, tmp_path: Path, tiny_model_dir: Path
) -> None:
    env = _env(
        tmp_path,
        DISCORD_TOKEN=emu.token,
        MUSICBOT_GUILD_ID=str(emu.guild_id),
        MUSICBOT_MODEL_SMALL=str(tiny_model_dir),
        MUSICBOT_DEVICE="cpu",
        MUSICBOT_DTYPE="float32",
    )
    async with musicbot_run(emu, env, tmp_path) as process:
        result, err = await _music_once(emu, process, {"prompt": "startup check", "duration": 1.0})

    assert audio_of(result)[0].shape == (32000, 1) and "small · 1 s" in result.content
    assert [scope for scope, _ in emu.command_syncs] == [emu.guild_id]
    assert emu.token not in err
    assert process.returncode in (0, 130) and emu.violations == []


async def test_run_serves_a_stereo_checkpoint_in_stereo(
    emu: DiscordEmulator, tmp_path: Path, tiny_stereo_dir: Path
) -> None:
    env = _env(
        tmp_path,
        DISCORD_TOKEN=emu.token,
        MUSICBOT_GUILD_ID=str(emu.guild_id),
        MUSICBOT_MODEL="stereo-small",
        MUSICBOT_MODEL_STEREO_SMALL=str(tiny_stereo_dir),
        MUSICBOT_DEVICE="cpu",
        MUSICBOT_DTYPE="float32",
    )
    async with musicbot_run(emu, env, tmp_path) as process:
        result, _ = await _music_once(emu, process, {"prompt": "wide pads", "duration": 2.5})

    audio, rate = audio_of(result)
    assert (audio.shape, rate) == ((80000, 2), 32000) and "stereo-small · 2.5 s" in result.content
    assert not np.array_equal(audio[:, 0], audio[:, 1])
    assert emu.violations == []
