"""``musicbot generate`` run as a user runs it: a subprocess, with a tiny local model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf


def _musicbot(*args: str, cwd: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **extra_env}
    env = {k: v for k, v in env.items() if not k.startswith("MUSICBOT_")}
    return subprocess.run(
        [sys.executable, "-m", "bot", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )


def test_generate_writes_wav_of_requested_length(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "song.wav"
    done = _musicbot(
        "generate",
        "calm lo-fi piano, rain",
        "--duration",
        "2.5",
        "--model",
        str(tiny_model_dir),
        "--seed",
        "42",
        "-o",
        str(out),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    info = sf.info(out)
    assert (info.samplerate, info.frames, info.subtype) == (32000, 80000, "PCM_16")
    assert "seed 42" in done.stdout
    assert "2.50 s" in done.stdout
    assert "generating" in done.stderr  # the progress bar
    assert "timings:" not in done.stderr  # only when asked for


def test_generate_timings_say_where_the_time_went(tiny_model_dir: Path, tmp_path: Path) -> None:
    from generation.cold_bench import parse_timings

    done = _musicbot(
        "generate", "drums", "--duration", "1", "--model", str(tiny_model_dir), "--timings",
        "-o", str(tmp_path / "take.wav"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    stages = parse_timings(done.stderr)
    assert list(stages) == ["start-up", "imports", "load", "prepare", "first step", "generation", "write"]
    assert all(seconds >= 0 for seconds in stages.values())


# ``musicbot`` itself with a weight-cache writer that takes its time, as it does for a real model's hundreds
# of MB: the command must still leave the whole file.
_SLOW_WRITER = """
import sys, time
from generation import weight_cache
write = weight_cache._write
weight_cache._write = lambda *args: (time.sleep(2), write(*args))
from bot.cli import entry
sys.argv[0] = "musicbot"
entry()
"""


def test_generate_ends_its_process_only_after_the_weight_cache_is_written(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The command skips the interpreter's teardown, not what an orderly exit waits for: the int8 weights
    it prepared are written to the cache in the background, and the file must be whole."""
    args = ["-v", "generate", "drums", "--duration", "1", "--model", str(tiny_model_dir), "--dtype", "int8"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", _SLOW_WRITER, *args, "-o", str(tmp_path / "take.wav")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "prepared weights cached in" in done.stderr  # logged by the writer thread, and flushed
    folder = tmp_path / "cache" / "musicbot" / "weights"
    [cached] = list(folder.iterdir())  # no partial file left behind
    assert cached.suffix == ".safetensors"
    again = _musicbot(
        *args, "-o", str(tmp_path / "again.wav"), cwd=tmp_path, XDG_CACHE_HOME=str(tmp_path / "cache")
    )
    assert again.returncode == 0, again.stderr
    assert "prepared weights read from" in again.stderr  # the second run found it whole
    assert sf.info(tmp_path / "again.wav").frames == 32000


def test_generate_variations_write_numbered_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    done = _musicbot(
        "generate",
        "drums",
        "--duration",
        "1",
        "--variations",
        "2",
        "--model",
        str(tiny_model_dir),
        "-o",
        str(tmp_path / "take.flac"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    a, rate = sf.read(tmp_path / "take-1.flac")
    b, _ = sf.read(tmp_path / "take-2.flac")
    assert rate == 32000 and len(a) == len(b) == 32000
    assert not np.array_equal(a, b)


def test_generate_extend_keeps_the_original(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = tmp_path / "first.wav"
    assert (
        _musicbot(
            "generate",
            "folk",
            "--duration",
            "2",
            "--model",
            str(tiny_model_dir),
            "-o",
            str(first),
            cwd=tmp_path,
        ).returncode
        == 0
    )
    longer = tmp_path / "longer.wav"
    done = _musicbot(
        "generate",
        "folk",
        "--duration",
        "1.5",
        "--extend",
        str(first),
        "--model",
        str(tiny_model_dir),
        "-o",
        str(longer),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert sf.info(longer).frames == 64000 + 48000


def test_generate_on_a_stereo_model_writes_stereo_and_widens_a_mono_original(
    tiny_model_dir: Path, tiny_stereo_dir: Path, tmp_path: Path
) -> None:
    mono = tmp_path / "mono.wav"
    made = _musicbot(
        "generate", "folk", "--duration", "2", "--model", str(tiny_model_dir), "-o", str(mono), cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    wide = tmp_path / "wide.wav"
    done = _musicbot(
        "generate",
        "folk",
        "--duration",
        "1.5",
        "--extend",
        str(mono),
        "--model",
        str(tiny_stereo_dir),
        "-o",
        str(wide),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    info = sf.info(wide)
    assert (info.channels, info.frames) == (2, 64000 + 48000)
    assert "3.50 s of stereo at 32000 Hz" in done.stdout
    assert "note: the mono original was widened to stereo" in done.stdout


def test_bad_parameter_gets_a_short_message(tiny_model_dir: Path, tmp_path: Path) -> None:
    done = _musicbot(
        "generate",
        "piano",
        "--top-p",
        "2",
        "--model",
        str(tiny_model_dir),
        "-o",
        str(tmp_path / "x.wav"),
        cwd=tmp_path,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "musicbot: top_p must be between 0 (off) and 1 (got 2)"
    assert not (tmp_path / "x.wav").exists()


def test_missing_model_gets_a_clear_message(tmp_path: Path) -> None:
    done = _musicbot("generate", "piano", "--model", "large", "-o", str(tmp_path / "x.wav"), cwd=tmp_path)
    assert done.returncode == 1
    assert "facebook/musicgen-large is not in the local cache" in done.stderr
    assert "Traceback" not in done.stderr


def test_bench_runs_one_kind_at_a_time(tmp_path: Path) -> None:
    done = _musicbot("bench", "--parts", "--quality", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == "musicbot: --cold, --quality and --parts are separate runs: choose one"


def test_a_cold_bench_run_that_fails_says_which_and_why(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a checkpoint neither recipe can load
    done = _musicbot("bench", "--cold", "--model", str(broken), "-o", str(tmp_path / "c.json"), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("musicbot: classic: transformers generate, fp32 failed (1): ")
    assert len(done.stderr.strip().splitlines()) == 1  # the child's own last line, no traceback
    assert not (tmp_path / "c.json").exists()
