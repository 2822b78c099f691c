"""The speed table runs end to end (on the tiny model here; the real shape is for `musicbot bench`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from generation import native
from generation.bench import run_bench
from generation.loader import int8_supported
from generation.random_models import build_model, tiny_architecture


def test_bench_times_every_setup_and_writes_its_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figures.json"
    figures = run_bench(
        arch="tiny", seconds=1.0, device="cpu", repeat=2, out=out, model=build_model(tiny_architecture())
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(figures))
    setups = [(row["setup"], row["batch"]) for row in figures["rows"]]
    assert setups[0] == ("classic: transformers generate, fp32", 1)
    ours = [s for s in setups if s[0].startswith("ours")]
    configurations = 1 + int8_supported() + (native.load() is not None)  # torch's kernels beside ours
    assert len(ours) == 2 * configurations and {b for _, b in ours} == {1, 4}
    if native.load() is not None:
        assert ("ours, bfloat16 (torch kernels)", 4) in setups
    for row in figures["rows"]:
        assert row["steps"] == 50 + 3  # 1 s at 50 frames/s, plus the delay pattern's 3 steps
        assert row["wall_seconds"] > 0 and row["peak_memory_gb"] > 0
    assert 0 <= figures["event_loop_lag_p99_ms"] < 1000
    assert all(1 < speed < 10_000 for speed in figures["memory_read_gb_per_s"])  # GB/s, before and after
    table = capsys.readouterr().out
    assert "best of 2 runs" in table and "a batch of 4 gives" in table and "event-loop lag p99" in table
    assert "memory read speed" in table


def test_bench_refuses_zero_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main

    assert main(["bench", "--repeat", "0"]) != 0
    assert "--repeat must be at least 1" in capsys.readouterr().err
