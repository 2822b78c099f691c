"""What the bot says: every text it sends is built here, from jobs, queue entries and usage."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import discord
from discord import app_commands

from bot.jobs import BotError, Job, JobKind, LimitOverride, QueueEntry, Usage
from bot.settings import Limits
from generation import GenerationError, GenerationRequest, ModelInfo
from generation.catalog import checkpoint

MIB = 2**20
BAR_WIDTH = 12
THREAD_NAME_CHARS = 100
SLUG_CHARS = 40
GENERIC_ERROR = "❌ Something went wrong on my side; it has been logged. Please try again in a moment."


@dataclass(frozen=True)
class Attachment:
    """One audio file of a result as it will be uploaded (or why it cannot be)."""

    filename: str
    data: bytes | None
    wav_bytes: int
    too_large: bool = False

    @property
    def is_flac(self) -> bool:
        return self.filename.endswith(".flac")


def quoted(prompt: str) -> str:
    """A prompt as users see it echoed: one line, markdown shown as typed (mentions never ping)."""
    return "“" + discord.utils.escape_markdown(" ".join(prompt.split())) + "”"


def seconds(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") + " s"


def estimate(value: float) -> str:
    """A rough wait: ``~40 s``, ``~3 min``, ``~1 h 5 min``."""
    value = max(0.0, value)
    if value < 60:
        return f"~{max(1, math.ceil(value))} s"
    minutes = math.ceil(value / 60)
    if minutes < 60:
        return f"~{minutes} min"
    return f"~{minutes // 60} h {minutes % 60} min"


def when(label: str, value: float | None, *, sep: str = " · ") -> str:
    """``· starts in ~40 s``, or nothing while there is no estimate (before a first job finished)."""
    return "" if value is None else f"{sep}{label} {estimate(value)}"


def progress_bar(done: int, total: int) -> str:
    fraction = min(1.0, done / total) if total > 0 else 0.0
    filled = round(fraction * BAR_WIDTH)
    return f"`{'▰' * filled}{'▱' * (BAR_WIDTH - filled)}` {round(fraction * 100)} %"


def thread_name(prompt: str) -> str:
    """Threads are named after the prompt (Discord allows 1-100 characters)."""
    name = " ".join(prompt.split()) or "music"
    return name if len(name) <= THREAD_NAME_CHARS else name[: THREAD_NAME_CHARS - 1] + "…"


def filename(job: Job, index: int, count: int, ext: str) -> str:
    words = re.sub(r"<[@#][!&]?[0-9]+>", " ", job.request.prompt.lower())  # no mentions in file names
    slug = re.sub(r"[^a-z0-9]+", "-", words).strip("-")[:SLUG_CHARS].strip("-")
    number = f"-{index + 1}" if count > 1 else ""
    return f"{slug or 'music'}-{job.id}{number}.{ext}"


def settings_text(request: GenerationRequest) -> str:
    sampling = request.sampling
    parts = [
        f"guidance {sampling.guidance:g}",
        f"temperature {sampling.temperature:g}",
        f"top-k {sampling.top_k}" if sampling.top_k else "top-k off",
        f"top-p {sampling.top_p:g}" if sampling.top_p else "top-p off",
    ]
    if request.loop:
        parts.append("seamless loop")
    return " · ".join(parts)


def seeds_text(seeds: Sequence[int]) -> str:
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return "seeds " + ", ".join(str(seed) for seed in seeds) + " (one per file, in order)"


def _what(job: Job) -> str:
    request = job.request
    if job.kind is JobKind.EXTEND:
        return f"extension by {seconds(request.duration)} of {quoted(request.prompt)}"
    count = f" ×{request.variations}" if request.variations > 1 else ""
    kind = {JobKind.VARIATIONS: "variations", JobKind.REGENERATE: "new take"}.get(job.kind, "music")
    return f"{kind}{count}, {seconds(request.duration)}, {quoted(request.prompt)}"


# --- status ---


def queued_text(
    job: Job, entry: QueueEntry | None, *, note: str | None = None, requeued: bool = False
) -> str:
    head = f"Job #{job.id} · {_what(job)}"
    if entry is None:
        line = "⏳ working on it…"
    elif entry.position == 0:
        line = "🎹 generating…" + when("done in", entry.done_in)
    else:
        again = "waiting again after a restart" if requeued else "queued"
        line = f"⏳ {again}: position {entry.position}" + when("starts in", entry.starts_in)
    return "\n".join([head, line, *([f"ℹ️ {note}"] if note else [])])


def progress_text(job: Job, done: int, total: int, entry: QueueEntry | None) -> str:
    eta = when("done in", entry.done_in) if entry is not None else ""
    return f"Job #{job.id} · {_what(job)}\n🎹 generating {progress_bar(done, total)}{eta}"


def delivered_text(job: Job, jump_url: str) -> str:
    return f"✅ Job #{job.id} is done: {jump_url}"


def failed_text(job: Job, reason: str) -> str:
    return f"❌ Job #{job.id} ({_what(job)}) failed: {reason}"


def cancelled_text(job: Job) -> str:
    return f"🚫 Job #{job.id} ({_what(job)}) was cancelled."


def interrupted_text() -> str:
    return (
        "❌ I restarted before your request was queued, so nothing was made and nothing was counted"
        " against your limits. Please send it again."
    )


def thread_queued_text(job: Job, thread_mention: str, entry: QueueEntry | None) -> str:
    where = "running now" if entry is not None and entry.position == 0 else "queued"
    if entry is not None and entry.position > 0:
        where += f" at position {entry.position}" + when("starts in", entry.starts_in, sep=", ")
    return f"Job #{job.id} ({_what(job)}) is {where}; it will be posted in {thread_mention}."


# --- results ---


def result_text(job: Job, files: Sequence[Attachment], *, limit: int, parent_seconds: float | None) -> str:
    request, result = job.request, job.result
    length = seconds(result.seconds if result else request.duration)
    if job.kind is JobKind.EXTEND and parent_seconds is not None:
        length = f"{length} ({seconds(parent_seconds)} + {seconds(request.duration)} new)"
    seeds = result.seeds if result else (request.seed or 0,)
    lines = [
        f"🎵 {quoted(request.prompt)}",
        f"{job.model or 'unknown model'} · {length} · {seeds_text(seeds)}",
        settings_text(request) + (" · follows your melody" if job.has_melody else ""),
        f"Requested by <@{job.user_id}> · job #{job.id}"
        + (f" · made in {result.elapsed:.1f} s" if result else ""),
    ]
    if result is not None:
        lines.extend(f"ℹ️ {note[0].upper()}{note[1:]}." for note in result.notes)
    if any(f.is_flac and not f.too_large for f in files):
        lines.append(f"ℹ️ Sent as FLAC (lossless): the WAV is over the {_mib(limit)} upload limit here.")
    for number, f in enumerate(files, start=1):
        if f.too_large:
            which = f"Track {number}" if len(files) > 1 else "The track"
            lines.append(
                f"⚠️ {which} is too large to upload here even as FLAC (the WAV is {_mib(f.wav_bytes)},"
                f" the limit is {_mib(limit)}); ask for a shorter duration."
            )
    return "\n".join(lines)


def _mib(size: float) -> str:
    return f"{size / MIB:.1f} MiB" if size >= MIB / 10 else f"{size / 1024:.0f} KiB"


# --- commands ---


def queue_text(entries: Sequence[QueueEntry], total: int) -> str:
    if not entries:
        return f"You have no jobs waiting or running. The queue holds {total} job{'s' * (total != 1)}."
    lines = [f"Your jobs ({total} in the whole queue):"]
    for entry in entries:
        job = entry.job
        if entry.position == 0:
            where = "generating now" + when("done in", entry.done_in, sep=", ")
        else:
            where = f"position {entry.position}" + when("starts in", entry.starts_in, sep=", ")
            where += when("done in", entry.done_in, sep=", ")
            if entry.starts_in is None:
                where += " (estimates come once a first job has finished)"
        lines.append(f"• #{job.id} {_what(job)}: {where}")
    return "\n".join(lines)


def cancelled_jobs_text(cancelled: Sequence[Job], running: Sequence[Job]) -> str:
    if cancelled:
        ids = ", ".join(f"#{job.id}" for job in cancelled)
        text = f"Cancelled {len(cancelled)} waiting job{'s' * (len(cancelled) != 1)}: {ids}."
    else:
        text = "You have no waiting jobs to cancel."
    for job in running:
        text += f"\nJob #{job.id} is generating now; `/cancel job:{job.id}` stops it."
    return text


def usage_text(usage: Usage, *, admin: bool) -> str:
    limits = usage.limits
    if usage.exempt:
        return (
            "You are an admin: no per-user limits hold for you.\n"
            f"Jobs waiting or running: {usage.active_jobs} · audio in the last 24 h:"
            f" {seconds(usage.seconds_used)}"
        )
    lines = [
        f"Daily audio: {seconds(usage.seconds_used)} of {seconds(limits.daily_seconds)} used in the"
        f" last 24 h; {seconds(usage.seconds_left)} left (daily_seconds).",
        f"Jobs waiting or running: {usage.active_jobs} of {limits.max_queued} (max_queued).",
        f"Longest track: {seconds(limits.max_duration)} (max_duration).",
        "An extension counts only its new seconds; variations count each track.",
    ]
    if usage.next_frees_at is not None:
        lines.insert(1, f"More frees up {discord.utils.format_dt(usage.next_frees_at, 'R')}.")
    return "\n".join(lines)


def model_text(current: str, info: ModelInfo | None) -> str:
    if info is None:
        return f"Model: {current} (not loaded yet)."
    melody = "yes" if info.supports_melody else "no"
    channels = {1: "mono", 2: "stereo"}.get(info.channels, f"{info.channels} channels")
    return (
        f"Model: **{current}** ({info.source}) on {info.device}, {info.dtype}; {info.sample_rate} Hz,"
        f" {channels}; follows melodies: {melody}."
    )


def sizes_text(sizes: Sequence[str]) -> str:
    """Every size /model offers, with its channels and a rough memory need."""
    lines = ["Sizes (memory: the weights in bf16/fp16, about twice that in fp32):"]
    for size in sizes:
        known = checkpoint(size)
        lines.append(f"`{size}`: {known.describe()}" if known else f"`{size}`")
    return "\n".join(lines)


def limits_text(who: str, limits: Limits, override: LimitOverride | None) -> str:
    text = (
        f"Limits for {who}: max_queued {limits.max_queued} · daily_seconds {limits.daily_seconds}"
        f" · max_duration {limits.max_duration}"
    )
    if override is not None and not override.empty:
        changed = [
            name
            for name in ("max_queued", "daily_seconds", "max_duration")
            if getattr(override, name) is not None
        ]
        text += f" (set by an admin: {', '.join(changed)})"
    return text + "."


def overrides_text(overrides: Mapping[int | None, LimitOverride]) -> str:
    users = [(user, o) for user, o in overrides.items() if user is not None and not o.empty]
    if not users:
        return "No user has limits of their own."
    lines = ["Users with limits of their own:"]
    for user, override in users[:20]:
        values = [
            f"{name} {getattr(override, name)}"
            for name in ("max_queued", "daily_seconds", "max_duration")
            if getattr(override, name) is not None
        ]
        lines.append(f"• <@{user}>: {', '.join(values)}")
    if len(users) > 20:
        lines.append(f"… and {len(users) - 20} more.")
    return "\n".join(lines)


def error_text(error: BaseException) -> str | None:
    """A short reply for an error a user can act on; None for a bug (log it, say something generic)."""
    if isinstance(error, BotError | GenerationError):
        return "❌ " + _sentence(str(error))
    if isinstance(error, app_commands.NoPrivateMessage):
        return "❌ Use this command in a channel of a server."
    if isinstance(error, app_commands.TransformerError):
        return "❌ One of the options has a value this command cannot use."
    if isinstance(error, app_commands.CommandSignatureMismatch | app_commands.CommandNotFound):
        return "❌ My commands are being updated; try again in a minute."
    if isinstance(error, discord.Forbidden):
        return (
            "❌ I am missing a permission here: I need View Channel, Send Messages, Send Messages in"
            " Threads, Attach Files, Create Public Threads and Read Message History."
        )
    return None


def _sentence(text: str) -> str:
    text = text.strip() or "that did not work"
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."
