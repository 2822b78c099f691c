"""Whole processes from the start: the classic transformers recipe as a script against ``musicbot
generate``, both on the same checkpoint directory, one fresh process per run, side by side.

What a person waits for, from typing the command to having the file: interpreter and imports, loading,
preparing, generating and writing. Each of our runs reports its stages (``musicbot generate --timings``);
the classic script reports its own. With ``drop_caches`` the page cache is emptied before every run
(root only), so the weights come from the disk as after a reboot.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROMPT = "calm lo-fi piano with rain"

# The recipe of the MusicGen model cards: from_pretrained in fp32, generate with sampling and guidance,
# write the first track. Run as its own process, it times its stages the way ours do.
CLASSIC = """
import json, sys, time
started = time.perf_counter()
import soundfile, torch
from transformers import AutoTokenizer, MusicgenForConditionalGeneration
imported = time.perf_counter()
model = MusicgenForConditionalGeneration.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
loaded = time.perf_counter()
inputs = tokenizer([sys.argv[4]], return_tensors="pt", padding=True)
frames = int(float(sys.argv[2]) * model.config.audio_encoder.frame_rate)
audio = model.generate(**inputs, do_sample=True, guidance_scale=3.0, max_new_tokens=frames)
generated = time.perf_counter()
soundfile.write(sys.argv[3], audio[0].T.numpy(), model.config.audio_encoder.sampling_rate)
written = time.perf_counter()
print("timings: " + json.dumps({"start-up": imported - started, "load": loaded - imported,
      "generation": generated - loaded, "write": written - generated}))
"""


@dataclass
class ProcessRun:
    setup: str
    wall_seconds: float
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def interpreter(self) -> float:
        """What the stages do not cover: the interpreter's own start-up and exit."""
        return self.wall_seconds - sum(self.stages.values())


def run_cold_bench(
    model_dir: Path, seconds: float, dtypes: list[str], repeat: int, drop_caches: bool, out: Path
) -> list[ProcessRun]:
    """The classic script once per ``repeat`` and ``musicbot generate`` once per dtype and ``repeat``; the
    fastest run of each counts. Prints the table and writes the figures to ``out``."""
    setups: list[tuple[str, list[str]]] = [
        ("classic: transformers generate, fp32", [sys.executable, "-c", CLASSIC]),
    ]
    for dtype in dtypes:
        setups.append((f"musicbot generate --dtype {dtype}", _ours(dtype)))
    runs: list[ProcessRun] = []
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "out.wav"
        for label, command in setups:
            best: ProcessRun | None = None
            for _ in range(repeat):
                if drop_caches:
                    _drop_page_cache()
                run = _timed_process(label, command, model_dir, seconds, output)
                best = run if best is None or run.wall_seconds < best.wall_seconds else best
            assert best is not None
            runs.append(best)
            print(f"  {label}: {best.wall_seconds:.1f} s", file=sys.stderr)
    print(format_cold_table(runs, seconds, drop_caches))
    out.write_text(
        json.dumps(
            {
                "audio_seconds": seconds,
                "page_cache_dropped": drop_caches,
                "cpu": cpu_name(),
                "runs": [{**asdict(r), "interpreter": r.interpreter} for r in runs],
            },
            indent=2,
        )
    )
    return runs


def _ours(dtype: str) -> list[str]:
    return [sys.executable, "-m", "bot", "generate", "--dtype", dtype, "--device", "cpu", "--timings"]


def _timed_process(
    label: str, command: list[str], model_dir: Path, seconds: float, output: Path
) -> ProcessRun:
    if command[1] == "-c":  # the classic script takes its arguments positionally
        argv = [*command, str(model_dir), str(seconds), str(output), PROMPT]
    else:
        argv = [*command, PROMPT, "--model", str(model_dir), "--duration", str(seconds), "-o", str(output)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise RuntimeError(f"{label} failed ({done.returncode}): {last[0].strip()}")
    return ProcessRun(label, wall, parse_timings(done.stderr + done.stdout))


def parse_timings(text: str) -> dict[str, float]:
    """The stages of the last ``timings:`` line: ours (``stage 1.23 s, ...``) or the classic script's JSON."""
    lines = [line for line in text.splitlines() if line.startswith("timings: ")]
    if not lines:
        return {}
    body = lines[-1].removeprefix("timings: ")
    if body.startswith("{"):
        return {k: float(v) for k, v in json.loads(body).items()}
    return {m[1]: float(m[2]) for m in re.finditer(r"([a-z][a-z -]*?) ([0-9.]+) s(?:,|$)", body)}


def format_cold_table(runs: list[ProcessRun], seconds: float, drop_caches: bool) -> str:
    stages = ["start-up", "imports", "load", "prepare", "first step", "generation", "write"]
    base = runs[0].wall_seconds
    cache = "page cache dropped before each run" if drop_caches else "page cache warm"
    lines = [
        f"Whole process for {seconds:g} s of audio, {cpu_name()}, {cache} (seconds):",
        "",
        "| setup | whole process | interpreter | " + " | ".join(stages) + " | speed-up |",
        "|---" * (len(stages) + 4) + "|",
    ]
    for run in runs:
        cells = [f"{run.stages[s]:.2f}" if s in run.stages else "" for s in stages]
        lines.append(
            f"| {run.setup} | {run.wall_seconds:.1f} | {run.interpreter:.2f} | "
            + " | ".join(cells)
            + f" | {base / run.wall_seconds:.1f}x |"
        )
    lines.append("")
    lines.append(
        "ready to generate = load + prepare (ours; the classic recipe prepares nothing before its loop)."
    )
    return "\n".join(lines)


def _drop_page_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as exc:
        raise RuntimeError(f"cannot drop the page cache (it needs root): {exc}") from None


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, for a figure's caption (this module imports no torch)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
