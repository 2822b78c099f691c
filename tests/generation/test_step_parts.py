"""``musicbot bench --parts``: the int8 step's parts, timed by a program linked against our kernels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from generation import native
from generation.step_parts import run_parts

TINY = {"layers": 2, "hidden": 64, "heads": 2, "ffn": 128, "outputs": 64, "text": 5, "position": 9}


@pytest.fixture
def int8_kernels() -> native.NativeKernels:
    kernels = native.load()
    if kernels is None or not kernels.int8:
        pytest.skip("our int8 kernels do not run here")
    return kernels


def test_parts_time_each_part_at_each_row_count_and_write_them(
    int8_kernels: native.NativeKernels, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "parts.json"
    figures = run_parts(shape=TINY, rows=(2, 4), repeat=1, out=out)
    assert figures is not None and json.loads(out.read_text()) == figures
    assert figures["amx"] == int(int8_kernels.amx_int8)
    two, four = figures["results"]
    assert (two["rows"], four["rows"]) == (2, 4)
    assert two["products_ms"] > 0 and four["products_ms"] > 0
    # each row reads its keys and values up to the written position, in every layer
    width = TINY["hidden"] + 4 * TINY["heads"]
    assert two["cache_bytes"] == TINY["layers"] * 2 * 2 * (TINY["position"] + 1) * width
    assert four["cache_bytes"] == 2 * two["cache_bytes"]
    # q, k, v, out, cross q and out, fc1, fc2 (panels, scales and sums), and the LM heads
    h, f = TINY["hidden"], TINY["ffn"]
    per_layer = sum(n * (k + 8) for n, k in ((3 * h, h), (h, h), (h, h), (h, h), (f, h), (h, f)))
    assert figures["weight_bytes"] == TINY["layers"] * per_layer + TINY["outputs"] * (h + 8)
    table = capsys.readouterr().out
    assert "| 2 | " in table and "| 4 | " in table and "self-attention" in table


def test_parts_without_our_int8_kernels_say_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(native, "load", lambda: None)
    assert run_parts(shape=TINY, repeat=1) is None
    assert "do not run here" in capsys.readouterr().out
