"""The Discord emulator drives the real discord.py client: login, gateway, interactions, Discord's rules."""

from __future__ import annotations

import asyncio
import io
import struct
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands

from tests.discord_emulator import DiscordEmulator, EmulatorError, Upload

CommandCallback = Callable[..., Coroutine[Any, Any, None]]


class RecordingTree(app_commands.CommandTree):
    """Keeps the errors raised in command callbacks, for the test to assert on."""

    def __init__(self, client: discord.Client) -> None:
        super().__init__(client)
        self.errors: list[BaseException] = []

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        self.errors.append(error.original if isinstance(error, app_commands.CommandInvokeError) else error)


class EmuBot(commands.Bot):
    """A bot that syncs its tree to the emulated guild in ``setup_hook``, as a real bot would."""

    tree: RecordingTree

    def __init__(self, guild_id: int, views: Sequence[discord.ui.View] = ()) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            tree_cls=RecordingTree,
            guild_ready_timeout=0.05,
        )
        self.guild_id = guild_id
        self.startup_views = list(views)
        self.synced: list[app_commands.AppCommand] = []
        self.resumed = asyncio.Event()

    async def setup_hook(self) -> None:
        for view in self.startup_views:
            self.add_view(view)
        guild = discord.Object(self.guild_id)
        self.tree.copy_global_to(guild=guild)
        self.synced = await self.tree.sync(guild=guild)

    async def on_resumed(self) -> None:
        self.resumed.set()


def tiny_wav(samples: int = 3200) -> bytes:
    """A valid 16-bit mono 32 kHz WAV holding a ramp."""
    data = b"".join(struct.pack("<h", (i * 37) % 30000 - 15000) for i in range(samples))
    fmt = struct.pack("<HHIIHH", 1, 1, 32000, 64000, 2, 16)
    chunks = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data))
    return b"RIFF" + struct.pack("<I", len(chunks) + len(data)) + chunks + data


def add_command(bot: EmuBot, callback: CommandCallback) -> None:
    """Register ``callback`` as a slash command named after it."""
    name = callback.__name__
    bot.tree.add_command(
        app_commands.Command(name=name, description=f"The {name} command.", callback=callback)
    )


@pytest.fixture
async def emu() -> AsyncIterator[DiscordEmulator]:
    async with DiscordEmulator(max_lifetime=30) as emulator:
        yield emulator


async def test_login_reaches_ready_with_the_guild(emu: DiscordEmulator) -> None:
    bot = EmuBot(emu.guild_id)
    async with emu.running(bot, wait_ready=True):
        guild = bot.get_guild(emu.guild_id)
        assert bot.user is not None and bot.user.id == emu.bot.id
        assert guild is not None and guild.get_channel(emu.channel.id) is not None
        assert guild.me.guild_permissions.send_messages
        await emu.wait_for(lambda: emu.heartbeats >= 1)
    assert [c.path for c in emu.calls[:2]] == ["/users/@me", "/oauth2/applications/@me"]
    assert emu.identify_count == 1
    assert emu.violations == []


async def test_wrong_token_fails_login_with_login_failure(emu: DiscordEmulator) -> None:
    bot = EmuBot(emu.guild_id)
    with pytest.raises(discord.LoginFailure):
        await bot.login("not-the-token")
    await bot.close()
    assert emu.calls[-1].status == 401


async def test_command_sync_is_recorded_with_ids(emu: DiscordEmulator) -> None:
    async def generate(interaction: discord.Interaction, prompt: str, seconds: int = 10) -> None:
        await interaction.response.send_message(prompt)

    bot = EmuBot(emu.guild_id)
    add_command(bot, generate)
    async with emu.running(bot):
        pass
    scope, sent = emu.command_syncs[-1]
    assert scope == emu.guild_id
    assert [c["name"] for c in sent] == ["generate"]
    assert [o["name"] for o in sent[0]["options"]] == ["prompt", "seconds"]
    stored = emu.synced_commands(emu.guild_id)[0]
    assert [cmd.id for cmd in bot.synced] == [int(stored["id"])]


async def test_slash_command_reaches_callback_with_its_options(emu: DiscordEmulator) -> None:
    received: dict[str, object] = {}

    async def generate(
        interaction: discord.Interaction,
        prompt: str,
        seconds: int,
        temperature: float,
        loop: bool,
        listener: discord.Member,
        melody: discord.Attachment,
    ) -> None:
        await interaction.response.defer(ephemeral=True)
        received.update(
            prompt=prompt,
            seconds=seconds,
            temperature=temperature,
            loop=loop,
            listener=listener.id,
            melody=await melody.read(),
            permissions=interaction.permissions.manage_guild,
            filesize_limit=interaction.filesize_limit,
        )
        await interaction.followup.send("ok")

    bot = EmuBot(emu.guild_id)
    add_command(bot, generate)
    melody = tiny_wav(64)
    async with emu.running(bot):
        options = {
            "prompt": "lofi <@everyone>",
            "seconds": 12,
            "temperature": 0.9,
            "loop": True,
            "listener": emu.owner,
            "melody": Upload("melody.wav", melody),
        }
        interaction = await emu.invoke_command("generate", options, user=emu.member)
        await emu.wait_for(lambda: [m for m in emu.interaction_messages(interaction) if m.content == "ok"])
    required = {"id", "application_id", "type", "token", "version", "attachment_size_limit", "member"}
    assert required <= interaction.payload.keys()
    assert {"roles", "flags", "permissions"} <= interaction.payload["member"].keys()
    assert abs(discord.utils.snowflake_time(interaction.id) - discord.utils.utcnow()).total_seconds() < 5
    assert received == {
        "prompt": "lofi <@everyone>",
        "seconds": 12,
        "temperature": 0.9,
        "loop": True,
        "listener": emu.owner.id,
        "melody": melody,
        "permissions": False,
        "filesize_limit": 10 * 1024 * 1024,
    }
    assert bot.tree.errors == [] and emu.violations == []


async def test_deferred_followup_uploads_wav_and_edits_original(emu: DiscordEmulator) -> None:
    wav = tiny_wav()

    async def generate(interaction: discord.Interaction, prompt: str) -> None:
        await interaction.response.defer(thinking=True)
        await interaction.followup.send(
            f"{prompt}:",
            file=discord.File(io.BytesIO(wav), "song.wav"),
            allowed_mentions=discord.AllowedMentions.none(),
        )
        await interaction.edit_original_response(content=f"{prompt}: done")

    bot = EmuBot(emu.guild_id)
    add_command(bot, generate)
    async with emu.running(bot):
        interaction = await emu.invoke_command("generate", {"prompt": "rain"})
        await emu.wait_for(lambda: emu.calls_to("PATCH", "@original", interaction=interaction))
        [message] = emu.interaction_messages(interaction)
        async with aiohttp.ClientSession() as session, session.get(message.attachments[0]["url"]) as response:
            downloaded = await response.read()
    [upload] = emu.calls_to("POST", "^/webhooks/", interaction=interaction)[0].files
    assert upload.filename == "song.wav" and upload.data == wav
    assert message.attachment_bytes("song.wav") == wav and downloaded == wav
    assert message.content == "rain: done" and not message.loading
    assert [version["content"] for version in message.versions] == ["", "rain:"]
    assert emu.calls_to("POST", "^/webhooks/")[0].json["allowed_mentions"] == {"parse": []}
    latency = emu.ack_latency(interaction)
    assert latency is not None and latency < 1.0
    assert emu.unfinished_deferrals() == [] and emu.violations == []


async def test_button_on_persistent_view_reaches_its_callback(emu: DiscordEmulator) -> None:
    clicks: list[tuple[int, int]] = []

    class Again(discord.ui.View):
        def __init__(self) -> None:
            super().__init__(timeout=None)

        @discord.ui.button(label="Again", custom_id="musicbot:again", style=discord.ButtonStyle.primary)
        async def again(self, interaction: discord.Interaction, button: discord.ui.Button[Again]) -> None:
            assert interaction.message is not None
            clicks.append((interaction.user.id, interaction.message.id))
            await interaction.response.send_message("queued again", ephemeral=True)

    # A message the bot posted before it restarted: only the persistent view can answer its button.
    old = await emu.add_message({"content": "song", "components": Again().to_components()})
    bot = EmuBot(emu.guild_id, views=[Again()])
    async with emu.running(bot):
        interaction = await emu.click_button(old, "musicbot:again", user=emu.owner)
        await emu.wait_for(lambda: emu.interaction_messages(interaction))
    assert clicks == [(emu.owner.id, old.id)]
    [reply] = emu.interaction_messages(interaction)
    assert reply.content == "queued again" and reply.ephemeral
    assert emu.violations == []


async def test_thread_on_followup_message_takes_messages(emu: DiscordEmulator) -> None:
    async def generate(interaction: discord.Interaction, prompt: str) -> None:
        await interaction.response.defer()
        message = await interaction.followup.send(f"{prompt} is ready", wait=True)
        assert isinstance(interaction.channel, discord.TextChannel)
        thread = await interaction.channel.create_thread(name=prompt, message=message)
        await thread.send("seed 42", file=discord.File(io.BytesIO(b"RIFF"), "take 2.wav"))

    bot = EmuBot(emu.guild_id)
    add_command(bot, generate)
    async with emu.running(bot):
        interaction = await emu.invoke_command("generate", {"prompt": "waves"})
        [message] = await emu.wait_for(lambda: emu.interaction_messages(interaction))
        thread = await emu.wait_for(lambda: emu.thread_of(message))
        [in_thread] = await emu.wait_for(lambda: emu.channel_messages(thread))
        await emu.wait_for(lambda: bot.get_channel(thread.id) is not None)  # THREAD_CREATE reached the bot
    assert thread.name == "waves" and thread.parent_id == emu.channel.id
    assert in_thread.content == "seed 42" and in_thread.attachments[0]["filename"] == "take_2.wav"
    assert emu.message(message.id).data["thread"]["id"] == str(thread.id)
    assert bot.tree.errors == [] and emu.violations == []


async def test_acknowledgement_after_three_seconds_is_rejected_and_recorded(emu: DiscordEmulator) -> None:
    async def slow(interaction: discord.Interaction) -> None:
        await asyncio.sleep(emu.ack_deadline + 0.1)
        await interaction.response.send_message("too late")

    bot = EmuBot(emu.guild_id)
    add_command(bot, slow)
    assert emu.ack_deadline == 3.0
    async with emu.running(bot):
        interaction = await emu.invoke_command("slow")
        await emu.wait_for(lambda: bot.tree.errors, timeout=5)
    [error] = bot.tree.errors
    assert isinstance(error, discord.NotFound) and error.code == 10062
    assert {v.kind for v in emu.violations} == {"not_acknowledged", "late_ack"}
    assert emu.ack_latency(interaction) is None and emu.interaction_messages(interaction) == []


async def test_second_acknowledgement_is_rejected(emu: DiscordEmulator) -> None:
    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pong")

    bot = EmuBot(emu.guild_id)
    add_command(bot, ping)
    async with emu.running(bot):
        interaction = await emu.invoke_command("ping")
        await emu.wait_for(lambda: emu.interaction_messages(interaction))
        url = f"{emu.api_url}/interactions/{interaction.id}/{interaction.token}/callback"
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json={"type": 4, "data": {}}) as response,
        ):
            assert response.status == 400 and response.headers["Content-Type"] == "application/json"
            assert (await response.json())["code"] == 40060
    assert [v.kind for v in emu.violations] == ["double_ack"]


async def test_followup_after_token_lifetime_fails() -> None:
    failures: list[discord.HTTPException] = []

    async def generate(interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        await asyncio.sleep(0.5)
        try:
            await interaction.followup.send("finally")
        except discord.HTTPException as error:
            failures.append(error)

    async with DiscordEmulator(token_lifetime=0.3, max_lifetime=30) as emu:
        bot = EmuBot(emu.guild_id)
        add_command(bot, generate)
        async with emu.running(bot):
            interaction = await emu.invoke_command("generate")
            await emu.wait_for(lambda: failures)
    assert failures[0].status == 401 and failures[0].code == 50027
    assert [v.kind for v in emu.violations] == ["expired_token"]
    assert emu.unfinished_deferrals() == [interaction]


async def test_upload_over_the_size_limit_is_refused() -> None:
    failures: list[discord.HTTPException] = []

    async def generate(interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        try:
            await interaction.followup.send(file=discord.File(io.BytesIO(bytes(2048)), "big.wav"))
        except discord.HTTPException as error:
            failures.append(error)
            await interaction.followup.send("too big")

    async with DiscordEmulator(attachment_size_limit=1024, max_lifetime=30) as emu:
        bot = EmuBot(emu.guild_id)
        add_command(bot, generate)
        async with emu.running(bot):
            interaction = await emu.invoke_command("generate")
            await emu.wait_for(lambda: [m for m in emu.interaction_messages(interaction) if m.content])
    assert failures[0].status == 413 and failures[0].code == 40005
    assert emu.interaction_messages(interaction)[0].attachments == []


async def test_forced_gateway_disconnect_is_followed_by_resume(emu: DiscordEmulator) -> None:
    calls: list[str] = []

    async def ping(interaction: discord.Interaction) -> None:
        calls.append("ping")
        await interaction.response.send_message("pong")

    bot = EmuBot(emu.guild_id)
    add_command(bot, ping)
    async with emu.running(bot):
        await emu.disconnect_gateway()
        # Sent while the bot is away: Discord replays it after RESUME.
        interaction = await emu.invoke_command("ping")
        await asyncio.wait_for(bot.resumed.wait(), timeout=5)
        await emu.wait_for(lambda: emu.interaction_messages(interaction))
    assert emu.resume_count == 1 and emu.identify_count == 1 and emu.gateway_connections == 2
    assert calls == ["ping"] and emu.violations == []


async def test_mentions_follow_allowed_mentions(emu: DiscordEmulator) -> None:
    bot = EmuBot(emu.guild_id)
    async with emu.running(bot):
        channel = bot.get_channel(emu.channel.id)
        assert isinstance(channel, discord.TextChannel)
        text = f"{emu.member.mention} @everyone"
        quiet = await channel.send(text, allowed_mentions=discord.AllowedMentions.none())
        loud = await channel.send(text)
    assert emu.message(quiet.id).pinged_user_ids == set() and not emu.message(quiet.id).mentions_everyone
    assert emu.message(loud.id).pinged_user_ids == {emu.member.id}


async def test_empty_message_and_unknown_route_get_discord_errors(emu: DiscordEmulator) -> None:
    bot = EmuBot(emu.guild_id)
    async with emu.running(bot):
        channel = bot.get_channel(emu.channel.id)
        assert isinstance(channel, discord.TextChannel)
        with pytest.raises(discord.HTTPException) as empty:
            await channel.send()
        with pytest.raises(discord.NotFound):
            await bot.http.request(discord.http.Route("GET", "/no/such/route"))
    assert empty.value.code == 50006
    assert {v.kind for v in emu.violations} == {"bad_request", "unknown_route"}


async def test_emulator_binds_loopback_restores_discord_and_stops() -> None:
    base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    async with DiscordEmulator(max_lifetime=0.2) as emu:
        assert discord.http.Route.BASE.startswith("http://127.0.0.1:")
        await asyncio.sleep(0.4)  # past the lifetime cap: the server stopped itself
        assert emu.violations_of("lifetime")
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.get(f"{emu.api_url}/gateway")
    restored = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    assert restored == (base, gateway)


async def test_modal_opened_from_a_button_is_submitted(emu: DiscordEmulator) -> None:
    submitted: list[str] = []

    class Prompt(discord.ui.Modal, title="New prompt"):
        text: discord.ui.TextInput[Prompt] = discord.ui.TextInput(label="Prompt", custom_id="prompt")

        async def on_submit(self, interaction: discord.Interaction) -> None:
            submitted.append(self.text.value)
            await interaction.response.edit_message(content=f"now: {self.text.value}", view=None)

    class Edit(discord.ui.View):
        def __init__(self) -> None:
            super().__init__(timeout=None)

        @discord.ui.button(label="Edit", custom_id="musicbot:edit")
        async def edit(self, interaction: discord.Interaction, button: discord.ui.Button[Edit]) -> None:
            await interaction.response.send_modal(Prompt())

    card = await emu.add_message({"content": "old", "components": Edit().to_components()})
    bot = EmuBot(emu.guild_id, views=[Edit()])
    async with emu.running(bot):
        click = await emu.click_button(card, "musicbot:edit")
        await emu.wait_for(lambda: click.modal)
        await emu.submit_modal(click, {"prompt": "jazz"})
        await emu.wait_for(lambda: card.content == "now: jazz")
    assert submitted == ["jazz"] and card.components == [] and card.edit_count == 1
    assert emu.violations == []


async def test_string_select_reaches_its_callback(emu: DiscordEmulator) -> None:
    chosen: list[list[str]] = []

    class Pick(discord.ui.View):
        @discord.ui.select(custom_id="musicbot:model", options=[discord.SelectOption(label=m) for m in "sml"])
        async def model(self, interaction: discord.Interaction, select: discord.ui.Select[Pick]) -> None:
            chosen.append(select.values)
            await interaction.response.defer()

    async def settings(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("model?", view=Pick())

    bot = EmuBot(emu.guild_id)
    add_command(bot, settings)
    async with emu.running(bot):
        command = await emu.invoke_command("settings")
        [card] = await emu.wait_for(lambda: emu.interaction_messages(command))
        with pytest.raises(EmulatorError):
            await emu.choose_select(card, "musicbot:model", ["xl"])
        pick = await emu.choose_select(card, "musicbot:model", ["m"])
        await emu.wait_for(lambda: pick.acknowledged)
    assert chosen == [["m"]] and emu.violations == []


async def test_invocations_a_discord_client_would_refuse_raise(emu: DiscordEmulator) -> None:
    seen: list[str] = []
    settings = app_commands.Group(name="settings", description="Bot settings.")

    @settings.command(name="show", description="Show the settings.")
    async def show(interaction: discord.Interaction) -> None:
        seen.append("show")
        await interaction.response.send_message("settings", ephemeral=True)

    @app_commands.default_permissions(manage_guild=True)
    async def purge(interaction: discord.Interaction, seconds: app_commands.Range[int, 1, 30]) -> None:
        seen.append(f"purge {seconds}")
        await interaction.response.send_message("purged", ephemeral=True)

    bot = EmuBot(emu.guild_id)
    bot.tree.add_command(settings)
    add_command(bot, purge)
    async with emu.running(bot):
        with pytest.raises(EmulatorError, match="never synced"):
            await emu.invoke_command("missing")
        with pytest.raises(EmulatorError, match="lacks the permissions"):
            await emu.invoke_command("purge", {"seconds": 5}, user=emu.member)
        with pytest.raises(EmulatorError, match="outside"):
            await emu.invoke_command("purge", {"seconds": 99}, user=emu.owner)
        with pytest.raises(EmulatorError, match="required"):
            await emu.invoke_command("purge", {}, user=emu.owner)
        await emu.invoke_command("purge", {"seconds": 5}, user=emu.owner)
        await emu.invoke_command("settings show")
        await emu.wait_for(lambda: len(seen) == 2)
    assert sorted(seen) == ["purge 5", "show"] and emu.violations == []


async def test_bot_without_attach_files_is_forbidden_to_upload() -> None:
    no_files = discord.Permissions(view_channel=True, send_messages=True, use_application_commands=True)
    async with DiscordEmulator(
        bot_permissions=no_files.value, everyone_permissions=0, max_lifetime=30
    ) as emu:
        bot = EmuBot(emu.guild_id)
        async with emu.running(bot):
            channel = bot.get_channel(emu.channel.id)
            assert isinstance(channel, discord.TextChannel)
            await channel.send("text is fine")
            with pytest.raises(discord.Forbidden) as denied:
                await channel.send(file=discord.File(io.BytesIO(b"RIFF"), "a.wav"))
    assert denied.value.code == 50013
    assert [m.content for m in emu.channel_messages()] == ["text is fine"]
    assert [v.kind for v in emu.violations] == ["missing_permissions"]


async def test_direct_messages_respect_closed_dms(emu: DiscordEmulator) -> None:
    closed = emu.add_user("private", accepts_dms=False)
    bot = EmuBot(emu.guild_id)
    async with emu.running(bot):
        await (await bot.fetch_user(emu.member.id)).send("your song is ready")
        with pytest.raises(discord.Forbidden) as denied:
            await (await bot.fetch_user(closed.id)).send("your song is ready")
    [dm] = [channel for channel in emu.channels.values() if channel.recipient is emu.member]
    assert [m.content for m in emu.channel_messages(dm)] == ["your song is ready"]
    assert denied.value.code == 50007


async def test_privileged_intents_must_be_enabled_like_in_the_developer_portal() -> None:
    intents = discord.Intents.default()
    intents.message_content = True
    async with DiscordEmulator(max_lifetime=30) as emu:
        bot = commands.Bot(command_prefix="!", intents=intents)
        with pytest.raises(discord.PrivilegedIntentsRequired):
            async with emu.running(bot):
                pass
    async with DiscordEmulator(privileged_intents=intents.value, max_lifetime=30) as emu:
        bot = commands.Bot(command_prefix="!", intents=intents, guild_ready_timeout=0.05)
        async with emu.running(bot):
            assert emu.identify_count == 1


async def test_reconnect_request_is_followed_by_resume(emu: DiscordEmulator) -> None:
    bot = EmuBot(emu.guild_id)
    async with emu.running(bot):
        await emu.request_reconnect()
        await asyncio.wait_for(bot.resumed.wait(), timeout=5)
    assert emu.resume_count == 1 and emu.identify_count == 1
