"""Load a MusicGen checkpoint (hub id or local directory) on the right device in the right dtype."""

from __future__ import annotations

import ctypes
import logging
import socket
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from generation.errors import ModelLoadError, ModelUnavailable

log = logging.getLogger(__name__)

MODEL_TYPES = ("musicgen", "musicgen_melody")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """Where the model runs, its weights' dtype, whether decoding steps use int8 weights, and whether a
    CPU may use the native kernels (``generation.native``: bf16 steps and EnCodec's residual blocks;
    torch's own otherwise)."""

    device: torch.device
    dtype: torch.dtype
    int8_steps: bool = False
    kernels: bool = True

    @property
    def label(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        return f"int8 steps + {name}" if self.int8_steps else name


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(
        flag
        for line in text.splitlines()
        if line.startswith("flags")
        for flag in line.split(":", 1)[1].split()
    )


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 dot products (avx512_bf16 / AMX): bf16 is then the fast dtype."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def bf16_is_fast(kernels: bool = True) -> bool:
    """Whether bf16 is this CPU's fast dtype: native bf16 dot products, or our kernels (where ``kernels``
    allows them) built for it. On a CPU with AVX2 alone (kernels/avx2.h) their bf16 products are fp32
    FMAs over half fp32's bytes, about 6x float32's steps (docs/engine.md)."""
    from generation import native  # it imports this module

    return cpu_supports_bf16() or (kernels and native.load() is not None)


def cpu_has_vnni() -> bool:
    """VNNI int8 dot products accumulate in 32 bits, so int8 activations can use their full range."""
    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


def int8_supported() -> bool:
    """fbgemm's int8 kernels (x86-64) back the int8 decoding steps."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def choose_placement(device: str = "auto", dtype: str = "auto", kernels: bool = True) -> Placement:
    """``auto``: CUDA when present (bf16, else fp16), else the CPU in bf16 where that is fast (native bf16,
    or our kernels unless ``kernels`` is False: ``bf16_is_fast``), else fp32.

    ``cuda:N`` picks one GPU of several (one worker process per GPU).
    """
    index = _cuda_index(device)
    if device not in ("auto", "cpu", "cuda") and index is None:
        raise ModelLoadError(device, f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(device, f"the device is {device} but no CUDA GPU is available")
    if index is not None and index >= torch.cuda.device_count():
        raise ModelLoadError(
            device, f"there is no GPU {index}: this machine has {torch.cuda.device_count()} (cuda:0 ...)"
        )
    if index is not None:
        dev = torch.device("cuda", index)
    else:
        dev = torch.device(
            "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        )
    if dtype == "int8":
        if dev.type != "cpu" or not int8_supported():
            raise ModelLoadError(dtype, "int8 decoding steps need a CPU with fbgemm (x86-64); use auto")
        fast = bf16_is_fast(kernels)
        return Placement(dev, torch.bfloat16 if fast else torch.float32, int8_steps=True, kernels=kernels)
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ModelLoadError(
                dtype, f"unknown dtype {dtype!r}: use auto, float32, bfloat16, float16 or int8"
            )
        return Placement(dev, _DTYPES[dtype])
    if dev.type == "cuda":
        return Placement(dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return Placement(dev, torch.bfloat16 if bf16_is_fast(kernels) else torch.float32, kernels=kernels)


def _cuda_index(device: str) -> int | None:
    """N of ``cuda:N``, else None."""
    prefix, _, number = device.partition(":")
    return int(number) if prefix == "cuda" and number.isdigit() else None


def import_model_stack() -> None:
    """Import transformers' MusicGen classes (seconds of imports: done once, and timed on its own)."""
    from transformers import (  # noqa: F401
        AutoConfig,
        AutoTokenizer,
        MusicgenForConditionalGeneration,
        MusicgenMelodyForConditionalGeneration,
    )


def load_checkpoint(source: str, placement: Placement) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a hub id or directory; the checkpoint's ``model_type`` picks the class."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        MusicgenForConditionalGeneration,
        MusicgenMelodyForConditionalGeneration,
    )

    _check_reachable(source)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as exc:
        raise _load_error(source, exc) from None
    except (ValueError, StrictDataclassError) as exc:  # transformers checked the configuration and refused
        cause = exc.__cause__ if isinstance(exc.__cause__, ValueError) else exc
        raise ModelLoadError(source, f"{source} cannot be served: {cause}") from None
    if config.model_type not in MODEL_TYPES:
        raise ModelLoadError(source, f"{source} is a {config.model_type!r} model, not MusicGen")
    cls = _codec_in_fp32(
        MusicgenMelodyForConditionalGeneration
        if config.model_type == "musicgen_melody"
        else MusicgenForConditionalGeneration
    )
    # Eager attention: PyTorch's SDPA kernel is slow on CPU for the single query row of a decoding step.
    attn = "sdpa" if placement.device.type == "cuda" else "eager"
    try:
        model = cls.from_pretrained(source, dtype=placement.dtype, attn_implementation=attn)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise _load_error(source, exc) from None
    try:
        return place_model(model, placement), tokenizer
    except torch.OutOfMemoryError:
        del model
        raise ModelLoadError(source, _does_not_fit(source, placement.device)) from None


def checkpoint_fingerprint(source: str) -> str | None:
    """A text that changes whenever the checkpoint's files do (names, sizes, modification times, and for
    a hub snapshot the content-addressed blobs they point to); None where the files cannot be found."""
    if _is_local(source):
        directory = Path(source).expanduser()
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            config = try_to_load_from_cache(source, "config.json")
        except ValueError:  # not a hub id either (e.g. a model built in memory, named in words)
            return None
        if not isinstance(config, str):
            return None
        directory = Path(config).parent
    try:
        files = sorted(p for p in directory.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
        parts = [str(directory.resolve())]
        for path in files:
            info = path.stat()
            parts.append(f"{path.name}:{path.resolve().name}:{info.st_size}:{info.st_mtime_ns}")
    except OSError:
        return None
    return "\n".join(parts)


def _does_not_fit(source: str, device: torch.device) -> str:
    where = "the machine's memory"
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        where = f"{device}'s memory ({free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB)"
    return (
        f"{source} does not fit in {where}: choose a smaller size (README's model table gives each"
        " one's memory), use another GPU (cuda:N), or free this one"
    )


def dtype_advice(device: str, dtype: str, placement: Placement) -> str | None:
    """What to tell an owner whose ``auto`` choice runs slowly on this machine (None: nothing)."""
    if placement.device.type != "cpu" or dtype != "auto" or placement.dtype != torch.float32:
        return None
    gpu = "no CUDA GPU found; " if device == "auto" else ""
    if not int8_supported():
        return f"{gpu}running on the CPU in float32"
    why = (
        "our kernels did not load (the log above says why; most often: install g++)"
        if placement.kernels
        else "our kernels are off (MUSICBOT_KERNELS=off)"
    )
    return (
        f"{gpu}this CPU has no native bf16 and {why}, so the model runs in float32; int8 decoding steps"
        " (MUSICBOT_DTYPE=int8, or --dtype int8) are several times faster here, with logits within"
        " about 4% of float32's"
    )


@cache
def _codec_in_fp32(cls: type) -> Any:
    """``cls`` loading EnCodec's weights in fp32 straight from the checkpoint whatever the model's dtype
    (a bf16 load would round them first, and EnCodec runs in fp32 for clean audio)."""
    return type(cls.__name__, (cls,), {"_keep_in_fp32_modules_strict": ["audio_encoder"]})


def place_model(model: Any, placement: Placement) -> Any:
    """Move a model to its device and dtype for inference, EnCodec kept in fp32 (clean audio, no measurable
    cost) with its weight norm folded into plain weights (the same values, not recomputed at every call).
    On a CPU the process's allocator is set up for EnCodec's decode (``keep_freed_blocks``)."""
    model.to(placement.device)
    for name, part in model.named_children():  # EnCodec stays as loaded: fp32 (see _codec_in_fp32)
        part.to(torch.float32 if name == "audio_encoder" else placement.dtype)
    _bake_weight_norm(model.audio_encoder)
    if placement.device.type == "cpu":
        keep_freed_blocks()
    return model.eval()


def _bake_weight_norm(module: torch.nn.Module) -> None:
    """Store weight-normed convolution weights as plain weights (the same values, not recomputed per call)."""
    from torch.nn.utils import parametrize

    for sub in module.modules():
        if parametrize.is_parametrized(sub, "weight"):
            parametrize.remove_parametrizations(sub, "weight", leave_parametrized=True)


@lru_cache(maxsize=1)
def glibc() -> ctypes.CDLL | None:
    """The C library, where it is glibc (for its allocator's settings and madvise); else None."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


@lru_cache(maxsize=1)
def keep_freed_blocks() -> None:
    """Have glibc keep freed blocks of up to 32 MB for reuse instead of unmapping them: EnCodec's decode in
    pieces makes new tensors of tens of MB at every layer, and fresh pages cost a fault and a zeroing
    each. Process-wide, once per process; without glibc, nothing."""
    libc = glibc()
    if libc is None:
        return
    mmap_threshold, trim_threshold = -3, -1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    libc.mallopt(mmap_threshold, 32 * 2**20)
    libc.mallopt(trim_threshold, 256 * 2**20)


def quiet_transformers() -> None:
    """transformers warns about the hub checkpoints' own configs and draws bars of its own; ours suffice."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _is_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


def _check_reachable(source: str) -> None:
    """Fail at once, with what to do, when the model is neither local, cached, nor reachable."""
    if _is_local(source):
        path = Path(source).expanduser()
        if not (path / "config.json").is_file():
            raise ModelUnavailable(
                source,
                f"no model at {path}: the directory must hold config.json and the weights "
                "(save one with save_pretrained, or point to a downloaded checkpoint)",
            )
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return  # cached: from_pretrained can work offline
    hint = (
        "download it once where the internet is reachable (it is then cached), or set the size's "
        "MUSICBOT_MODEL_* setting to a local directory that holds the checkpoint"
    )
    if constants.HF_HUB_OFFLINE:
        raise ModelUnavailable(
            source, f"model {source} is not in the local cache and HF_HUB_OFFLINE is set: {hint}"
        )
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as exc:
        raise ModelUnavailable(
            source,
            f"model {source} is not cached and the Hugging Face hub ({host}) cannot be reached ({exc}): "
            f"{hint}; "
            "set HF_HUB_OFFLINE=1 to skip this check",
        ) from None


def _load_error(source: str, exc: OSError) -> ModelLoadError:
    log.debug("loading %s failed", source, exc_info=exc)
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(source, f"could not load {source}: {first_line}")
