"""Every command option in one table: what Discord is told, how a crafted value is checked, what users read.

Each ``Option`` is the parameter's ``app_commands.Transform`` annotation, so its kind, bounds and choices
are what the command tree syncs; ``option_problem`` checks raw options against the same entries before
any handler runs; the entries' descriptions and ``InvalidOption`` messages are what users read.
``generation.request`` keeps its own domain check (it protects the engine from any caller); the bounds
here lie within it (a test holds them to that).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import discord
from discord import app_commands

from bot.jobs import BotError
from bot.settings import MODEL_SIZES
from generation.request import (
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MAX_VARIATIONS,
    MIN_DURATION,
)

Kind = discord.AppCommandOptionType
TEXT = Kind.string
WHOLE = Kind.integer
NUMBER = Kind.number
FLAG = Kind.boolean
USER = Kind.user
FILE = Kind.attachment

# The longest track a command accepts; each user's max_duration limit is checked by the job service.
LONGEST_TRACK = 600
DEFAULT_VARIATIONS = 2

# What each option type must carry, as users read it; snowflake types carry an id.
KIND_NAMES: Mapping[Kind, str] = {
    Kind.string: "text",
    Kind.integer: "a whole number",
    Kind.number: "a number",
    Kind.boolean: "true or false",
    Kind.user: "a user",
    Kind.channel: "a channel",
    Kind.role: "a role",
    Kind.mentionable: "a user or a role",
    Kind.attachment: "an attached file",
}


class InvalidOption(BotError):
    """An option value outside what the command declares (only a crafted request can send one)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class Option(app_commands.Transformer[discord.Client]):
    """One option of one command.

    ``about`` is its description; ``{low}`` and ``{high}`` in it stand for the bounds. Numbers lie in
    ``low``..``high`` (whole numbers when ``kind`` is ``WHOLE``); text is 1..``longest`` characters
    (an empty or blank prompt is left to ``generation.request``, whose message says what to do);
    ``allowed`` lists the only values a text option takes.
    """

    name: str
    kind: Kind
    about: str
    low: int | float | None = None
    high: int | float | None = None
    longest: int | None = None
    allowed: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        return self.about.format(low=_shown(self.low), high=_shown(self.high))

    @property
    def whole(self) -> bool:
        return self.kind is WHOLE

    # --- what Discord is told (the Transformer interface) ---

    @property
    def type(self) -> Kind:
        return self.kind

    @property
    def min_value(self) -> int | float | None:
        if self.kind is TEXT:
            return 1 if self.longest is not None else None
        return _declared(self.low, self.whole)

    @property
    def max_value(self) -> int | float | None:
        if self.kind is TEXT:
            return self.longest
        return _declared(self.high, self.whole)

    @property
    def choices(self) -> list[app_commands.Choice[int | float | str]] | None:
        return [app_commands.Choice(name=value, value=value) for value in self.allowed] or None

    async def transform(self, interaction: discord.Interaction, value: Any, /) -> Any:
        """The value as discord.py read it: ``option_problem`` has already checked it."""
        return value

    # --- the check of a value that arrived ---

    def problem(self, value: object) -> InvalidOption | None:
        """What is wrong with a value of the declared type (see ``fits``); None if nothing."""
        if self.kind in (WHOLE, NUMBER):
            return self._number_problem(value)
        if self.kind is TEXT and isinstance(value, str):
            if self.longest is not None and len(value) > self.longest:
                return InvalidOption(
                    self.name, f"{self.name} is too long ({len(value)} characters; at most {self.longest})"
                )
            if self.allowed and value not in self.allowed:
                return InvalidOption(self.name, f"{self.name} must be one of {', '.join(self.allowed)}")
        return None

    def _number_problem(self, value: object) -> InvalidOption | None:
        if self.low is None or self.high is None:
            return None
        bounds = f"between {_shown(self.low)} and {_shown(self.high)}"
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            return InvalidOption(self.name, f"{self.name} must be {KIND_NAMES[self.kind]} {bounds}")
        if not self.low <= value <= self.high:
            got = str(value) if isinstance(value, int) else f"{value:g}"
            return InvalidOption(self.name, f"{self.name} must be {bounds} (got {got})")
        return None


def _shown(value: float | None) -> str:
    """600, 0.01, 2147483647: never 2.14748e+09."""
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _declared(value: float | None, whole: bool) -> int | float | None:
    if value is None:
        return None
    return int(value) if whole else float(value)


# --- the table: one constant per option, grouped by command ---

# /music
PROMPT = Option(
    "prompt", TEXT, "What the music should be, e.g. 'calm lo-fi piano, rain'", longest=MAX_PROMPT_CHARS
)
DURATION = Option(
    "duration", NUMBER, "Seconds of music ({low}-{high}, default 10)", low=MIN_DURATION, high=LONGEST_TRACK
)
TAKES = Option(
    "variations", WHOLE, "How many different takes ({low}-{high}, default 1)", low=1, high=MAX_VARIATIONS
)
SEED = Option("seed", WHOLE, "Make a result again exactly (default: random)", low=0, high=MAX_SEED)
GUIDANCE = Option(
    "guidance", NUMBER, "How closely to follow the prompt ({low}-{high}, default 3)", low=1, high=MAX_GUIDANCE
)
# The engine takes any temperature above 0; users are offered 0.01 and up.
TEMPERATURE = Option(
    "temperature",
    NUMBER,
    "Higher is more adventurous ({low}-{high}, default 1)",
    low=0.01,
    high=MAX_TEMPERATURE,
)
TOP_K = Option(
    "top_k",
    WHOLE,
    "Sample from the k likeliest sounds ({low} = off, up to {high}, default 250)",
    low=0,
    high=MAX_TOP_K,
)
TOP_P = Option("top_p", NUMBER, "Nucleus sampling ({low} = off, the default, up to {high})", low=0, high=1)
MELODY = Option(
    "melody", FILE, "An audio file whose tune to follow (WAV, FLAC, OGG or MP3; uses the melody model)"
)
LOOP = Option("loop", FLAG, "A seamless loop: the end flows into the start")

# /variations
MORE_TAKES = Option(
    "count",
    WHOLE,
    f"How many new takes ({{low}}-{{high}}, default {DEFAULT_VARIATIONS})",
    low=1,
    high=MAX_VARIATIONS,
)
TWEAK = Option("prompt", TEXT, "Words to add to the track's prompt, e.g. 'with more drums'", longest=200)

# /cancel (2**53: the largest integer Discord lets a command declare)
JOB = Option("job", WHOLE, "The job number (default: all your waiting jobs)", low=1, high=2**53)

# /model: its choices are every size the settings name a source for.
MODEL_SIZE = Option(
    "size", TEXT, "The model to switch to (leave out to see the current one)", allowed=MODEL_SIZES
)

# /limits
LIMITS_USER = Option("user", USER, "Whose limits (leave out for everyone's defaults)")
MAX_QUEUED = Option("max_queued", WHOLE, "Jobs waiting or running at once ({low}-{high})", low=0, high=100)
DAILY_SECONDS = Option(
    "daily_seconds", WHOLE, "Seconds of audio per 24 hours ({low}-{high})", low=0, high=7 * 24 * 3600
)
MAX_DURATION = Option(
    "max_duration", WHOLE, "Longest track in seconds ({low}-{high})", low=1, high=LONGEST_TRACK
)

# Each command's options, in its parameters' order; a command missing here takes none.
OPTIONS: Mapping[str, tuple[Option, ...]] = {
    "music": (PROMPT, DURATION, TAKES, SEED, GUIDANCE, TEMPERATURE, TOP_K, TOP_P, MELODY, LOOP),
    "variations": (MORE_TAKES, TWEAK),
    "cancel": (JOB,),
    "model": (MODEL_SIZE,),
    "limits": (LIMITS_USER, MAX_QUEUED, DAILY_SECONDS, MAX_DURATION),
}


def descriptions(command: str) -> dict[str, str]:
    """The command's option descriptions, for ``app_commands.describe``."""
    return {option.name: option.description for option in OPTIONS[command]}


def lookup(command: str, name: str) -> Option | None:
    return next((option for option in OPTIONS.get(command, ()) if option.name == name), None)


# --- the check of crafted options ---


def option_problem(command: object, data: Mapping[str, Any]) -> InvalidOption | None:
    """What is wrong with a command's raw options, before discord.py reads them; None if nothing.

    Discord checks options against what it was told, but a crafted request can send anything, and
    discord.py trips over some of it (a number option holding text) before any handler runs, leaving
    the user with "This interaction failed". Each declared option must have its declared type and a
    value of it within the table's bounds.
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
        raw = given.get(name)
        if raw is None:
            if parameter.required:
                return InvalidOption(name, f"{name} is required")
            continue
        kind, value = parameter.type, raw.get("value")
        if raw.get("type") != kind.value or not fits(kind, value, attachments):
            return InvalidOption(name, f"{name} must be {KIND_NAMES.get(kind, 'something else')}")
        entry = lookup(command.qualified_name, name)
        problem = entry.problem(value) if entry is not None else None
        if problem is not None:
            return problem
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


def fits(kind: Kind, value: object, attachments: object) -> bool:
    """Whether a raw value has the option type's JSON shape (snowflake types: an id, of a sent file)."""
    if kind is TEXT:
        return isinstance(value, str)
    if kind is WHOLE:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is NUMBER:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is FLAG:
        return isinstance(value, bool)
    if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).isdigit():
        return False
    if kind is FILE:
        return isinstance(attachments, Mapping) and str(value) in attachments
    return True
