"""The discord.py bot: its command tree, the persistent result buttons, and command sync at start."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bot.delivery import PROGRESS_INTERVAL, DiscordDelivery
from bot.exts.admin import AdminCog
from bot.exts.music import MusicCog
from bot.exts.queue import QueueCog
from bot.interactions import reply_error
from bot.jobs import INTERACTION_LIFETIME, JobService
from bot.options import option_problem
from bot.settings import Settings
from bot.views import TrackButton

log = logging.getLogger(__name__)


class MusicTree(app_commands.CommandTree):
    """Every command error goes through ``reply_error`` (the default only logs: "interaction failed")."""

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        """Options Discord would not have sent get a specific refusal before any handler runs.

        A wrong type, or a value outside ``bot.options``'s bounds: only a crafted request has them.
        """
        if interaction.type is not discord.InteractionType.application_command:
            return True
        problem = option_problem(interaction.command, interaction.data or {})
        if problem is None:
            return True
        log.info("refused a malformed command from user %d: %s", interaction.user.id, problem)
        await reply_error(interaction, problem)
        return False

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        original = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        await reply_error(interaction, original)


class MusicBot(commands.Bot):
    """One bot per process; it owns no model: jobs go to the ``JobService`` it is given."""

    def __init__(
        self,
        service: JobService,
        settings: Settings,
        *,
        interaction_lifetime: timedelta = INTERACTION_LIFETIME,
        progress_interval: float = PROGRESS_INTERVAL,
        **options: Any,
    ) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            help_command=None,
            intents=discord.Intents.default(),
            tree_cls=MusicTree,
            # Nothing the bot sends pings anyone unless a message says so on purpose.
            allowed_mentions=discord.AllowedMentions.none(),
            **options,
        )
        self.service = service
        self.settings = settings
        self.delivery = DiscordDelivery(
            self, service, interaction_lifetime=interaction_lifetime, progress_interval=progress_interval
        )
        service.set_listener(self.delivery)
        self._session: aiohttp.ClientSession | None = None
        self._music: MusicCog | None = None

    async def setup_hook(self) -> None:
        self._session = aiohttp.ClientSession()
        self._music = MusicCog(self, self.service, self.settings, self.delivery, self._session)
        await self.add_cog(self._music)
        await self.add_cog(QueueCog(self.service, self.settings))
        await self.add_cog(AdminCog(self.service, self.settings))
        self.add_dynamic_items(TrackButton)
        await self.sync_commands()

    async def sync_commands(self) -> None:
        """To MUSICBOT_GUILD_ID when set (there at once), else globally (Discord may take a while)."""
        if self.settings.guild_id is not None:
            guild = discord.Object(self.settings.guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("synced %d commands to server %d", len(synced), self.settings.guild_id)
        else:
            synced = await self.tree.sync()
            log.info("synced %d commands globally", len(synced))

    async def on_ready(self) -> None:
        log.info(
            "logged in as %s (%s) in %d servers", self.user, getattr(self.user, "id", "?"), len(self.guilds)
        )

    @property
    def track_actions(self) -> MusicCog:
        """What the buttons under a result do (``TrackButton`` is registered once this is set)."""
        if self._music is None:
            raise RuntimeError("a button was pressed before the bot was set up")
        return self._music

    async def close(self) -> None:
        await self.delivery.close()
        await super().close()
        if self._session is not None:
            await self._session.close()


class ShardedMusicBot(MusicBot, commands.AutoShardedBot):
    """The same bot running some of the shards (``MUSICBOT_SHARD_IDS`` of ``MUSICBOT_SHARD_COUNT``).

    Each process of a sharded bot answers the guilds of its shards; the jobs they queue share one
    PostgreSQL database, and each result is delivered by the process that owns the job.
    """


def make_bot(service: JobService, settings: Settings, **options: Any) -> MusicBot:
    """A plain bot, or a sharded one when shard settings are given."""
    if settings.shard_count is None:
        return MusicBot(service, settings, **options)
    return ShardedMusicBot(
        service,
        settings,
        shard_count=settings.shard_count,
        shard_ids=list(settings.shard_ids or []) or None,
        **options,
    )
