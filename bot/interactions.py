"""Acknowledging and answering interactions, the one way errors reach users, and who counts as an admin.

Every handler acknowledges first (Discord allows 3 seconds), then works. Errors reach ``reply_error``:
domain errors become a short ephemeral reply, anything else is logged and gets a generic one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import discord

from bot import messages
from bot.delivery import NO_MENTIONS
from bot.jobs import NotAllowed, Origin
from bot.settings import Settings

log = logging.getLogger(__name__)

# Keys in ``Interaction.extras``: a public "thinking" reply not yet handed to a job, and its message id.
PUBLIC_THINKING = "musicbot.public_thinking"
REPLY_MESSAGE_ID = "musicbot.reply_message_id"


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


@contextlib.asynccontextmanager
async def errors_replied(interaction: discord.Interaction) -> AsyncIterator[None]:
    """Any error in the block goes to ``reply_error`` (for components: a view's own handler only logs)."""
    try:
        yield
    except Exception as exc:
        await reply_error(interaction, exc)


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


def is_admin(interaction: discord.Interaction, settings: Settings) -> bool:
    """Manage Server here, or listed in MUSICBOT_ADMIN_IDS (a server can change Discord's defaults)."""
    if interaction.user.id in settings.admin_ids:
        return True
    if interaction.guild_id is None:
        return False
    permissions = interaction.permissions
    return permissions.manage_guild or permissions.administrator


def require_admin(interaction: discord.Interaction, settings: Settings, command: str) -> None:
    if not is_admin(interaction, settings):
        raise NotAllowed(
            f"only admins (members with Manage Server, or users in MUSICBOT_ADMIN_IDS) can use {command}"
        )


def origin(interaction: discord.Interaction) -> Origin:
    """Who asked, and where the answer goes."""
    return Origin(interaction.user.id, interaction.guild_id, interaction.channel_id)
