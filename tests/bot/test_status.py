"""The status message: queue position while waiting, then a progress bar, edited at most every 3 s."""

from __future__ import annotations

import itertools
from pathlib import Path

from bot.delivery import PROGRESS_INTERVAL
from tests.bot.harness import fake_settings, fake_workers, reply, running_bot, wait_reply, wait_result
from tests.discord_emulator import DiscordEmulator
from tests.jobs.fakes import FakeModels


async def test_status_shows_the_queue_position_then_a_progress_bar_edited_at_most_every_3_s(
    emu: DiscordEmulator, db_path: Path, models: FakeModels
) -> None:
    models.steps, models.step_seconds = 10, 0.4
    models.hold("first")
    async with running_bot(emu, fake_settings(db_path, emu.guild_id), fake_workers(models)) as bot:
        first = await emu.invoke_command("music", {"prompt": "first", "duration": 2.0}, user=emu.owner)
        await models.wait_generating()
        second = await emu.invoke_command("music", {"prompt": "second", "duration": 2.0})
        await wait_reply(emu, second, lambda m: "position" in m.content)
        await bot.service.cancel(1, user_id=emu.owner.id)  # frees the worker for the second job
        result = await wait_result(emu, second)
        cancelled = await wait_reply(emu, first, lambda m: "cancelled" in m.content)

    shown = [version.get("content") or "" for version in result.versions]
    assert any("queued: position 1" in text and "“second”" in text for text in shown), shown
    assert any("▰" in text and "%" in text for text in shown), shown
    status_edits = [
        call.at
        for call in emu.calls_to("PATCH", "^/webhooks/", interaction=second)
        if not call.files and call.status == 200
    ]
    assert len(status_edits) >= 2
    gaps = [later - earlier for earlier, later in itertools.pairwise(status_edits)]
    assert PROGRESS_INTERVAL == 3.0 and min(gaps) >= PROGRESS_INTERVAL - 0.1, gaps
    assert result.attachments and "Job #1" in cancelled.content
    assert reply(emu, first) is cancelled and emu.violations == []
