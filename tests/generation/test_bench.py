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
    assert "memory read speed" in table and "run by run, taken in turn" in table
    for row in figures["rows"]:
        assert len(row["walls"]) == 2 and min(row["walls"]) == row["wall_seconds"]


def test_four_against_one_is_also_given_run_by_run() -> None:
    from generation.bench import Row, paired_gains

    one = Row("ours", 1, 5.0, 3.0, 253, 1.0, (3.0, 4.0, 3.5))
    four = Row("ours", 4, 5.0, 5.0, 253, 1.0, (6.0, 5.0, 5.6))
    assert paired_gains(one, four) == pytest.approx([2.0, 3.2, 2.5])
    # the fastest of each (3.0 and 5.0) would say 2.4x: neither pair's
    assert one.compute_per_audio_second / four.compute_per_audio_second == pytest.approx(2.4)


def test_bench_refuses_zero_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main

    assert main(["bench", "--repeat", "0"]) != 0
    assert "--repeat must be at least 1" in capsys.readouterr().err


def test_the_cold_bench_times_whole_processes_side_by_side(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from generation.cold_bench import run_cold_bench

    out = tmp_path / "cold.json"
    runs = run_cold_bench(tiny_model_dir, 1.0, ["float32"], repeat=1, drop_caches=False, out=out)
    classic, ours = runs
    assert classic.setup.startswith("classic") and ours.setup == "musicbot generate --dtype float32"
    assert set(classic.stages) == {"start-up", "load", "generation", "write"}
    assert set(ours.stages) == {"start-up", "imports", "load", "prepare", "first step", "generation", "write"}
    for run in runs:  # the stages are the process's own time: they fit inside its wall time
        assert all(seconds >= 0 for seconds in run.stages.values())
        assert 0 < sum(run.stages.values()) < run.wall_seconds
    figures = json.loads(out.read_text())
    assert [r["setup"] for r in figures["runs"]] == [classic.setup, ours.setup]
    table = capsys.readouterr().out
    assert "Whole process for 1 s of audio" in table and "| musicbot generate --dtype float32 |" in table


def test_timings_lines_of_both_kinds_are_read() -> None:
    from generation.cold_bench import parse_timings

    ours = "wrote x\ntimings: start-up 4.24 s, first step 0.62 s, generation 10.35 s, write 0.00 s\n"
    assert parse_timings(ours) == {"start-up": 4.24, "first step": 0.62, "generation": 10.35, "write": 0.0}
    assert parse_timings('timings: {"load": 1.5, "generation": 52.3}') == {"load": 1.5, "generation": 52.3}
    assert parse_timings("no timings here") == {}


def test_the_quality_guard_compares_every_dtype_with_fp32_and_bf16(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from generation.quality import run_quality

    out = tmp_path / "quality.json"
    results = run_quality(
        arch="tiny", logit_steps=20, greedy_steps=40, out=out, model=build_model(tiny_architecture())
    )
    by_dtype = {r.dtype: r for r in results}
    expected = ["float32", "int8", "bfloat16"] if int8_supported() else ["float32", "bfloat16"]
    assert list(by_dtype) == expected
    reference = by_dtype["float32"]
    assert reference.logits_error_worst == 0.0  # fp32 against itself
    assert by_dtype["bfloat16"].agreement_with_bf16 == 1.0 and by_dtype["bfloat16"].first_difference is None
    for result in results[1:]:  # rounding, not another computation
        assert 0 < result.logits_error_mean <= result.logits_error_worst < 0.1
    assert json.loads(out.read_text())["dtypes"][0]["dtype"] == "float32"
    assert "| int8 |" in capsys.readouterr().out or not int8_supported()
