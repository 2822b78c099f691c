"""The buttons under a result: Variations, Extend, Regenerate.

Each button is a ``DynamicItem`` whose ``custom_id`` carries the job id and track, so a click is
understood by any bot process, including one started after the message was posted.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Protocol, cast

import discord

from bot.jobs import TrackRef

MAX_TRACK_BUTTONS = 4


class TrackAction(StrEnum):
    VARIATIONS = "var"
    EXTEND = "ext"
    REGENERATE = "regen"


LABELS = {
    TrackAction.VARIATIONS: "Variations",
    TrackAction.EXTEND: "Extend",
    TrackAction.REGENERATE: "Regenerate",
}
EMOJI = {TrackAction.VARIATIONS: "🔀", TrackAction.EXTEND: "➕", TrackAction.REGENERATE: "🔁"}


class TrackActions(Protocol):
    """The work behind the buttons (the music cog)."""

    async def more_variations(self, interaction: discord.Interaction, ref: TrackRef) -> None: ...

    async def extend(self, interaction: discord.Interaction, ref: TrackRef) -> None: ...

    async def regenerate(self, interaction: discord.Interaction, ref: TrackRef) -> None: ...


class HasTrackActions(Protocol):
    """The client a click arrives at (the bot)."""

    @property
    def track_actions(self) -> TrackActions: ...


class TrackButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=re.compile(r"musicbot:(?P<action>var|ext|regen):(?P<job>[0-9]{1,19}):(?P<track>[0-9])"),
):
    def __init__(
        self, action: TrackAction, ref: TrackRef, *, label: str | None = None, row: int | None = None
    ):
        super().__init__(
            discord.ui.Button(
                label=label or LABELS[action],
                emoji=EMOJI[action],
                style=discord.ButtonStyle.primary
                if action is TrackAction.VARIATIONS
                else discord.ButtonStyle.secondary,
                custom_id=track_custom_id(action, ref),
                row=row,
            )
        )
        self.action = action
        self.ref = ref

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> TrackButton:
        label = item.label if isinstance(item, discord.ui.Button) else None
        return cls(
            TrackAction(match["action"]), TrackRef(int(match["job"]), int(match["track"])), label=label
        )

    async def callback(self, interaction: discord.Interaction) -> None:
        actions = cast(HasTrackActions, interaction.client).track_actions
        work = {
            TrackAction.VARIATIONS: actions.more_variations,
            TrackAction.EXTEND: actions.extend,
            TrackAction.REGENERATE: actions.regenerate,
        }[self.action]
        await work(interaction, self.ref)


def track_custom_id(action: TrackAction, ref: TrackRef) -> str:
    return f"musicbot:{action.value}:{ref.job_id}:{ref.index}"


def is_result_of(message: discord.Message, job_id: int) -> bool:
    """Whether the message is a result of this job (it carries the job's Regenerate button)."""
    wanted = track_custom_id(TrackAction.REGENERATE, TrackRef(job_id, 0))
    for row in message.components:
        for item in getattr(row, "children", ()):
            if getattr(item, "custom_id", None) == wanted:
                return True
    return False


def result_view(job_id: int, tracks: int) -> discord.ui.View:
    """Variations and Regenerate for the job; Extend for each of its tracks (one row when there is one)."""
    view = discord.ui.View(timeout=None)
    first = TrackRef(job_id, 0)
    view.add_item(TrackButton(TrackAction.VARIATIONS, first, row=0))
    if tracks <= 1:
        view.add_item(TrackButton(TrackAction.EXTEND, first, row=0))
    else:
        for index in range(min(tracks, MAX_TRACK_BUTTONS)):
            view.add_item(
                TrackButton(TrackAction.EXTEND, TrackRef(job_id, index), label=f"Extend {index + 1}", row=1)
            )
    view.add_item(TrackButton(TrackAction.REGENERATE, first, row=0))
    return view
