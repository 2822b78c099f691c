"""Our own CPU kernels for the decoding step and EnCodec's convolutions (``kernels/``), built on first
use, else None.

The library is compiled with the system's g++ for this very CPU (``-march=native``) into a per-user cache
(``$XDG_CACHE_HOME/musicbot/kernels``, by default under ``~/.cache``) that only this user can write,
under a name keyed by the sources, the generated interface header, the flags, the compiler and the CPU,
and loaded with ctypes. Its interface is declared once, in ``generation.native_api``: the C++ is compiled
against the header generated from it, and every call goes through bindings that check their arguments
against the same declarations. Wherever the library cannot be had (no compiler, no AVX-512 BF16, not
x86-64, a cache another user could write) ``load()`` returns None and the step runs on torch's own
kernels, which give the same results to rounding.

The library links the process's OpenMP runtime (torch's libgomp is already loaded under the same
soname), so its threads are torch's threads, not a second pool competing with them for the cores.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from generation import native_api
from generation.errors import NonFiniteScores
from generation.loader import cpu_flags, glibc
from generation.native_api import StepLayer, StepModel
from generation.private_cache import UnsafeCache, check_private, private_dir

log = logging.getLogger(__name__)

KERNELS_DIR = Path(__file__).with_name("kernels")
SOURCES = (KERNELS_DIR / "decoder.cpp", KERNELS_DIR / "encodec.cpp", KERNELS_DIR / "sampling.cpp")
HEADERS = (KERNELS_DIR / "common.h", KERNELS_DIR / "avx2.h")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# the kernels' own instructions; a CPU without them gets each AVX-512 operation as two AVX2 ones
# (kernels/avx2.h: the same results, the dot products at several instructions each)
AVX512_CPU = ("avx512f", "avx512bw", "avx512_bf16")
REQUIRED_CPU = ("avx2", "fma")
AVX2_FLAGS = (*FLAGS, "-mno-avx512f")  # also for an AVX-512 CPU without BF16: its AVX2 build
MAX_HEADS = native_api.MAX_HEADS
UPSAMPLE_STRIDES = native_api.UPSAMPLE_STRIDES
INT8_EXTRA = 8  # bytes a row that a packed int8 matrix adds: its row's fp32 scale and int32 sum of ints
_build_lock = threading.Lock()


class NativeKernels:
    """The compiled library's kernels as operations on tensors. Each call crosses through
    ``native_api``'s bindings, which check every tensor against the kernel's declaration; the checks here
    add what the declaration cannot know (which dimension is which)."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self.calls = native_api.bind(lib)  # every entry point, each call checked against its declaration
        c = self.calls
        self._pack, self._pack_amx = c["pack_linear_weight"], c["pack_amx_conv"]
        self._linear_avx512, self._linear_amx = c["linear_bf16"], c["linear_amx_bf16"]
        # AMX tiles where the CPU has them and Linux grants them to this process: the products then
        # cost the weight stream alone at any batch. Tests may turn this off.
        self.amx = {"amx_tile", "amx_bf16"} <= cpu_flags() and c["amx_enable"]() == 1
        # 512: built for AVX-512 BF16; 256: for AVX2, each 512-bit operation as two (kernels/avx2.h)
        self.vector_bits = c["vector_bits"]()
        # int8 weights: VNNI's u8 x s8 dot products (every AVX-512 BF16 CPU has them), AMX's where it can;
        # on AVX2 the same exact sums of widened bytes
        self.int8 = self.vector_bits == 256 or "avx512_vnni" in cpu_flags()
        self.amx_int8 = self.amx and "amx_int8" in cpu_flags()
        self._pack_int8 = c["pack_linear_int8"]
        self._linear_int8, self._linear_amx_int8 = c["linear_int8"], c["linear_amx_int8"]
        self._attend, self._cross = c["attend_bf16"], c["cross_attend_bf16"]
        self._cross_int8 = c["cross_attend_int8"]
        self._attend_int8, self._quantize_cache = c["attend_int8"], c["quantize_cache"]
        self._attend_scratch = c["attend_scratch"]
        self._resblock, self._resblock_scratch = c["resblock_f32"], c["resblock_scratch"]
        self._upsample, self._upsample_scratch = c["upsample_f32"], c["upsample_scratch"]
        self._narrow, self._narrow_scratch = c["narrow_conv_f32"], c["narrow_scratch"]
        self._resblock_amx, self._resblock_amx_scratch = c["resblock_amx"], c["resblock_amx_scratch"]
        self._upsample_amx, self._upsample_amx_scratch = c["upsample_amx"], c["upsample_amx_scratch"]
        self._step, self._step_work = c["decoder_step"], c["step_work"]
        self._sample, self._sample_scratch = c["sample_tokens"], c["sample_scratch"]
        self._pack_lstm, self._lstm = c["pack_lstm"], c["lstm_f32"]

    @staticmethod
    def _threads_scratch(floats_per_thread: int) -> tuple[int, torch.Tensor]:
        """torch's thread count and fp32 working memory for a kernel's threads."""
        threads = torch.get_num_threads()
        return threads, torch.empty(threads * floats_per_thread, dtype=torch.float32)

    def pack(self, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """A bf16 ``(N, K)`` weight in the linear kernel's panel layout (N % 32 == 0, K even). ``out``:
        where to write it (contiguous bf16, that shape), else new memory."""
        weight = weight.detach().to(torch.bfloat16).contiguous()
        rows, cols = weight.shape
        if not fits_linear(rows, cols):
            raise ValueError(f"weight {tuple(weight.shape)} does not fit the kernel's blocks")
        packed = torch.empty_like(weight) if out is None else out
        _require(packed, packed.shape == weight.shape, "out")
        self._pack(weight, packed, rows, cols)
        return packed

    def pack_int8(
        self, ints: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """An int8 ``(N, K)`` weight with its fp32 per-row ``scales`` (``W ~ ints * scales[:, None]``) in the
        int8 products' layout: ``(N, K + 8)`` int8 bytes holding the panels, then the scales and each
        row's sum of ints (its rows are not the weight's rows). N % 32 == 0, K % 64 == 0. ``out``: where
        to write it (contiguous, that shape), else new memory."""
        rows, cols = ints.shape
        if not fits_linear_int8(rows, cols):
            raise ValueError(f"weight {tuple(ints.shape)} does not fit the int8 kernel's blocks")
        packed = torch.empty((rows, cols + INT8_EXTRA), dtype=torch.int8) if out is None else out
        _require(packed, packed.shape == (rows, cols + INT8_EXTRA), "out", torch.int8)
        self._pack_int8(ints.contiguous(), scales.float().contiguous(), packed, rows, cols)
        return packed

    @staticmethod
    def packed_shape(packed: torch.Tensor) -> tuple[int, int]:
        """``(N, K)`` of the weight a packed matrix (bf16 from ``pack``, int8 from ``pack_int8``) holds."""
        rows, cols = packed.shape
        return rows, cols - INT8_EXTRA if packed.dtype == torch.int8 else cols

    def linear(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        residual: torch.Tensor | None = None,
        *,
        gelu: bool = False,
    ) -> torch.Tensor:
        """``[GELU](x @ W.T) (+ residual)`` for contiguous bf16 ``x (..., K)``; W as returned by ``pack``
        or ``pack_int8``."""
        rows_out, cols = self.packed_shape(packed)
        _require(x, x.shape[-1] == cols, "x")
        y = x.new_empty((*x.shape[:-1], rows_out))
        if residual is not None:
            _require(residual, residual.shape == y.shape, "residual")
        rows, act, threads = x.numel() // cols, int(gelu), torch.get_num_threads()
        if packed.dtype == torch.int8:
            # the rows quantized to u8, then each row's scale and zero point (two floats)
            scratch = torch.empty(rows * (cols + 8), dtype=torch.uint8)
            kernel = self._linear_amx_int8 if self.amx_int8 else self._linear_int8
            kernel(packed, x, residual, y, scratch, rows, rows_out, cols, act, threads)
            return y
        kernel = self._linear_amx if self.amx and cols % 32 == 0 else self._linear_avx512
        kernel(packed, x, residual, y, rows, rows_out, cols, act, threads)
        return y

    def attend(
        self,
        qkv: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        heads: int,
        position: int,
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write ``position``'s key/value from ``qkv (rows, 1, 3 * heads * D)`` into the position-major
        caches ``(rows, capacity, heads * D)`` bf16 (or int8 ones from ``int8_caches``), then attend over
        0..position; returns ``(rows, heads * D)`` bf16. ``scratch`` from ``attention_scratch`` saves an
        allocation a call (a pass makes thousands)."""
        rows, capacity, _ = keys.shape
        head_dim = _head_dim(keys, heads)
        hidden = heads * head_dim
        _require(keys, 0 <= position < capacity, "keys", keys.dtype)  # int8: whole quads, attend_int8 says
        _require(values, values.shape == keys.shape, "values", keys.dtype)
        _require(qkv, qkv.numel() == rows * 3 * hidden, "qkv")
        out = qkv.new_empty((rows, hidden))
        threads = torch.get_num_threads()
        scratch = self._fit_scratch(scratch, threads * self._attend_scratch(heads, head_dim, capacity))
        kernel = self._attend_int8 if keys.dtype == torch.int8 else self._attend
        kernel(
            qkv,
            keys,
            values,
            out,
            scratch,
            rows,
            heads,
            head_dim,
            capacity,
            position,
            threads,
        )
        return out

    def int8_caches(
        self, keys: torch.Tensor, values: torch.Tensor, heads: int, capacity: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 self-attention caches ``(rows, capacity, hidden + 4 * heads)`` bytes for ``attend`` (half the
        bytes it streams a step), holding the bf16 ``keys``/``values (rows, positions, hidden)`` as their
        first positions (``fill_int8_cache``); ``capacity`` rounded up to whole quads (``int8_values``)."""
        rows, _, hidden = keys.shape
        caches = []
        for source, is_keys in ((keys, True), (values, False)):
            shape = (rows, int8_cache_capacity(capacity), int8_cache_width(hidden, heads))
            cache = torch.empty(shape, dtype=torch.int8)
            self.fill_int8_cache(cache, source, heads, keys=is_keys)
            caches.append(cache)
        return caches[0], caches[1]

    def fill_int8_cache(self, cache: torch.Tensor, source: torch.Tensor, heads: int, *, keys: bool) -> None:
        """Write bf16 ``source (rows, positions, hidden)`` keys (or values) into the first positions of an
        int8 cache ``(rows, capacity, hidden + 4 * heads)``, quantized as ``attend`` quantizes the positions
        it adds: each head of a position to int8 on its own scale (keys offset by 128)."""
        rows, filled, hidden = source.shape
        width = int8_cache_width(hidden, heads)
        fits = hidden % heads == 0 and cache.dim() == 3 and cache.shape[::2] == (rows, width)
        whole = cache.shape[1] % INT8_QUAD == 0 if cache.dim() == 3 else False
        _require(cache, fits and whole and filled <= cache.shape[1], "cache", torch.int8)
        _require(source, True, "source")
        quads = int8_cache_capacity(filled)  # values are written a quad at a time
        for row in range(rows if filled else 0):
            self._quantize_cache(source[row], cache[row, :quads], filled, heads, hidden // heads, int(keys))

    def sample(
        self,
        logits: torch.Tensor,
        draws: torch.Tensor,
        *,
        guided: bool,
        guidance: float,
        temperature: float,
        top_k: int,
    ) -> torch.Tensor:
        """``generation.sampling.choose`` (without top-p) on a step's bf16 ``logits ((2 if guided else 1)
        * rows, codebooks, vocab)`` with guidance applied first: the tokens ``(rows, codebooks)`` int64 for
        ``draws (rows, codebooks)`` fp32 uniform in [0, 1)."""
        rows, codebooks = draws.shape
        vocab = logits.shape[-1]
        _require(logits, logits.shape == ((2 if guided else 1) * rows, codebooks, vocab), "logits")
        _require(draws, True, "draws", torch.float32)
        tokens = torch.empty((rows, codebooks), dtype=torch.int64)
        threads, scratch = self._threads_scratch(self._sample_scratch(vocab))
        broken = self._sample(
            logits, draws, tokens, scratch, rows, int(guided), codebooks, vocab,
            float(guidance), float(temperature), top_k, threads,
        )  # fmt: skip
        if broken:
            raise NonFiniteScores(broken)
        return tokens

    def attention_scratch(self, heads: int, head_dim: int, capacity: int) -> torch.Tensor:
        """Working memory for ``attend`` over caches of ``capacity`` positions, for torch's threads."""
        return torch.empty(
            torch.get_num_threads() * self._attend_scratch(heads, head_dim, capacity), dtype=torch.float32
        )

    @staticmethod
    def _fit_scratch(scratch: torch.Tensor | None, floats: int) -> torch.Tensor:
        if scratch is None or scratch.numel() < floats:  # none given, or the threads have grown since
            return torch.empty(floats, dtype=torch.float32)
        _require(scratch, True, "scratch", torch.float32)
        return scratch

    def cross_attend(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        heads: int,
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``q (rows, 1, heads * D)`` over fixed position-major ``keys``/``values (rows, n,
        heads * D)``, with an additive fp32 ``mask (rows, n)`` or None; returns ``(rows, heads * D)`` bf16.
        ``scratch`` as for ``attend``, from ``attention_scratch(heads, D, n)``."""
        rows, n, hidden = keys.shape
        head_dim = _head_dim(keys, heads)
        _require(values, values.shape == keys.shape, "values")
        _require(q, q.numel() == rows * hidden, "q")
        if mask is not None and (
            mask.dtype != torch.float32 or mask.shape != (rows, n) or not mask.is_contiguous()
        ):
            raise ValueError(f"mask: {mask.dtype} {tuple(mask.shape)} is not a contiguous fp32 ({rows}, {n})")
        out = q.new_empty((rows, hidden))
        threads = torch.get_num_threads()
        scratch = self._fit_scratch(scratch, threads * self._attend_scratch(heads, head_dim, n))
        self._cross(
            q,
            keys,
            values,
            mask,
            out,
            scratch,
            rows,
            heads,
            head_dim,
            n,
            threads,
        )
        return out

    def cross_attend_int8(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        lengths: torch.Tensor,
        heads: int,
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``cross_attend`` over the text's int8 caches ``(rows, capacity, hidden + 4 * heads)`` (from
        ``int8_caches``), row r over its first ``lengths[r]`` positions (int32, 1 .. capacity, and no more
        than the caches were filled with: ``int8_caches`` leaves the rest of the last quad unwritten):
        the mask of a prompt padded to the batch's longest, without reading the padding."""
        rows, capacity, _ = keys.shape
        head_dim = _head_dim(keys, heads)
        hidden = heads * head_dim
        _require(values, values.shape == keys.shape, "values", torch.int8)
        _require(q, q.numel() == rows * hidden, "q")
        fits = lengths.shape == (rows,) and bool(((lengths >= 1) & (lengths <= capacity)).all())
        _require(lengths, fits, "lengths", torch.int32)
        out = q.new_empty((rows, hidden))
        threads = torch.get_num_threads()
        scratch = self._fit_scratch(scratch, threads * self._attend_scratch(heads, head_dim, capacity))
        self._cross_int8(q, keys, values, lengths, out, scratch, rows, heads, head_dim, capacity, threads)
        return out

    def pack_lstm(self, weight_hh: torch.Tensor) -> torch.Tensor:
        """An LSTM layer's recurrent weights ``(4H, H)`` (torch's ``weight_hh``, gates i, f, g, o) in the
        kernel's panels. H % 16 == 0."""
        hidden = weight_hh.shape[1]
        _require(
            weight_hh,
            weight_hh.shape == (4 * hidden, hidden) and hidden % 16 == 0,
            "weight_hh",
            torch.float32,
        )
        packed = torch.empty_like(weight_hh)
        self._pack_lstm(weight_hh, packed, hidden)
        return packed

    def lstm(self, pre: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """One LSTM layer from zero state: the hidden states ``(T, B, H)`` for the input's products plus both
        biases ``pre (T, B, 4H)``, its recurrent weights packed by ``pack_lstm``."""
        steps, rows, gates = pre.shape
        hidden = gates // 4
        _require(pre, gates == 4 * hidden and packed.shape == (gates, hidden), "pre", torch.float32)
        out = pre.new_empty((steps, rows, hidden))
        cell = pre.new_empty((rows, hidden))
        self._lstm(pre, packed, out, cell, steps, rows, hidden, torch.get_num_threads())
        return out

    @staticmethod
    def pack_resblock(conv1: torch.Tensor, conv2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual-block weights ``conv1 (H, C, 3)`` and ``conv2 (C, H, 1)`` in the kernel's order."""
        hidden, channels, _ = conv1.shape
        w1 = conv1.detach().float().reshape(hidden // 4, 4, channels, 3).permute(0, 2, 3, 1).contiguous()
        w2 = conv2.detach().float().reshape(channels // 4, 4, hidden).permute(0, 2, 1).contiguous()
        return w1, w2

    def resblock(
        self, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
    ) -> torch.Tensor:
        """EnCodec's residual block on fp32 ``x (rows, C, T)``, T >= 2: ``x + b2 + W2 ELU(b1 + W1 *
        reflect_pad(ELU(x)))``, the weights as returned by ``pack_resblock``; returns a new tensor."""
        rows, channels, length = x.shape
        hidden = b1.shape[0]
        fp32 = torch.float32
        _require(x, fits_resblock(channels, hidden) and length >= 2, "x", fp32)
        _require(w1, w1.shape == (hidden // 4, channels, 3, 4), "w1", fp32)
        _require(b1, b1.shape == (hidden,), "b1", fp32)
        _require(w2, w2.shape == (channels // 4, hidden, 4), "w2", fp32)
        _require(b2, b2.shape == (channels,), "b2", fp32)
        threads, scratch = self._threads_scratch(self._resblock_scratch(channels, hidden))
        y = torch.empty_like(x)
        self._resblock(
            x,
            y,
            w1,
            b1,
            w2,
            b2,
            scratch,
            rows,
            channels,
            hidden,
            length,
            threads,
        )
        return y

    def pack_amx_conv(self, taps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A convolution's weights as ``taps (J, M, K)`` (tap j: an output-by-input matrix) split into
        the bf16 hi and lo parts of AMX tiles, for ``resblock_amx`` and ``upsample_amx``."""
        taps = taps.detach().float().contiguous()
        count, rows, cols = taps.shape
        if not fits_amx_conv(rows, cols):
            raise ValueError(f"weights {tuple(taps.shape)} do not fit the AMX tiles")
        hi = torch.empty(taps.shape, dtype=torch.bfloat16)
        lo = torch.empty_like(hi)
        self._pack_amx(taps, hi, lo, count, rows, cols)
        return hi, lo

    def resblock_amx(
        self,
        x: torch.Tensor,
        w1: tuple[torch.Tensor, torch.Tensor],
        b1: torch.Tensor,
        w2: tuple[torch.Tensor, torch.Tensor],
        b2: torch.Tensor,
    ) -> torch.Tensor:
        """``resblock`` on AMX tiles, to about 2^-16 of fp32: ``w1`` packed from ``conv1`` as its 3 taps of
        ``(H, C)``, ``w2`` from ``conv2`` as 1 tap of ``(C, H)`` (``pack_amx_conv``)."""
        rows, channels, length = x.shape
        hidden = b1.shape[0]
        fp32 = torch.float32
        _require(x, self.amx and fits_amx_resblock(channels, hidden) and length >= 2, "x", fp32)
        for part in w1:
            _require(part, part.shape == (3, hidden, channels), "w1")
        for part in w2:
            _require(part, part.shape == (1, channels, hidden), "w2")
        _require(b1, b1.shape == (hidden,), "b1", fp32)
        _require(b2, b2.shape == (channels,), "b2", fp32)
        threads, scratch = self._threads_scratch(self._resblock_amx_scratch(channels, hidden))
        y = torch.empty_like(x)
        self._resblock_amx(
            x, y, w1[0], w1[1], b1,
            w2[0], w2[1], b2, scratch,
            rows, channels, hidden, length, threads,
        )  # fmt: skip
        return y

    def upsample_amx(
        self,
        x: torch.Tensor,
        w: tuple[torch.Tensor, torch.Tensor],
        b: torch.Tensor,
        stride: int,
        left: int,
        *,
        activate: bool,
    ) -> torch.Tensor:
        """EnCodec's transposed convolution of ``stride`` S and kernel 2S on fp32 ``x (rows, Cin, T)`` (or on
        ``ELU(x)``) on AMX tiles, to about 2^-16 of fp32, its S samples of padding trimmed (``left`` at the
        start): ``(rows, Cout, S T)``. ``w`` from ``pack_upsample_amx``."""
        rows, cin, length = x.shape
        cout = b.shape[0]
        fp32 = torch.float32
        fits = self.amx and fits_amx_conv(cout, cin) and length > 0 and stride > 0 and 0 <= left <= stride
        _require(x, fits, "x", fp32)
        for part in w:
            _require(part, part.shape == (2 * stride, cout, cin), "w")
        _require(b, b.shape == (cout,), "b", fp32)
        threads, scratch = self._threads_scratch(self._upsample_amx_scratch(cin, cout, stride))
        y = torch.empty((rows, cout, stride * length), dtype=fp32)
        self._upsample_amx(
            x, y, w[0], w[1], b, scratch,
            rows, cin, cout, length, stride, left, int(activate), threads,
        )  # fmt: skip
        return y

    def pack_upsample_amx(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A transposed convolution's ``weight (Cin, Cout, 2S)`` as ``upsample_amx``'s taps: for each phase
        r, ``W[:, :, r]`` (on x[q]) then ``W[:, :, r + S]`` (on x[q - 1]), each (Cout, Cin)."""
        stride = weight.shape[-1] // 2
        order = [tap for r in range(stride) for tap in (r, r + stride)]
        return self.pack_amx_conv(weight.detach().float().permute(2, 1, 0)[order])

    @staticmethod
    def pack_upsample(weight: torch.Tensor) -> torch.Tensor:
        """A transposed convolution's ``weight (Cin, Cout, 2S)`` in ``upsample``'s order: for each 16 output
        channels, each input channel's 2S taps as vectors of the 16 (zeros past Cout)."""
        cin, cout, taps = weight.shape
        blocks = -(-cout // 16)
        padded = torch.zeros(blocks * 16, cin, taps, dtype=torch.float32)
        padded[:cout] = weight.detach().float().permute(1, 0, 2)
        return padded.reshape(blocks, 16, cin, taps).permute(0, 2, 3, 1).contiguous()

    def upsample(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride: int, left: int, *, activate: bool
    ) -> torch.Tensor:
        """EnCodec's transposed convolution of ``stride`` S and kernel 2S on fp32 ``x (rows, Cin, T)``, or on
        ``ELU(x)`` with ``activate``, its S samples of padding trimmed (``left`` at the start): ``(rows,
        Cout, S T)``. ``w`` from ``pack_upsample``."""
        rows, cin, length = x.shape
        cout = b.shape[0]
        fp32 = torch.float32
        fits = fits_upsample(cin, cout, 2 * stride, stride) and length > 0 and 0 <= left <= stride
        _require(x, fits, "x", fp32)
        _require(w, w.shape == (-(-cout // 16), cin, 2 * stride, 16), "w", fp32)
        _require(b, b.shape == (cout,), "b", fp32)
        threads, scratch = self._threads_scratch(self._upsample_scratch(cin))
        y = torch.empty((rows, cout, stride * length), dtype=fp32)
        self._upsample(
            x, y, w, b, scratch,
            rows, cin, cout, length, stride, left, int(activate), threads,
        )  # fmt: skip
        return y

    def narrow_conv(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, left: int, *, activate: bool
    ) -> torch.Tensor:
        """A convolution to a few channels over fp32 ``x (rows, C, T)`` (or ``ELU(x)`` with ``activate``)
        reflect-padded by ``left`` samples before and ``K - 1 - left`` after: ``(rows, O, T)`` for
        ``w (O, C, K)``."""
        rows, channels, length = x.shape
        outs, _, taps = w.shape
        fp32 = torch.float32
        fits = fits_narrow(outs, taps) and 0 <= left < taps and length > max(left, taps - 1 - left)
        _require(x, fits, "x", fp32)
        _require(w, w.shape[1] == channels, "w", fp32)
        _require(b, b.shape == (outs,), "b", fp32)
        threads, scratch = self._threads_scratch(self._narrow_scratch(channels))
        y = torch.empty((rows, outs, length), dtype=fp32)
        self._narrow(
            x, y, w, b, scratch,
            rows, channels, outs, taps, length, left, int(activate), threads,
        )  # fmt: skip
        return y


class NativeStep:
    """One decoding pass's whole step as one ``decoder_step`` call (embeddings, every layer, the LM
    heads): the tensors it reads are checked once here, the tokens and position at every step.

    ``layers`` holds per layer ``ln1``/``ln2``/``ln3`` as (weight, bias, eps) (``ln2`` None without
    cross-attention), the packed ``qkv``, ``out``, ``cross_q``, ``cross_out``, ``fc1`` (followed by exact
    GELU), ``fc2``, the self-attention ``keys``/``values`` (rows, capacity, hidden) bf16 (int8 weights
    take the int8 caches of ``int8_caches``) and, with cross-attention, ``cross_keys``/``cross_values``
    (cross_rows, text, hidden) bf16, under ``cross_mask`` or, with ``cross_lengths``, each row over its
    first ``cross_lengths[row]`` positions; with int8 weights and lengths, the text's int8 caches.
    """

    def __init__(
        self,
        kernels: NativeKernels,
        *,
        heads: int,
        embeddings: list[torch.Tensor],
        positions: torch.Tensor,
        final_ln: tuple[torch.Tensor, torch.Tensor, float],
        lm_head: torch.Tensor,
        layers: list[dict[str, Any]],
        rows: int,
        cross_rows: int,
        cross_mask: torch.Tensor | None,
        cross_lengths: torch.Tensor | None = None,
    ) -> None:
        if not 0 <= cross_rows <= rows:
            raise ValueError(f"cross_rows: {cross_rows} is not within the step's {rows} rows")
        self.kernels, self.rows, self.cross_rows = kernels, rows, cross_rows
        first = layers[0]
        hidden = kernels.packed_shape(first["out"])[0]
        ffn = kernels.packed_shape(first["fc1"])[0]
        capacity = first["keys"].shape[1]
        cross = first.get("cross_keys") is not None
        text = first["cross_keys"].shape[1] if cross else 0
        self.codebooks, self.vocab = len(embeddings), kernels.packed_shape(lm_head)[0] // len(embeddings)
        self.tokens_below = min(e.shape[0] for e in embeddings)
        self.capacity = min(capacity, positions.shape[0])
        self._keep: list[Any] = []  # every tensor the structs point into

        def ptr(
            t: torch.Tensor | None,
            shape: tuple[int, ...] | None,
            name: str,
            dtype: torch.dtype = torch.bfloat16,
        ) -> int | None:
            if t is None:
                return None
            _require(t, shape is None or tuple(t.shape) == shape, name, dtype)
            self._keep.append(t)
            return t.data_ptr()

        def norm(
            ln: tuple[torch.Tensor, torch.Tensor, float], name: str
        ) -> tuple[int | None, int | None, float]:
            w, b, eps = ln
            return ptr(w, (hidden,), name), ptr(b, (hidden,), name), float(eps)

        _head_dim(first["keys"], heads)  # heads that fit the attention kernel
        int8 = lm_head.dtype == torch.int8  # every matrix packed by pack_int8, or every one by pack
        if cross_lengths is not None:  # in place of the mask; int8 steps' text caches hold whole quads
            fits = (not int8 or text % INT8_QUAD == 0) and cross_mask is None
            fits = fits and cross_lengths.shape == (cross_rows,)
            fits = fits and bool(((cross_lengths >= 1) & (cross_lengths <= text)).all())
            _require(cross_lengths, fits, "cross_lengths", torch.int32)
        if int8 and not (kernels.int8 and fits_linear_int8(hidden, ffn)):
            raise ValueError("int8 weights: this CPU lacks VNNI or the widths are not multiples of 64")
        wdtype, extra = (torch.int8, INT8_EXTRA) if int8 else (torch.bfloat16, 0)
        # int8 steps attend over int8 caches (int8_caches), bf16 ones over bf16
        cache_width, cache_dtype = (
            (int8_cache_width(hidden, heads), torch.int8) if int8 else (hidden, torch.bfloat16)
        )
        _require(first["keys"], not int8 or capacity % INT8_QUAD == 0, "keys", cache_dtype)  # whole quads

        def matrix(t: torch.Tensor | None, rows_out: int, cols: int, name: str) -> int | None:
            return ptr(t, (rows_out, cols + extra), name, wdtype)

        heads_out, heads_in = kernels.packed_shape(lm_head)
        _require(lm_head, fits_linear(heads_out, hidden) and heads_in == hidden, "lm_head", wdtype)
        structs = []
        for i, layer in enumerate(layers):
            n = f"layer {i}"
            ln1, ln3 = norm(layer["ln1"], n), norm(layer["ln3"], n)
            ln2 = norm(layer["ln2"], n) if cross else (None, None, 0.0)
            fields: dict[str, Any] = {
                "qkv": matrix(layer["qkv"], 3 * hidden, hidden, n),
                "out": matrix(layer["out"], hidden, hidden, n),
                "fc1": matrix(layer["fc1"], ffn, hidden, n),
                "fc2": matrix(layer["fc2"], hidden, ffn, n),
                "keys": ptr(layer["keys"], (rows, capacity, cache_width), n, cache_dtype),
                "values": ptr(layer["values"], (rows, capacity, cache_width), n, cache_dtype),
            }
            if cross:
                fields["cross_q"] = matrix(layer["cross_q"], hidden, hidden, n)
                fields["cross_out"] = matrix(layer["cross_out"], hidden, hidden, n)
                # bf16, or in an int8 step with lengths the int8 caches cross_attend_int8 takes
                text_shape, text_dtype = (
                    ((cross_rows, text, int8_cache_width(hidden, heads)), torch.int8)
                    if int8 and cross_lengths is not None
                    else ((cross_rows, text, hidden), torch.bfloat16)
                )
                fields["cross_keys"] = ptr(layer["cross_keys"], text_shape, n, text_dtype)
                fields["cross_values"] = ptr(layer["cross_values"], text_shape, n, text_dtype)
            for k, (w, b, eps) in enumerate((ln1, ln2, ln3), 1):
                fields[f"ln{k}_w"], fields[f"ln{k}_b"], fields[f"eps{k}"] = w, b, eps
            structs.append(StepLayer(**fields))
        self.layers = (StepLayer * len(structs))(*structs)
        tables = [ptr(e, (e.shape[0], hidden), "embeddings") for e in embeddings]
        self.tables = (ctypes.c_void_p * len(tables))(*tables)
        final = norm(final_ln, "final layer norm")
        sizes = {"layers": len(layers), "hidden": hidden, "heads": heads, "ffn": ffn, "text": text}
        self.model = StepModel(
            **sizes,
            codebooks=self.codebooks,
            vocab=self.vocab,
            capacity=capacity,
            amx=int(kernels.amx_int8 if int8 else kernels.amx),
            int8=int(int8),
            embeddings=ctypes.cast(self.tables, ctypes.POINTER(ctypes.c_void_p)),
            positions=ptr(positions, (positions.shape[0], hidden), "positions"),
            final_w=final[0],
            final_b=final[1],
            final_eps=final[2],
            lm_head=ptr(lm_head, None, "lm_head", wdtype),
            cross_mask=ptr(cross_mask, (cross_rows, text), "cross_mask", torch.float32) if cross else None,
            cross_lengths=ptr(cross_lengths, (cross_rows,), "cross_lengths", torch.int32) if cross else None,
        )
        threads = torch.get_num_threads()
        self.threads = threads
        self.work = torch.empty(kernels._step_work(rows, hidden, ffn), dtype=torch.bfloat16)
        head_dim = hidden // heads
        self.scratch = torch.empty(
            threads * kernels._attend_scratch(heads, head_dim, max(capacity, text)), dtype=torch.float32
        )
        self.x = torch.empty((rows, hidden), dtype=torch.bfloat16)  # the step's hidden states

    def __call__(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Logits ``(rows, codebooks, vocab)`` bf16 of the next column, given this one's ``tokens (rows,
        codebooks)`` at ``position``."""
        fits = tokens.shape == (self.rows, self.codebooks) and 0 <= position < self.capacity
        _require(tokens, fits, "tokens", torch.int64)
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.tokens_below:
            raise ValueError(f"tokens: outside the embeddings' 0 .. {self.tokens_below - 1}")
        if torch.get_num_threads() != self.threads:  # the scratch was sized for the threads
            raise RuntimeError("torch's thread count changed during a decoding pass")
        logits = torch.empty((self.rows, self.codebooks * self.vocab), dtype=torch.bfloat16)
        self.kernels._step(
            self.model, self.layers, tokens, self.x, logits,
            self.work, self.scratch, self.rows, self.cross_rows, position, self.threads,
        )  # fmt: skip
        return logits.view(self.rows, self.codebooks, self.vocab)


def fits_upsample(in_channels: int, out_channels: int, kernel: int, stride: int) -> bool:
    """Whether a transposed convolution fits ``upsample``: kernel twice its stride, one of 2-6 or 8."""
    return stride in UPSAMPLE_STRIDES and kernel == 2 * stride and in_channels > 0 and out_channels > 0


def fits_amx_resblock(channels: int, hidden: int) -> bool:
    """Whether both of a residual block's convolutions (C -> H, then H -> C) fit the AMX tiles."""
    return fits_amx_conv(hidden, channels) and fits_amx_conv(channels, hidden)


def fits_amx_conv(outputs: int, inputs: int) -> bool:
    """Whether a convolution's (outputs, inputs) fit the AMX kernels' tiles: outputs in 16s, inputs in 32s."""
    return outputs % 16 == 0 and inputs % 32 == 0 and outputs > 0 and inputs > 0


def fits_narrow(out_channels: int, kernel: int) -> bool:
    """Whether a convolution fits ``narrow_conv``: at most 4 outputs and 17 taps."""
    return 0 < out_channels <= 4 and 0 < kernel <= 17


def _require(tensor: torch.Tensor, sizes_fit: bool, name: str, dtype: torch.dtype = torch.bfloat16) -> None:
    if not sizes_fit or tensor.dtype != dtype or not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError(f"{name}: {tensor.dtype} {tuple(tensor.shape)} does not fit the kernel's call")


HUGE_PAGE = 2 * 2**20
MADV_HUGEPAGE = 14


def huge_page_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised buffer backed by 2 MB pages where Linux lends them on request (transparent huge
    pages in ``madvise`` mode). For what a step reads or writes all over, every step:

    - the attention caches: a step writes each cache's next position, and on 4 kB pages a pass's caches
      fault in a page a few positions at a time (about 100 faults a step at four requests, 15 µs each on
      a VM: 7% of a step), on 2 MB pages once in hundreds of steps;
    - the int8 step weights: one request's step streams all of them (344 MB for the small model), and on
      4 kB pages that is 84,000 page walks a step; on 2 MB pages one request's int8 steps took 14-17%
      less time (a 2-core EPYC)."""
    buffer = torch.empty(shape, dtype=dtype)
    ask_huge_pages(buffer)
    return buffer


def ask_huge_pages(buffer: torch.Tensor) -> None:
    """Ask Linux to back the whole 2 MB pages within ``buffer`` with 2 MB pages (``madvise``, a hint):
    before its first touch, its faults bring them; after, khugepaged gathers its 4 kB pages into them
    in the background (16 MB every 10 s by default)."""
    libc, start = glibc(), buffer.data_ptr()
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    last = (start + buffer.numel() * buffer.element_size()) // HUGE_PAGE * HUGE_PAGE
    if libc is not None and last > first:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_HUGEPAGE)


def int8_cache_width(hidden: int, heads: int) -> int:
    """Bytes a position of an int8 self-attention cache: its ints, then an fp32 scale a head."""
    return hidden + 4 * heads


INT8_QUAD = 4  # int8 value caches keep four positions together, so their capacity is whole quads


def int8_cache_capacity(positions: int) -> int:
    """The capacity of an int8 cache that holds ``positions``: rounded up to whole quads."""
    return -(-positions // INT8_QUAD) * INT8_QUAD


def int8_values(cache: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 value cache ``(rows, capacity, hidden + 4 * heads)`` as its ints ``(rows, capacity, hidden)``
    and fp32 scales ``(rows, capacity, heads)``, position-major (copies). The kernel keeps each quad of
    four positions as the four positions' bytes of each value side by side, then their scales."""
    rows, capacity, width = cache.shape
    hidden = width - 4 * heads
    quads = cache.view(rows, capacity // INT8_QUAD, INT8_QUAD * width)
    ints = quads[..., : INT8_QUAD * hidden].reshape(rows, -1, hidden, INT8_QUAD).transpose(-1, -2)
    scales = quads[..., INT8_QUAD * hidden :].contiguous().view(torch.float32)
    return ints.reshape(rows, capacity, hidden), scales.reshape(rows, capacity, heads)


def _head_dim(keys: torch.Tensor, heads: int) -> int:
    """The head size of position-major ``keys (rows, positions, heads * D)`` (bf16, or an int8 cache),
    checked against the kernel."""
    int8 = keys.dtype == torch.int8
    hidden = keys.shape[-1] - (4 * heads if int8 else 0)
    head_dim = hidden // heads if heads > 0 else 0
    fits = keys.dim() == 3 and 0 < heads <= MAX_HEADS and head_dim * heads == hidden
    _require(keys, fits and fits_attention(head_dim), "keys", torch.int8 if int8 else torch.bfloat16)
    return head_dim


def fits_linear(rows: int, cols: int) -> bool:
    """Whether an ``(N, K)`` weight fits the linear kernel's panels."""
    return rows % 32 == 0 and cols % 2 == 0


def fits_linear_int8(rows: int, cols: int) -> bool:
    """Whether an ``(N, K)`` weight fits the int8 kernel's panels (64 k a tile product)."""
    return rows % 32 == 0 and cols % 64 == 0 and rows > 0 and cols > 0


def fits_resblock(channels: int, hidden: int) -> bool:
    """Whether a residual block of ``channels`` (``hidden`` inside) fits the kernel's blocks of 4."""
    return channels % 4 == 0 and hidden % 4 == 0 and channels > 0 and hidden > 0


def fits_attention(head_dim: int) -> bool:
    """Whether heads of this size fit the attention kernel's 32-wide loads and 16 accumulators."""
    return head_dim % 32 == 0 and head_dim <= native_api.MAX_HEAD_SIZE


@lru_cache(maxsize=1)
def load() -> NativeKernels | None:
    """The kernels for this CPU, compiled once per source and CPU; None where they cannot be had."""
    missing = [f for f in REQUIRED_CPU if f not in cpu_flags()]
    if platform.machine() not in ("x86_64", "AMD64") or missing:
        log.info("native kernels not used: the CPU lacks %s", ", ".join(missing) or "x86-64")
        return None
    # g++ and its libgomp: torch's OpenMP runtime is GNU's, so the kernels share its threads (clang's
    # libomp would start a second pool spinning on the same cores)
    compiler = shutil.which("g++")
    if compiler is None:
        log.warning("native kernels not used: no g++ found to build them")
        return None
    try:
        directory = private_cache_dir()
        path = _build(compiler, directory)
        try:
            lib = _load_trusted(path)
        except UnsafeCache:
            raise
        except OSError:  # a cached build this system can no longer load (e.g. an older libstdc++): once more
            path.unlink(missing_ok=True)
            path = _build(compiler, directory)
            lib = _load_trusted(path)
        return NativeKernels(lib, path)
    except UnsafeCache as exc:
        log.warning("native kernels not used: %s; torch's kernels run instead", exc)
        return None
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
        # RuntimeError: no home directory; AttributeError: a declared entry point the library lacks
        log.warning("native kernels not used: building them failed: %s", exc)
        return None


def build_flags() -> tuple[str, ...]:
    """The compiler's flags for this CPU: AVX-512 where it has the kernels' instructions, else AVX2."""
    return FLAGS if all(f in cpu_flags() for f in AVX512_CPU) else AVX2_FLAGS


def private_cache_dir() -> Path:
    """``musicbot/kernels`` under the cache root, created 0700 (see ``generation.private_cache``)."""
    return private_dir("kernels")


def _load_trusted(path: Path) -> ctypes.CDLL:
    check_private(path.parent, "directory")
    check_private(path, "library")
    return ctypes.CDLL(str(path))


def library_path(compiler: str, directory: Path) -> Path:
    """Where the library for these sources, flags, compiler and CPU lives in ``directory``."""
    version = subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout
    parts = [
        *(f"{p.name}\0".encode() + p.read_bytes() for p in (*SOURCES, *HEADERS)),
        native_api.render_header().encode(),
        " ".join(build_flags()).encode(),
        compiler.encode(),
        version,
        " ".join(sorted(cpu_flags())).encode(),
    ]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return directory / f"kernels-{key}.so"


def _build(compiler: str, directory: Path) -> Path:
    """The library for these sources in ``directory`` (a private one), built there if missing."""
    target = library_path(compiler, directory)
    with _build_lock:
        if target.exists():
            return target
        compile_library(compiler, build_flags(), target)
        log.info("built the native kernels for this CPU: %s", target)
        return target


def compile_library(
    compiler: str, flags: Sequence[str], target: Path, sources: Sequence[Path] | None = None
) -> None:
    """Compile ``sources`` against the generated interface header into ``target``, atomically: built in a
    private directory beside it, then renamed into place, so a reader sees all of it or none."""
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        (work / "interface.h").write_text(native_api.render_header())
        partial = work / target.name
        try:
            subprocess.run(
                [compiler, *flags, f"-I{work}", *map(str, sources or SOURCES), "-o", str(partial)],
                check=True,
                capture_output=True,
                timeout=300,
            )
        except subprocess.CalledProcessError as exc:
            output = exc.stderr.decode(errors="replace").strip()
            errors = [line for line in output.splitlines() if "error" in line][:5]
            raise OSError("\n".join(errors) or output[-500:]) from exc
        partial.chmod(0o700)  # whatever the umask: writable by this user alone
        os.replace(partial, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
