"""Settings, read once from the environment (and a ``.env`` file). Nothing else reads ``os.environ``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from generation.catalog import CHECKPOINTS, SIZES

MODEL_SIZES = SIZES
DEFAULT_MODEL_SOURCES = {c.size: c.source for c in CHECKPOINTS}
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
KERNELS = ("auto", "off")


def model_variable(size: str) -> str:
    """The setting that points a size at another hub id or directory: ``MUSICBOT_MODEL_STEREO_SMALL``."""
    return "MUSICBOT_MODEL_" + size.upper().replace("-", "_")


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
    # auto: on a CPU with AVX-512 BF16, bf16 steps and EnCodec's layers use the native kernels where g++
    # builds them; off: torch's
    kernels: str = "auto"
    admin_ids: frozenset[int] = frozenset()
    guild_id: int | None = None
    limits: Limits = field(default_factory=Limits)
    queue_size: int = 50
    max_batch: int = 4
    # Seconds a batch may generate per 10 s of audio it makes (never less in all); see JobWorker.time_limit.
    job_timeout: float = 300.0
    # A PostgreSQL URL (MUSICBOT_DB=postgresql://...) instead of the SQLite file ``db_path``.
    db_url: str | None = field(default=None, repr=False)
    # Generation worker processes that `musicbot run` starts and supervises beside itself.
    workers: int = 1
    # Discord shards: how many in all (None: as Discord recommends), and which this process runs.
    shard_count: int | None = None
    shard_ids: tuple[int, ...] | None = None
    # Seconds a worker's claim (or a bot's ownership of its replies) holds without a heartbeat.
    lease: float = 30.0
    # Port for Prometheus metrics (None: off), and the address it listens on.
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"

    @property
    def database(self) -> str:
        """What ``MUSICBOT_DB`` names: the PostgreSQL URL, or the SQLite file's path."""
        return self.db_url or str(self.db_path)

    @property
    def shared_database(self) -> bool:
        return self.db_url is not None

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
        device = env.get("MUSICBOT_DEVICE", "auto").lower()
        if device not in DEVICES and not _is_cuda_index(device):
            raise SettingsError(f"MUSICBOT_DEVICE must be one of auto, cpu, cuda or cuda:N (got {device!r})")
        dtype = _choice(env, "MUSICBOT_DTYPE", DTYPES, "auto")
        kernels = _choice(env, "MUSICBOT_KERNELS", KERNELS, "auto")
        sources = {size: env.get(model_variable(size), DEFAULT_MODEL_SOURCES[size]) for size in MODEL_SIZES}
        admin_ids = frozenset(
            _int(env, "MUSICBOT_ADMIN_IDS", part) for part in _split(env.get("MUSICBOT_ADMIN_IDS", ""))
        )
        guild = env.get("MUSICBOT_GUILD_ID")
        db = env.get("MUSICBOT_DB", "musicbot.sqlite3")
        db_url = db if db.startswith(("postgresql://", "postgres://")) else None
        shard_count = _positive(env, "MUSICBOT_SHARD_COUNT", 0) or None
        shard_ids = None
        if "MUSICBOT_SHARD_IDS" in env:
            shard_ids = tuple(
                _int(env, "MUSICBOT_SHARD_IDS", part) for part in _split(env["MUSICBOT_SHARD_IDS"])
            )
            if shard_count is None:
                raise SettingsError(
                    "MUSICBOT_SHARD_IDS needs MUSICBOT_SHARD_COUNT (the number of shards in all)"
                )
            if any(not 0 <= shard < shard_count for shard in shard_ids):
                raise SettingsError(
                    f"MUSICBOT_SHARD_IDS must be between 0 and {shard_count - 1} (MUSICBOT_SHARD_COUNT - 1)"
                )
        workers = _whole(env, "MUSICBOT_WORKERS", 1)
        port = env.get("MUSICBOT_METRICS_PORT")
        metrics_port = _int(env, "MUSICBOT_METRICS_PORT", port) if port else None
        if metrics_port is not None and not 0 < metrics_port < 65536:
            raise SettingsError(f"MUSICBOT_METRICS_PORT must be a port number, 1-65535 (got {metrics_port})")
        return cls(
            discord_token=env.get("DISCORD_TOKEN"),
            db_path=Path("musicbot.sqlite3" if db_url else db),
            db_url=db_url,
            workers=workers,
            shard_count=shard_count,
            shard_ids=shard_ids,
            lease=_seconds(env, "MUSICBOT_LEASE", 30.0),
            metrics_port=metrics_port,
            metrics_address=env.get("MUSICBOT_METRICS_ADDR", "127.0.0.1"),
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
    return _at_least(env, name, default, 1)


def _whole(env: Mapping[str, str], name: str, default: int) -> int:
    return _at_least(env, name, default, 0)


def _at_least(env: Mapping[str, str], name: str, default: int, least: int) -> int:
    if name not in env:
        return default
    value = _int(env, name, env[name])
    if value < least:
        bound = "0 or more" if least == 0 else f"at least {least}"
        raise SettingsError(f"{name} must be {bound} (got {value})")
    return value


def _is_cuda_index(device: str) -> bool:
    prefix, _, number = device.partition(":")
    return prefix == "cuda" and number.isdigit()


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    if name not in env:
        return default
    try:
        value = float(env[name])
    except ValueError:
        raise SettingsError(f"{name} must be a number of seconds (got {env[name]!r})") from None
    if not value > 0:
        raise SettingsError(f"{name} must be more than 0 seconds (got {env[name]})")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    value = env.get(name, default).lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)} (got {value!r})")
    return value


def child_environment(overrides: Mapping[str, str]) -> dict[str, str]:
    """The environment for a child process: this one's (with ``.env``, once the settings are read),
    changed by ``overrides``."""
    return {**os.environ, **overrides}
