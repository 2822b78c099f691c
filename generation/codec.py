"""EnCodec decoding in short overlapping pieces: the same audio, about twice as fast on a CPU.

EnCodec's decoder is a convolution stack behind an LSTM. Decoding a whole batch of tracks at once makes
every activation tens of megabytes (64 channels x 32000 samples per second per row), so each layer
streams its input from memory; on a 2-core CPU a batch of four 5-second tracks took 3.2 s, a quarter of
the whole job. Here the LSTM (the only part that sees the whole track) runs once on the full frame
sequence, and the convolutions after it run on pieces of a few hundred milliseconds that stay in the
caches, each with a few frames of context on both sides that are cut away again. The convolutions
after the LSTM see less than two frames to each side, so the result equals the one-call decode to
float rounding (a test holds it to that).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils import parametrize


class EncodecDecoder:
    """Decode ``(rows, codebooks, frames)`` codes to ``(rows, channels, samples)`` audio."""

    CONTEXT_FRAMES = 2  # frames of context on each side of a piece (one is enough: a test holds it)
    ROW_FRAMES = 120  # frames per piece times rows: a piece's activations stay within the caches

    def __init__(self, encodec: Any, device: torch.device) -> None:
        self.encodec = encodec
        config = encodec.config
        layers = list(encodec.decoder.layers)
        recurrent = [i for i, layer in enumerate(layers) if hasattr(layer, "lstm")]
        # Pieces only pay on a CPU, and only for the plain codec (no per-chunk scales or normalization).
        self.pieces = (
            device.type == "cpu" and bool(recurrent) and config.chunk_length is None and not config.normalize
        )
        split = recurrent[-1] + 1 if recurrent else 0
        self.global_layers, self.local_layers = layers[:split], layers[split:]
        self.hop = 1
        for ratio in config.upsampling_ratios:
            self.hop *= int(ratio)
        _bake_weight_norm(encodec)

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        if not self.pieces:
            return self.encodec.decode(codes[None], [None] * codes.shape[0]).audio_values
        hidden = self.encodec.quantizer.decode(codes.transpose(0, 1))
        for layer in self.global_layers:
            hidden = layer(hidden)
        frames = hidden.shape[-1]
        size = max(16, self.ROW_FRAMES // codes.shape[0])
        context = self.CONTEXT_FRAMES
        pieces = []
        for start in range(0, frames, size):
            end = min(frames, start + size)
            lo, hi = max(0, start - context), min(frames, end + context)
            piece = hidden[..., lo:hi]
            for layer in self.local_layers:
                piece = layer(piece)
            skip = (start - lo) * self.hop
            pieces.append(piece[..., skip : skip + (end - start) * self.hop])
        return torch.cat(pieces, -1)


def _bake_weight_norm(module: torch.nn.Module) -> None:
    """Store weight-normed convolution weights as plain weights (the same values, not recomputed per call)."""
    for sub in module.modules():
        if parametrize.is_parametrized(sub, "weight"):
            parametrize.remove_parametrizations(sub, "weight", leave_parametrized=True)
