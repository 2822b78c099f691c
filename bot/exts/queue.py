"""/queue, /cancel and /usage: a user's own jobs and limits."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.app_commands import Transform
from discord.ext import commands

from bot import messages
from bot.delivery import NO_MENTIONS
from bot.interactions import defer_private, is_admin
from bot.jobs import JobService
from bot.options import JOB, descriptions
from bot.settings import Settings


class QueueCog(commands.Cog, name="Queue"):
    """What is waiting, stopping what should not run, and what is left of one's limits."""

    def __init__(self, service: JobService, settings: Settings) -> None:
        self.service = service
        self.settings = settings

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
    @app_commands.describe(**descriptions("cancel"))
    async def cancel(self, interaction: discord.Interaction, job: Transform[int, JOB] | None = None) -> None:
        """Cancel one of your jobs, or all your waiting ones."""
        await defer_private(interaction)
        user = interaction.user.id
        if job is not None:
            admin = is_admin(interaction, self.settings)
            cancelled = await self.service.cancel(int(job), user_id=user, is_admin=admin)
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
        admin = is_admin(interaction, self.settings)
        usage = await self.service.usage(interaction.user.id, is_admin=admin)
        await interaction.followup.send(
            messages.usage_text(usage, admin=admin), ephemeral=True, allowed_mentions=NO_MENTIONS
        )
