"""Every native entry point on small shapes and at the edges of its blocks, for a sanitized build.

Run by test_native.py in a subprocess with the sanitizer runtime preloaded: ``python -m
tests.generation.native_sanitized LIBRARY``. Exits 0 after printing ``ok`` (a sanitizer report aborts it).
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import torch

from generation import native
from generation.fast_decoder import int8_quantize


def _bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).to(torch.bfloat16)


def products(kernels: native.NativeKernels) -> None:
    for rows in (1, 7, 8, 9, 16, 17):
        for cols in (32, 48, 64):
            packed = kernels.pack(_bf16(64, cols))
            x = _bf16(rows, 1, cols)
            kernels.linear(x, packed, _bf16(rows, 1, 64), gelu=True)
            kernels.linear(x, packed)
    if kernels.int8:
        for rows in (1, 7, 8, 9, 16, 17):
            for cols in (64, 128):
                ints = torch.randint(-127, 128, (64, cols), dtype=torch.int8)
                packed = kernels.pack_int8(ints, torch.rand(64))
                x = _bf16(rows, 1, cols)
                kernels.linear(x, packed, _bf16(rows, 1, 64), gelu=True)
                kernels.linear(x, packed)


def attention(kernels: native.NativeKernels) -> None:
    for rows, heads, dim, capacity in (
        (1, 1, 32, 1),
        (3, 2, 64, 5),
        (2, native.MAX_HEADS, 32, 3),
        (1, 2, 256, 2),
    ):
        hidden = heads * dim
        keys, values = _bf16(rows, capacity, hidden), _bf16(rows, capacity, hidden)
        for position in range(capacity):  # from one position to the cache full
            kernels.attend(_bf16(rows, 1, 3 * hidden), keys, values, heads, position)
        if kernels.int8:  # int8 caches: filled from empty, and given whole
            k8, v8 = kernels.int8_caches(
                keys[:, :0].contiguous(), values[:, :0].contiguous(), heads, capacity
            )
            for position in range(capacity):
                kernels.attend(_bf16(rows, 1, 3 * hidden), k8, v8, heads, position)
            k8, v8 = kernels.int8_caches(keys, values, heads, capacity)
            kernels.attend(_bf16(rows, 1, 3 * hidden), k8, v8, heads, capacity - 1)
        for n in (1, capacity):
            k, v = _bf16(rows, n, hidden), _bf16(rows, n, hidden)
            kernels.cross_attend(_bf16(rows, 1, hidden), k, v, None, heads)
            kernels.cross_attend(_bf16(rows, 1, hidden), k, v, torch.zeros(rows, n), heads)
            if kernels.int8:  # the text as int8 caches, each row over 1 .. n of its positions
                k8, v8 = kernels.int8_caches(k, v, heads, n)
                for length in {1, n}:
                    lengths = torch.full((rows,), length, dtype=torch.int32)
                    kernels.cross_attend_int8(_bf16(rows, 1, hidden), k8, v8, lengths, heads)


def sampling(kernels: native.NativeKernels) -> None:
    from generation.errors import NonFiniteScores

    for rows, codebooks, vocab in ((1, 1, 1), (3, 4, 7), (4, 4, 2048)):
        for guided in (False, True):
            logits = _bf16((2 if guided else 1) * rows, codebooks, vocab)
            for top_k in (0, 1, vocab - 1, vocab, vocab + 5):
                for draws in (torch.zeros(rows, codebooks), torch.full((rows, codebooks), 1 - 2**-24)):
                    kernels.sample(logits, draws, guided=guided, guidance=3.0, temperature=0.7, top_k=top_k)
            logits[0, 0, 0] = float("nan")
            try:
                kernels.sample(
                    logits, torch.rand(rows, codebooks), guided=guided, guidance=3.0, temperature=1.0, top_k=5
                )
            except NonFiniteScores:
                pass
            else:
                raise AssertionError("a NaN score went unnoticed")


def convolutions(kernels: native.NativeKernels) -> None:
    for steps, rows, hidden in ((1, 1, 16), (3, 9, 32), (2, 8, 16), (4, 3, 48)):
        packed = kernels.pack_lstm(torch.randn(4 * hidden, hidden))
        kernels.lstm(torch.randn(steps, rows, 4 * hidden), packed)
    for channels, hidden in ((4, 4), (8, 4), (16, 8)):
        conv1, conv2 = torch.randn(hidden, channels, 3), torch.randn(channels, hidden, 1)
        w1, w2 = kernels.pack_resblock(conv1, conv2)
        for length in (2, 63, 64, 65, 129):
            kernels.resblock(
                torch.randn(2, channels, length), w1, torch.randn(hidden), w2, torch.randn(channels)
            )
    for stride, cin, cout in (
        (4, 1, 4),
        (4, 5, 8),
        (8, 33, 17),
        (5, 3, 16),
        (2, 2, 3),
        (3, 1, 1),
        (6, 4, 20),
    ):
        w = kernels.pack_upsample(torch.randn(cin, cout, 2 * stride))
        for length in (1, 15, 16, 17, 64, 65):
            for left in (0, stride // 2, stride):
                x = torch.randn(2, cin, length)
                kernels.upsample(x, w, torch.randn(cout), stride, left, activate=left == stride // 2)
    for outs, taps, left, length in ((1, 1, 0, 1), (1, 7, 3, 4), (4, 17, 8, 9), (2, 3, 1, 64), (1, 7, 3, 65)):
        w = torch.randn(outs, 6, taps)
        kernels.narrow_conv(torch.randn(2, 6, length), w, torch.randn(outs), left, activate=True)


def amx_convolutions(kernels: native.NativeKernels) -> None:
    if not kernels.amx:
        return
    for channels, hidden in ((32, 32), (64, 32)):
        w1 = kernels.pack_amx_conv(torch.randn(hidden, channels, 3).permute(2, 0, 1))
        w2 = kernels.pack_amx_conv(torch.randn(channels, hidden, 1).permute(2, 0, 1))
        for length in (2, 63, 64, 65):
            kernels.resblock_amx(
                torch.randn(2, channels, length), w1, torch.randn(hidden), w2, torch.randn(channels)
            )
    for stride, length in ((4, 1), (4, 64), (4, 65), (5, 3), (2, 17)):
        w = kernels.pack_upsample_amx(torch.randn(32, 16, 2 * stride))
        for left in (0, stride):
            kernels.upsample_amx(torch.randn(2, 32, length), w, torch.randn(16), stride, left, activate=True)


def decoder_step(kernels: native.NativeKernels, int8: bool) -> None:
    """The whole step, with bf16 weights or (``int8``) int8 ones."""
    hidden, heads, codebooks, vocab, capacity, text = 64, 2, 2, 16, 4, 3
    ffn = 128 if int8 else 96  # int8 products take widths in 64s

    def pack(weight: torch.Tensor) -> torch.Tensor:
        return kernels.pack_int8(**int8_quantize(weight)) if int8 else kernels.pack(weight)

    for rows, cross_rows in ((1, 1), (4, 2), (2, 0)):
        by_length = rows > 1  # steps of one row keep the text under a mask, the others read each row's length
        text_int8 = int8 and by_length  # and int8 steps the text as int8 caches
        layers = []
        for _ in range(2):
            ln = (_bf16(hidden), _bf16(hidden), 1e-5)
            square = {name: pack(_bf16(hidden, hidden)) for name in ("out", "cross_q", "cross_out")}
            layers.append(
                {
                    "ln1": ln, "ln2": ln, "ln3": ln, **square, "qkv": pack(_bf16(3 * hidden, hidden)),
                    "fc1": pack(_bf16(ffn, hidden)), "fc2": pack(_bf16(hidden, ffn)),
                    "keys": _bf16(rows, capacity, hidden), "values": _bf16(rows, capacity, hidden),
                    "cross_keys": _bf16(cross_rows, text, hidden),
                    "cross_values": _bf16(cross_rows, text, hidden),
                }
            )  # fmt: skip
            if int8:  # int8 steps attend over int8 caches
                layers[-1]["keys"], layers[-1]["values"] = kernels.int8_caches(
                    layers[-1]["keys"], layers[-1]["values"], heads, capacity
                )
            if text_int8:  # and over the text's, each row its own length (one row the whole text)
                layers[-1]["cross_keys"], layers[-1]["cross_values"] = kernels.int8_caches(
                    layers[-1]["cross_keys"], layers[-1]["cross_values"], heads, text
                )
        lengths = torch.tensor([text, 1, 2, 3][:cross_rows], dtype=torch.int32) if by_length else None
        step = native.NativeStep(
            kernels,
            heads=heads,
            embeddings=[_bf16(vocab + 1, hidden) for _ in range(codebooks)],
            positions=_bf16(capacity, hidden),
            final_ln=(_bf16(hidden), _bf16(hidden), 1e-5),
            lm_head=pack(_bf16(codebooks * vocab, hidden)),
            layers=layers,
            rows=rows,
            cross_rows=cross_rows,
            cross_mask=None if by_length else torch.zeros(cross_rows, text),
            cross_lengths=lengths,
        )
        for position in range(capacity):  # to the cache full
            step(torch.randint(0, vocab + 1, (rows, codebooks)), position)


def main(library: str) -> None:
    torch.manual_seed(0)
    path = Path(library)
    kernels = native.NativeKernels(ctypes.CDLL(str(path)), path)
    amx_int8 = kernels.amx_int8
    for amx in sorted({False, kernels.amx}):
        kernels.amx, kernels.amx_int8 = amx, amx and amx_int8
        products(kernels)
        decoder_step(kernels, int8=False)
        if kernels.int8:
            decoder_step(kernels, int8=True)
    attention(kernels)
    sampling(kernels)
    convolutions(kernels)
    amx_convolutions(kernels)
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
