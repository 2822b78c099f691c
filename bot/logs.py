"""Logging for the command line, with secrets taken out of every record before it is written.

discord.py logs at DEBUG the gateway events it receives (an interaction carries its token) and the
URLs it calls (a webhook URL carries an interaction token). The bot token is never meant to reach a
log, but if any code ever put it there, this is the last line of defence: the filter sits on the
handlers, so it sees every library's records too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

REDACTED = "<redacted>"
# A webhook or interaction callback URL: /webhooks/<application id>/<token>/...
TOKEN_IN_URL = re.compile(r"(/(?:webhooks|interactions)/[0-9]+/)[A-Za-z0-9_.\-]+")
# "token": "..." in a JSON payload or a dict's repr.
TOKEN_FIELD = re.compile(r"""(["']token["']\s*:\s*["'])[^"']+""")
# The shape of a Discord bot token: base64 user id, timestamp, HMAC.
BOT_TOKEN_SHAPE = re.compile(r"\b[A-Za-z0-9_\-]{23,28}\.[A-Za-z0-9_\-]{6,7}\.[A-Za-z0-9_\-]{27,}")
# An interaction token anywhere (a SQL parameter, say): they begin with base64 of "interaction:".
INTERACTION_TOKEN = re.compile(r"aW50ZXJhY3Rpb246[A-Za-z0-9_\-]+")
# Loggers that at DEBUG write out every SQL statement with its parameters (tokens, audio blobs).
TOO_CHATTY = ("aiosqlite",)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without the given secrets and without anything shaped like a Discord token."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = TOKEN_IN_URL.sub(rf"\g<1>{REDACTED}", text)
    text = TOKEN_FIELD.sub(rf"\g<1>{REDACTED}", text)
    text = INTERACTION_TOKEN.sub(REDACTED, text)
    return BOT_TOKEN_SHAPE.sub(REDACTED, text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (and traceback) with ``redact`` before a handler formats it."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: list[str] = []
        self._formatter = logging.Formatter()

    def add_secret(self, secret: str | None) -> None:
        if secret and secret not in self._secrets:
            self._secrets.append(secret)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as usual
            return True
        record.msg, record.args = redact(message, self._secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self._secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self._secrets)
        return True


def configure_logging(verbose: bool) -> RedactingFilter:
    """Log to stderr (everything with ``verbose``, else warnings); the filter that guards it."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in TOO_CHATTY:
        logging.getLogger(name).setLevel(logging.INFO)
    guard = RedactingFilter()
    for handler in logging.getLogger().handlers:
        handler.addFilter(guard)
    return guard
