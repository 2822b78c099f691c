"""EnCodec decoding in pieces gives the same audio as one call."""

from __future__ import annotations

import pytest
import torch

from generation.codec import EncodecDecoder
from generation.engine import MusicGenEngine


def _whole(engine: MusicGenEngine, codes: torch.Tensor) -> torch.Tensor:
    return engine.model.audio_encoder.decode(codes[None], [None] * codes.shape[0]).audio_values


def test_pieces_decode_to_the_same_audio_as_one_call(tiny_engine: MusicGenEngine) -> None:
    decoder = EncodecDecoder(tiny_engine.model.audio_encoder, torch.device("cpu"))
    assert decoder.pieces
    generator = torch.Generator().manual_seed(0)
    size = tiny_engine.model.config.audio_encoder.codebook_size
    # one row (pieces of 120 frames) and four rows (pieces of 30), neither a whole number of pieces
    for rows, frames in ((1, 253), (4, 131), (2, 7)):
        codes = torch.randint(0, size, (rows, tiny_engine.codebooks, frames), generator=generator)
        with torch.inference_mode():
            whole = _whole(tiny_engine, codes)
            pieces = decoder(codes)
        assert pieces.shape == whole.shape == (rows, 1, frames * tiny_engine.hop)
        scale = whole.abs().max().item()
        assert scale > 0
        assert (pieces - whole).abs().max().item() <= 1e-5 * scale


def test_gpu_and_scaled_codecs_decode_in_one_call(tiny_engine: MusicGenEngine) -> None:
    encodec = tiny_engine.model.audio_encoder
    assert not EncodecDecoder(encodec, torch.device("cuda")).pieces
    encodec.config.normalize = True
    try:
        assert not EncodecDecoder(encodec, torch.device("cpu")).pieces
    finally:
        encodec.config.normalize = False


def test_narrow_convolution_equals_torchs() -> None:
    from generation.codec import _NarrowConv1d

    torch.manual_seed(0)
    for out in (1, 3):
        conv = torch.nn.Conv1d(64, out, kernel_size=7)
        x = torch.randn(2, 64, 301)
        with torch.inference_mode():
            want = conv(x)
            got = _NarrowConv1d(conv)(x)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_the_codec_splits_after_the_first_upsampling(tiny_engine: MusicGenEngine) -> None:
    from generation.codec import _NarrowConv1d

    decoder = EncodecDecoder(tiny_engine.model.audio_encoder, torch.device("cpu"))
    ratios = tiny_engine.model.config.audio_encoder.upsampling_ratios
    assert decoder.upsampled == ratios[0]
    assert decoder.hop * decoder.upsampled == tiny_engine.hop
    assert isinstance(decoder.global_layers[-1].conv, torch.nn.ConvTranspose1d)
    assert isinstance(decoder.local_layers[-1].conv, _NarrowConv1d)  # the last, to one channel


def test_residual_blocks_take_the_native_kernel_unless_kernels_are_off(tiny_engine: MusicGenEngine) -> None:
    from generation import native
    from generation.codec import _NativeResnetBlock

    if native.load() is None:
        pytest.skip("the native kernels need an AVX-512 BF16 CPU and a C++ compiler")
    encodec = tiny_engine.model.audio_encoder

    def fused(decoder: EncodecDecoder) -> int:
        return sum(isinstance(layer, _NativeResnetBlock) for layer in decoder.local_layers)

    # the tiny codec's blocks of 32, 16 and 8 channels; 4 channels (2 inside) stay with EnCodec's own
    assert fused(EncodecDecoder(encodec, torch.device("cpu"))) == 3
    assert fused(EncodecDecoder(encodec, torch.device("cpu"), kernels=False)) == 0
