"""Settings, read once from the environment (and a ``.env`` file). Nothing else reads ``os.environ``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

MODEL_SIZES = ("small", "medium", "large", "melody")
DEFAULT_MODEL_SOURCES = {size: f"facebook/musicgen-{size}" for size in MODEL_SIZES}
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
KERNELS = ("auto", "off")


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names it."""


@dataclass(frozen=True)
class Limits:
    """Per-user limits: the defaults, or one user's override."""

    max_queued: int = 2
    daily_seconds: int = 600
    max_duration: int = 120


@dataclass(frozen=True)
class Settings:
    discord_token: str | None = field(default=None, repr=False)
    db_path: Path = Path("musicbot.sqlite3")
    model: str = "small"
    model_sources: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_MODEL_SOURCES))
    device: str = "auto"
    dtype: str = "auto"
    # auto: on a CPU with AVX-512 BF16, bf16 steps and EnCodec's residual blocks use the native kernels
    # where g++ builds them; off: torch's
    kernels: str = "auto"
    admin_ids: frozenset[int] = frozenset()
    guild_id: int | None = None
    limits: Limits = field(default_factory=Limits)
    queue_size: int = 50
    max_batch: int = 4
    # Seconds a batch may generate per 10 s of audio it makes (never less in all); see job_time_limit.
    job_timeout: float = 300.0

    def model_source(self, size_or_source: str) -> str:
        """A size name maps to its configured hub id or directory; anything else is used as it is."""
        return self.model_sources.get(size_or_source, size_or_source)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, dotenv: Path | None = Path(".env")
    ) -> Settings:
        """Read the settings; a ``.env`` file fills in what the environment does not set."""
        if environ is None:
            if dotenv is not None and dotenv.is_file():
                from dotenv import load_dotenv

                load_dotenv(dotenv, override=False)
            environ = os.environ
        env = {
            k: v.strip() for k, v in environ.items() if k.startswith(("MUSICBOT_", "DISCORD_")) and v.strip()
        }

        model = env.get("MUSICBOT_MODEL", "small")
        device = _choice(env, "MUSICBOT_DEVICE", DEVICES, "auto")
        dtype = _choice(env, "MUSICBOT_DTYPE", DTYPES, "auto")
        kernels = _choice(env, "MUSICBOT_KERNELS", KERNELS, "auto")
        sources = {
            size: env.get(f"MUSICBOT_MODEL_{size.upper()}", DEFAULT_MODEL_SOURCES[size])
            for size in MODEL_SIZES
        }
        admin_ids = frozenset(
            _int(env, "MUSICBOT_ADMIN_IDS", part) for part in _split(env.get("MUSICBOT_ADMIN_IDS", ""))
        )
        guild = env.get("MUSICBOT_GUILD_ID")
        return cls(
            discord_token=env.get("DISCORD_TOKEN"),
            db_path=Path(env.get("MUSICBOT_DB", "musicbot.sqlite3")),
            model=model,
            model_sources=sources,
            device=device,
            dtype=dtype,
            kernels=kernels,
            admin_ids=admin_ids,
            guild_id=_int(env, "MUSICBOT_GUILD_ID", guild) if guild else None,
            limits=Limits(
                max_queued=_positive(env, "MUSICBOT_MAX_QUEUED_PER_USER", 2),
                daily_seconds=_positive(env, "MUSICBOT_DAILY_SECONDS_PER_USER", 600),
                max_duration=_positive(env, "MUSICBOT_MAX_DURATION", 120),
            ),
            queue_size=_positive(env, "MUSICBOT_QUEUE_SIZE", 50),
            max_batch=_positive(env, "MUSICBOT_MAX_BATCH", 4),
            job_timeout=_positive(env, "MUSICBOT_JOB_TIMEOUT", 300),
        )


def _split(value: str) -> list[str]:
    return [part for part in value.replace(";", ",").replace(" ", ",").split(",") if part]


def _int(env: Mapping[str, str], name: str, value: str | None) -> int:
    try:
        return int(value or "")
    except ValueError:
        raise SettingsError(f"{name} must be a whole number (got {value!r})") from None


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    if name not in env:
        return default
    value = _int(env, name, env[name])
    if value < 1:
        raise SettingsError(f"{name} must be at least 1 (got {value})")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    value = env.get(name, default).lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)} (got {value!r})")
    return value
