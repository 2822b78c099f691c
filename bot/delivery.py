"""Delivery: the job listener that keeps each job's status message current and posts its result.

A job is answered through its interaction while the interaction's token lives (15 minutes): the
deferred "thinking" message becomes the status message and then the result. After that, or for jobs
that live in a thread (Variations and Extend clicks), the status message is a channel message and the
result is a new channel message that mentions the requester. Status edits are throttled to one every
``progress_interval`` seconds; the result is never held back.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime, timedelta

import discord

from bot import messages
from bot.jobs import (
    INTERACTION_LIFETIME,
    BaseJobListener,
    BotError,
    Delivery,
    Job,
    JobKind,
    JobService,
    JobState,
    JobTrack,
    PendingRequest,
    utc_now,
)
from bot.jobs.tasks import BackgroundTasks
from bot.views import is_result_of, result_view
from generation.audio import encode_audio

log = logging.getLogger(__name__)

NO_MENTIONS = discord.AllowedMentions.none()
DEFAULT_UPLOAD_LIMIT = 10 * 2**20
PROGRESS_INTERVAL = 3.0
# Discord answers these when an interaction token has expired or its webhook is gone.
DEAD_WEBHOOK_CODES = frozenset({10015, 50027})
UNKNOWN_MESSAGE = 10008
ENTITY_TOO_LARGE = 40005
# How far back (before the job finished) and how deep to look for a result posted before a crash.
HISTORY_SLACK = timedelta(seconds=5)
HISTORY_DEPTH = 100

Clock = Callable[[], datetime]


def only_requester(user_id: int) -> discord.AllowedMentions:
    """The one ping the bot sends on purpose: the requester, when a result is posted to the channel."""
    return discord.AllowedMentions(
        everyone=False, roles=False, replied_user=False, users=[discord.Object(user_id)]
    )


class _Card:
    """The status message of one job: where it is, and throttled edits of it."""

    def __init__(
        self,
        job: Job,
        *,
        upload_limit: int,
        interval: float,
        edit: Callable[[_Card, str], Awaitable[None]],
        tasks: BackgroundTasks,
    ) -> None:
        self.job = job
        self.status_message_id = job.delivery.status_message_id
        self.upload_limit = upload_limit
        self.webhook_alive = job.delivery.interaction_token is not None
        # Its outcome was reached before this process started: it may have been posted already.
        self.recovered = False
        # The status message is up (a card made by the command that queued the job is not, until
        # its announcement is; a card for a job from the database is).
        self.announced = True
        self.started = False
        self.closed = False
        self._interval = interval
        self._edit = edit
        self._tasks = tasks
        self._lock = asyncio.Lock()
        self._shown: str | None = None
        self._wanted: str | None = None
        self._last_edit = -math.inf
        self._timer: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> bool:
        """Shown as waiting in the queue (announced, not started, not ended)."""
        return self.announced and not self.started and not self.closed

    def shown(self, text: str) -> None:
        """The announcement put ``text`` up (it counts as an edit for the throttle)."""
        self.announced = True
        self._shown = self._wanted = text
        self._last_edit = time.monotonic()

    async def show(self, text: str) -> None:
        """Show ``text`` now, or when the throttle allows (the latest text wins)."""
        if self.closed:
            return
        self._wanted = text
        if self._timer is not None:
            return
        wait = self._last_edit + self._interval - time.monotonic()
        if wait > 0:
            self._timer = self._tasks.spawn(self._later(wait), name=f"job-{self.job.id}-status")
            return
        await self._flush()

    @contextlib.asynccontextmanager
    async def final(self) -> AsyncIterator[None]:
        """No more status edits; waits for one in flight so that it cannot land after the final one."""
        self.closed = True
        async with self._lock:
            yield

    async def _later(self, wait: float) -> None:
        try:
            await asyncio.sleep(wait)
        finally:
            self._timer = None
        await self._flush()

    async def _flush(self) -> None:
        async with self._lock:
            text = self._wanted
            if self.closed or text is None or text == self._shown:
                return
            self._last_edit = time.monotonic()
            await self._edit(self, text)
            self._shown = text


class DiscordDelivery(BaseJobListener):
    """Hears the job service and answers on Discord; one instance per bot."""

    def __init__(
        self,
        client: discord.Client,
        service: JobService,
        *,
        interaction_lifetime: timedelta = INTERACTION_LIFETIME,
        progress_interval: float = PROGRESS_INTERVAL,
        clock: Clock = utc_now,
    ) -> None:
        self._client = client
        self._service = service
        self._lifetime = interaction_lifetime
        # Stop using a token a little before Discord does (30 s of 15 minutes).
        self._margin = interaction_lifetime / 30
        self._interval = progress_interval
        self._clock = clock
        self._cards: dict[int, _Card] = {}
        self._tasks = BackgroundTasks()

    async def close(self) -> None:
        await self._tasks.cancel()

    # --- called by the commands, right after a job was queued (``submit(..., hold_events=True)``) ---

    async def announce_in_reply(
        self, job: Job, interaction: discord.Interaction, *, note: str | None
    ) -> None:
        """The interaction's deferred reply becomes the job's status message.

        The card owns the status message from here on: the service holds the job's events back until
        this announcement is up, so no event can edit the message before it.
        """
        card = self._cards[job.id] = self._new_card(job, interaction.filesize_limit)
        card.announced = False
        try:
            text = messages.queued_text(job, self._service.position(job.id), note=note)
            await interaction.edit_original_response(content=text, allowed_mentions=NO_MENTIONS)
            card.shown(text)
        finally:
            self._service.release_events(job.id)

    async def announce_in_channel(
        self, job: Job, channel: discord.abc.Messageable, *, upload_limit: int
    ) -> discord.Message:
        """Post the job's status message in ``channel`` (a result's thread); as ``announce_in_reply``."""
        card = self._cards[job.id] = self._new_card(job, upload_limit)
        card.announced = False
        try:
            text = messages.queued_text(job, self._service.position(job.id))
            message = await channel.send(text, allowed_mentions=NO_MENTIONS)
            card.status_message_id = message.id
            card.shown(text)
            await self._service.update_delivery(job.id, status_message_id=message.id)
        finally:
            self._service.release_events(job.id)
        return message

    # --- the listener ---

    async def job_requeued(self, job: Job) -> None:
        card = await self._card(job)
        await card.show(messages.queued_text(job, self._service.position(job.id), requeued=True))

    async def job_started(self, job: Job) -> None:
        card = await self._card(job)
        card.started = True
        await card.show(messages.queued_text(job, self._service.position(job.id)))
        self._refresh_waiting()

    async def job_progress(self, job: Job, done: int, total: int) -> None:
        card = await self._card(job)
        card.started = True
        await card.show(messages.progress_text(job, done, total, self._service.position(job.id)))

    async def job_finished(self, job: Job, tracks: Sequence[JobTrack]) -> None:
        card = await self._card(job)
        try:
            async with card.final():
                message_id = await self._post_result(card, job, tracks)
            await self._service.mark_delivered(job.id, result_message_id=message_id)
        except Exception as exc:
            await self._delivery_failed(job, exc)
        finally:
            self._cards.pop(job.id, None)
        self._refresh_waiting()

    async def job_failed(self, job: Job, reason: str) -> None:
        card = await self._card(job)
        try:
            async with card.final():
                await self._tell(card, job, messages.failed_text(job, reason))
            await self._service.mark_delivered(job.id)
        except Exception as exc:
            await self._delivery_failed(job, exc)
        finally:
            self._cards.pop(job.id, None)
        self._refresh_waiting()

    async def request_interrupted(self, request: PendingRequest) -> None:
        """A command the bot stopped in the middle of: its reply says so, if it can still be edited."""
        await self._client.wait_until_ready()
        webhook = self._live_webhook(request.delivery)
        message_id = request.delivery.status_message_id
        if webhook is None or message_id is None:
            log.info("request %d was lost in a restart; its reply can no longer be edited", request.id)
            return
        try:
            await webhook.edit_message(
                message_id, content=messages.interrupted_text(), allowed_mentions=NO_MENTIONS
            )
        except discord.HTTPException as exc:
            log.warning("could not tell the user of request %d that it was lost: %s", request.id, exc)

    async def job_cancelled(self, job: Job) -> None:
        card = await self._card(job)
        try:
            async with card.final():
                await self._edit_status(card, messages.cancelled_text(job))
            await self._service.mark_delivered(job.id)
        except Exception:
            log.exception("could not show that job %d was cancelled", job.id)
        finally:
            self._cards.pop(job.id, None)
        self._refresh_waiting()

    # --- cards ---

    async def _card(self, job: Job) -> _Card:
        card = self._cards.get(job.id)
        if card is None:
            # A job from before a restart: its messages are known from the database.
            await self._client.wait_until_ready()
            card = self._cards.setdefault(job.id, self._new_card(job, self._guild_upload_limit(job)))
            card.recovered = job.state in (JobState.DONE, JobState.FAILED)
        return card

    def _new_card(self, job: Job, upload_limit: int) -> _Card:
        return _Card(
            job, upload_limit=upload_limit, interval=self._interval, edit=self._edit_status, tasks=self._tasks
        )

    def _guild_upload_limit(self, job: Job) -> int:
        guild = self._client.get_guild(job.origin.guild_id) if job.origin.guild_id else None
        return guild.filesize_limit if guild is not None else DEFAULT_UPLOAD_LIMIT

    def _refresh_waiting(self) -> None:
        """The queue moved: waiting jobs show their new positions, off this job's path."""
        if any(card.waiting for card in self._cards.values()):
            self._tasks.spawn(self._show_positions(), name="queue-positions")

    async def _show_positions(self) -> None:
        for card in list(self._cards.values()):
            if not card.waiting:
                continue
            entry = self._service.position(card.job.id)
            if entry is not None:
                await card.show(messages.queued_text(card.job, entry))

    # --- talking to Discord ---

    def _webhook(self, card: _Card) -> discord.Webhook | None:
        """The interaction's webhook while its token lives; None once it has expired."""
        webhook = self._live_webhook(card.job.delivery) if card.webhook_alive else None
        if webhook is None:
            card.webhook_alive = False
        return webhook

    def _live_webhook(self, delivery: Delivery) -> discord.Webhook | None:
        if delivery.interaction_token is None or delivery.application_id is None:
            return None
        created = delivery.interaction_created_at
        if created is None or self._clock() >= created + self._lifetime - self._margin:
            return None
        return discord.Webhook.partial(
            delivery.application_id, delivery.interaction_token, client=self._client
        )

    def _channel(self, job: Job) -> discord.PartialMessageable:
        if job.origin.channel_id is None:
            raise BotError(f"job #{job.id} has no channel to deliver to")
        return self._client.get_partial_messageable(job.origin.channel_id, guild_id=job.origin.guild_id)

    async def _edit_status(self, card: _Card, text: str) -> None:
        if card.status_message_id is None:
            return
        try:
            webhook = self._webhook(card)
            if webhook is not None:
                try:
                    await webhook.edit_message(
                        card.status_message_id, content=text, allowed_mentions=NO_MENTIONS
                    )
                    return
                except discord.HTTPException as exc:
                    if not _dead_webhook(exc):
                        raise
                    card.webhook_alive = False
            status = self._channel(card.job).get_partial_message(card.status_message_id)
            await status.edit(content=text, allowed_mentions=NO_MENTIONS)
        except discord.NotFound:
            log.info("the status message of job %d is gone", card.job.id)
            card.status_message_id = None
        except discord.HTTPException as exc:
            log.warning("could not update the status of job %d: %s", card.job.id, exc)

    async def _tell(self, card: _Card, job: Job, text: str) -> None:
        """An outcome without files: in the reply while the token lives, else to the channel with a ping."""
        webhook = self._webhook(card)
        if webhook is not None and card.status_message_id is not None:
            try:
                await webhook.edit_message(card.status_message_id, content=text, allowed_mentions=NO_MENTIONS)
                return
            except discord.HTTPException as exc:
                if not _dead_webhook(exc) and exc.code != UNKNOWN_MESSAGE:
                    raise
                card.webhook_alive = False
        marker = f"❌ Job #{job.id} ("
        if not card.recovered or await self._posted_before(card, job, lambda m: marker in m.content) is None:
            await self._channel(job).send(
                f"<@{job.user_id}> {text}", allowed_mentions=only_requester(job.user_id)
            )
        await self._edit_status(card, text)

    async def _post_result(self, card: _Card, job: Job, tracks: Sequence[JobTrack]) -> int:
        files = await asyncio.to_thread(_attachments, job, tracks, card.upload_limit)
        parent_seconds = await self._parent_seconds(job)
        for attempt in (files, [_refused(f) for f in files]):
            text = messages.result_text(job, attempt, limit=card.upload_limit, parent_seconds=parent_seconds)
            try:
                return await self._send_result(card, job, text, attempt, len(tracks))
            except discord.HTTPException as exc:
                if exc.code != ENTITY_TOO_LARGE or attempt is not files:
                    raise
                log.warning("job %d: Discord refused the upload as too large; sending without files", job.id)
        raise AssertionError("unreachable")

    async def _send_result(
        self, card: _Card, job: Job, text: str, files: Sequence[messages.Attachment], tracks: int
    ) -> int:
        webhook = self._webhook(card)
        if webhook is not None and card.status_message_id is not None:
            try:
                message = await webhook.edit_message(
                    card.status_message_id,
                    content=text,
                    attachments=_discord_files(files),
                    view=result_view(job.id, tracks),
                    allowed_mentions=NO_MENTIONS,
                )
                return message.id
            except discord.HTTPException as exc:
                if not _dead_webhook(exc) and exc.code != UNKNOWN_MESSAGE:
                    raise
                card.webhook_alive = False
        posted = None
        if card.recovered:
            posted = await self._posted_before(card, job, lambda m: is_result_of(m, job.id))
        if posted is not None:
            await self._edit_status(card, messages.delivered_text(job, posted.jump_url))
            return posted.id
        sent = await self._channel(job).send(
            f"<@{job.user_id}> your music is ready.\n{text}",
            files=_discord_files(files),
            view=result_view(job.id, tracks),
            allowed_mentions=only_requester(job.user_id),
        )
        await self._edit_status(card, messages.delivered_text(job, sent.jump_url))
        return sent.id

    async def _posted_before(
        self, card: _Card, job: Job, is_it: Callable[[discord.Message], bool]
    ) -> discord.Message | None:
        """The bot's message about this job that an earlier run sent but did not record, if any.

        A run that is killed between sending an outcome and recording it would send it twice. The
        status message (the reply, which may already carry it) and the channel's history since the
        job finished say whether it did.
        """
        me = self._client.user
        channel = self._channel(job)
        since = (job.finished_at or job.created_at) - HISTORY_SLACK
        try:
            if card.status_message_id is not None:
                with contextlib.suppress(discord.NotFound):
                    status = await channel.fetch_message(card.status_message_id)
                    if is_it(status):
                        return status
            async for message in channel.history(after=since, limit=HISTORY_DEPTH):
                if me is not None and message.author.id == me.id and is_it(message):
                    log.info("job %d was posted before the restart (message %d)", job.id, message.id)
                    return message
        except discord.HTTPException as exc:
            log.warning("could not look for an earlier post of job %d (%s); posting it", job.id, exc)
        return None

    async def _parent_seconds(self, job: Job) -> float | None:
        if job.kind is not JobKind.EXTEND or job.parent is None:
            return None
        try:
            parent = await self._service.job(job.parent.job_id)
        except BotError:
            return None
        return parent.result.seconds if parent.result is not None else None

    async def _delivery_failed(self, job: Job, exc: Exception) -> None:
        if isinstance(exc, discord.NotFound | discord.Forbidden):
            # The channel is gone or closed to the bot: retrying at the next start would not help.
            log.warning("giving up delivering job %d: %s", job.id, exc)
            await self._service.mark_delivered(job.id)
            return
        log.error("delivering job %d failed; it is tried again at the next start", job.id, exc_info=exc)


def _dead_webhook(exc: discord.HTTPException) -> bool:
    return exc.status == 401 or exc.code in DEAD_WEBHOOK_CODES


def _attachments(job: Job, tracks: Sequence[JobTrack], limit: int) -> list[messages.Attachment]:
    """WAV when it fits the upload limit, else the stored FLAC, else nothing (and say so)."""
    found = []
    for track in tracks:
        wav = encode_audio(track.audio.samples, track.audio.sample_rate, "wav")
        if len(wav) <= limit:
            name, data = messages.filename(job, track.index, len(tracks), "wav"), wav
        else:
            name, data = messages.filename(job, track.index, len(tracks), "flac"), track.flac
        found.append(messages.Attachment(name, data, len(wav), too_large=len(data) > limit))
    return [_refused(f) if f.too_large else f for f in found]


def _refused(file: messages.Attachment) -> messages.Attachment:
    return messages.Attachment(file.filename, None, file.wav_bytes, too_large=True)


def _discord_files(files: Sequence[messages.Attachment]) -> list[discord.File]:
    return [discord.File(io.BytesIO(f.data), f.filename) for f in files if f.data is not None]
