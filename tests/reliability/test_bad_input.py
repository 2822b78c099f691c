"""Bad input gets a short, specific message and changes nothing: crafted options that skip Discord's own
checks, unusable prompts, unusable melody files, buttons of jobs that are gone, other users' jobs;
and hypothesis throws arbitrary prompts and option values at the job service."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import math
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bot.jobs import JobService, JobState, LimitExceeded, Origin, open_database
from bot.settings import Limits
from generation import GenerationRequest, GenerationWorker, InvalidRequest, SamplingParams
from tests.discord_emulator import DiscordEmulator, EmulatedInteraction, Upload
from tests.reliability.harness import (
    FaultyModels,
    answered,
    attachment,
    bot_running,
    crafted,
    rows,
    settings_for,
)

T = TypeVar("T")
MIB = 2**20


def tune(seconds: float, rate: int = 32000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(
        buffer, (0.4 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16"
    )
    return buffer.getvalue()


def flac_claiming(hours: float) -> bytes:
    """A 2 s FLAC whose header says it lasts ``hours`` (a few hundred bytes)."""
    rate = 48000
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((2 * rate, 2), dtype=np.float32), rate, format="FLAC", subtype="PCM_16")
    data = bytearray(buffer.getvalue())
    info = int.from_bytes(data[18:26], "big")  # STREAMINFO: rate, channels, bits, 36-bit sample count
    info = (info & ~((1 << 36) - 1)) | int(hours * 3600 * rate)
    data[18:26] = info.to_bytes(8, "big")
    return bytes(data)


def nothing_changed(db_path: Path) -> bool:
    return rows(db_path, "SELECT (SELECT count(*) FROM jobs) + (SELECT count(*) FROM pending_requests)") == [
        (0,)
    ]


async def refusal(emu: DiscordEmulator, interaction: EmulatedInteraction) -> str:
    message = await answered(emu, interaction)
    assert message.ephemeral, message.content
    return message.content


def option(kind: int, name: str, value: Any) -> dict[str, Any]:
    return {"type": kind, "name": name, "value": value}


STRING, INTEGER, BOOLEAN, NUMBER, ATTACHMENT = 3, 4, 5, 10, 11
PROMPT = option(STRING, "prompt", "calm piano")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ([PROMPT, option(NUMBER, "duration", "ten")], "❌ Duration must be a number."),
        ([PROMPT, option(STRING, "duration", "10")], "❌ Duration must be a number."),
        ([PROMPT, option(NUMBER, "duration", math.nan)], "❌ Duration must be a number between 1 and 600."),
        ([PROMPT, option(NUMBER, "duration", math.inf)], "❌ Duration must be a number between 1 and 600."),
        ([PROMPT, option(NUMBER, "duration", 0)], "❌ Duration must be between 1 and 600 (got 0)."),
        ([PROMPT, option(NUMBER, "duration", -5.5)], "❌ Duration must be between 1 and 600 (got -5.5)."),
        ([PROMPT, option(INTEGER, "variations", 2.5)], "❌ Variations must be a whole number."),
        ([PROMPT, option(INTEGER, "variations", True)], "❌ Variations must be a whole number."),
        ([PROMPT, option(INTEGER, "variations", 0)], "❌ Variations must be between 1 and 4 (got 0)."),
        ([PROMPT, option(INTEGER, "seed", -1)], "❌ Seed must be between 0 and 2147483647 (got -1)."),
        (
            [PROMPT, option(INTEGER, "seed", 2**64)],
            f"❌ Seed must be between 0 and 2147483647 (got {2**64}).",
        ),
        ([PROMPT, option(NUMBER, "guidance", 0.5)], "❌ Guidance must be between 1 and 20 (got 0.5)."),
        ([PROMPT, option(NUMBER, "temperature", 0)], "❌ Temperature must be between 0.01 and 5 (got 0)."),
        ([PROMPT, option(INTEGER, "top_k", 5000)], "❌ Top_k must be between 0 and 2048 (got 5000)."),
        ([PROMPT, option(NUMBER, "top_p", 1.5)], "❌ Top_p must be between 0 and 1 (got 1.5)."),
        ([PROMPT, option(BOOLEAN, "loop", "yes")], "❌ Loop must be true or false."),
        ([option(STRING, "prompt", 42)], "❌ Prompt must be text."),
        ([option(NUMBER, "duration", 5)], "❌ Prompt is required."),
        ([PROMPT, option(ATTACHMENT, "melody", "not-an-id")], "❌ Melody must be an attached file."),
        ([PROMPT, option(ATTACHMENT, "melody", "123456")], "❌ Melody must be an attached file."),
    ],
    ids=lambda value: None if isinstance(value, list) else value[2:40],
)
async def test_crafted_option_values_are_refused_with_a_specific_message(
    emu: DiscordEmulator, db_path: Path, models: FaultyModels, options: list[dict[str, Any]], message: str
) -> None:
    async with bot_running(emu, settings_for(db_path, emu.guild_id), models):
        said = await refusal(emu, await crafted(emu, "music", options))

    assert said == message
    assert nothing_changed(db_path) and models.calls == [] and emu.violations == []


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "❌ The prompt is empty: describe the music you want."),
        ("  \t\n  ", "❌ The prompt is empty: describe the music you want."),
        ("x" * 401, "❌ Prompt is too long (401 characters; at most 400)."),
        ("x" * 100_000, "❌ Prompt is too long (100000 characters; at most 400)."),
        ("beat\x00drop", "❌ The prompt contains control characters."),
        ("\x1b[31mred alert", "❌ The prompt contains control characters."),
        ("half a \ud83d pair", "❌ The prompt contains characters that are not valid text."),
    ],
    ids=["empty", "whitespace", "401-chars", "100k-chars", "nul", "escape-sequence", "lone-surrogate"],
)
async def test_an_unusable_prompt_is_refused_with_a_specific_message(
    emu: DiscordEmulator, db_path: Path, models: FaultyModels, prompt: str, message: str
) -> None:
    async with bot_running(emu, settings_for(db_path, emu.guild_id), models):
        said = await refusal(emu, await crafted(emu, "music", [option(STRING, "prompt", prompt)]))

    assert said == message
    assert nothing_changed(db_path) and emu.violations == []


WAV = tune(3.0)
BIG = 20 * MIB


@pytest.mark.parametrize(
    ("upload", "lies", "message"),
    [
        (
            Upload("tune.wav", b"\x89PNG\r\n\x1a\n" + bytes(500)),
            {},
            "❌ The file is not audio that can be read",
        ),
        (Upload("tune.wav", b""), {}, "❌ The audio file is empty."),
        (Upload("tune.wav", WAV[:30]), {}, "❌ The file is not audio that can be read"),
        (Upload("tune.wav", WAV[:44]), {}, "❌ The audio file holds no samples."),
        (Upload("tune.wav", WAV[: 44 + 16000 * 2]), {}, "❌ The melody is too short (0.50 s; at least 1 s)."),
        (
            Upload("tune.wav", bytes(BIG + 1)),
            {},
            "❌ The audio file is too large (20.0 MiB; at most 20 MiB).",
        ),
        (Upload("tune.wav", bytes(BIG + MIB)), {"size": 1000}, "❌ The audio file is too large (20.0 MiB"),
        (Upload("tune.wav", b"just text", "audio/wav"), {}, "❌ The file is not audio that can be read"),
        (Upload("tune.flac", flac_claiming(hours=20)), {}, "❌ The melody is 72000 s long; at most 600 s."),
    ],
    ids=[
        "not-audio",
        "zero-length",
        "truncated-header",
        "header-only",
        "truncated-to-half-a-second",
        "enormous",
        "enormous-but-claims-1000-bytes",
        "text-claiming-audio-wav",
        "flac-header-claiming-20-hours",
    ],
)
async def test_an_unusable_melody_file_is_refused_with_a_specific_message(
    emu: DiscordEmulator,
    db_path: Path,
    models: FaultyModels,
    upload: Upload,
    lies: dict[str, Any],
    message: str,
) -> None:
    async with bot_running(emu, settings_for(db_path, emu.guild_id, model="melody"), models):
        sent = attachment(emu, upload, **lies)
        interaction = await crafted(
            emu,
            "music",
            [PROMPT, option(ATTACHMENT, "melody", sent["id"])],
            resolved={"attachments": {sent["id"]: sent}},
        )
        said = await refusal(emu, interaction)

    assert said.startswith(message), said
    assert nothing_changed(db_path) and models.calls == [] and emu.violations == []


async def test_a_melody_is_judged_by_its_content_not_its_name_or_type(
    emu: DiscordEmulator, db_path: Path, models: FaultyModels
) -> None:
    async with bot_running(emu, settings_for(db_path, emu.guild_id, model="melody"), models):
        disguised = Upload("holiday.png", tune(2.0), "image/png")
        interaction = await emu.invoke_command(
            "music", {"prompt": "hum", "duration": 1.0, "melody": disguised}
        )
        result = await answered(emu, interaction, lambda m: bool(m.attachments))
        cut_short = Upload("tune.wav", WAV[: 44 + 64000 * 2])  # a 3 s file cut after 2 s: 2 s are used
        second = await emu.invoke_command("music", {"prompt": "hum", "duration": 1.0, "melody": cut_short})
        await answered(emu, second, lambda m: bool(m.attachments))

    assert "follows your melody" in result.content and emu.violations == []


@pytest.mark.parametrize(
    ("custom_id", "message"),
    [
        ("musicbot:regen:999:0", "❌ There is no job #999."),
        ("musicbot:var:999:0", "❌ There is no job #999."),
        ("musicbot:ext:999:0", "❌ There is no job #999."),
        ("musicbot:regen:9999999999999999999:0", "❌ There is no job #9999999999999999999."),
        ("musicbot:ext:1:3", "❌ Job #1 has no track 4."),
    ],
    ids=["regenerate", "variations", "extend", "id-past-sqlite", "track-that-was-never-made"],
)
async def test_a_button_of_a_job_that_no_longer_exists_says_so_and_changes_nothing(
    emu: DiscordEmulator, db_path: Path, models: FaultyModels, custom_id: str, message: str
) -> None:
    async with bot_running(emu, settings_for(db_path, emu.guild_id), models):
        made = await emu.invoke_command("music", {"prompt": "kept", "duration": 1.0})
        await answered(emu, made, lambda m: bool(m.attachments))
        # A result message from before the database was replaced (say, restored from an old backup).
        button = {"type": 2, "style": 2, "label": "Old", "custom_id": custom_id}
        old = await emu.add_message(
            {"content": "an old result", "components": [{"type": 1, "components": [button]}]}
        )
        said = await refusal(emu, await emu.click_button(old, custom_id))

    assert said == message
    assert rows(db_path, "SELECT count(*) FROM jobs") == [(1,)]
    assert rows(db_path, "SELECT count(*) FROM pending_requests") == [(0,)]
    assert emu.threads() == [] and emu.violations == []


async def test_cancel_of_someone_elses_or_a_missing_or_a_finished_job_is_refused(
    emu: DiscordEmulator, db_path: Path, models: FaultyModels
) -> None:
    other = emu.add_user("other")
    models.hold()
    async with bot_running(emu, settings_for(db_path, emu.guild_id), models) as bot:
        mine = await emu.invoke_command("music", {"prompt": "my secret song", "duration": 1.0})
        await answered(emu, mine, lambda m: "Job #1" in m.content)
        theirs = await refusal(emu, await emu.invoke_command("cancel", {"job": 1}, user=other))
        none_of_theirs = await refusal(emu, await emu.invoke_command("cancel", {}, user=other))
        missing = await refusal(emu, await emu.invoke_command("cancel", {"job": 42}))
        models.release()
        await answered(emu, mine, lambda m: bool(m.attachments))
        finished = await refusal(emu, await emu.invoke_command("cancel", {"job": 1}))
        job = await bot.service.job(1)

    assert theirs == "❌ Only the person who asked for job #1 or an admin can cancel it."
    assert none_of_theirs == "You have no waiting jobs to cancel."
    assert missing == "❌ There is no job #42."
    assert finished == "❌ Job #1 is already done."
    assert job.state is JobState.DONE and emu.violations == []


# --- hypothesis against the job service ---


class ServiceThread:
    """A started job service on an event loop of its own thread, for hypothesis's synchronous examples."""

    def __init__(self, db_path: Path, models: FaultyModels) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="service-loop", daemon=True)
        self._db_path = db_path
        self._models = models
        self._stop: asyncio.Event | None = None
        self.service: JobService | None = None

    def __enter__(self) -> ServiceThread:
        self._thread.start()
        started = threading.Event()
        self._runner = asyncio.run_coroutine_threadsafe(self._serve(started), self._loop)
        if not started.wait(10):
            raise TimeoutError("the service did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._runner.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _serve(self, started: threading.Event) -> None:
        limits = Limits(max_queued=10**6, daily_seconds=10**9, max_duration=600)
        settings = settings_for(self._db_path, None, limits=limits, queue_size=10**6)
        self._stop = asyncio.Event()
        async with (
            open_database(self._db_path, checkpoint_every=None) as db,
            JobService(db, settings, lambda: GenerationWorker(self._models)) as service,
        ):
            self.service = service
            started.set()
            await self._stop.wait()

    def call(self, make: Callable[[JobService], Awaitable[T]]) -> T:
        assert self.service is not None
        service = self.service

        async def run() -> T:
            return await make(service)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)


@pytest.fixture
def service_thread(tmp_path: Path) -> Iterator[ServiceThread]:
    models = FaultyModels()
    models.hold()  # nothing runs: the jobs stay as they were stored
    with ServiceThread(tmp_path / "hypothesis.sqlite3", models) as running:
        yield running
    models.release()


# Any text (surrogates and control characters too) and any number, mixed with plausible ones so that
# many examples get as far as the database.
any_text = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=500),
    st.text(st.characters(categories=("L", "N", "P", "S", "Zs")), min_size=1, max_size=400),
    # Letters and halves of surrogate pairs (Discord's JSON can carry one; Python reads it as text).
    st.lists(st.characters(categories=["L"]) | st.characters(categories=["Cs"]), min_size=1, max_size=50).map(
        "".join
    ),
)
wild = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70))


def mostly(plausible: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """One odd value in eight, so that every option gets its turn to be the wrong one."""
    return st.tuples(st.integers(0, 7), plausible, odd).map(lambda t: t[2] if t[0] == 7 else t[1])


def number(low: float, high: float) -> st.SearchStrategy[float]:
    return mostly(st.floats(low, high), wild)


def whole(low: int, high: int) -> st.SearchStrategy[int]:
    return mostly(st.integers(low, high), st.integers(-(2**70), 2**70))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=any_text,
    duration=number(1, 700),
    variations=whole(1, 4),
    seed=st.one_of(st.none(), whole(0, 2**31 - 1)),
    guidance=number(1, 20),
    temperature=number(0.01, 5),
    top_k=whole(0, 2048),
    top_p=number(0, 1),
)
def test_any_prompt_and_options_are_either_stored_exactly_or_refused_without_a_trace(
    service_thread: ServiceThread,
    prompt: str,
    duration: float,
    variations: int,
    seed: int | None,
    guidance: float,
    temperature: float,
    top_k: int,
    top_p: float,
) -> None:
    def count() -> tuple[int, float]:
        usage = service_thread.call(lambda s: s.usage(7))
        jobs = len(service_thread.call(lambda s: s.recent_jobs(7, 10**6)))
        return jobs, usage.seconds_used

    before = count()
    try:
        request = GenerationRequest(  # what a command builds from the options
            prompt=prompt,
            duration=duration,
            sampling=SamplingParams(guidance, temperature, top_k, top_p),
            variations=variations,
            seed=seed,
        )
    except InvalidRequest as exc:
        event(f"refused: {exc.field}")
        # A refusal names what is wrong, as the user typed it.
        assert exc.field in {
            "prompt",
            "duration",
            "variations",
            "seed",
            "guidance",
            "temperature",
            "top_k",
            "top_p",
        }
        assert str(exc) and exc.field.replace("_", "") in str(exc).replace("_", "").lower()
        return
    try:
        job = service_thread.call(lambda s: s.submit(request, Origin(7, 1, 2)))
    except (InvalidRequest, LimitExceeded) as exc:
        event(f"refused by the service: {type(exc).__name__}")
        assert str(exc) and count() == before
        return
    event("stored")
    stored = service_thread.call(lambda s: s.job(job.id))
    assert stored.request == dataclasses.replace(request, seed=job.request.seed)
    assert seed is None or job.request.seed == seed
    assert stored.request.prompt == prompt.strip() and stored.seconds == request.duration * request.variations
    assert count() == (before[0] + 1, before[1] + stored.seconds)
    service_thread.call(lambda s: s.cancel(job.id, user_id=7))
