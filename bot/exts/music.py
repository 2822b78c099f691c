"""/music, /variations, the buttons under a result (Variations, Extend, Regenerate) and a result's thread.

Options arrive checked against ``bot.options`` (the command tree refuses anything else); each handler
acknowledges first, then queues a job whose status message is the acknowledgement (or, from a button,
a message in the result's thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import discord
from discord import app_commands
from discord.app_commands import Transform
from discord.ext import commands

from bot import messages
from bot.attachments import read_attachment
from bot.delivery import NO_MENTIONS, DiscordDelivery
from bot.interactions import (
    PUBLIC_THINKING,
    REPLY_MESSAGE_ID,
    defer_private,
    defer_reply,
    errors_replied,
    is_admin,
    origin,
)
from bot.jobs import (
    BotError,
    Delivery,
    Job,
    JobKind,
    JobNotFound,
    JobService,
    MelodyUnavailable,
    Origin,
    PendingRequest,
    TrackNotFound,
    TrackRef,
)
from bot.options import (
    DEFAULT_VARIATIONS,
    DURATION,
    GUIDANCE,
    LOOP,
    MELODY,
    MORE_TAKES,
    PROMPT,
    SEED,
    TAKES,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    TWEAK,
    descriptions,
)
from bot.remakes import extension_request, variations_request
from bot.settings import Settings
from generation import GenerationRequest, SamplingParams
from generation.melody import MAX_BYTES, MelodyReference, load_melody

log = logging.getLogger(__name__)

THREAD_ALREADY_EXISTS = 160004
MAX_JOB_ID = 2**63 - 1  # SQLite's largest integer: a crafted button can name a larger one


class NotInResultThread(BotError):
    def __init__(self) -> None:
        super().__init__(
            "use /variations inside a result's thread (press Variations under a result to start one)"
        )


class MusicCog(commands.Cog, name="Music"):
    """Making music: new tracks, more takes of a track, and continuations of one."""

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

    @app_commands.command(name="music")
    @app_commands.guild_only()
    @app_commands.describe(**descriptions("music"))
    async def music(
        self,
        interaction: discord.Interaction,
        prompt: Transform[str, PROMPT],
        duration: Transform[float, DURATION] = 10.0,
        variations: Transform[int, TAKES] = 1,
        seed: Transform[int, SEED] | None = None,
        guidance: Transform[float, GUIDANCE] = 3.0,
        temperature: Transform[float, TEMPERATURE] = 1.0,
        top_k: Transform[int, TOP_K] = 250,
        top_p: Transform[float, TOP_P] = 0.0,
        melody: Transform[discord.Attachment, MELODY] | None = None,
        loop: Transform[bool, LOOP] = False,
    ) -> None:
        """Make music from a description."""
        await defer_reply(interaction)
        async with self._pending(interaction):
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
    @app_commands.describe(**descriptions("variations"))
    async def variations(
        self,
        interaction: discord.Interaction,
        count: Transform[int, MORE_TAKES] = DEFAULT_VARIATIONS,
        prompt: Transform[str, TWEAK] | None = None,
    ) -> None:
        """More takes of this thread's track (use it inside a result's thread)."""
        await defer_reply(interaction)
        async with self._pending(interaction):
            parent = await self.service.job_for_thread(interaction.channel_id or 0)
            if parent is None:
                raise NotInResultThread()
            request = variations_request(parent, int(count), prompt)
            request = await self._with_parent_melody(request, parent)
            await self._queue_in_reply(interaction, request, JobKind.VARIATIONS, TrackRef(parent.id, 0))

    # --- the buttons under a result (``bot.views.TrackButton`` hands each click to one of these) ---

    async def regenerate(self, interaction: discord.Interaction, ref: TrackRef) -> None:
        """The same request with a new seed, answered where the button was pressed."""
        async with errors_replied(interaction):
            await defer_reply(interaction)
            async with self._pending(interaction):
                parent = await self._parent(ref)
                request = await self._with_parent_melody(replace(parent.request, seed=None), parent)
                if parent.kind is JobKind.EXTEND and parent.parent is not None:
                    await self._queue_in_reply(interaction, request, JobKind.EXTEND, parent.parent)
                else:
                    await self._queue_in_reply(
                        interaction, request, JobKind.REGENERATE, TrackRef(parent.id, 0)
                    )

    async def more_variations(self, interaction: discord.Interaction, ref: TrackRef) -> None:
        """More takes of the result, in its thread."""
        async with errors_replied(interaction):
            await defer_private(interaction)
            async with self._pending(interaction):
                parent = await self._parent(ref)
                request = variations_request(parent, DEFAULT_VARIATIONS)
                request = await self._with_parent_melody(request, parent)
                job, thread = await self._queue_in_thread(
                    interaction, request, JobKind.VARIATIONS, ref, parent
                )
            await self._queued_in_thread(interaction, job, thread)

    async def extend(self, interaction: discord.Interaction, ref: TrackRef) -> None:
        """A continuation of one track of the result, in its thread."""
        async with errors_replied(interaction):
            await defer_private(interaction)
            async with self._pending(interaction):
                parent = await self._parent(ref)
                if not await self.service.has_track(ref):
                    raise TrackNotFound(ref.job_id, ref.index)  # before a thread is made for nothing
                request = extension_request(parent)
                job, thread = await self._queue_in_thread(interaction, request, JobKind.EXTEND, ref, parent)
            await self._queued_in_thread(interaction, job, thread)

    async def _parent(self, ref: TrackRef) -> Job:
        if ref.job_id > MAX_JOB_ID:
            raise JobNotFound(ref.job_id)
        return await self.service.job(ref.job_id)

    async def _queue_in_thread(
        self,
        interaction: discord.Interaction,
        request: GenerationRequest,
        kind: JobKind,
        ref: TrackRef,
        parent: Job,
    ) -> tuple[Job, discord.Thread]:
        thread = await self._result_thread(interaction, parent)
        job = await self.service.submit(
            request,
            Origin(interaction.user.id, interaction.guild_id, thread.id),
            kind=kind,
            parent=ref,
            is_admin=is_admin(interaction, self.settings),
            pending_id=interaction.id,
            hold_events=True,
        )
        return job, thread

    async def _queued_in_thread(
        self, interaction: discord.Interaction, job: Job, thread: discord.Thread
    ) -> None:
        """The job's status message goes into the thread; the presser gets a private note."""
        await self.delivery.announce_in_channel(job, thread, upload_limit=interaction.filesize_limit)
        text = messages.thread_queued_text(job, thread.mention, self.service.position(job.id))
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS)

    # --- the result's thread ---

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
            origin(interaction),
            kind=kind,
            parent=parent,
            delivery=delivery,
            is_admin=is_admin(interaction, self.settings),
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
        await self.service.note_pending(PendingRequest(interaction.id, origin(interaction), delivery))
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
        data = await read_attachment(self.session, attachment, MAX_BYTES)
        return await asyncio.to_thread(load_melody, data)

    async def _with_parent_melody(self, request: GenerationRequest, parent: Job) -> GenerationRequest:
        if not parent.has_melody:
            return request
        return replace(request, melody=await self.service.melody(parent.id))
