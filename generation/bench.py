"""The speed table: the classic transformers recipe against our decoding loop, on a real shape.

Random weights of the real architecture cost exactly what the real model costs. Everything runs in
one process, one configuration after the other, so the figures compare on the same machine state.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from generation import native
from generation.engine import MusicGenEngine
from generation.loader import Placement, choose_placement, int8_supported, place_model
from generation.random_models import architecture, build_model
from generation.request import GenerationRequest, SamplingParams
from generation.worker import GenerationWorker

log = logging.getLogger(__name__)

PROMPTS = [
    "calm lo-fi piano with rain",
    "upbeat electronic dance music with heavy bass",
    "epic orchestral soundtrack, strings and brass",
    "acoustic guitar folk song, warm and gentle",
]
SAMPLING = SamplingParams(guidance=3.0, temperature=1.0, top_k=250, top_p=0.0)


@dataclass(frozen=True)
class Row:
    setup: str
    batch: int
    audio_seconds: float
    wall_seconds: float
    steps: int
    peak_memory_gb: float
    walls: tuple[float, ...] = ()  # every run's seconds, in the order taken (wall_seconds: the fastest)

    @property
    def compute_per_audio_second(self) -> float:
        """Seconds of compute for each second of audio delivered (per item in a batch)."""
        return self.wall_seconds / (self.audio_seconds * self.batch)

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.wall_seconds / self.steps


class _PeakMemory:
    """Peak resident memory (CPU) or peak allocated memory (CUDA) over a block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    @contextmanager
    def measure(self) -> Iterator[None]:
        self.peak = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        stop = threading.Event()

        def sample() -> None:
            page = os.sysconf("SC_PAGE_SIZE")
            while not stop.is_set():
                with open("/proc/self/statm") as f:
                    self.peak = max(self.peak, int(f.read().split()[1]) * page)
                stop.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield
        finally:
            stop.set()
            sampler.join()


def _classic(model: Any, tokenizer: Any, batch: int, seconds: float, frame_rate: int, codebooks: int) -> int:
    """The recipe from the transformers docs: ``generate`` with sampling and guidance."""
    inputs = tokenizer(PROMPTS[:batch], return_tensors="pt", padding=True).to(model.device)
    steps = round(seconds * frame_rate) + codebooks - 1
    with torch.inference_mode():
        model.generate(
            **inputs,
            do_sample=True,
            guidance_scale=SAMPLING.guidance,
            top_k=SAMPLING.top_k,
            temperature=SAMPLING.temperature,
            max_new_tokens=steps,
        )
    return steps


def _ours(engine: MusicGenEngine, batch: int, seconds: float) -> int:
    steps = 0

    def count(done: int, total: int) -> None:
        nonlocal steps
        steps = total

    requests = [
        GenerationRequest(p, duration=seconds, sampling=SAMPLING, seed=i)
        for i, p in enumerate(PROMPTS[:batch])
    ]
    engine.generate(requests, progress=count)
    return steps


def _timed(
    setup: str, batch: int, seconds: float, memory: _PeakMemory, run: Callable[[], int], repeat: int
) -> Row:
    """The fastest of ``repeat`` runs (a shared machine only ever adds time), and the highest peak."""
    return _timed_together([(setup, batch, run)], seconds, memory, repeat)[0]


def _timed_together(
    runs: list[tuple[str, int, Callable[[], int]]], seconds: float, memory: _PeakMemory, repeat: int
) -> list[Row]:
    """Each run's fastest of ``repeat``, the runs taken in turn (one, four, one, four...), so that a
    slow spell of a shared machine falls on both sides of a ratio rather than on one."""
    walls: list[list[float]] = [[] for _ in runs]
    peaks, steps = [0] * len(runs), [0] * len(runs)
    for _ in range(repeat):
        for i, (_setup, _batch, run) in enumerate(runs):
            gc.collect()
            with memory.measure():
                started = time.perf_counter()
                steps[i] = run()
                if memory.device.type == "cuda":
                    torch.cuda.synchronize()
                walls[i].append(time.perf_counter() - started)
            peaks[i] = max(peaks[i], memory.peak)
    rows = []
    for (setup, batch, _run), wall, peak, count in zip(runs, walls, peaks, steps, strict=True):
        row = Row(setup, batch, seconds, min(wall), count, peak / 1e9, tuple(wall))
        log.info("%s batch %d: %.2f s per audio second", setup, batch, row.compute_per_audio_second)
        rows.append(row)
    return rows


async def _loop_lag(engine: MusicGenEngine, seconds: float) -> list[float]:
    """Gaps seen by a 10 ms ticker on the event loop while the worker thread generates."""
    worker = GenerationWorker(lambda _key: engine)
    await worker.start("bench")
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last - 0.01)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        await worker.generate(
            [GenerationRequest(PROMPTS[0], duration=seconds, sampling=SAMPLING, seed=0)],
            progress=lambda d, t: None,
        )
    finally:
        done.set()
        await ticker
    worker._engine = None  # the bench keeps the engine; the worker must not release it
    await worker.close()
    return gaps


def run_bench(
    *,
    arch: str = "small",
    seconds: float = 5.0,
    device: str = "auto",
    classic: bool = True,
    repeat: int = 1,
    out: Path | None = None,
    model: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Build the architecture with random weights, time every setup, print the table, write the figures."""
    placement = choose_placement(device, "auto")
    fast_dtype = placement.dtype
    if model is None:
        print(f"building musicgen-{arch} with random weights...", flush=True)
        model = build_model(architecture(arch))
    net: Any
    net, tokenizer = model
    config = net.config
    frame_rate = config.audio_encoder.frame_rate
    # the delay pattern's extra steps: one per codebook of a channel (stereo interleaves two channels)
    codebooks = config.decoder.num_codebooks // getattr(config.decoder, "audio_channels", 1)
    params = sum(p.numel() for p in net.parameters())
    memory = _PeakMemory(placement.device)
    rows: list[Row] = []
    read_speed = [_read_speed(placement.device)]

    def classic_run(batch: int, dtype: torch.dtype, label: str) -> None:
        place_model(net, Placement(placement.device, dtype))
        net.decoder.set_attn_implementation("sdpa")  # what a user of the docs' recipe gets
        rows.append(
            _timed(
                label,
                batch,
                seconds,
                memory,
                lambda: _classic(net, tokenizer, batch, seconds, frame_rate, codebooks),
                repeat,
            )
        )

    if classic:
        classic_run(1, torch.float32, "classic: transformers generate, fp32")
    if fast_dtype != torch.float32 or not classic:
        classic_run(1, fast_dtype, f"transformers generate, {_name(fast_dtype)}")
    place_model(net, Placement(placement.device, fast_dtype))
    net.decoder.set_attn_implementation("eager" if placement.device.type == "cpu" else "sdpa")
    # (placement, CUDA graphs): on CUDA, the device steps with and without their graphs
    setups = [(placement, placement.device.type == "cuda")]
    if placement.device.type == "cuda":
        setups.append((placement, False))
    if placement.device.type == "cpu" and fast_dtype == torch.bfloat16 and native.load() is not None:
        # what the native kernels buy: the same steps on torch's kernels (what a host without g++ gets)
        setups.append((replace(placement, kernels=False), False))
    if placement.device.type == "cpu" and int8_supported():
        setups.append((Placement(placement.device, fast_dtype, int8_steps=True), False))
    engine = None
    for setup, graphs in setups:
        engine = MusicGenEngine(net, tokenizer, name=arch, source="random weights", placement=setup)
        if engine.graphs and not graphs:
            engine.graphs = False
        elif engine.graphs and not engine.check_graphs():
            print("CUDA graphs failed their check: the graph rows run eager device steps", flush=True)
        _ours(engine, 1, 1.0)  # warm-up: weights gathered, kernels chosen, graphs captured
        runs: list[tuple[str, int, Callable[[], int]]] = [
            (_label(setup, engine), batch, partial(_ours, engine, batch, seconds)) for batch in (1, 4)
        ]
        rows.extend(_timed_together(runs, seconds, memory, repeat))
        if (setup, graphs) != setups[-1]:
            engine.close_steps()
    assert engine is not None
    read_speed.append(_read_speed(placement.device))
    gaps = asyncio.run(_loop_lag(engine, min(seconds, 3.0)))
    lag_p99 = statistics.quantiles(gaps, n=100)[98] * 1000 if len(gaps) > 1 else float("nan")

    figures = {
        "architecture": f"musicgen-{arch}",
        "parameters": params,
        "device": _device_name(placement.device),
        "threads": torch.get_num_threads(),
        "audio_seconds": seconds,
        "repeat": repeat,
        "sampling": asdict(SAMPLING),
        "rows": [
            {
                **asdict(r),
                "compute_per_audio_second": r.compute_per_audio_second,
                "ms_per_step": r.ms_per_step,
            }
            for r in rows
        ],
        "event_loop_lag_p99_ms": lag_p99,
        "memory_read_gb_per_s": read_speed,
    }
    print(format_table(rows, figures))
    if out is not None:
        out.write_text(json.dumps(figures, indent=2))
        print(f"figures written to {out}")
    return figures


def format_table(rows: list[Row], figures: dict[str, Any]) -> str:
    base = next((r for r in rows if r.setup.startswith("classic")), rows[0])
    lines = [
        f"{figures['architecture']} ({figures['parameters'] / 1e6:.0f} M parameters, random weights) on "
        f"{figures['device']}, {figures['threads']} threads; "
        f"{figures['audio_seconds']:g} s of audio, guidance 3, top_k 250, best of {figures['repeat']} runs",
        "",
        f"| {'setup':<40} | batch | compute s / audio s | ms / step | speed-up | peak memory |",
        f"|{'-' * 42}|-------|---------------------|-----------|----------|-------------|",
    ]
    for r in rows:
        lines.append(
            f"| {r.setup:<40} | {r.batch:>5} | {r.compute_per_audio_second:>19.2f} | {r.ms_per_step:>9.1f} | "
            f"{base.compute_per_audio_second / r.compute_per_audio_second:>7.1f}x | "
            f"{r.peak_memory_gb:>8.2f} GB |"
        )
    lines.append("")
    for setup in dict.fromkeys(r.setup for r in rows if r.setup.startswith("ours")):
        one = next(r for r in rows if r.setup == setup and r.batch == 1)
        four = next((r for r in rows if r.setup == setup and r.batch == 4), None)
        if four is not None:
            gain = one.compute_per_audio_second / four.compute_per_audio_second
            line = f"{setup}: a batch of 4 gives {gain:.1f}x the throughput of one request"
            paired = paired_gains(one, four)
            if len(paired) > 1:
                line += (
                    f" (run by run, taken in turn: {min(paired):.1f}-{max(paired):.1f}x,"
                    f" median {statistics.median(paired):.1f}x)"
                )
            lines.append(line)
    lines.append(f"event-loop lag p99 while the worker generates: {figures['event_loop_lag_p99_ms']:.1f} ms")
    start, end = figures["memory_read_gb_per_s"]
    if start is not None and end is not None:
        lines.append(
            f"memory read speed (torch.sum over 256 MB): {start:.0f} GB/s before the runs, {end:.0f} after;"
            " one bf16 request is bound by it, so compare runs made at like speeds"
        )
    return "\n".join(lines)


def paired_gains(one: Row, four: Row) -> list[float]:
    """Four's throughput against one's for each pair of runs taken in turn. One request's step is bound
    by the memory and four's much less, so on a host whose memory speed swings the fastest runs of each
    can come from different spells; the pairs show how far that moves the ratio."""
    return [(a / one.batch) / (b / four.batch) for a, b in zip(one.walls, four.walls, strict=False)]


def _read_speed(device: torch.device) -> float | None:
    """GB/s of the fastest of three sums over 256 MB: on a shared host it moves, and a one-request bf16
    step (its weights read once) with it, so runs compare only at like read speeds."""
    if device.type != "cpu":
        return None
    data = torch.ones(64 * 2**20)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * data.element_size() / best / 1e9


def _label(setup: Placement, engine: MusicGenEngine) -> str:
    if setup.device.type == "cuda":
        return f"ours, {setup.label}, " + ("CUDA graphs" if engine.graphs else "eager device steps")
    return f"ours, {setup.label}" + ("" if setup.kernels else " (torch kernels)")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"
