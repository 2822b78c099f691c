"""``musicbot bench --parts``: the int8 decoding step's parts timed apart, one request's rows against
four's, on a real shape with random weights.

What a batch adds to a step is its rows' attention (each row reads its own caches, every step) and the
products' per-row work; the weight stream is shared. The speed table gives the whole; this gives the
parts, from a small C++ program (``kernels/step_parts.cpp``) linked against our kernels' library, so
that no interpreter time falls between them: each layer's products alone, then with the self-attention
after them, with the same caches only read (the memory's floor for the attention), and with the text's
attention. The attention runs at the pass's middle position, where a step's attention costs its
average over the pass.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from generation import native, native_api
from generation.random_models import architecture

SOURCE = native.KERNELS_DIR / "step_parts.cpp"
ROWS = (2, 8)  # one request and four, each with guidance's unconditional twin
TEXT = 20  # text positions: the bench's prompts, as its random tokenizer splits them


def run_parts(
    *,
    arch: str = "small",
    seconds: float = 5.0,
    repeat: int = 5,
    out: Path | None = None,
    shape: dict[str, int] | None = None,
    rows: tuple[int, ...] = ROWS,
) -> dict[str, Any] | None:
    """Time the parts for ``arch`` (or ``shape``: layers, hidden, heads, ffn, outputs, text, position),
    print the table, write the figures; None (with the reason printed) where our int8 kernels do not run."""
    custom = shape is not None
    kernels = native.load()
    if kernels is None or not kernels.int8:
        print("bench --parts times our int8 kernels, which do not run here (see the log above)")
        return None
    if shape is None:
        decoder = architecture(arch)["decoder"]
        frames = round(seconds * 50)  # MusicGen's 50 frames a second
        shape = {
            "layers": decoder["num_hidden_layers"],
            "hidden": decoder["hidden_size"],
            "heads": decoder["num_attention_heads"],
            "ffn": decoder["ffn_dim"],
            "outputs": decoder["num_codebooks"] * decoder["vocab_size"],
            "text": TEXT,
            "position": frames // 2,
        }
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="musicbot-parts-") as work:
        program = _build(kernels, Path(work))
        order = ("layers", "hidden", "heads", "ffn", "outputs", "text", "position")
        args = [*(shape[k] for k in order), repeat, int(kernels.amx_int8), threads, *rows]
        run = subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(f"the parts program failed: {run.stderr.strip()[-500:]}")
    figures: dict[str, Any] = {"architecture": "custom" if custom else arch, **shape}
    figures.update(json.loads(run.stdout))
    print(format_parts(figures))
    if out is not None:
        out.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {out}")
    return figures


def _build(kernels: native.NativeKernels, work: Path) -> Path:
    """The program, compiled for this CPU against the loaded library (found again at run time by rpath)."""
    (work / "interface.h").write_text(native_api.render_header())
    program = work / "step_parts"
    library = kernels.path
    flags = [f for f in native.build_flags() if f not in ("-shared", "-fPIC")]
    command = ["g++", *flags, f"-I{work}", str(SOURCE), str(library), f"-Wl,-rpath,{library.parent}"]
    built = subprocess.run([*command, "-o", str(program)], capture_output=True, text=True, timeout=300)
    if built.returncode != 0:
        raise RuntimeError(f"building the parts program failed: {built.stderr.strip()[-500:]}")
    return program


def format_parts(figures: dict[str, Any]) -> str:
    """The table: a step's parts in ms at each row count, the attention's rate against its floor."""
    tiles = "AMX tiles" if figures["amx"] else "vector dot products"
    lines = [
        f"The int8 step's parts ({figures['architecture']}: {figures['layers']} layers, hidden"
        f" {figures['hidden']}; products on {tiles},"
        f" {figures['threads']} threads): the self-attention at position {figures['position']}, the text"
        f" attention over {figures['text']} positions; best of the runs, ms a step",
        "",
        "| rows | products | self-attention | reading its caches | text attention | products' GB/s |"
        " attention's GB/s | reading's GB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in figures["results"]:
        rate = figures["weight_bytes"] / r["products_ms"] / 1e6
        attention = r["cache_bytes"] / r["self_attention_ms"] / 1e6 if r["self_attention_ms"] > 0 else 0.0
        reading = r["cache_bytes"] / r["reading_ms"] / 1e6 if r["reading_ms"] > 0 else 0.0
        lines.append(
            f"| {r['rows']} | {r['products_ms']:.2f} | {r['self_attention_ms']:.2f} | {r['reading_ms']:.2f} |"
            f" {r['text_attention_ms']:.2f} | {rate:.1f} | {attention:.1f} | {reading:.1f} |"
        )
    return "\n".join(lines)
