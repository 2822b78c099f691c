"""A local Discord API emulator for tests: REST + websocket gateway on 127.0.0.1, driving real discord.py.

The emulator plays Discord's part for one bot in one guild. A test points discord.py at it, starts the
bot, injects slash commands, button clicks and modal submits as chosen users, and then inspects what
the bot sent: every REST call is recorded, messages keep their edit history and uploaded bytes.

It enforces the rules the real Discord enforces and discord.py does not: an interaction must be
acknowledged within 3 seconds (late: 404 code 10062) and only once (400 code 40060); the interaction
token lives 15 minutes (expired: 401 code 50027); followups need an acknowledgement first; messages are
validated (empty, too long, bad components); uploads respect the size limit (413 code 40005); the bot
needs channel permissions for channel messages and threads. Breaches are answered like Discord does
and recorded in ``violations``.

Usage::

    async with DiscordEmulator() as emu, emu.running(bot):
        interaction = await emu.invoke_command("generate", {"prompt": "lofi"})
        await emu.wait_for(lambda: emu.interaction_messages(interaction))
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import itertools
import json
import logging
import mimetypes
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import discord
import yarl
from aiohttp import BodyPartReader, WSMsgType, web

log = logging.getLogger(__name__)

JSON = dict[str, Any]
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

API_VERSION = 10
DISCORD_EPOCH_MS = 1_420_070_400_000
DEFAULT_TOKEN = "emulator.bot.token"
MIB = 1024 * 1024

# Gateway intents (https://discord.com/developers/docs/events/gateway#list-of-intents).
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_PRESENCES = 1 << 8
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15
PRIVILEGED_INTENTS = INTENT_GUILD_MEMBERS | INTENT_GUILD_PRESENCES | INTENT_MESSAGE_CONTENT

# Interaction, callback and message constants.
INTERACTION_APPLICATION_COMMAND = 2
INTERACTION_MESSAGE_COMPONENT = 3
INTERACTION_MODAL_SUBMIT = 5
CALLBACK_MESSAGE = 4
CALLBACK_DEFERRED_MESSAGE = 5
CALLBACK_DEFERRED_UPDATE = 6
CALLBACK_UPDATE_MESSAGE = 7
CALLBACK_MODAL = 9
FLAG_SUPPRESS_EMBEDS = 1 << 2
FLAG_HAS_THREAD = 1 << 5
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_SUPPRESS_NOTIFICATIONS = 1 << 12
FLAG_COMPONENTS_V2 = 1 << 15
CHANNEL_TEXT = 0
CHANNEL_DM = 1
CHANNEL_ANNOUNCEMENT = 5
CHANNEL_PUBLIC_THREAD = 11
CHANNEL_PRIVATE_THREAD = 12
THREAD_TYPES = (10, CHANNEL_PUBLIC_THREAD, CHANNEL_PRIVATE_THREAD)

ALL_PERMISSIONS = discord.Permissions.all().value
ADMINISTRATOR = discord.Permissions(administrator=True).value
DEFAULT_EVERYONE_PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    create_public_threads=True,
    read_message_history=True,
    attach_files=True,
    embed_links=True,
    add_reactions=True,
    use_application_commands=True,
).value
DEFAULT_BOT_PERMISSIONS = DEFAULT_EVERYONE_PERMISSIONS | discord.Permissions(manage_threads=True).value

# Error codes of requests the real Discord refuses as malformed; they count as "bad_request" violations.
INVALID_REQUEST_CODES = frozenset({50006, 50024, 50035, 50083, 50109, 160004, 40005})

OPTION_SUB_COMMAND, OPTION_SUB_COMMAND_GROUP = 1, 2
OPTION_STRING, OPTION_INTEGER, OPTION_BOOLEAN, OPTION_USER = 3, 4, 5, 6
OPTION_CHANNEL, OPTION_ROLE, OPTION_MENTIONABLE, OPTION_NUMBER, OPTION_ATTACHMENT = 7, 8, 9, 10, 11
COMMAND_NAME = re.compile(r"^[-_\w]{1,32}$")
USER_MENTION = re.compile(r"<@!?(\d+)>")
ROLE_MENTION = re.compile(r"<@&(\d+)>")
TOKEN_IN_PATH = re.compile(r"^(/(?:interactions|webhooks)/\d+)/[^/]+")


class EmulatorError(Exception):
    """A test asked for something a real Discord user or client could not do."""


class _DiscordHTTPError(Exception):
    """An error the emulator answers the way Discord does: status, JSON code and message."""

    def __init__(self, status: int, code: int, message: str, errors: JSON | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors

    def body(self) -> JSON:
        body: JSON = {"message": self.message, "code": self.code}
        if self.errors:
            body["errors"] = self.errors
        return body


def _unknown_interaction() -> _DiscordHTTPError:
    return _DiscordHTTPError(404, 10062, "Unknown interaction")


def _already_acknowledged() -> _DiscordHTTPError:
    return _DiscordHTTPError(400, 40060, "Interaction has already been acknowledged.")


def _invalid_webhook_token() -> _DiscordHTTPError:
    return _DiscordHTTPError(401, 50027, "Invalid Webhook Token")


def _unknown_webhook() -> _DiscordHTTPError:
    return _DiscordHTTPError(404, 10015, "Unknown Webhook")


def _unknown_message() -> _DiscordHTTPError:
    return _DiscordHTTPError(404, 10008, "Unknown Message")


def _unknown_channel() -> _DiscordHTTPError:
    return _DiscordHTTPError(404, 10003, "Unknown Channel")


def _missing_permissions() -> _DiscordHTTPError:
    return _DiscordHTTPError(403, 50013, "Missing Permissions")


def _invalid_form(errors: JSON) -> _DiscordHTTPError:
    return _DiscordHTTPError(400, 50035, "Invalid Form Body", errors)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


# ---------------------------------------------------------------------------------------------------------
# Data model: what the emulated Discord knows and what a test inspects.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class EmuUser:
    """A Discord user who is also a member of the emulated guild."""

    id: int
    name: str
    bot: bool = False
    role_ids: list[int] = field(default_factory=list)
    permissions: int | None = None
    """Exact channel permissions reported in interactions; None computes them from roles."""
    locale: str = "en-US"
    accepts_dms: bool = True
    joined_at: str = field(default_factory=_now_iso)

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def user_payload(self) -> JSON:
        return {
            "id": str(self.id),
            "username": self.name,
            "discriminator": "0",
            "global_name": self.name,
            "avatar": None,
            "bot": self.bot,
            "system": False,
            "public_flags": 0,
            "banner": None,
            "accent_color": None,
            "avatar_decoration_data": None,
            "primary_guild": None,
            "collectibles": None,
        }

    def member_payload(self, *, with_user: bool = True) -> JSON:
        payload: JSON = {
            "roles": [str(role_id) for role_id in self.role_ids],
            "joined_at": self.joined_at,
            "nick": None,
            "avatar": None,
            "banner": None,
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "communication_disabled_until": None,
        }
        if with_user:
            payload["user"] = self.user_payload()
        return payload


@dataclass
class EmuRole:
    id: int
    name: str
    permissions: int
    position: int = 0
    managed: bool = False
    mentionable: bool = False
    bot_id: int | None = None

    @property
    def mention(self) -> str:
        return f"<@&{self.id}>"

    def payload(self) -> JSON:
        payload: JSON = {
            "id": str(self.id),
            "name": self.name,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": self.position,
            "permissions": str(self.permissions),
            "managed": self.managed,
            "mentionable": self.mentionable,
            "flags": 0,
        }
        if self.bot_id is not None:
            payload["tags"] = {"bot_id": str(self.bot_id)}
        return payload


@dataclass
class EmuChannel:
    """A guild text channel, a thread, or a DM channel."""

    id: int
    type: int
    name: str
    guild_id: int | None
    parent_id: int | None = None
    owner_id: int | None = None
    position: int = 0
    archived: bool = False
    locked: bool = False
    auto_archive_duration: int = 1440
    created_at: str = field(default_factory=_now_iso)
    recipient: EmuUser | None = None
    message_count: int = 0
    last_message_id: int | None = None

    @property
    def is_thread(self) -> bool:
        return self.type in THREAD_TYPES

    @property
    def mention(self) -> str:
        return f"<#{self.id}>"

    def payload(self) -> JSON:
        if self.type == CHANNEL_DM:
            return self._dm_payload()
        payload: JSON = {
            "id": str(self.id),
            "type": self.type,
            "guild_id": str(self.guild_id),
            "name": self.name,
            "parent_id": str(self.parent_id) if self.parent_id else None,
            "last_message_id": str(self.last_message_id) if self.last_message_id else None,
            "rate_limit_per_user": 0,
            "flags": 0,
        }
        if self.is_thread:
            payload.update(self._thread_fields())
        else:
            payload.update(
                position=self.position,
                permission_overwrites=[],
                nsfw=False,
                topic=None,
                default_auto_archive_duration=1440,
                default_thread_rate_limit_per_user=0,
            )
        return payload

    def _thread_fields(self) -> JSON:
        return {
            "owner_id": str(self.owner_id),
            "message_count": self.message_count,
            "total_message_sent": self.message_count,
            "member_count": 1,
            "thread_metadata": {
                "archived": self.archived,
                "locked": self.locked,
                "auto_archive_duration": self.auto_archive_duration,
                "archive_timestamp": self.created_at,
                "create_timestamp": self.created_at,
                "invitable": True,
            },
        }

    def _dm_payload(self) -> JSON:
        if self.recipient is None:
            raise EmulatorError(f"DM channel {self.id} has no recipient")
        return {
            "id": str(self.id),
            "type": CHANNEL_DM,
            "last_message_id": str(self.last_message_id) if self.last_message_id else None,
            "recipients": [self.recipient.user_payload()],
            "flags": 0,
        }


@dataclass(frozen=True)
class Upload:
    """A file a user attaches to a slash command option of type attachment."""

    filename: str
    data: bytes
    content_type: str | None = None


@dataclass(frozen=True)
class RecordedFile:
    """One uploaded multipart file part: form field (``files[0]``), file name and exact bytes."""

    field: str
    filename: str
    content_type: str | None
    data: bytes


@dataclass
class RecordedCall:
    """One REST request the bot made, with what the emulator answered."""

    method: str
    path: str
    """Path below the API base (``/channels/1/messages``); interaction tokens read ``<token>``."""
    query: dict[str, str]
    json: Any
    """The JSON body, or the ``payload_json`` part of a multipart body."""
    files: list[RecordedFile]
    at: float
    """``time.monotonic()`` when the request arrived."""
    status: int = 0
    response: Any = None
    interaction_id: int | None = None


@dataclass(frozen=True)
class Violation:
    """A rule of the real Discord that the bot broke (or a request the emulator could not serve)."""

    kind: str
    detail: str
    interaction_id: int | None
    at: float


@dataclass(frozen=True)
class StoredFile:
    attachment_id: int
    filename: str
    content_type: str | None
    data: bytes


@dataclass
class StoredMessage:
    """A message as Discord holds it: current JSON, previous versions, uploaded bytes."""

    data: JSON
    channel_id: int
    interaction_id: int | None = None
    files: dict[int, StoredFile] = field(default_factory=dict)
    versions: list[JSON] = field(default_factory=list)
    deleted: bool = False
    allowed_mentions: JSON | None = None

    @property
    def id(self) -> int:
        return int(self.data["id"])

    @property
    def content(self) -> str:
        return str(self.data.get("content") or "")

    @property
    def flags(self) -> int:
        return int(self.data.get("flags") or 0)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & FLAG_EPHEMERAL)

    @property
    def loading(self) -> bool:
        """True while this is a deferred "Bot is thinking..." message."""
        return bool(self.flags & FLAG_LOADING)

    @property
    def author_id(self) -> int:
        return int(self.data["author"]["id"])

    @property
    def embeds(self) -> list[JSON]:
        return list(self.data.get("embeds") or [])

    @property
    def components(self) -> list[JSON]:
        return list(self.data.get("components") or [])

    @property
    def attachments(self) -> list[JSON]:
        return list(self.data.get("attachments") or [])

    @property
    def edit_count(self) -> int:
        return len(self.versions)

    @property
    def pinged_user_ids(self) -> set[int]:
        """Users this message notified, after ``allowed_mentions`` was applied."""
        return {int(user["id"]) for user in self.data.get("mentions") or []}

    @property
    def pinged_role_ids(self) -> set[int]:
        return {int(role_id) for role_id in self.data.get("mention_roles") or []}

    @property
    def mentions_everyone(self) -> bool:
        return bool(self.data.get("mention_everyone"))

    def custom_ids(self) -> list[str]:
        return [str(c["custom_id"]) for c in _walk_components(self.components) if "custom_id" in c]

    def find_component(self, custom_id: str) -> JSON | None:
        return next((c for c in _walk_components(self.components) if c.get("custom_id") == custom_id), None)

    def attachment_bytes(self, filename: str | None = None) -> bytes:
        """Bytes of the attachment named ``filename`` (or the only attachment)."""
        current = [int(a["id"]) for a in self.attachments]
        files = [self.files[a] for a in current if a in self.files]
        if filename is not None:
            files = [f for f in files if f.filename == filename]
        if len(files) != 1:
            raise EmulatorError(f"message {self.id} has {len(files)} attachments matching {filename!r}")
        return files[0].data


@dataclass
class EmulatedInteraction:
    """An interaction the emulator sent to the bot, and how the bot answered it."""

    id: int
    token: str
    type: int
    user: EmuUser
    channel_id: int
    payload: JSON
    created_at: float
    """``time.monotonic()`` when INTERACTION_CREATE was sent."""
    message_id: int | None = None
    """For component and modal-submit interactions: the message the component is on."""
    acked_at: float | None = None
    response_type: int | None = None
    callback_payload: JSON | None = None
    original_message_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)
    modal: JSON | None = None
    deadline_handle: asyncio.TimerHandle | None = None

    @property
    def acknowledged(self) -> bool:
        return self.acked_at is not None

    @property
    def ack_latency(self) -> float | None:
        """Seconds from INTERACTION_CREATE to the bot's accepted callback."""
        return None if self.acked_at is None else self.acked_at - self.created_at

    @property
    def deferred(self) -> bool:
        return self.response_type in (CALLBACK_DEFERRED_MESSAGE, CALLBACK_DEFERRED_UPDATE)


@dataclass
class _GatewaySession:
    id: str
    intents: int
    shard: list[int] | None
    ws: web.WebSocketResponse | None
    seq: int = 0
    sent: list[tuple[int, str]] = field(default_factory=list)
    """Every DISPATCH as (sequence number, serialized frame), for replay on RESUME."""


@dataclass(frozen=True)
class _ParsedBody:
    json: Any
    files: list[RecordedFile]


def _walk_components(components: Sequence[JSON]) -> Iterator[JSON]:
    """Every component, nested ones included (action rows, v2 containers, sections, labels)."""
    for component in components:
        yield component
        yield from _walk_components(component.get("components") or [])
        for key in ("accessory", "component"):
            if isinstance(component.get(key), dict):
                yield from _walk_components([component[key]])


# ---------------------------------------------------------------------------------------------------------
# Payload validation, the subset of Discord's checks that catches real bot bugs.
# ---------------------------------------------------------------------------------------------------------


def _embed_errors(embeds: Sequence[JSON]) -> JSON:
    errors: JSON = {}
    if len(embeds) > 10:
        errors["embeds"] = "Must be 10 or fewer in length."
    total = 0
    for index, embed in enumerate(embeds):
        limits = {"title": 256, "description": 4096}
        for key, limit in limits.items():
            size = len(embed.get(key) or "")
            total += size
            if size > limit:
                errors[f"embeds.{index}.{key}"] = f"Must be {limit} or fewer in length."
        fields = embed.get("fields") or []
        if len(fields) > 25:
            errors[f"embeds.{index}.fields"] = "Must be 25 or fewer in length."
        for field_index, embed_field in enumerate(fields):
            name, value = str(embed_field.get("name") or ""), str(embed_field.get("value") or "")
            total += len(name) + len(value)
            if not name or len(name) > 256 or not value or len(value) > 1024:
                errors[f"embeds.{index}.fields.{field_index}"] = "Name 1-256 and value 1-1024 characters."
        total += len((embed.get("footer") or {}).get("text") or "")
        total += len((embed.get("author") or {}).get("name") or "")
    if total > 6000:
        errors["embeds"] = "Embed size exceeds maximum size of 6000"
    return errors


def _button_errors(button: JSON, where: str) -> JSON:
    errors: JSON = {}
    style = button.get("style")
    if style == 5 and not button.get("url"):
        errors[where] = "A link button needs a url."
    if style in (1, 2, 3, 4) and not button.get("custom_id"):
        errors[where] = "A button needs a custom_id."
    if len(button.get("label") or "") > 80:
        errors[f"{where}.label"] = "Must be 80 or fewer in length."
    return errors


def _action_row_errors(components: Sequence[JSON]) -> JSON:
    errors: JSON = {}
    if len(components) > 5:
        errors["components"] = "Must be 5 or fewer in length."
    for row_index, row in enumerate(components):
        children = row.get("components") or []
        if row.get("type") != 1:
            errors[f"components.{row_index}"] = "Top-level components must be action rows."
            continue
        buttons = [c for c in children if c.get("type") == 2]
        if not children or len(children) > 5 or (buttons and len(buttons) != len(children)):
            errors[f"components.{row_index}.components"] = "An action row holds 1-5 buttons or one select."
        if not buttons and len(children) > 1:
            errors[f"components.{row_index}.components"] = "An action row holds one select menu."
        for index, button in enumerate(buttons):
            errors.update(_button_errors(button, f"components.{row_index}.components.{index}"))
    return errors


def _component_errors(components: Sequence[JSON], flags: int) -> JSON:
    errors: JSON = {} if flags & FLAG_COMPONENTS_V2 else _action_row_errors(components)
    custom_ids = [str(c["custom_id"]) for c in _walk_components(components) if c.get("custom_id")]
    if any(len(custom_id) > 100 for custom_id in custom_ids):
        errors["components.custom_id"] = "Must be 100 or fewer in length."
    if len(custom_ids) != len(set(custom_ids)):
        errors["components.custom_id"] = "Component custom id cannot be duplicated"
    for component in _walk_components(components):
        if component.get("type") == 3 and not 1 <= len(component.get("options") or []) <= 25:
            errors["components.options"] = "A string select needs 1-25 options."
    return errors


def _validate_message(data: JSON, file_count: int, *, creating: bool, kept_attachments: int = 0) -> None:
    """Raise Discord's 400 errors for a message body that the real API would refuse."""
    errors: JSON = {}
    content = data.get("content")
    flags = int(data.get("flags") or 0)
    if content is not None and len(str(content)) > 2000:
        errors["content"] = "Must be 2000 or fewer in length."
    embeds = data.get("embeds") or []
    errors.update(_embed_errors(embeds))
    components = data.get("components") or []
    errors.update(_component_errors(components, flags))
    if flags & FLAG_COMPONENTS_V2 and (content or embeds):
        errors["content"] = "content and embeds cannot be used with IS_COMPONENTS_V2."
    if file_count + kept_attachments > 10:
        errors["attachments"] = "Must be 10 or fewer in length."
    if errors:
        raise _invalid_form(errors)
    has_body = content or embeds or components or file_count or kept_attachments or data.get("poll")
    if creating and not has_body:
        raise _DiscordHTTPError(400, 50006, "Cannot send an empty message")


def _command_errors(commands: Sequence[JSON]) -> JSON:
    """Discord's validation of a bulk command overwrite."""
    errors: JSON = {}
    seen: set[tuple[str, int]] = set()
    for index, command in enumerate(commands):
        name, kind = str(command.get("name") or ""), int(command.get("type") or 1)
        if (name, kind) in seen:
            errors[f"{index}.name"] = "Application command names must be unique"
        seen.add((name, kind))
        if kind == 1:
            if not COMMAND_NAME.match(name) or name != name.lower():
                errors[f"{index}.name"] = "Invalid chat input command name."
            if not 1 <= len(command.get("description") or "") <= 100:
                errors[f"{index}.description"] = "Must be between 1 and 100 in length."
        errors.update(_option_errors(command.get("options") or [], f"{index}.options"))
    return errors


def _option_errors(options: Sequence[JSON], where: str) -> JSON:
    errors: JSON = {}
    if len(options) > 25:
        errors[where] = "Must be 25 or fewer in length."
    names = [str(option.get("name")) for option in options]
    if len(names) != len(set(names)):
        errors[where] = "Option names must be unique"
    seen_optional = False
    for index, option in enumerate(options):
        if option.get("type") in (OPTION_SUB_COMMAND, OPTION_SUB_COMMAND_GROUP):
            errors.update(_option_errors(option.get("options") or [], f"{where}.{index}.options"))
            continue
        if option.get("required") and seen_optional:
            errors[f"{where}.{index}.required"] = (
                "Required options must be placed before non-required options"
            )
        seen_optional = seen_optional or not option.get("required")
        if not 1 <= len(option.get("description") or "") <= 100:
            errors[f"{where}.{index}.description"] = "Must be between 1 and 100 in length."
        if len(option.get("choices") or []) > 25:
            errors[f"{where}.{index}.choices"] = "Must be 25 or fewer in length."
    return errors


def _sanitize_filename(filename: str) -> str:
    """Discord replaces whitespace in uploaded file names with underscores."""
    return re.sub(r"\s", "_", filename) or "unknown"


# ---------------------------------------------------------------------------------------------------------
# The emulator.
# ---------------------------------------------------------------------------------------------------------


class DiscordEmulator:
    """Discord's REST API, CDN and gateway for one bot in one guild, served on 127.0.0.1.

    Use as ``async with DiscordEmulator() as emu:``. Entering starts the server on a free port and
    points discord.py at it (``Route.BASE`` and ``DiscordWebSocket.DEFAULT_GATEWAY``); leaving stops
    it and restores both. The server also stops by itself after ``max_lifetime`` seconds.
    """

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        ack_deadline: float = 3.0,
        token_lifetime: float = 15 * 60,
        attachment_size_limit: int = 10 * MIB,
        bot_permissions: int = DEFAULT_BOT_PERMISSIONS,
        everyone_permissions: int = DEFAULT_EVERYONE_PERMISSIONS,
        privileged_intents: int = 0,
        require_synced_commands: bool = True,
        heartbeat_interval: float = 41.25,
        max_lifetime: float = 120.0,
        patch_discord: bool = True,
        bot_name: str = "musicbot",
        guild_name: str = "Emulated Guild",
    ) -> None:
        self.token = token
        self.ack_deadline = ack_deadline
        self.token_lifetime = token_lifetime
        self.attachment_size_limit = attachment_size_limit
        self.privileged_intents = privileged_intents
        self.require_synced_commands = require_synced_commands
        self.heartbeat_interval = heartbeat_interval
        self.max_lifetime = max_lifetime
        self._patch_discord = patch_discord
        self._increment = itertools.count()

        self.calls: list[RecordedCall] = []
        self.violations: list[Violation] = []
        self.commands: dict[int | None, dict[str, JSON]] = {}
        """Synced commands by guild id (None: global), by name, as Discord returned them."""
        self.command_syncs: list[tuple[int | None, list[JSON]]] = []
        """Every bulk overwrite: (guild id or None, the command JSON the bot sent)."""
        self.presence_updates: list[JSON] = []
        self.gateway_connections = 0
        self.identify_count = 0
        self.resume_count = 0
        self.heartbeats = 0

        self.application_id = self.snowflake()
        self.bot = EmuUser(self.application_id, bot_name, bot=True)
        self.guild_id = self.snowflake()
        self.guild_name = guild_name
        self.roles: dict[int, EmuRole] = {
            self.guild_id: EmuRole(self.guild_id, "@everyone", everyone_permissions)
        }
        self.bot_role = self.add_role(bot_name, bot_permissions, managed=True, bot_id=self.bot.id)
        self.bot.role_ids.append(self.bot_role.id)
        self.users: dict[int, EmuUser] = {self.bot.id: self.bot}
        self.owner = self.add_user("owner", permissions=ALL_PERMISSIONS)
        self.member = self.add_user("member")
        self.channels: dict[int, EmuChannel] = {}
        self.channel = self.add_channel("general")

        self.messages: dict[int, StoredMessage] = {}
        self.interactions: dict[int, EmulatedInteraction] = {}
        self._interactions_by_token: dict[str, EmulatedInteraction] = {}
        self._cdn: dict[int, StoredFile] = {}
        self._session: _GatewaySession | None = None
        # Every identified session by shard number (0 without sharding): several bot processes of one
        # application each run some shards. Events go to every session; an interaction to one.
        self._shards: dict[int, _GatewaySession] = {}
        self._sockets: set[web.WebSocketResponse] = set()
        self._send_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._lifetime_task: asyncio.Task[None] | None = None
        self._patches = contextlib.ExitStack()
        self._current_call: contextvars.ContextVar[RecordedCall] = contextvars.ContextVar("emulated_call")
        self._port = 0

    # --- lifecycle -----------------------------------------------------------------------------------

    async def __aenter__(self) -> DiscordEmulator:
        await self.start()
        if self._patch_discord:
            self._patches.enter_context(self.pointed_at())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Serve on a free 127.0.0.1 port."""
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * MIB)
        self._add_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        self._lifetime_task = asyncio.create_task(
            self._stop_after_lifetime(), name="discord-emulator-lifetime"
        )
        log.info("Discord emulator listening on %s", self.base_url)

    async def stop(self) -> None:
        """Close gateway sockets, stop serving and restore discord.py's endpoints."""
        self._patches.close()
        task, self._lifetime_task = self._lifetime_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        for interaction in self.interactions.values():
            if interaction.deadline_handle is not None:
                interaction.deadline_handle.cancel()
        for ws in list(self._sockets):
            await ws.close(code=1001, message=b"emulator stopped")
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _stop_after_lifetime(self) -> None:
        await asyncio.sleep(self.max_lifetime)
        log.warning("Discord emulator reached its %s s lifetime cap; stopping", self.max_lifetime)
        self._violate("lifetime", f"emulator stopped after its {self.max_lifetime} s lifetime cap", None)
        await self.stop()

    @contextlib.contextmanager
    def pointed_at(self) -> Iterator[None]:
        """Point discord.py's REST base and default gateway at this emulator, restoring them after."""
        route, gateway = discord.http.Route, discord.gateway.DiscordWebSocket
        old_base, old_gateway = route.BASE, gateway.DEFAULT_GATEWAY
        route.BASE = self.api_url
        gateway.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)
        try:
            yield
        finally:
            route.BASE, gateway.DEFAULT_GATEWAY = old_base, old_gateway

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/v{API_VERSION}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self._port}/gateway/"

    @contextlib.asynccontextmanager
    async def running(
        self,
        client: discord.Client,
        *,
        token: str | None = None,
        wait_ready: bool = False,
        timeout: float = 5.0,  # noqa: ASYNC109 - a test-facing knob, like pytest's own timeouts
    ) -> AsyncIterator[discord.Client]:
        """Log ``client`` in, connect it in a task and wait until it has the guild; close it on exit.

        ``wait_ready`` also waits for ``on_ready``, which discord.py delays by the client's
        ``guild_ready_timeout`` (2 s unless the client was made with a smaller one).
        """
        try:
            await client.login(token or self.token)
        except BaseException:
            await client.close()
            raise
        task = asyncio.create_task(client.connect(reconnect=True), name="emulated-discord-client")
        try:
            await self.wait_for(lambda: task.done() or self._client_has_guild(client), timeout=timeout)
            if task.done():
                task.result()
                raise EmulatorError("the client stopped before receiving the guild")
            if wait_ready:
                await asyncio.wait_for(client.wait_until_ready(), timeout)
            yield client
        finally:
            await client.close()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, timeout)

    def _client_has_guild(self, client: discord.Client) -> bool:
        guild = client.get_guild(self.guild_id)
        return guild is not None and not guild.unavailable and guild.get_channel(self.channel.id) is not None

    # --- the emulated guild --------------------------------------------------------------------------

    def snowflake(self) -> int:
        """A new snowflake carrying the current time."""
        now_ms = int(time.time() * 1000)
        return ((now_ms - DISCORD_EPOCH_MS) << 22) | (1 << 17) | (next(self._increment) % 4096)

    def add_role(
        self, name: str, permissions: int = 0, *, managed: bool = False, bot_id: int | None = None
    ) -> EmuRole:
        role = EmuRole(self.snowflake(), name, permissions, len(self.roles), managed, bot_id=bot_id)
        self.roles[role.id] = role
        return role

    def add_user(
        self,
        name: str,
        *,
        roles: Sequence[EmuRole] = (),
        permissions: int | None = None,
        locale: str = "en-US",
        accepts_dms: bool = True,
    ) -> EmuUser:
        """A new guild member. ``permissions`` fixes what interactions report; None derives it from roles."""
        user = EmuUser(self.snowflake(), name, False, [r.id for r in roles], permissions, locale, accepts_dms)
        self.users[user.id] = user
        return user

    def add_channel(self, name: str) -> EmuChannel:
        channel = EmuChannel(self.snowflake(), CHANNEL_TEXT, name, self.guild_id, position=len(self.channels))
        self.channels[channel.id] = channel
        return channel

    def member_permissions(self, user: EmuUser) -> int:
        """The user's permissions in guild channels, as interactions report them."""
        if user.permissions is not None:
            perms = user.permissions
        else:
            perms = self.roles[self.guild_id].permissions
            for role_id in user.role_ids:
                perms |= self.roles[role_id].permissions
        return ALL_PERMISSIONS if perms & ADMINISTRATOR else perms

    @property
    def bot_permissions(self) -> int:
        return self.member_permissions(self.bot)

    def _guild_payload(self) -> JSON:
        return {
            "id": str(self.guild_id),
            "name": self.guild_name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(self.owner.id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": "en-US",
            "system_channel_id": str(self.channel.id),
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "features": [],
            "roles": [role.payload() for role in self.roles.values()],
            "emojis": [],
            "stickers": [],
            "max_members": 500000,
            "vanity_url_code": None,
        }

    def _guild_create_payload(self, intents: int) -> JSON:
        members = list(self.users.values()) if intents & INTENT_GUILD_MEMBERS else [self.bot]
        threads = [c for c in self.channels.values() if c.is_thread and not c.archived]
        return {
            **self._guild_payload(),
            "joined_at": self.bot.joined_at,
            "large": False,
            "unavailable": False,
            "member_count": len(self.users),
            "members": [user.member_payload() for user in members],
            "channels": [c.payload() for c in self.channels.values() if c.type == CHANNEL_TEXT],
            "threads": [thread.payload() for thread in threads],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    def _application_payload(self) -> JSON:
        return {
            "id": str(self.application_id),
            "name": self.bot.name,
            "icon": None,
            "description": "",
            "summary": "",
            "type": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.owner.user_payload(),
            "team": None,
            "verify_key": "0" * 64,
            "flags": 0,
            "bot": self.bot.user_payload(),
            "interactions_endpoint_url": None,
            "redirect_uris": [],
            "tags": [],
            "approximate_guild_count": 1,
            "integration_types_config": {"0": {}},
        }

    # --- test helpers: waiting and inspecting ---------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0) -> T:  # noqa: ASYNC109
        """Wait until ``predicate()`` is truthy and return its value; TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            self._changed.clear()
            result = predicate()
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                recent = ", ".join(f"{c.method} {c.path} -> {c.status}" for c in self.calls[-8:])
                raise TimeoutError(f"condition not met within {timeout} s; last calls: {recent or 'none'}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.05))

    def _notify(self) -> None:
        self._changed.set()

    def _violate(self, kind: str, detail: str, interaction_id: int | None) -> None:
        log.warning("Discord rule broken (%s): %s", kind, detail)
        self.violations.append(Violation(kind, detail, interaction_id, time.monotonic()))
        self._notify()

    def violations_of(self, kind: str) -> list[Violation]:
        return [v for v in self.violations if v.kind == kind]

    def calls_to(
        self,
        method: str | None = None,
        path: str | None = None,
        *,
        interaction: EmulatedInteraction | None = None,
    ) -> list[RecordedCall]:
        """Recorded calls filtered by method, a regular expression searched in the path, and interaction."""
        return [
            call
            for call in self.calls
            if (method is None or call.method == method)
            and (path is None or re.search(path, call.path))
            and (interaction is None or call.interaction_id == interaction.id)
        ]

    def message(self, message_id: int) -> StoredMessage:
        try:
            return self.messages[message_id]
        except KeyError:
            raise EmulatorError(f"no message {message_id}") from None

    def message_content(self, message_id: int) -> str:
        """The latest content of a message, after all edits."""
        return self.message(message_id).content

    def channel_messages(
        self, channel: EmuChannel | int | None = None, *, include_ephemeral: bool = True
    ) -> list[StoredMessage]:
        """Messages in a channel or thread (default: the main channel), oldest first, not deleted."""
        channel_id = self._channel_id(channel)
        return [
            message
            for message in self.messages.values()
            if message.channel_id == channel_id
            and not message.deleted
            and (include_ephemeral or not message.ephemeral)
        ]

    def interaction_messages(self, interaction: EmulatedInteraction | int) -> list[StoredMessage]:
        """The interaction's original response (if it has a message) and its followups."""
        found = self._interaction(interaction)
        ids = ([found.original_message_id] if found.original_message_id else []) + found.followup_ids
        unique = list(dict.fromkeys(ids))
        return [
            self.messages[mid] for mid in unique if mid in self.messages and not self.messages[mid].deleted
        ]

    def ack_latency(self, interaction: EmulatedInteraction | int) -> float | None:
        """Seconds between sending the interaction and its accepted acknowledgement (None: not acked)."""
        return self._interaction(interaction).ack_latency

    def threads(self) -> list[EmuChannel]:
        return [channel for channel in self.channels.values() if channel.is_thread]

    def thread_of(self, message: StoredMessage | int) -> EmuChannel | None:
        """The thread started from a message, if any."""
        message_id = message if isinstance(message, int) else message.id
        return self.channels.get(message_id) if message_id in self.channels else None

    def synced_commands(self, guild_id: int | None = None) -> list[JSON]:
        return list(self.commands.get(guild_id, {}).values())

    def unfinished_deferrals(self) -> list[EmulatedInteraction]:
        """Interactions whose deferred "thinking" message was never completed."""
        return [
            i
            for i in self.interactions.values()
            if i.original_message_id in self.messages and self.messages[i.original_message_id].loading
        ]

    def _interaction(self, interaction: EmulatedInteraction | int) -> EmulatedInteraction:
        return self.interactions[interaction if isinstance(interaction, int) else interaction.id]

    def _channel_id(self, channel: EmuChannel | int | None) -> int:
        if channel is None:
            return self.channel.id
        return channel if isinstance(channel, int) else channel.id

    # --- gateway --------------------------------------------------------------------------------------

    async def dispatch(
        self, event: str, data: JSON, *, session: _GatewaySession | None = None, intent: int = 0
    ) -> None:
        """Send a DISPATCH to the bot (every shard's session, or ``session``); while a session is
        disconnected its events wait for its RESUME."""
        sessions = [session] if session is not None else list(self._shards.values())
        if not sessions:
            raise EmulatorError(f"no bot has identified on the gateway; cannot dispatch {event}")
        for target in sessions:
            if intent and not target.intents & intent:
                continue
            async with self._send_lock:
                target.seq += 1
                frame = json.dumps({"op": 0, "t": event, "s": target.seq, "d": data})
                target.sent.append((target.seq, frame))
                await self._send_frame(target, frame)
        self._notify()

    async def _dispatch_if(self, intent: int, event: str, data: JSON) -> None:
        """Dispatch an event the bot receives only with ``intent`` (and only once it has identified)."""
        if self._shards:
            await self.dispatch(event, data, intent=intent)

    def shard_session(self, shard: int | None) -> _GatewaySession:
        """The session of ``shard`` (None: the latest to identify)."""
        session = self._session if shard is None else self._shards.get(shard)
        if session is None:
            raise EmulatorError(f"no bot has identified on the gateway for shard {shard}")
        return session

    @property
    def shards(self) -> list[int]:
        """The shards that have identified."""
        return sorted(self._shards)

    async def _send_frame(self, session: _GatewaySession, frame: str) -> None:
        ws = session.ws
        if ws is None or ws.closed:
            return
        try:
            await ws.send_str(frame)
        except ConnectionError:
            session.ws = None

    async def disconnect_gateway(self, code: int = 4000) -> None:
        """Drop the bot's gateway connection from Discord's side; discord.py then reconnects and RESUMEs."""
        session = self._session
        if session is None or session.ws is None:
            raise EmulatorError("no gateway connection to drop")
        ws, session.ws = session.ws, None
        await ws.close(code=code, message=b"emulator dropped the connection")

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT, as Discord does before moving a session."""
        session = self._session
        if session is None or session.ws is None:
            raise EmulatorError("no gateway connection")
        await session.ws.send_str(json.dumps({"op": 7, "d": None}))

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, max_msg_size=0)
        await ws.prepare(request)
        self._sockets.add(ws)
        self.gateway_connections += 1
        self._notify()
        try:
            await ws.send_str(
                json.dumps({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval * 1000}})
            )
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await self._on_gateway_frame(ws, json.loads(msg.data))
        except Exception as error:
            log.exception("Discord emulator gateway failed")
            self._violate("emulator_error", f"gateway: {error!r}", None)
            await ws.close(code=4000, message=b"emulator error")
        finally:
            self._sockets.discard(ws)
            for session in self._shards.values():
                if session.ws is ws:
                    session.ws = None
            self._notify()
        return ws

    async def _on_gateway_frame(self, ws: web.WebSocketResponse, frame: JSON) -> None:
        op, data = frame.get("op"), frame.get("d")
        if op == 1:
            self.heartbeats += 1
            await ws.send_str(json.dumps({"op": 11}))
        elif op == 2:
            await self._on_identify(ws, data or {})
        elif op == 6:
            await self._on_resume(ws, data or {})
        elif op == 3:
            self.presence_updates.append(data or {})
        elif op == 8:
            await self._on_request_members(data or {})
        elif op != 4:
            self._violate("gateway", f"unknown gateway opcode {op}", None)
            await ws.close(code=4001, message=b"Unknown opcode.")
        self._notify()

    async def _on_identify(self, ws: web.WebSocketResponse, data: JSON) -> None:
        if data.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        intents = int(data.get("intents") or 0)
        if intents & PRIVILEGED_INTENTS & ~self.privileged_intents:
            self._violate("gateway", f"privileged intents {intents & PRIVILEGED_INTENTS} not enabled", None)
            await ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        session = self._session = _GatewaySession(secrets.token_hex(16), intents, data.get("shard"), ws)
        self._shards[session.shard[0] if session.shard else 0] = session
        self.identify_count += 1
        await self.dispatch("READY", self._ready_payload(session), session=session)
        await self.dispatch("GUILD_CREATE", self._guild_create_payload(intents), session=session)

    def _ready_payload(self, session: _GatewaySession) -> JSON:
        payload: JSON = {
            "v": API_VERSION,
            "user": {**self.bot.user_payload(), "verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [{"id": str(self.guild_id), "unavailable": True}],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "geo_ordered_rtc_regions": [],
        }
        if session.shard is not None:
            payload["shard"] = session.shard
        return payload

    async def _on_resume(self, ws: web.WebSocketResponse, data: JSON) -> None:
        session = next((s for s in self._shards.values() if s.id == data.get("session_id")), None)
        if data.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        if session is None or data.get("session_id") != session.id:
            await ws.send_str(json.dumps({"op": 9, "d": False}))
            return
        last_seq = int(data.get("seq") or 0)
        async with self._send_lock:
            session.ws = ws
            for seq, frame in session.sent:
                if seq > last_seq:
                    await self._send_frame(session, frame)
        self.resume_count += 1
        await self.dispatch("RESUMED", {}, session=session)

    async def _on_request_members(self, data: JSON) -> None:
        members = [user.member_payload() for user in self.users.values()]
        chunk = {"guild_id": str(self.guild_id), "members": members, "chunk_index": 0, "chunk_count": 1}
        if data.get("nonce") is not None:
            chunk["nonce"] = data["nonce"]
        await self.dispatch("GUILD_MEMBERS_CHUNK", chunk)

    # --- injecting interactions -----------------------------------------------------------------------

    async def invoke_command(
        self,
        name: str,
        options: Mapping[str, object] | None = None,
        *,
        user: EmuUser | None = None,
        channel: EmuChannel | int | None = None,
        shard: int | None = None,
    ) -> EmulatedInteraction:
        """A user runs a slash command (``"name"`` or ``"group sub"``) with options, as Discord sends it.

        ``shard``: the bot process (by shard) that receives it; default: the latest to identify.

        Option values: str, int, float, bool, EmuUser, EmuRole, EmuChannel, or Upload for attachments.
        Like the Discord client, this refuses unknown, missing required or out-of-range options, and
        commands the user may not see (``default_member_permissions``).
        """
        user = user or self.member
        target = self._channel(self._channel_id(channel))
        path = name.split()
        command = self._find_command(path[0])
        self._check_command_visible(command, user)
        resolved: JSON = {}
        schema = None if command.get("_unsynced") else (command.get("options") or [])
        leaf_schema, wrap = self._subcommand_path(schema, path[1:])
        leaf = self._build_options(leaf_schema, dict(options or {}), resolved, target)
        data: JSON = {"id": command["id"], "name": path[0], "type": 1, "options": wrap(leaf)}
        if resolved:
            data["resolved"] = resolved
        if command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        return await self._send_interaction(INTERACTION_APPLICATION_COMMAND, data, user, target, shard=shard)

    async def click_button(
        self, message: StoredMessage | int, custom_id: str, *, user: EmuUser | None = None
    ) -> EmulatedInteraction:
        """A user clicks the button with ``custom_id`` on a message."""
        stored = self.message(message if isinstance(message, int) else message.id)
        self._clickable(stored, custom_id, component_type=2)
        data = {"custom_id": custom_id, "component_type": 2}
        return await self._component_interaction(stored, data, user or self.member)

    async def choose_select(
        self,
        message: StoredMessage | int,
        custom_id: str,
        values: Sequence[str],
        *,
        user: EmuUser | None = None,
    ) -> EmulatedInteraction:
        """A user picks ``values`` in the string select menu ``custom_id`` on a message."""
        stored = self.message(message if isinstance(message, int) else message.id)
        component = self._clickable(stored, custom_id, component_type=3)
        allowed = {option["value"] for option in component.get("options") or []}
        low, high = component.get("min_values", 1), component.get("max_values", 1)
        if not set(values) <= allowed or not low <= len(values) <= high:
            raise EmulatorError(f"select {custom_id!r} does not accept {list(values)!r}")
        data = {"custom_id": custom_id, "component_type": 3, "values": list(values)}
        return await self._component_interaction(stored, data, user or self.member)

    async def submit_modal(
        self, opened_by: EmulatedInteraction, values: Mapping[str, str], *, user: EmuUser | None = None
    ) -> EmulatedInteraction:
        """The user fills in and submits the modal the bot opened in answer to ``opened_by``."""
        modal = opened_by.modal
        if modal is None:
            raise EmulatorError(f"interaction {opened_by.id} did not open a modal")
        components = [self._submitted_component(c, values) for c in modal.get("components") or []]
        data = {"custom_id": modal["custom_id"], "components": components}
        target = self._channel(opened_by.channel_id)
        message = self.messages.get(opened_by.message_id) if opened_by.message_id else None
        return await self._send_interaction(
            INTERACTION_MODAL_SUBMIT, data, user or opened_by.user, target, message=message
        )

    def _submitted_component(self, component: JSON, values: Mapping[str, str]) -> JSON:
        if component.get("type") == 1:
            return {
                "type": 1,
                "components": [self._submitted_component(c, values) for c in component["components"]],
            }
        if component.get("type") == 18:
            return {"type": 18, "component": self._submitted_component(component["component"], values)}
        custom_id = component.get("custom_id")
        if component.get("type") == 4:
            value = values.get(custom_id, component.get("value") or "")
            if component.get("required", True) and not value:
                raise EmulatorError(f"modal text input {custom_id!r} is required")
            return {"type": 4, "custom_id": custom_id, "value": value}
        return {
            "type": component.get("type"),
            "custom_id": custom_id,
            "values": list(values.get(custom_id, [])),
        }

    def _clickable(self, message: StoredMessage, custom_id: str, *, component_type: int) -> JSON:
        component = message.find_component(custom_id)
        if component is None or component.get("type") != component_type:
            raise EmulatorError(
                f"message {message.id} has no component {custom_id!r} of type {component_type}"
            )
        if component.get("disabled"):
            raise EmulatorError(f"component {custom_id!r} is disabled; a user cannot use it")
        return component

    async def _component_interaction(
        self, message: StoredMessage, data: JSON, user: EmuUser
    ) -> EmulatedInteraction:
        target = self._channel(message.channel_id)
        return await self._send_interaction(
            INTERACTION_MESSAGE_COMPONENT, data, user, target, message=message
        )

    async def _send_interaction(
        self,
        kind: int,
        data: JSON,
        user: EmuUser,
        channel: EmuChannel,
        *,
        message: StoredMessage | None = None,
        shard: int | None = None,
    ) -> EmulatedInteraction:
        session = self.shard_session(shard)
        interaction_id = self.snowflake()
        token = f"aW50ZXJhY3Rpb246{secrets.token_urlsafe(64)}"
        payload = self._interaction_payload(interaction_id, token, kind, data, user, channel)
        if message is not None:
            payload["message"] = message.data
        interaction = EmulatedInteraction(
            interaction_id,
            token,
            kind,
            user,
            channel.id,
            payload,
            time.monotonic(),
            message_id=message.id if message else None,
        )
        self.interactions[interaction_id] = interaction
        self._interactions_by_token[token] = interaction
        await self.dispatch("INTERACTION_CREATE", payload, session=session)
        loop = asyncio.get_running_loop()
        interaction.deadline_handle = loop.call_later(
            self.ack_deadline, self._check_acknowledged, interaction
        )
        return interaction

    def _check_acknowledged(self, interaction: EmulatedInteraction) -> None:
        if not interaction.acknowledged:
            detail = f"interaction {interaction.id} not acknowledged within {self.ack_deadline} s"
            self._violate(
                "not_acknowledged", detail + ' (the user sees "This interaction failed")', interaction.id
            )

    def _interaction_payload(
        self, interaction_id: int, token: str, kind: int, data: JSON, user: EmuUser, channel: EmuChannel
    ) -> JSON:
        payload: JSON = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": kind,
            "data": data,
            "token": token,
            "version": 1,
            "channel_id": str(channel.id),
            "channel": {**channel.payload(), "permissions": str(self.member_permissions(user))},
            "app_permissions": str(self.bot_permissions),
            "locale": user.locale,
            "entitlements": [],
            "entitlement_sku_ids": [],
            "attachment_size_limit": self.attachment_size_limit,
        }
        if channel.type == CHANNEL_DM:
            payload.update(
                user=user.user_payload(), context=1, authorizing_integration_owners={"1": str(user.id)}
            )
            return payload
        member = {**user.member_payload(), "permissions": str(self.member_permissions(user))}
        payload.update(
            guild_id=str(self.guild_id),
            guild={"id": str(self.guild_id), "locale": "en-US", "features": []},
            guild_locale="en-US",
            member=member,
            context=0,
            authorizing_integration_owners={"0": str(self.guild_id)},
        )
        return payload

    def _find_command(self, name: str) -> JSON:
        for scope in (self.guild_id, None):
            command = self.commands.get(scope, {}).get(name)
            if command is not None and int(command.get("type") or 1) == 1:
                return command
        if self.require_synced_commands:
            raise EmulatorError(f"/{name} was never synced, so no user could run it")
        return {"id": str(self.snowflake()), "name": name, "_unsynced": True}

    def _check_command_visible(self, command: JSON, user: EmuUser) -> None:
        required = command.get("default_member_permissions")
        if required is not None and int(required) & ~self.member_permissions(user):
            raise EmulatorError(f"{user.name} lacks the permissions to see /{command['name']}")

    @staticmethod
    def _subcommand_path(
        schema: list[JSON] | None, names: Sequence[str]
    ) -> tuple[list[JSON] | None, Callable[[list[JSON]], list[JSON]]]:
        """Walk subcommand (group) names; return the leaf's option schema and a wrapper for its options."""
        if schema is None:
            if names:
                raise EmulatorError("an unsynced command has no subcommands")
            return None, lambda leaf: leaf
        wrappers: list[tuple[int, str]] = []
        options: list[JSON] = schema
        for name in names:
            found = next((o for o in options if o.get("name") == name), None)
            if found is None or found.get("type") not in (OPTION_SUB_COMMAND, OPTION_SUB_COMMAND_GROUP):
                raise EmulatorError(f"no subcommand {name!r}")
            wrappers.append((int(found["type"]), name))
            options = found.get("options") or []

        def wrap(leaf: list[JSON]) -> list[JSON]:
            for kind, name in reversed(wrappers):
                leaf = [{"type": kind, "name": name, "options": leaf}]
            return leaf

        return options, wrap

    def _build_options(
        self, schema: list[JSON] | None, values: dict[str, object], resolved: JSON, channel: EmuChannel
    ) -> list[JSON]:
        if schema is None:
            return [self._inferred_option(name, value, resolved, channel) for name, value in values.items()]
        by_name = {str(option["name"]): option for option in schema}
        unknown = set(values) - set(by_name)
        if unknown:
            raise EmulatorError(f"unknown options {sorted(unknown)}")
        missing = [name for name, option in by_name.items() if option.get("required") and name not in values]
        if missing:
            raise EmulatorError(f"required options missing: {missing}")
        return [self._option(by_name[name], value, resolved, channel) for name, value in values.items()]

    def _inferred_option(self, name: str, value: object, resolved: JSON, channel: EmuChannel) -> JSON:
        kinds: list[tuple[type, int]] = [
            (bool, OPTION_BOOLEAN),
            (int, OPTION_INTEGER),
            (float, OPTION_NUMBER),
            (str, OPTION_STRING),
            (EmuUser, OPTION_USER),
            (EmuRole, OPTION_ROLE),
            (EmuChannel, OPTION_CHANNEL),
            (Upload, OPTION_ATTACHMENT),
        ]
        kind = next((k for py_type, k in kinds if isinstance(value, py_type)), None)
        if kind is None:
            raise EmulatorError(f"cannot send option {name}={value!r}")
        return self._option({"name": name, "type": kind}, value, resolved, channel)

    def _option(self, schema: JSON, value: object, resolved: JSON, channel: EmuChannel) -> JSON:
        kind, name = int(schema["type"]), str(schema["name"])
        if kind in (OPTION_STRING, OPTION_INTEGER, OPTION_NUMBER, OPTION_BOOLEAN):
            return {"type": kind, "name": name, "value": self._scalar_option(schema, value)}
        if kind == OPTION_ATTACHMENT:
            if not isinstance(value, Upload):
                raise EmulatorError(f"option {name} needs an Upload")
            attachment = self._store_upload(value, channel)
            resolved.setdefault("attachments", {})[attachment["id"]] = attachment
            return {"type": kind, "name": name, "value": attachment["id"]}
        return {"type": kind, "name": name, "value": self._entity_option(kind, name, value, resolved)}

    def _scalar_option(self, schema: JSON, value: object) -> object:
        kind, name = int(schema["type"]), str(schema["name"])
        expected: dict[int, tuple[type, ...]] = {
            OPTION_STRING: (str,),
            OPTION_INTEGER: (int,),
            OPTION_NUMBER: (int, float),
            OPTION_BOOLEAN: (bool,),
        }
        if not isinstance(value, expected[kind]) or (kind != OPTION_BOOLEAN and isinstance(value, bool)):
            raise EmulatorError(f"option {name} takes {expected[kind]}, not {value!r}")
        choices = [choice["value"] for choice in schema.get("choices") or []]
        if choices and value not in choices:
            raise EmulatorError(f"option {name} must be one of {choices}")
        if isinstance(value, str) and not (
            schema.get("min_length", 0) <= len(value) <= schema.get("max_length", 6000)
        ):
            raise EmulatorError(f"option {name} has a length outside its min/max")
        if isinstance(value, int | float) and not isinstance(value, bool):
            low, high = schema.get("min_value"), schema.get("max_value")
            if (low is not None and value < low) or (high is not None and value > high):
                raise EmulatorError(f"option {name}={value} is outside [{low}, {high}]")
        return value

    def _entity_option(self, kind: int, name: str, value: object, resolved: JSON) -> str:
        if isinstance(value, EmuUser) and kind in (OPTION_USER, OPTION_MENTIONABLE):
            resolved.setdefault("users", {})[str(value.id)] = value.user_payload()
            member = {
                **value.member_payload(with_user=False),
                "permissions": str(self.member_permissions(value)),
            }
            resolved.setdefault("members", {})[str(value.id)] = member
            return str(value.id)
        if isinstance(value, EmuRole) and kind in (OPTION_ROLE, OPTION_MENTIONABLE):
            resolved.setdefault("roles", {})[str(value.id)] = value.payload()
            return str(value.id)
        if isinstance(value, EmuChannel) and kind == OPTION_CHANNEL:
            entry = {**value.payload(), "permissions": str(ALL_PERMISSIONS)}
            resolved.setdefault("channels", {})[str(value.id)] = entry
            return str(value.id)
        raise EmulatorError(f"option {name} of type {kind} cannot take {value!r}")

    def _store_upload(self, upload: Upload, channel: EmuChannel) -> JSON:
        attachment_id = self.snowflake()
        filename = _sanitize_filename(upload.filename)
        content_type = upload.content_type or mimetypes.guess_type(filename)[0]
        self._cdn[attachment_id] = StoredFile(attachment_id, filename, content_type, upload.data)
        return self._attachment_payload(
            attachment_id, filename, content_type, len(upload.data), channel.id, True
        )

    def _attachment_payload(
        self,
        attachment_id: int,
        filename: str,
        content_type: str | None,
        size: int,
        channel_id: int,
        ephemeral: bool,
    ) -> JSON:
        url = f"{self.base_url}/cdn/attachments/{channel_id}/{attachment_id}/{filename}"
        payload: JSON = {
            "id": str(attachment_id),
            "filename": filename,
            "size": size,
            "url": url,
            "proxy_url": url,
            "content_type": content_type,
            "flags": 0,
        }
        if ephemeral:
            payload["ephemeral"] = True
        return payload

    async def post_user_message(
        self, content: str, *, user: EmuUser | None = None, channel: EmuChannel | int | None = None
    ) -> StoredMessage:
        """A user writes a message in a channel (MESSAGE_CREATE reaches the bot if its intents allow)."""
        author = user or self.member
        target = self._channel(self._channel_id(channel))
        return await self._create_message(target, {"content": content}, [], author=author)

    async def add_message(
        self, data: JSON, *, channel: EmuChannel | int | None = None, author: EmuUser | None = None
    ) -> StoredMessage:
        """Seed a message (e.g. one the bot posted before a restart) without going through the bot."""
        target = self._channel(self._channel_id(channel))
        return await self._create_message(target, data, [], author=author or self.bot, dispatch=False)

    # --- HTTP plumbing --------------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_get("/gateway/", self._gateway)
        app.router.add_get("/cdn/attachments/{channel_id}/{attachment_id}/{filename}", self._cdn_file)
        api = f"/api/v{API_VERSION}"
        commands = "/applications/{app_id}/commands"
        guild_commands = "/applications/{app_id}/guilds/{guild_id}/commands"
        webhook = "/webhooks/{app_id}/{token}"
        message = "/channels/{channel_id}/messages/{message_id}"
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/users/@me", self._get_me),
            ("GET", "/oauth2/applications/@me", self._get_application),
            ("GET", "/applications/@me", self._get_application),
            ("GET", "/gateway", self._get_gateway),
            ("GET", "/gateway/bot", self._get_gateway_bot),
            ("PUT", commands, self._put_commands),
            ("GET", commands, self._get_commands),
            ("PUT", guild_commands, self._put_commands),
            ("GET", guild_commands, self._get_commands),
            ("POST", "/interactions/{interaction_id}/{token}/callback", self._interaction_callback),
            ("POST", webhook, self._webhook_post),
            ("GET", webhook + "/messages/{message_id}", self._webhook_get),
            ("PATCH", webhook + "/messages/{message_id}", self._webhook_patch),
            ("DELETE", webhook + "/messages/{message_id}", self._webhook_delete),
            ("POST", "/channels/{channel_id}/messages", self._post_message),
            ("GET", "/channels/{channel_id}/messages", self._get_messages),
            ("GET", message, self._get_message),
            ("PATCH", message, self._patch_message),
            ("DELETE", message, self._delete_message),
            ("POST", message + "/threads", self._thread_from_message),
            ("POST", "/channels/{channel_id}/threads", self._thread_without_message),
            ("PUT", message + "/reactions/{emoji}/@me", self._add_reaction),
            ("DELETE", message + "/reactions/{emoji}/@me", self._remove_reaction),
            ("POST", "/channels/{channel_id}/typing", self._no_content),
            ("GET", "/channels/{channel_id}", self._get_channel),
            ("PATCH", "/channels/{channel_id}", self._patch_channel),
            ("DELETE", "/channels/{channel_id}", self._delete_channel),
            ("PUT", "/channels/{channel_id}/thread-members/@me", self._join_thread),
            ("DELETE", "/channels/{channel_id}/thread-members/@me", self._join_thread),
            ("GET", "/guilds/{guild_id}", self._get_guild),
            ("GET", "/guilds/{guild_id}/channels", self._get_guild_channels),
            ("GET", "/guilds/{guild_id}/roles", self._get_roles),
            ("GET", "/guilds/{guild_id}/members/{user_id}", self._get_member),
            ("GET", "/users/{user_id}", self._get_user),
            ("POST", "/users/@me/channels", self._create_dm),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, api + path, handler)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/gateway/"):
            return await handler(request)
        path = TOKEN_IN_PATH.sub(r"\1/<token>", request.path.removeprefix(f"/api/v{API_VERSION}"))
        call = RecordedCall(request.method, path, dict(request.query), None, [], time.monotonic())
        self._current_call.set(call)
        try:
            body = await self._parse_body(request)
            call.json, call.files = body.json, body.files
            self._check_authorization(request, path)
            response = await handler(request)
        except _DiscordHTTPError as error:
            response = self._error_response(error, call)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            self._violate("unknown_route", f"{request.method} {request.path} is not served", None)
            response = _json_response({"message": "404: Not Found", "code": 0}, 404)
        except Exception as error:  # an emulator bug must not look like a 500: the client retries those
            log.exception("Discord emulator failed on %s %s", request.method, request.path)
            self._violate("emulator_error", f"{request.method} {path}: {error!r}", call.interaction_id)
            response = _json_response({"message": f"emulator error: {error!r}", "code": 0}, 400)
        call.status = response.status
        if (
            response.content_type == "application/json"
            and isinstance(response, web.Response)
            and response.body
        ):
            call.response = json.loads(bytes(response.body))  # type: ignore[arg-type]
        self.calls.append(call)
        self._notify()
        return response

    def _error_response(self, error: _DiscordHTTPError, call: RecordedCall) -> web.Response:
        if error.code in INVALID_REQUEST_CODES:
            self._violate("bad_request", f"{call.method} {call.path}: {error.body()}", call.interaction_id)
        return _json_response(error.body(), error.status)

    def _tag_interaction(self, interaction: EmulatedInteraction) -> None:
        """Mark the request being served as belonging to ``interaction``."""
        self._current_call.get().interaction_id = interaction.id

    def _check_authorization(self, request: web.Request, path: str) -> None:
        if path.startswith(("/interactions/", "/webhooks/", "/cdn/")):
            return
        if request.headers.get("Authorization") != f"Bot {self.token}":
            raise _DiscordHTTPError(401, 0, "401: Unauthorized")

    @staticmethod
    async def _parse_body(request: web.Request) -> _ParsedBody:
        if request.content_type.startswith("multipart/"):
            payload: Any = None
            files: list[RecordedFile] = []
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "payload_json":
                    payload = json.loads(await part.text())
                else:
                    data = bytes(await part.read(decode=False))
                    content_type = part.headers.get("Content-Type")
                    files.append(RecordedFile(part.name or "", part.filename or "", content_type, data))
            return _ParsedBody(payload, files)
        raw = await request.read()
        if not raw:
            return _ParsedBody(None, [])
        try:
            return _ParsedBody(json.loads(raw), [])
        except ValueError:
            raise _DiscordHTTPError(400, 50109, "The request body contains invalid JSON.") from None

    def _body(self, request: web.Request) -> _ParsedBody:
        """The parsed body of the request being served (parsed once, by the middleware)."""
        call = self._current_call.get()
        return _ParsedBody(call.json, call.files)

    # --- REST: login, application, gateway, commands ---------------------------------------------------

    async def _get_me(self, request: web.Request) -> web.Response:
        me = {
            **self.bot.user_payload(),
            "verified": True,
            "mfa_enabled": False,
            "flags": 0,
            "locale": "en-US",
        }
        return _json_response(me)

    async def _get_application(self, request: web.Request) -> web.Response:
        return _json_response(self._application_payload())

    async def _get_gateway(self, request: web.Request) -> web.Response:
        return _json_response({"url": self.gateway_url.rstrip("/")})

    async def _get_gateway_bot(self, request: web.Request) -> web.Response:
        limit = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}
        return _json_response(
            {"url": self.gateway_url.rstrip("/"), "shards": 1, "session_start_limit": limit}
        )

    def _command_scope(self, request: web.Request) -> int | None:
        if int(request.match_info["app_id"]) != self.application_id:
            raise _DiscordHTTPError(403, 50001, "Missing Access")
        guild = request.match_info.get("guild_id")
        if guild is not None and int(guild) != self.guild_id:
            raise _DiscordHTTPError(403, 50001, "Missing Access")
        return None if guild is None else int(guild)

    async def _put_commands(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        sent = self._body(request).json
        if not isinstance(sent, list):
            raise _invalid_form({"_errors": "Expected a list of commands."})
        errors = _command_errors(sent)
        if errors:
            raise _invalid_form(errors)
        previous = self.commands.get(scope, {})
        stored = {str(command["name"]): self._stored_command(command, scope, previous) for command in sent}
        self.commands[scope] = stored
        self.command_syncs.append((scope, copy.deepcopy(sent)))
        return _json_response(list(stored.values()))

    def _stored_command(self, command: JSON, scope: int | None, previous: Mapping[str, JSON]) -> JSON:
        old = previous.get(str(command["name"]))
        stored: JSON = {
            "type": 1,
            "default_member_permissions": None,
            "nsfw": False,
            "name_localizations": None,
            "description_localizations": None,
            **copy.deepcopy(command),
            "id": old["id"] if old else str(self.snowflake()),
            "application_id": str(self.application_id),
            "version": str(self.snowflake()),
        }
        if scope is not None:
            stored["guild_id"] = str(scope)
        return stored

    async def _get_commands(self, request: web.Request) -> web.Response:
        return _json_response(self.synced_commands(self._command_scope(request)))

    # --- REST: interaction callback and webhooks ------------------------------------------------------

    async def _interaction_callback(self, request: web.Request) -> web.Response:
        interaction = self.interactions.get(int(request.match_info["interaction_id"]))
        if interaction is None or interaction.token != request.match_info["token"]:
            raise _unknown_interaction()
        self._tag_interaction(interaction)
        now = time.monotonic()
        if interaction.acknowledged:
            self._violate("double_ack", f"interaction {interaction.id} answered twice", interaction.id)
            raise _already_acknowledged()
        if now - interaction.created_at > self.ack_deadline:
            detail = f"interaction {interaction.id} acknowledged after {now - interaction.created_at:.2f} s"
            self._violate("late_ack", detail, interaction.id)
            raise _unknown_interaction()
        body = self._body(request)
        payload = body.json if isinstance(body.json, dict) else {}
        kind = int(payload.get("type") or 0)
        self._check_callback_type(interaction, kind)
        # Acknowledged before any await, so a concurrent second callback gets 40060; undone if refused.
        interaction.acked_at, interaction.response_type = now, kind
        try:
            resource = await self._apply_callback(interaction, kind, payload.get("data") or {}, body.files)
        except _DiscordHTTPError:
            interaction.acked_at = interaction.response_type = None
            raise
        interaction.callback_payload = payload
        if request.query.get("with_response") not in ("1", "true", "True"):
            return _no_content_response()
        return _json_response({"interaction": self._callback_summary(interaction), "resource": resource})

    def _check_callback_type(self, interaction: EmulatedInteraction, kind: int) -> None:
        allowed = {CALLBACK_MESSAGE, CALLBACK_DEFERRED_MESSAGE, CALLBACK_MODAL}
        if interaction.type == INTERACTION_MESSAGE_COMPONENT or interaction.message_id is not None:
            allowed |= {CALLBACK_DEFERRED_UPDATE, CALLBACK_UPDATE_MESSAGE}
        if interaction.type == INTERACTION_MODAL_SUBMIT:
            allowed.discard(CALLBACK_MODAL)
        if kind not in allowed:
            raise _invalid_form(
                {"type": f"Callback type {kind} is not valid for interaction type {interaction.type}"}
            )

    async def _apply_callback(
        self, interaction: EmulatedInteraction, kind: int, data: JSON, files: list[RecordedFile]
    ) -> JSON:
        channel = self._channel(interaction.channel_id)
        if kind == CALLBACK_MESSAGE:
            message = await self._interaction_message(interaction, channel, data, files)
            interaction.original_message_id = message.id
            return {"type": kind, "message": message.data}
        if kind == CALLBACK_DEFERRED_MESSAGE:
            flags = FLAG_LOADING | (int(data.get("flags") or 0) & FLAG_EPHEMERAL)
            message = await self._interaction_message(
                interaction, channel, {"flags": flags}, [], loading=True
            )
            interaction.original_message_id = message.id
            return {"type": kind, "message": message.data}
        if kind == CALLBACK_MODAL:
            self._validate_modal(data)
            interaction.modal = copy.deepcopy(data)
            return {"type": kind}
        target = self.message(interaction.message_id or 0)
        if kind == CALLBACK_UPDATE_MESSAGE:
            await self._edit_message(target, data, files)
        interaction.original_message_id = target.id
        return {"type": kind, "message": target.data}

    @staticmethod
    def _validate_modal(data: JSON) -> None:
        errors: JSON = {}
        if not 1 <= len(data.get("title") or "") <= 45:
            errors["title"] = "Must be between 1 and 45 in length."
        if not data.get("custom_id") or len(data["custom_id"]) > 100:
            errors["custom_id"] = "Must be between 1 and 100 in length."
        if not 1 <= len(data.get("components") or []) <= 5:
            errors["components"] = "Must be between 1 and 5 in length."
        if errors:
            raise _invalid_form(errors)

    def _callback_summary(self, interaction: EmulatedInteraction) -> JSON:
        summary: JSON = {"id": str(interaction.id), "type": interaction.type}
        message = self.messages.get(interaction.original_message_id or 0)
        if message is not None and interaction.response_type in (CALLBACK_MESSAGE, CALLBACK_DEFERRED_MESSAGE):
            summary.update(
                response_message_id=str(message.id),
                response_message_loading=message.loading,
                response_message_ephemeral=message.ephemeral,
            )
        return summary

    def _webhook_interaction(self, request: web.Request) -> EmulatedInteraction:
        """The interaction a webhook token belongs to, enforcing the 15-minute token lifetime."""
        interaction = self._interactions_by_token.get(request.match_info["token"])
        if interaction is None or int(request.match_info["app_id"]) != self.application_id:
            raise _invalid_webhook_token()
        self._tag_interaction(interaction)
        age = time.monotonic() - interaction.created_at
        if age > self.token_lifetime:
            detail = f"interaction {interaction.id} token used {age:.2f} s after creation"
            self._violate("expired_token", detail, interaction.id)
            raise _invalid_webhook_token()
        if not interaction.acknowledged:
            self._violate(
                "followup_before_ack", f"interaction {interaction.id} webhook used before ack", interaction.id
            )
            raise _unknown_webhook()
        return interaction

    def _webhook_message(self, interaction: EmulatedInteraction, message_ref: str) -> StoredMessage:
        if message_ref == "@original":
            message_id = interaction.original_message_id
        else:
            message_id = int(message_ref)
            if message_id != interaction.original_message_id and message_id not in interaction.followup_ids:
                message_id = None
        message = self.messages.get(message_id or 0)
        if message is None or message.deleted:
            raise _unknown_message()
        return message

    async def _webhook_post(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        body = self._body(request)
        data = body.json if isinstance(body.json, dict) else {}
        original = self.messages.get(interaction.original_message_id or 0)
        if original is not None and original.loading and not original.deleted:
            # Discord completes a deferred "thinking" message with the first followup; the
            # defer decided whether it is ephemeral.
            message = original
            await self._edit_message(message, data, body.files, completing=True)
        else:
            channel = self._channel(interaction.channel_id)
            message = await self._interaction_message(interaction, channel, data, body.files)
        interaction.followup_ids.append(message.id)
        if request.query.get("wait") not in ("1", "true", "True"):
            return _no_content_response()
        return _json_response(message.data)

    async def _webhook_get(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        return _json_response(self._webhook_message(interaction, request.match_info["message_id"]).data)

    async def _webhook_patch(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        message = self._webhook_message(interaction, request.match_info["message_id"])
        body = self._body(request)
        data = body.json if isinstance(body.json, dict) else {}
        await self._edit_message(message, data, body.files, completing=message.loading)
        return _json_response(message.data)

    async def _webhook_delete(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        await self._delete(self._webhook_message(interaction, request.match_info["message_id"]))
        return _no_content_response()

    async def _interaction_message(
        self,
        interaction: EmulatedInteraction,
        channel: EmuChannel,
        data: JSON,
        files: list[RecordedFile],
        *,
        loading: bool = False,
    ) -> StoredMessage:
        flags = int(data.get("flags") or 0)
        allowed_flags = (
            FLAG_EPHEMERAL | FLAG_SUPPRESS_EMBEDS | FLAG_SUPPRESS_NOTIFICATIONS | FLAG_COMPONENTS_V2
        )
        if flags & ~(allowed_flags | FLAG_LOADING) or (flags & FLAG_LOADING and not loading):
            raise _invalid_form({"flags": f"Invalid message flags {flags}"})
        return await self._create_message(
            channel, data, files, author=self.bot, interaction=interaction, validate=not loading
        )

    # --- REST: channel messages -----------------------------------------------------------------------

    def _channel(self, channel_id: int) -> EmuChannel:
        channel = self.channels.get(channel_id)
        if channel is None:
            raise _unknown_channel()
        return channel

    def _request_channel(self, request: web.Request) -> EmuChannel:
        return self._channel(int(request.match_info["channel_id"]))

    def _request_message(self, request: web.Request, channel: EmuChannel) -> StoredMessage:
        message = self.messages.get(int(request.match_info["message_id"]))
        if message is None or message.deleted or message.channel_id != channel.id or message.ephemeral:
            raise _unknown_message()
        return message

    def _require_bot_permission(self, channel: EmuChannel, *permissions: discord.Permissions) -> None:
        if channel.type == CHANNEL_DM:
            return
        granted = self.bot_permissions
        for needed in permissions:
            if needed.value & ~granted:
                self._violate("missing_permissions", f"bot lacks {needed!r} in channel {channel.id}", None)
                raise _missing_permissions()

    def _send_permissions(
        self, channel: EmuChannel, data: JSON, file_count: int
    ) -> list[discord.Permissions]:
        needed = [discord.Permissions(view_channel=True)]
        if channel.is_thread:
            needed.append(discord.Permissions(send_messages_in_threads=True))
        else:
            needed.append(discord.Permissions(send_messages=True))
        if file_count:
            needed.append(discord.Permissions(attach_files=True))
        if data.get("embeds"):
            needed.append(discord.Permissions(embed_links=True))
        return needed

    async def _post_message(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        body = self._body(request)
        data = body.json if isinstance(body.json, dict) else {}
        self._require_bot_permission(channel, *self._send_permissions(channel, data, len(body.files)))
        if channel.type == CHANNEL_DM and channel.recipient is not None and not channel.recipient.accepts_dms:
            raise _DiscordHTTPError(403, 50007, "Cannot send messages to this user")
        if channel.is_thread and channel.locked:
            raise _DiscordHTTPError(400, 50083, "Thread is archived")
        if int(data.get("flags") or 0) & FLAG_EPHEMERAL:
            raise _invalid_form({"flags": "Channel messages cannot be ephemeral"})
        channel.archived = False
        message = await self._create_message(channel, data, body.files, author=self.bot)
        return _json_response(message.data)

    async def _get_messages(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        self._require_bot_permission(channel, discord.Permissions(read_message_history=True))
        limit = min(int(request.query.get("limit", 50)), 100)
        before, after = request.query.get("before"), request.query.get("after")
        visible = self.channel_messages(channel, include_ephemeral=False)
        if before:
            visible = [m for m in visible if m.id < int(before)]
        if after:
            visible = [m for m in visible if m.id > int(after)]
        newest_first = sorted(visible, key=lambda m: m.id, reverse=True)[:limit]
        return _json_response([m.data for m in newest_first])

    async def _get_message(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        return _json_response(self._request_message(request, channel).data)

    async def _patch_message(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        message = self._request_message(request, channel)
        if message.author_id != self.bot.id:
            raise _DiscordHTTPError(403, 50005, "Cannot edit a message authored by another user")
        body = self._body(request)
        data = body.json if isinstance(body.json, dict) else {}
        await self._edit_message(message, data, body.files)
        return _json_response(message.data)

    async def _delete_message(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        message = self._request_message(request, channel)
        if message.author_id != self.bot.id:
            self._require_bot_permission(channel, discord.Permissions(manage_messages=True))
        await self._delete(message)
        return _no_content_response()

    async def _add_reaction(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        message = self._request_message(request, channel)
        self._require_bot_permission(channel, discord.Permissions(add_reactions=True))
        emoji = request.match_info["emoji"]
        reactions = message.data.setdefault("reactions", [])
        if not any(r["emoji"]["name"] == emoji for r in reactions):
            reactions.append({"emoji": {"id": None, "name": emoji}, "count": 1, "me": True})
        return _no_content_response()

    async def _remove_reaction(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        message = self._request_message(request, channel)
        emoji = request.match_info["emoji"]
        message.data["reactions"] = [
            r for r in message.data.get("reactions", []) if r["emoji"]["name"] != emoji
        ]
        return _no_content_response()

    async def _no_content(self, request: web.Request) -> web.Response:
        self._request_channel(request)
        return _no_content_response()

    # --- messages: create, edit, delete ---------------------------------------------------------------

    async def _create_message(
        self,
        channel: EmuChannel,
        data: JSON,
        files: list[RecordedFile],
        *,
        author: EmuUser,
        interaction: EmulatedInteraction | None = None,
        validate: bool = True,
        dispatch: bool = True,
    ) -> StoredMessage:
        if validate:
            _validate_message(data, len(files), creating=True)
        flags = int(data.get("flags") or 0)
        message_id = self.snowflake()
        stored = StoredMessage({}, channel.id, interaction.id if interaction else None)
        stored.allowed_mentions = data.get("allowed_mentions")
        attachments = self._new_attachments(stored, message_id, data, files, bool(flags & FLAG_EPHEMERAL))
        stored.data = {
            "id": str(message_id),
            "channel_id": str(channel.id),
            "author": author.user_payload(),
            "content": str(data.get("content") or ""),
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": bool(data.get("tts")),
            "attachments": attachments,
            "embeds": copy.deepcopy(data.get("embeds") or []),
            "components": copy.deepcopy(data.get("components") or []),
            "reactions": [],
            "pinned": False,
            "type": 0,
            "flags": flags,
            "position": channel.message_count if channel.is_thread else None,
        }
        if channel.guild_id is not None:
            stored.data["guild_id"] = str(channel.guild_id)
        if interaction is not None:
            self._add_interaction_fields(stored.data, interaction)
        self._add_reference(stored.data, data, channel)
        self._apply_mentions(stored, channel)
        self.messages[message_id] = stored
        if not stored.ephemeral:
            channel.last_message_id = message_id
            channel.message_count += 1
            if dispatch:
                await self._dispatch_message_event("MESSAGE_CREATE", stored, channel)
        self._notify()
        return stored

    def _add_interaction_fields(self, data: JSON, interaction: EmulatedInteraction) -> None:
        data["webhook_id"] = str(self.application_id)
        data["application_id"] = str(self.application_id)
        command = interaction.type == INTERACTION_APPLICATION_COMMAND
        data["type"] = 20 if command else 0
        metadata: JSON = {
            "id": str(interaction.id),
            "type": interaction.type,
            "user": interaction.user.user_payload(),
            "authorizing_integration_owners": interaction.payload.get("authorizing_integration_owners", {}),
        }
        if interaction.original_message_id is not None:
            metadata["original_response_message_id"] = str(interaction.original_message_id)
        if interaction.message_id is not None:
            metadata["interacted_message_id"] = str(interaction.message_id)
        data["interaction_metadata"] = metadata
        if command:
            data["interaction"] = {
                "id": str(interaction.id),
                "type": interaction.type,
                "name": interaction.payload["data"].get("name", ""),
                "user": interaction.user.user_payload(),
            }

    def _add_reference(self, data: JSON, sent: JSON, channel: EmuChannel) -> None:
        reference = sent.get("message_reference")
        if not reference:
            return
        referenced = self.messages.get(int(reference.get("message_id") or 0))
        if referenced is None or referenced.deleted:
            if reference.get("fail_if_not_exists", True):
                raise _invalid_form({"message_reference": "Unknown message"})
            return
        data["type"] = 19
        data["message_reference"] = {
            "type": 0,
            "message_id": str(referenced.id),
            "channel_id": str(referenced.channel_id),
            "guild_id": str(channel.guild_id) if channel.guild_id else None,
        }
        data["referenced_message"] = referenced.data

    def _apply_mentions(self, message: StoredMessage, channel: EmuChannel) -> None:
        """Fill mentions/mention_roles/mention_everyone as Discord does, honouring allowed_mentions."""
        content = message.content
        allowed = message.allowed_mentions
        parse = {"users", "roles", "everyone"} if allowed is None else set(allowed.get("parse") or [])
        listed_users = {int(u) for u in (allowed or {}).get("users") or []}
        listed_roles = {int(r) for r in (allowed or {}).get("roles") or []}
        user_ids = {int(u) for u in USER_MENTION.findall(content)}
        pinged_users = {u for u in user_ids if u in self.users and ("users" in parse or u in listed_users)}
        reply = message.data.get("referenced_message")
        if reply is not None and (allowed is None or allowed.get("replied_user", True)):
            pinged_users.add(int(reply["author"]["id"]))
        role_ids = {int(r) for r in ROLE_MENTION.findall(content)}
        pinged_roles = {r for r in role_ids if r in self.roles and ("roles" in parse or r in listed_roles)}
        can_everyone = bool(self.bot_permissions & discord.Permissions(mention_everyone=True).value)
        everyone = "everyone" in parse and can_everyone and ("@everyone" in content or "@here" in content)
        message.data["mentions"] = [
            self.users[u].user_payload() for u in sorted(pinged_users) if u in self.users
        ]
        message.data["mention_roles"] = [str(r) for r in sorted(pinged_roles)]
        message.data["mention_everyone"] = everyone

    def _new_attachments(
        self, message: StoredMessage, message_id: int, data: JSON, files: list[RecordedFile], ephemeral: bool
    ) -> list[JSON]:
        """Attachments for uploaded file parts: ``attachments[].id`` n matches part ``files[n]``."""
        by_field = {f.field: f for f in files}
        entries = data.get("attachments")
        if entries is None:
            entries = [{"id": index, "filename": f.filename} for index, f in enumerate(files)]
        payloads: list[JSON] = []
        for entry in entries:
            upload = by_field.get(f"files[{entry.get('id')}]")
            if upload is None:
                continue  # an existing attachment, kept by _edit_message
            if len(upload.data) > self.attachment_size_limit:
                raise _DiscordHTTPError(413, 40005, "Request entity too large")
            attachment_id = self.snowflake()
            filename = _sanitize_filename(str(entry.get("filename") or upload.filename))
            content_type = mimetypes.guess_type(filename)[0] or upload.content_type
            stored = StoredFile(attachment_id, filename, content_type, upload.data)
            self._cdn[attachment_id] = message.files[attachment_id] = stored
            payload = self._attachment_payload(
                attachment_id, filename, content_type, len(upload.data), message.channel_id, ephemeral
            )
            if entry.get("description"):
                payload["description"] = entry["description"]
            payloads.append(payload)
        unmatched = len(files) - len(payloads)
        if unmatched > 0:
            raise _invalid_form({"attachments": f"{unmatched} uploaded files are not listed in attachments"})
        return payloads

    async def _edit_message(
        self,
        message: StoredMessage,
        data: JSON,
        files: list[RecordedFile],
        *,
        completing: bool = False,
    ) -> None:
        """Apply an edit with Discord's semantics; ``completing`` fills in a deferred message."""
        existing = {int(a["id"]): a for a in message.attachments}
        listed = data.get("attachments")
        if listed is None:
            kept = list(existing.values())
        else:
            kept = [existing[int(a["id"])] for a in listed if int(a["id"]) in existing]
        merged = {
            **message.data,
            **{k: v for k, v in data.items() if k in ("content", "embeds", "components")},
        }
        _validate_message(merged, len(files), creating=completing, kept_attachments=len(kept))
        new = self._new_attachments(message, message.id, data, files, message.ephemeral)
        message.versions.append(copy.deepcopy(message.data))
        for key, empty in (("content", ""), ("embeds", []), ("components", [])):
            if key in data:
                message.data[key] = empty if data[key] is None else copy.deepcopy(data[key])
        message.data["attachments"] = kept + new
        if "flags" in data:
            toggled = int(data.get("flags") or 0) & FLAG_SUPPRESS_EMBEDS
            message.data["flags"] = (message.flags & ~FLAG_SUPPRESS_EMBEDS) | toggled
        if "allowed_mentions" in data:
            message.allowed_mentions = data["allowed_mentions"]
        if completing:
            message.data["flags"] = message.flags & ~FLAG_LOADING
        else:
            message.data["edited_timestamp"] = _now_iso()
        self._apply_mentions(message, self._channel(message.channel_id))
        if not message.ephemeral:
            await self._dispatch_message_event("MESSAGE_UPDATE", message, self._channel(message.channel_id))
        self._notify()

    async def _delete(self, message: StoredMessage) -> None:
        message.deleted = True
        self._notify()
        if not message.ephemeral:
            event = {"id": str(message.id), "channel_id": str(message.channel_id)}
            if message.data.get("guild_id"):
                event["guild_id"] = message.data["guild_id"]
            await self._dispatch_if(self._message_intent(message.channel_id), "MESSAGE_DELETE", event)

    def _message_intent(self, channel_id: int) -> int:
        channel = self.channels.get(channel_id)
        return INTENT_DIRECT_MESSAGES if channel and channel.type == CHANNEL_DM else INTENT_GUILD_MESSAGES

    async def _dispatch_message_event(self, event: str, message: StoredMessage, channel: EmuChannel) -> None:
        for session in list(self._shards.values()):
            if not session.intents & self._message_intent(channel.id):
                continue
            data = copy.deepcopy(message.data)
            if message.author_id != self.bot.id and not session.intents & INTENT_MESSAGE_CONTENT:
                data.update(content="", embeds=[], attachments=[], components=[])
            author = self.users.get(message.author_id)
            if channel.guild_id is not None and author is not None and message.data.get("webhook_id") is None:
                data["member"] = author.member_payload(with_user=False)
            await self.dispatch(event, data, session=session)

    # --- REST: threads and channels -------------------------------------------------------------------

    async def _thread_from_message(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        message = self._request_message(request, channel)
        if channel.type not in (CHANNEL_TEXT, CHANNEL_ANNOUNCEMENT):
            raise _DiscordHTTPError(400, 50024, "Cannot execute action on this channel type")
        self._require_bot_permission(channel, discord.Permissions(create_public_threads=True))
        if message.id in self.channels:
            raise _DiscordHTTPError(400, 160004, "A thread has already been created for this message")
        data = self._body(request).json or {}
        thread = self._new_thread(channel, data, CHANNEL_PUBLIC_THREAD, thread_id=message.id)
        message.versions.append(copy.deepcopy(message.data))
        message.data["thread"] = thread.payload()
        message.data["flags"] = message.flags | FLAG_HAS_THREAD
        await self._announce_thread(thread)
        await self._dispatch_message_event("MESSAGE_UPDATE", message, channel)
        return _json_response(self._thread_response(thread))

    async def _thread_without_message(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        if channel.type not in (CHANNEL_TEXT, CHANNEL_ANNOUNCEMENT):
            raise _DiscordHTTPError(400, 50024, "Cannot execute action on this channel type")
        data = self._body(request).json or {}
        kind = int(data.get("type") or CHANNEL_PRIVATE_THREAD)
        needed = "create_private_threads" if kind == CHANNEL_PRIVATE_THREAD else "create_public_threads"
        self._require_bot_permission(channel, discord.Permissions(**{needed: True}))
        thread = self._new_thread(channel, data, kind)
        await self._announce_thread(thread)
        return _json_response(self._thread_response(thread))

    def _new_thread(
        self, parent: EmuChannel, data: JSON, kind: int, *, thread_id: int | None = None
    ) -> EmuChannel:
        name = str(data.get("name") or "")
        if not 1 <= len(name) <= 100:
            raise _invalid_form({"name": "Must be between 1 and 100 in length."})
        duration = int(data.get("auto_archive_duration") or 1440)
        if duration not in (60, 1440, 4320, 10080):
            raise _invalid_form({"auto_archive_duration": "Must be one of 60, 1440, 4320, 10080."})
        thread = EmuChannel(
            thread_id or self.snowflake(),
            kind,
            name,
            self.guild_id,
            parent_id=parent.id,
            owner_id=self.bot.id,
            auto_archive_duration=duration,
        )
        self.channels[thread.id] = thread
        self._notify()
        return thread

    def _thread_member(self, thread: EmuChannel) -> JSON:
        return {
            "id": str(thread.id),
            "user_id": str(self.bot.id),
            "join_timestamp": thread.created_at,
            "flags": 0,
        }

    def _thread_response(self, thread: EmuChannel) -> JSON:
        return {**thread.payload(), "member": self._thread_member(thread)}

    async def _announce_thread(self, thread: EmuChannel) -> None:
        event = {**self._thread_response(thread), "newly_created": True}
        await self._dispatch_if(INTENT_GUILDS, "THREAD_CREATE", event)

    async def _get_channel(self, request: web.Request) -> web.Response:
        return _json_response(self._request_channel(request).payload())

    async def _patch_channel(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        data = self._body(request).json or {}
        if channel.is_thread:
            if channel.owner_id != self.bot.id:
                self._require_bot_permission(channel, discord.Permissions(manage_threads=True))
            channel.archived = bool(data.get("archived", channel.archived))
            channel.locked = bool(data.get("locked", channel.locked))
            channel.auto_archive_duration = int(
                data.get("auto_archive_duration", channel.auto_archive_duration)
            )
        else:
            self._require_bot_permission(channel, discord.Permissions(manage_channels=True))
        channel.name = str(data.get("name", channel.name))
        event = "THREAD_UPDATE" if channel.is_thread else "CHANNEL_UPDATE"
        await self._dispatch_if(INTENT_GUILDS, event, channel.payload())
        return _json_response(channel.payload())

    async def _delete_channel(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        needed = "manage_threads" if channel.is_thread else "manage_channels"
        self._require_bot_permission(channel, discord.Permissions(**{needed: True}))
        del self.channels[channel.id]
        event = "THREAD_DELETE" if channel.is_thread else "CHANNEL_DELETE"
        await self._dispatch_if(INTENT_GUILDS, event, channel.payload())
        return _json_response(channel.payload())

    async def _join_thread(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        if not channel.is_thread:
            raise _DiscordHTTPError(400, 50024, "Cannot execute action on this channel type")
        return _no_content_response()

    # --- REST: guild, users, DMs, CDN -----------------------------------------------------------------

    def _check_guild(self, request: web.Request) -> None:
        if int(request.match_info["guild_id"]) != self.guild_id:
            raise _DiscordHTTPError(404, 10004, "Unknown Guild")

    async def _get_guild(self, request: web.Request) -> web.Response:
        self._check_guild(request)
        return _json_response(self._guild_payload())

    async def _get_guild_channels(self, request: web.Request) -> web.Response:
        self._check_guild(request)
        return _json_response([c.payload() for c in self.channels.values() if c.type == CHANNEL_TEXT])

    async def _get_roles(self, request: web.Request) -> web.Response:
        self._check_guild(request)
        return _json_response([role.payload() for role in self.roles.values()])

    async def _get_member(self, request: web.Request) -> web.Response:
        self._check_guild(request)
        user = self.users.get(int(request.match_info["user_id"]))
        if user is None:
            raise _DiscordHTTPError(404, 10007, "Unknown Member")
        return _json_response(user.member_payload())

    async def _get_user(self, request: web.Request) -> web.Response:
        user = self.users.get(int(request.match_info["user_id"]))
        if user is None:
            raise _DiscordHTTPError(404, 10013, "Unknown User")
        return _json_response(user.user_payload())

    async def _create_dm(self, request: web.Request) -> web.Response:
        data = self._body(request).json or {}
        user = self.users.get(int(data.get("recipient_id") or 0))
        if user is None or user.bot:
            raise _invalid_form({"recipient_id": "Unknown user"})
        channel = next(
            (c for c in self.channels.values() if c.type == CHANNEL_DM and c.recipient is user), None
        )
        if channel is None:
            channel = EmuChannel(self.snowflake(), CHANNEL_DM, "", None, recipient=user)
            self.channels[channel.id] = channel
        return _json_response(channel.payload())

    async def _cdn_file(self, request: web.Request) -> web.Response:
        stored = self._cdn.get(int(request.match_info["attachment_id"]))
        if stored is None or stored.filename != request.match_info["filename"]:
            return web.Response(status=404, text="Not Found")
        headers = {"Content-Type": stored.content_type or "application/octet-stream"}
        return web.Response(body=stored.data, headers=headers)


def _json_response(payload: Any, status: int = 200) -> web.Response:
    """A JSON answer with ``Content-Type: application/json`` exactly, which discord.py requires."""
    body = json.dumps(payload).encode()
    return web.Response(status=status, body=body, headers={"Content-Type": "application/json"})


def _no_content_response() -> web.Response:
    return web.Response(status=204)
