"""The slash commands and the result buttons.

Every handler acknowledges its interaction first (Discord allows 3 seconds), then checks its input
again (crafted payloads skip Discord's own checks), then works. Errors reach ``reply_error``: domain
errors become a short ephemeral reply, anything else is logged and gets a generic one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bot import messages
from bot.delivery import NO_MENTIONS, DiscordDelivery
from bot.jobs import (
    BotError,
    Delivery,
    Job,
    JobKind,
    JobNotFound,
    JobService,
    MelodyUnavailable,
    NotAllowed,
    Origin,
    PendingRequest,
    TrackNotFound,
    TrackRef,
)
from bot.settings import MODEL_SIZES, Settings
from bot.views import TrackAction
from generation import AudioInputError, GenerationRequest, ModelLoadError, SamplingParams
from generation.request import (
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MAX_VARIATIONS,
)

if TYPE_CHECKING:
    from generation.melody import MelodyReference

log = logging.getLogger(__name__)

# The longest track a command accepts; the per-user max_duration limit is checked by the job service.
MAX_DURATION_LIMIT = 600
MAX_DURATION = float(MAX_DURATION_LIMIT)
MIN_TEMPERATURE = 0.01
DEFAULT_VARIATIONS = 2
MAX_TWEAK_CHARS = 200
MAX_QUEUED_LIMIT = 100
MAX_DAILY_SECONDS_LIMIT = 7 * 24 * 3600
THREAD_ALREADY_EXISTS = 160004
DOWNLOAD_CHUNK = 64 * 1024
MAX_JOB_ID = 2**63 - 1  # SQLite's largest integer: a crafted button can name a larger one

# Keys in ``Interaction.extras``: a public "thinking" reply not yet handed to a job, and its message id.
PUBLIC_THINKING = "musicbot.public_thinking"
REPLY_MESSAGE_ID = "musicbot.reply_message_id"

ModelSize = Literal["small", "medium", "large", "melody"]


class InvalidOption(BotError):
    """An option value outside what the command declares (only a crafted request can send one)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class NotInResultThread(BotError):
    def __init__(self) -> None:
        super().__init__(
            "use /variations inside a result's thread (press Variations under a result to start one)"
        )


class ModelSwitchFailed(BotError):
    def __init__(self, size: str, current: str, reason: str) -> None:
        super().__init__(f"could not switch to {size}: {reason}; still using {current}")


async def reply_error(interaction: discord.Interaction, error: BaseException) -> None:
    """The one way errors reach users: an ephemeral message, and never a second response."""
    text = messages.error_text(error)
    if text is None:
        log.error("an interaction failed (%s)", _describe(interaction), exc_info=error)
        text = messages.GENERIC_ERROR
    try:
        if not interaction.response.is_done():
            await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_MENTIONS)
            return
        if interaction.extras.pop(PUBLIC_THINKING, False):
            # The deferred reply would be public: remove it so that only the user sees the error.
            try:
                await interaction.delete_original_response()
            except discord.HTTPException as exc:
                log.warning("could not remove a reply before an error message: %s", exc)
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS)
    except discord.HTTPException as exc:
        log.warning("could not tell the user about an error (%s): %s", _describe(interaction), exc)


def _describe(interaction: discord.Interaction) -> str:
    if interaction.command is not None:
        what = f"/{interaction.command.qualified_name}"
    else:
        data: dict[str, Any] = dict(interaction.data or {})
        what = f"component {data.get('custom_id')}"
    return f"{what} by user {interaction.user.id}"


async def defer_reply(interaction: discord.Interaction) -> None:
    """Acknowledge at once with a public "thinking" reply; it becomes the job's status message."""
    response = await interaction.response.defer(thinking=True)
    interaction.extras[PUBLIC_THINKING] = True
    interaction.extras[REPLY_MESSAGE_ID] = response.message_id if response is not None else None


async def defer_private(interaction: discord.Interaction) -> None:
    """Acknowledge at once with a "thinking" reply only the user sees."""
    response = await interaction.response.defer(ephemeral=True, thinking=True)
    interaction.extras[REPLY_MESSAGE_ID] = response.message_id if response is not None else None


# What each option type must carry, as users read it; snowflake types carry an id.
OPTION_KINDS: Mapping[discord.AppCommandOptionType, str] = {
    discord.AppCommandOptionType.string: "text",
    discord.AppCommandOptionType.integer: "a whole number",
    discord.AppCommandOptionType.number: "a number",
    discord.AppCommandOptionType.boolean: "true or false",
    discord.AppCommandOptionType.user: "a user",
    discord.AppCommandOptionType.channel: "a channel",
    discord.AppCommandOptionType.role: "a role",
    discord.AppCommandOptionType.mentionable: "a user or a role",
    discord.AppCommandOptionType.attachment: "an attached file",
}


def option_problem(command: object, data: Mapping[str, Any]) -> InvalidOption | None:
    """What is wrong with a command's raw options, before discord.py reads them; None if nothing.

    Discord checks option types, but a crafted request can send anything, and discord.py trips over
    some of it (a number option holding text) before any handler runs, leaving the user with
    "This interaction failed". Each declared option must have its declared type and a value of it.
    """
    if not isinstance(command, app_commands.Command):
        return None
    options = _leaf_options(data.get("options"))
    if options is None:
        return InvalidOption("options", "the command's options are malformed")
    given = {option["name"]: option for option in options}
    resolved = data.get("resolved")
    attachments = resolved.get("attachments") if isinstance(resolved, Mapping) else None
    for parameter in command.parameters:
        name = parameter.display_name
        option = given.get(name)
        if option is None:
            if parameter.required:
                return InvalidOption(name, f"{name} is required")
            continue
        kind = parameter.type
        if option.get("type") != kind.value or not _fits(kind, option.get("value"), attachments):
            return InvalidOption(name, f"{name} must be {OPTION_KINDS.get(kind, 'something else')}")
    return None


def _leaf_options(options: object) -> list[Mapping[str, Any]] | None:
    """The options below any subcommands; None if they are not a list of named options."""
    while True:
        if options is None:
            return []
        if not isinstance(options, list) or not all(
            isinstance(o, Mapping) and isinstance(o.get("name"), str) for o in options
        ):
            return None
        if len(options) == 1 and options[0].get("type") in (1, 2):
            options = options[0].get("options")
            continue
        return options


def _fits(kind: discord.AppCommandOptionType, value: object, attachments: object) -> bool:
    types = discord.AppCommandOptionType
    if kind is types.string:
        return isinstance(value, str)
    if kind is types.integer:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is types.number:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is types.boolean:
        return isinstance(value, bool)
    if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).isdigit():
        return False
    if kind is types.attachment:
        return isinstance(attachments, Mapping) and str(value) in attachments
    return True


def check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidOption(name, f"{name} must be true or false")


def check_number(name: str, value: float | None, low: float, high: float, *, whole: bool = False) -> None:
    if value is None:
        return
    kinds = int if whole else int | float
    bounds = f"between {_bound(low)} and {_bound(high)}"
    if not isinstance(value, kinds) or isinstance(value, bool) or not math.isfinite(value):
        what = "a whole number" if whole else "a number"
        raise InvalidOption(name, f"{name} must be {what} {bounds}")
    if not low <= value <= high:
        got = str(value) if isinstance(value, int) else f"{value:g}"
        raise InvalidOption(name, f"{name} must be {bounds} (got {got})")


def _bound(value: float) -> str:
    """600, 0.01, 2147483647: never 2.14748e+09."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def check_text(name: str, value: str | None, longest: int) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise InvalidOption(name, f"{name} must be text")
    if len(value) > longest:
        raise InvalidOption(name, f"{name} is too long ({len(value)} characters; at most {longest})")


def variations_request(parent: Job, count: int, tweak: str | None = None) -> GenerationRequest:
    """More takes of a job: its prompt (plus the tweak) and settings, new seeds."""
    prompt = parent.request.prompt
    if tweak and tweak.strip():
        prompt = f"{prompt}, {tweak.strip()}"
    duration = parent.request.duration
    if parent.kind is JobKind.EXTEND and parent.result is not None:
        duration = parent.result.seconds
    return GenerationRequest(
        prompt=prompt,
        duration=duration,
        sampling=parent.request.sampling,
        variations=count,
        loop=parent.request.loop,
    )


def extension_request(parent: Job) -> GenerationRequest:
    """Continue a track by as many seconds as its job asked for."""
    return GenerationRequest(
        prompt=parent.request.prompt, duration=parent.request.duration, sampling=parent.request.sampling
    )


async def read_attachment(session: aiohttp.ClientSession, attachment: discord.Attachment, cap: int) -> bytes:
    """The attachment's bytes, refusing (before and while downloading) anything over ``cap`` bytes."""
    if attachment.size > cap:
        raise _too_large(attachment.size, cap)
    data = bytearray()
    try:
        async with session.get(attachment.url) as response:
            response.raise_for_status()
            async for chunk in response.content.iter_chunked(DOWNLOAD_CHUNK):
                data += chunk
                if len(data) > cap:
                    raise _too_large(len(data), cap)
    except aiohttp.ClientError as exc:
        raise AudioInputError("download", "the melody file could not be downloaded; try again") from exc
    return bytes(data)


def _too_large(size: int, cap: int) -> AudioInputError:
    return AudioInputError(
        "too_large", f"the audio file is too large ({size / 2**20:.1f} MiB; at most {cap / 2**20:.0f} MiB)"
    )


class MusicCommands(commands.Cog, name="Music"):
    """/music, /variations, /queue, /cancel, /usage, /model, /limits and the result buttons."""

    def __init__(
        self,
        client: discord.Client,
        service: JobService,
        settings: Settings,
        delivery: DiscordDelivery,
        session: aiohttp.ClientSession,
    ) -> None:
        self.client = client
        self.service = service
        self.settings = settings
        self.delivery = delivery
        self.session = session
        # One lock per result message being given a thread, with how many clicks use it.
        self._thread_locks: dict[int, tuple[asyncio.Lock, int]] = {}

    # --- making music ---

    @app_commands.command(name="music")
    @app_commands.guild_only()
    @app_commands.describe(
        prompt="What the music should be, e.g. 'calm lo-fi piano, rain'",
        duration=f"Seconds of music (1-{MAX_DURATION_LIMIT}, default 10)",
        variations=f"How many different takes (1-{MAX_VARIATIONS}, default 1)",
        seed="Make a result again exactly (default: random)",
        guidance=f"How closely to follow the prompt (1-{MAX_GUIDANCE:g}, default 3)",
        temperature=f"Higher is more adventurous ({MIN_TEMPERATURE}-{MAX_TEMPERATURE:g}, default 1)",
        top_k=f"Sample from the k likeliest sounds (0 = off, up to {MAX_TOP_K}, default 250)",
        top_p="Nucleus sampling (0 = off, the default, up to 1)",
        melody="An audio file whose tune to follow (WAV, FLAC, OGG or MP3; uses the melody model)",
        loop="A seamless loop: the end flows into the start",
    )
    async def music(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, MAX_PROMPT_CHARS],
        duration: app_commands.Range[float, 1.0, MAX_DURATION] = 10.0,
        variations: app_commands.Range[int, 1, MAX_VARIATIONS] = 1,
        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
        guidance: app_commands.Range[float, 1.0, MAX_GUIDANCE] = 3.0,
        temperature: app_commands.Range[float, MIN_TEMPERATURE, MAX_TEMPERATURE] = 1.0,
        top_k: app_commands.Range[int, 0, MAX_TOP_K] = 250,
        top_p: app_commands.Range[float, 0.0, 1.0] = 0.0,
        melody: discord.Attachment | None = None,
        loop: bool = False,
    ) -> None:
        """Make music from a description."""
        await defer_reply(interaction)
        async with self._pending(interaction):
            check_text("prompt", prompt, MAX_PROMPT_CHARS)
            check_number("duration", duration, 1.0, MAX_DURATION)
            check_number("variations", variations, 1, MAX_VARIATIONS, whole=True)
            check_number("seed", seed, 0, MAX_SEED, whole=True)
            check_number("guidance", guidance, 1.0, MAX_GUIDANCE)
            check_number("temperature", temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)
            check_number("top_k", top_k, 0, MAX_TOP_K, whole=True)
            check_number("top_p", top_p, 0.0, 1.0)
            check_flag("loop", loop)
            reference = await self._melody(melody) if melody is not None else None
            request = GenerationRequest(
                prompt=prompt,
                duration=float(duration),
                sampling=SamplingParams(float(guidance), float(temperature), int(top_k), float(top_p)),
                variations=int(variations),
                seed=seed,
                loop=loop,
                melody=reference.clip if reference is not None else None,
            )
            note = reference.note if reference is not None else None
            await self._queue_in_reply(interaction, request, JobKind.NEW, None, note=note)

    @app_commands.command(name="variations")
    @app_commands.guild_only()
    @app_commands.describe(
        count=f"How many new takes (1-{MAX_VARIATIONS}, default {DEFAULT_VARIATIONS})",
        prompt="Words to add to the track's prompt, e.g. 'with more drums'",
    )
    async def variations(
        self,
        interaction: discord.Interaction,
        count: app_commands.Range[int, 1, MAX_VARIATIONS] = DEFAULT_VARIATIONS,
        prompt: app_commands.Range[str, 1, MAX_TWEAK_CHARS] | None = None,
    ) -> None:
        """More takes of this thread's track (use it inside a result's thread)."""
        await defer_reply(interaction)
        async with self._pending(interaction):
            check_number("count", count, 1, MAX_VARIATIONS, whole=True)
            check_text("prompt", prompt, MAX_TWEAK_CHARS)
            parent = await self.service.job_for_thread(interaction.channel_id or 0)
            if parent is None:
                raise NotInResultThread()
            request = variations_request(parent, int(count), prompt)
            request = await self._with_parent_melody(request, parent)
            await self._queue_in_reply(interaction, request, JobKind.VARIATIONS, TrackRef(parent.id, 0))

    # --- the queue and limits ---

    @app_commands.command(name="queue")
    @app_commands.guild_only()
    async def queue(self, interaction: discord.Interaction) -> None:
        """Your jobs: their places in the queue and when they should be done."""
        await defer_private(interaction)
        mine = self.service.queue(interaction.user.id)
        text = messages.queue_text(mine, len(self.service.queue()))
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS)

    @app_commands.command(name="cancel")
    @app_commands.guild_only()
    @app_commands.describe(job="The job number (default: all your waiting jobs)")
    async def cancel(
        self, interaction: discord.Interaction, job: app_commands.Range[int, 1, 2**53] | None = None
    ) -> None:
        """Cancel one of your jobs, or all your waiting ones."""
        await defer_private(interaction)
        check_number("job", job, 1, 2**53, whole=True)
        user = interaction.user.id
        if job is not None:
            cancelled = await self.service.cancel(int(job), user_id=user, is_admin=self.is_admin(interaction))
            text = f"Cancelled job #{cancelled.id}."
        else:
            waiting = await self.service.cancel_waiting(user)
            running = [entry.job for entry in self.service.queue(user) if entry.position == 0]
            text = messages.cancelled_jobs_text(waiting, running)
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS)

    @app_commands.command(name="usage")
    @app_commands.guild_only()
    async def usage(self, interaction: discord.Interaction) -> None:
        """Your limits and what is left of them."""
        await defer_private(interaction)
        admin = self.is_admin(interaction)
        usage = await self.service.usage(interaction.user.id, is_admin=admin)
        await interaction.followup.send(
            messages.usage_text(usage, admin=admin), ephemeral=True, allowed_mentions=NO_MENTIONS
        )

    # --- admins ---

    @app_commands.command(name="model")
    @app_commands.guild_only()
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.describe(size="The model to switch to (leave out to see the current one)")
    async def model(self, interaction: discord.Interaction, size: ModelSize | None = None) -> None:
        """Show or switch the model (admins)."""
        await defer_private(interaction)
        self.require_admin(interaction, "/model")
        if size is None:
            text = messages.model_text(self.service.model, self.service.model_info)
            await interaction.followup.send(text, ephemeral=True)
            return
        if size not in MODEL_SIZES:
            raise InvalidOption("size", f"size must be one of {', '.join(MODEL_SIZES)}")
        if size == self.service.model:
            text = "Already in use. " + messages.model_text(self.service.model, self.service.model_info)
            await interaction.followup.send(text, ephemeral=True)
            return
        await interaction.edit_original_response(content=f"Loading {size} (after the running batch)…")
        try:
            info = await self.service.switch_model(size)
        except ModelLoadError as exc:
            raise ModelSwitchFailed(size, self.service.model, str(exc)) from exc
        log.info("user %d switched the model to %s", interaction.user.id, size)
        text = "Switched. " + messages.model_text(self.service.model, info)
        await interaction.edit_original_response(content=text)

    @app_commands.command(name="limits")
    @app_commands.guild_only()
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.describe(
        user="Whose limits (leave out for everyone's defaults)",
        max_queued=f"Jobs waiting or running at once (0-{MAX_QUEUED_LIMIT})",
        daily_seconds=f"Seconds of audio per 24 hours (0-{MAX_DAILY_SECONDS_LIMIT})",
        max_duration=f"Longest track in seconds (1-{MAX_DURATION_LIMIT})",
    )
    async def limits(
        self,
        interaction: discord.Interaction,
        user: discord.User | None = None,
        max_queued: app_commands.Range[int, 0, MAX_QUEUED_LIMIT] | None = None,
        daily_seconds: app_commands.Range[int, 0, MAX_DAILY_SECONDS_LIMIT] | None = None,
        max_duration: app_commands.Range[int, 1, MAX_DURATION_LIMIT] | None = None,
    ) -> None:
        """Show or set the limits: everyone's defaults or one user's (admins)."""
        await defer_private(interaction)
        self.require_admin(interaction, "/limits")
        check_number("max_queued", max_queued, 0, MAX_QUEUED_LIMIT, whole=True)
        check_number("daily_seconds", daily_seconds, 0, MAX_DAILY_SECONDS_LIMIT, whole=True)
        check_number("max_duration", max_duration, 1, MAX_DURATION_LIMIT, whole=True)
        target = user.id if user is not None else None
        who = user.mention if user is not None else "everyone (the defaults)"
        if max_queued is None and daily_seconds is None and max_duration is None:
            overrides = await self.service.limit_overrides()
            text = messages.limits_text(who, await self.service.limits(target), overrides.get(target))
            if target is None:
                text += "\n" + messages.overrides_text(overrides)
        else:
            changed = await self.service.set_limits(
                target, max_queued=max_queued, daily_seconds=daily_seconds, max_duration=max_duration
            )
            log.info("user %d set the limits of %s", interaction.user.id, target or "everyone")
            text = "Saved. " + messages.limits_text(who, changed, None)
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS)

    def is_admin(self, interaction: discord.Interaction) -> bool:
        """Manage Server here, or listed in MUSICBOT_ADMIN_IDS (a server can change Discord's defaults)."""
        if interaction.user.id in self.settings.admin_ids:
            return True
        if interaction.guild_id is None:
            return False
        permissions = interaction.permissions
        return permissions.manage_guild or permissions.administrator

    def require_admin(self, interaction: discord.Interaction, command: str) -> None:
        if not self.is_admin(interaction):
            raise NotAllowed(
                f"only admins (members with Manage Server, or users in MUSICBOT_ADMIN_IDS) can use {command}"
            )

    # --- the buttons under a result ---

    async def track_button(
        self, interaction: discord.Interaction, action: TrackAction, ref: TrackRef
    ) -> None:
        try:
            if action is TrackAction.REGENERATE:
                await self._regenerate(interaction, ref)
            else:
                await self._in_thread(interaction, action, ref)
        except Exception as exc:
            await reply_error(interaction, exc)

    async def _regenerate(self, interaction: discord.Interaction, ref: TrackRef) -> None:
        """The same request with a new seed, answered where the button was pressed."""
        await defer_reply(interaction)
        async with self._pending(interaction):
            parent = await self._parent(ref)
            request = await self._with_parent_melody(replace(parent.request, seed=None), parent)
            if parent.kind is JobKind.EXTEND and parent.parent is not None:
                await self._queue_in_reply(interaction, request, JobKind.EXTEND, parent.parent)
            else:
                await self._queue_in_reply(interaction, request, JobKind.REGENERATE, TrackRef(parent.id, 0))

    async def _in_thread(self, interaction: discord.Interaction, action: TrackAction, ref: TrackRef) -> None:
        """Variations and extensions go into the result's thread; the presser gets a private note."""
        await defer_private(interaction)
        async with self._pending(interaction):
            parent = await self._parent(ref)
            if action is TrackAction.VARIATIONS:
                kind = JobKind.VARIATIONS
                request = await self._with_parent_melody(
                    variations_request(parent, DEFAULT_VARIATIONS), parent
                )
            else:
                if not await self.service.has_track(ref):
                    raise TrackNotFound(ref.job_id, ref.index)  # before a thread is made for nothing
                kind, request = JobKind.EXTEND, extension_request(parent)
            thread = await self._result_thread(interaction, parent)
            origin = Origin(interaction.user.id, interaction.guild_id, thread.id)
            job = await self.service.submit(
                request,
                origin,
                kind=kind,
                parent=ref,
                is_admin=self.is_admin(interaction),
                pending_id=interaction.id,
                hold_events=True,
            )
        await self.delivery.announce_in_channel(job, thread, upload_limit=interaction.filesize_limit)
        text = messages.thread_queued_text(job, thread.mention, self.service.position(job.id))
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS)

    async def _parent(self, ref: TrackRef) -> Job:
        if ref.job_id > MAX_JOB_ID:
            raise JobNotFound(ref.job_id)
        return await self.service.job(ref.job_id)

    async def _result_thread(self, interaction: discord.Interaction, parent: Job) -> discord.Thread:
        """The thread on the result message, named after the prompt; made on first use."""
        if isinstance(interaction.channel, discord.Thread):
            return interaction.channel
        message = interaction.message
        channel = interaction.channel
        if message is None or not isinstance(channel, discord.TextChannel):
            raise BotError("variations and extensions need a text channel where I can start threads")
        lock, users = self._thread_locks.get(message.id, (asyncio.Lock(), 0))
        self._thread_locks[message.id] = (lock, users + 1)
        try:
            async with lock:
                known = (await self.service.job(parent.id)).delivery.thread_id
                thread = await self._thread(known) if known else None
                if thread is None:
                    thread = await self._start_thread(channel, message, parent)
                    await self.service.update_delivery(parent.id, thread_id=thread.id)
                return thread
        finally:
            lock, users = self._thread_locks[message.id]
            if users > 1:
                self._thread_locks[message.id] = (lock, users - 1)
            else:
                del self._thread_locks[message.id]

    async def _start_thread(
        self, channel: discord.TextChannel, message: discord.Message, parent: Job
    ) -> discord.Thread:
        try:
            return await channel.create_thread(
                name=messages.thread_name(parent.request.prompt), message=message
            )
        except discord.HTTPException as exc:
            # Another bot process (or a person) was first; a thread's id is its starter message's.
            found = await self._thread(message.id) if exc.code == THREAD_ALREADY_EXISTS else None
            if found is None:
                raise
            return found

    async def _thread(self, thread_id: int) -> discord.Thread | None:
        """A thread that still exists, or None (deleted, or out of the bot's sight)."""
        channel = self.client.get_channel(thread_id)
        if channel is None:
            try:
                channel = await self.client.fetch_channel(thread_id)
            except (discord.NotFound, discord.Forbidden):
                return None
        return channel if isinstance(channel, discord.Thread) else None

    # --- shared steps ---

    async def _queue_in_reply(
        self,
        interaction: discord.Interaction,
        request: GenerationRequest,
        kind: JobKind,
        parent: TrackRef | None,
        *,
        note: str | None = None,
    ) -> None:
        """Queue the job with the deferred reply as its status message (answered there for 15 minutes)."""
        reply_id = interaction.extras.get(REPLY_MESSAGE_ID) or (await interaction.original_response()).id
        delivery = Delivery(
            application_id=interaction.application_id,
            interaction_token=interaction.token,
            interaction_created_at=interaction.created_at,
            status_message_id=reply_id,
        )
        job = await self.service.submit(
            request,
            _origin(interaction),
            kind=kind,
            parent=parent,
            delivery=delivery,
            is_admin=self.is_admin(interaction),
            pending_id=interaction.id,
            hold_events=True,
        )
        # The reply belongs to the job now: an error from here on must not remove it.
        interaction.extras[PUBLIC_THINKING] = False
        await self.delivery.announce_in_reply(job, interaction, note=note)

    @contextlib.asynccontextmanager
    async def _pending(self, interaction: discord.Interaction) -> AsyncIterator[None]:
        """From the acknowledgement until the job is queued, a crash is told to the user at the next start.

        A refusal or an error ends it here; a cancellation (the bot stopping) leaves it for that start.
        """
        delivery = Delivery(
            application_id=interaction.application_id,
            interaction_token=interaction.token,
            interaction_created_at=interaction.created_at,
            status_message_id=interaction.extras.get(REPLY_MESSAGE_ID),
        )
        await self.service.note_pending(PendingRequest(interaction.id, _origin(interaction), delivery))
        try:
            yield
        except Exception:
            try:
                await self.service.drop_pending(interaction.id)
            except Exception:
                log.exception("could not forget request %d", interaction.id)
            raise

    async def _melody(self, attachment: discord.Attachment) -> MelodyReference:
        info = self.service.model_info
        if info is not None and not info.supports_melody:
            raise MelodyUnavailable(info.name)
        # generation.melody imports torch: only when a melody actually comes.
        from generation.melody import MAX_BYTES, load_melody

        data = await read_attachment(self.session, attachment, MAX_BYTES)
        return await asyncio.to_thread(load_melody, data)

    async def _with_parent_melody(self, request: GenerationRequest, parent: Job) -> GenerationRequest:
        if not parent.has_melody:
            return request
        return replace(request, melody=await self.service.melody(parent.id))


def _origin(interaction: discord.Interaction) -> Origin:
    return Origin(interaction.user.id, interaction.guild_id, interaction.channel_id)
