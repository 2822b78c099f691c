"""Downloading a user's attachment (a melody file) without ever holding more than a cap."""

from __future__ import annotations

import aiohttp
import discord

from generation import AudioInputError

DOWNLOAD_CHUNK = 64 * 1024


async def read_attachment(session: aiohttp.ClientSession, attachment: discord.Attachment, cap: int) -> bytes:
    """The attachment's bytes, refusing (before and while downloading) anything over ``cap`` bytes."""
    if attachment.size > cap:
        raise _too_large(attachment.size, cap)
    data = bytearray()
    try:
        async with session.get(attachment.url) as response:
            response.raise_for_status()
            async for chunk in response.content.iter_chunked(DOWNLOAD_CHUNK):
                data += chunk
                if len(data) > cap:
                    raise _too_large(len(data), cap)
    except aiohttp.ClientError as exc:
        raise AudioInputError("download", "the melody file could not be downloaded; try again") from exc
    return bytes(data)


def _too_large(size: int, cap: int) -> AudioInputError:
    return AudioInputError(
        "too_large", f"the audio file is too large ({size / 2**20:.1f} MiB; at most {cap / 2**20:.0f} MiB)"
    )
