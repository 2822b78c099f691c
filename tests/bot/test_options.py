"""The option table: what Discord is told is the table, and the table stays within what generation accepts."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import discord
import pytest
from discord import app_commands

from bot import options
from bot.exts.admin import AdminCog
from bot.exts.music import MusicCog
from bot.exts.queue import QueueCog
from bot.jobs import Job, JobKind, JobState, Origin
from bot.options import OPTIONS, Option, option_problem
from bot.remakes import variations_request
from generation import GenerationRequest, InvalidRequest, SamplingParams


@pytest.fixture
def tree() -> Iterator[app_commands.CommandTree[discord.Client]]:
    """Every cog's commands in a tree, as the bot syncs them (no connection needed)."""
    tree: app_commands.CommandTree[discord.Client] = app_commands.CommandTree(
        discord.Client(intents=discord.Intents.default())
    )
    for cog in (MusicCog, QueueCog, AdminCog):
        for command in cog.__cog_app_commands__:
            tree.add_command(command)
    yield tree


def told(tree: app_commands.CommandTree[discord.Client], name: str) -> dict[str, Any]:
    command = tree.get_command(name)
    assert isinstance(command, app_commands.Command)
    return command.to_dict(tree)


def expected_payload(option: Option) -> dict[str, Any]:
    """An option as Discord should be told it, from the table alone."""
    payload: dict[str, Any] = {
        "name": option.name,
        "type": option.kind.value,
        "description": option.description,
    }
    if option.kind is options.TEXT and option.longest is not None:
        payload["min_length"], payload["max_length"] = 1, option.longest
    if option.low is not None:
        payload["min_value"] = int(option.low) if option.whole else float(option.low)
    if option.high is not None:
        payload["max_value"] = int(option.high) if option.whole else float(option.high)
    if option.allowed:
        payload["choices"] = [{"name": value, "value": value} for value in option.allowed]
    return payload


def test_every_command_tells_discord_exactly_the_options_of_the_table(
    tree: app_commands.CommandTree[discord.Client],
) -> None:
    names = {command.name for command in tree.get_commands()}
    assert set(OPTIONS) <= names
    for name in names:
        sent = told(tree, name)["options"]
        keys = ("name", "type", "description", "min_length", "max_length", "min_value", "max_value")
        shown = [{k: o[k] for k in (*keys, "choices") if k in o} for o in sent]
        assert shown == [expected_payload(option) for option in OPTIONS.get(name, ())], name


def test_every_description_is_filled_in_fits_discord_and_names_the_parameters_default(
    tree: app_commands.CommandTree[discord.Client],
) -> None:
    for name, table in OPTIONS.items():
        command = tree.get_command(name)
        assert isinstance(command, app_commands.Command)
        for option in table:
            assert "{" not in option.description and len(option.description) <= 100, option
            said = re.search(r"default (\d+(?:\.\d+)?)", option.description)
            parameter = command.get_parameter(option.name)
            assert parameter is not None
            if said is not None:
                assert float(said.group(1)) == parameter.default, (name, option.name)


# Which request field each option of /music fills in.
REQUEST_FIELDS = {
    options.DURATION: "duration",
    options.TAKES: "variations",
    options.SEED: "seed",
    options.GUIDANCE: "guidance",
    options.TEMPERATURE: "temperature",
    options.TOP_K: "top_k",
    options.TOP_P: "top_p",
}


def request_with(field: str, value: float) -> GenerationRequest:
    sampling = {"guidance": 3.0, "temperature": 1.0, "top_k": 250, "top_p": 0.0}
    fields: dict[str, Any] = {"prompt": "calm piano", "duration": 10.0, "variations": 1, "seed": None}
    (sampling if field in sampling else fields)[field] = value
    return GenerationRequest(sampling=SamplingParams(**sampling), **fields)


@pytest.mark.parametrize("option", list(REQUEST_FIELDS), ids=lambda option: option.name)
def test_every_bound_of_a_music_option_is_a_value_generation_accepts(option: Option) -> None:
    assert option.low is not None and option.high is not None
    for value in (option.low, option.high):
        request_with(REQUEST_FIELDS[option], value)  # raises InvalidRequest if generation refuses it


def test_every_number_option_of_music_and_variations_is_checked_against_a_request_field() -> None:
    numbers = [o for o in (*OPTIONS["music"], *OPTIONS["variations"]) if o.low is not None]
    assert set(numbers) == {*REQUEST_FIELDS, options.MORE_TAKES}
    request_with("variations", options.MORE_TAKES.high or 0)
    request_with("variations", options.MORE_TAKES.low or 0)


def test_the_longest_prompt_and_tweak_make_a_request_generation_accepts() -> None:
    assert options.PROMPT.longest is not None and options.TWEAK.longest is not None
    GenerationRequest(prompt="x" * options.PROMPT.longest)
    with pytest.raises(InvalidRequest):
        GenerationRequest(prompt="x" * (options.PROMPT.longest + 1))
    parent = Job(
        id=1,
        origin=Origin(1, 1, 1),
        kind=JobKind.NEW,
        request=GenerationRequest(prompt="x", seed=1),
        state=JobState.DONE,
        created_at=datetime.now(UTC),
    )
    variations_request(parent, 1, "y" * options.TWEAK.longest)


def command(tree: app_commands.CommandTree[discord.Client], name: str) -> app_commands.Command[Any, ..., Any]:
    found = tree.get_command(name)
    assert isinstance(found, app_commands.Command)
    return found


def crafted(*given: tuple[str, int, object]) -> dict[str, Any]:
    return {"options": [{"name": name, "type": kind, "value": value} for name, kind, value in given]}


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("music", crafted(("prompt", 3, "x"), ("temperature", 10, 0.005)), "between 0.01 and 5 (got 0.005)"),
        ("music", crafted(("prompt", 3, "x" * 401)), "prompt is too long (401 characters; at most 400)"),
        ("variations", crafted(("prompt", 3, "y" * 201)), "prompt is too long (201 characters; at most 200)"),
        ("cancel", crafted(("job", 4, 2**53 + 1)), f"job must be between 1 and {2**53} (got {2**53 + 1})"),
        ("model", crafted(("size", 3, "huge")), "size must be one of small, medium, large, melody"),
        ("limits", crafted(("max_duration", 4, 601)), "max_duration must be between 1 and 600 (got 601)"),
    ],
)
def test_a_crafted_value_outside_the_table_is_refused_with_the_tables_bounds(
    tree: app_commands.CommandTree[discord.Client], name: str, data: dict[str, Any], message: str
) -> None:
    problem = option_problem(command(tree, name), data)
    assert problem is not None and message in str(problem)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("music", crafted(("prompt", 3, "x"), ("temperature", 10, 0.01), ("top_k", 4, 2048))),
        ("music", crafted(("prompt", 3, "x" * 400), ("duration", 10, 600), ("seed", 4, 2**31 - 1))),
        ("model", crafted(("size", 3, "melody"))),
        ("limits", crafted(("max_queued", 4, 0), ("daily_seconds", 4, 7 * 24 * 3600))),
    ],
)
def test_values_at_the_tables_bounds_pass(
    tree: app_commands.CommandTree[discord.Client], name: str, data: dict[str, Any]
) -> None:
    assert option_problem(command(tree, name), data) is None
