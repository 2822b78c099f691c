"""The quality guard beside the speed table: how far each fast dtype's decoding steps stray from fp32.

Two figures per dtype on a real shape with random weights (what a speed-up may cost, not what music
sounds like): the relative error of the logits against fp32 when every dtype is fed the same tokens
(teacher forcing), and the agreement of greedy codes with bf16's (the default where bf16 is native) over
a long run, where one flipped code changes everything after it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from generation.engine import MusicGenEngine
from generation.loader import Placement, choose_placement, int8_supported, place_model
from generation.random_models import architecture, build_model
from generation.request import GenerationRequest, SamplingParams

PROMPTS = ["calm lo-fi piano with rain", "epic orchestral soundtrack, strings and brass"]
GREEDY = SamplingParams(top_k=1)


@dataclass(frozen=True)
class Quality:
    dtype: str
    logits_error_mean: float  # relative (Frobenius) error of a step's logits against fp32, mean over steps
    logits_error_worst: float  # ... the worst step
    agreement_with_bf16: float  # share of greedy codes equal to bf16's
    first_difference: int | None  # the first step whose greedy codes differ from bf16's (None: none)
    seconds: float


def run_quality(
    *,
    arch: str = "small",
    logit_steps: int = 100,
    greedy_steps: int = 500,
    out: Path | None = None,
    model: tuple[Any, Any] | None = None,
) -> list[Quality]:
    """fp32, int8 (where fbgemm runs) and bf16 steps on one model, in that order (each placement casts
    the shared weights, and fp32 must see them unrounded). Prints the table, writes the figures."""
    if model is None:
        print(f"building musicgen-{arch} with random weights...", flush=True)
        model = build_model(architecture(arch))
    net, tokenizer = model
    cpu = torch.device("cpu")
    setups = [("float32", Placement(cpu, torch.float32))]
    if int8_supported():
        setups.append(("int8", Placement(cpu, choose_placement("cpu", "int8").dtype, int8_steps=True)))
    setups.append(("bfloat16", Placement(cpu, torch.bfloat16)))
    generator = torch.Generator().manual_seed(0)
    logits: dict[str, torch.Tensor] = {}
    codes: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    tokens: torch.Tensor | None = None
    for label, placement in setups:
        print(f"  {label}: {logit_steps} teacher-forced steps, {greedy_steps} greedy steps", flush=True)
        started = time.perf_counter()
        place_model(net, placement)
        engine = MusicGenEngine(net, tokenizer, name=arch, source="random weights", placement=placement)
        if tokens is None:
            vocab = net.config.decoder.vocab_size
            tokens = torch.randint(
                0, vocab, (len(PROMPTS), engine.codebooks, logit_steps), generator=generator
            )
        logits[label] = _teacher_forced(engine, tokens)
        codes[label] = _greedy(engine, greedy_steps)
        seconds[label] = time.perf_counter() - started
        engine.close_steps()
    results = [
        _compare(label, logits[label], logits["float32"], codes[label], codes["bfloat16"], seconds[label])
        for label, _ in setups
    ]
    print(format_quality(results, arch, logit_steps, greedy_steps))
    if out is not None:
        figures = {
            "architecture": f"musicgen-{arch}",
            "logit_steps": logit_steps,
            "greedy_steps": greedy_steps,
            "dtypes": [asdict(r) for r in results],
        }
        out.write_text(json.dumps(figures, indent=2))
        print(f"figures written to {out}")
    return results


def _teacher_forced(engine: MusicGenEngine, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``(steps + 1, rows, codebooks, vocab)`` for the given tokens, guided rows included."""
    rows, codebooks, steps = tokens.shape
    with torch.inference_mode():
        conditioning = engine._condition(PROMPTS, GenerationRequest(PROMPTS[0]))
        start = torch.full((rows, codebooks, 1), engine.pad_token)
        out = [conditioning.prefill(start, steps + 1)]
        out += [conditioning.step(tokens[:, :, t]) for t in range(steps)]
    return torch.stack(out).float()


def _greedy(engine: MusicGenEngine, steps: int) -> torch.Tensor:
    """Greedy codes ``(rows, steps)`` per codebook, in step order (the delay pattern's columns)."""
    frames = steps - engine.channel_codebooks + 1
    with torch.inference_mode():
        conditioning = engine._condition(PROMPTS, GenerationRequest(PROMPTS[0], sampling=GREEDY))
        generators = [torch.Generator() for _ in PROMPTS]
        codes, _ = engine._decode(conditioning, None, frames, GREEDY, generators, lambda: None, None)
    return codes


def _compare(
    label: str,
    logits: torch.Tensor,
    reference: torch.Tensor,
    codes: torch.Tensor,
    bf16_codes: torch.Tensor,
    seconds: float,
) -> Quality:
    steps = logits.shape[0]
    errors = (logits - reference).reshape(steps, -1).norm(dim=1) / reference.reshape(steps, -1).norm(dim=1)
    same = (codes == bf16_codes).reshape(-1, codes.shape[-1]).all(dim=0)  # per frame, every row and codebook
    differ = (~same).nonzero()
    return Quality(
        dtype=label,
        logits_error_mean=float(errors.mean()),
        logits_error_worst=float(errors.max()),
        agreement_with_bf16=float((codes == bf16_codes).float().mean()),
        first_difference=int(differ[0]) if len(differ) else None,
        seconds=seconds,
    )


def format_quality(results: list[Quality], arch: str, logit_steps: int, greedy_steps: int) -> str:
    lines = [
        f"Quality guard, musicgen-{arch} (random weights): logits against fp32 over {logit_steps}"
        f" teacher-forced steps; greedy codes against bf16 over {greedy_steps} steps",
        "",
        "| dtype | logits error, mean | logits error, worst step | greedy codes equal to bf16's |"
        " first differing frame |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        first = "none" if r.first_difference is None else str(r.first_difference)
        lines.append(
            f"| {r.dtype} | {100 * r.logits_error_mean:.2f} % | {100 * r.logits_error_worst:.2f} % |"
            f" {100 * r.agreement_with_bf16:.1f} % | {first} |"
        )
    return "\n".join(lines)
