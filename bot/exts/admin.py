"""/model and /limits, for admins (checked here: a server can change Discord's command permissions).

The /model choices are ``bot.options.MODEL_SIZE``'s (every size in
``bot.settings.MODEL_SIZES``); what /model says about a model is ``messages.model_text``.
"""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from discord.app_commands import Transform
from discord.ext import commands

from bot import messages
from bot.delivery import NO_MENTIONS
from bot.interactions import defer_private, require_admin
from bot.jobs import BotError, JobService
from bot.options import DAILY_SECONDS, LIMITS_USER, MAX_DURATION, MAX_QUEUED, MODEL_SIZE, descriptions
from bot.settings import MODEL_SIZES, Settings
from generation import ModelLoadError

log = logging.getLogger(__name__)


class ModelSwitchFailed(BotError):
    def __init__(self, size: str, current: str, reason: str) -> None:
        super().__init__(f"could not switch to {size}: {reason}; still using {current}")


class AdminCog(commands.Cog, name="Admin"):
    """The model in use and everyone's limits."""

    def __init__(self, service: JobService, settings: Settings) -> None:
        self.service = service
        self.settings = settings

    @app_commands.command(name="model")
    @app_commands.guild_only()
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.describe(**descriptions("model"))
    async def model(
        self, interaction: discord.Interaction, size: Transform[str, MODEL_SIZE] | None = None
    ) -> None:
        """Show or switch the model (admins)."""
        await defer_private(interaction)
        require_admin(interaction, self.settings, "/model")
        if size is None:
            text = messages.model_text(self.service.model, self.service.model_info)
            text += "\n" + messages.sizes_text(MODEL_SIZES)
            await interaction.followup.send(text, ephemeral=True)
            return
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
    @app_commands.describe(**descriptions("limits"))
    async def limits(
        self,
        interaction: discord.Interaction,
        user: Transform[discord.User, LIMITS_USER] | None = None,
        max_queued: Transform[int, MAX_QUEUED] | None = None,
        daily_seconds: Transform[int, DAILY_SECONDS] | None = None,
        max_duration: Transform[int, MAX_DURATION] | None = None,
    ) -> None:
        """Show or set the limits: everyone's defaults or one user's (admins)."""
        await defer_private(interaction)
        require_admin(interaction, self.settings, "/limits")
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
