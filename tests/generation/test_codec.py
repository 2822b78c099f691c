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
    from generation.codec import _NarrowConv1d, _NativeLastConv, _NativeUpsample

    decoder = EncodecDecoder(tiny_engine.model.audio_encoder, torch.device("cpu"))
    ratios = tiny_engine.model.config.audio_encoder.upsampling_ratios
    assert decoder.upsampled == ratios[0]
    assert decoder.hop * decoder.upsampled == tiny_engine.hop
    first_up = decoder.global_layers[-1]  # the first upsampling: EnCodec's own, or the native kernel's
    assert isinstance(first_up, _NativeUpsample) or isinstance(first_up.conv, torch.nn.ConvTranspose1d)
    last = decoder.local_layers[
        -1
    ]  # the last, to one channel: the native kernel's, or in torch the narrow one
    assert isinstance(last, _NativeLastConv) or isinstance(last.conv, _NarrowConv1d)


def test_residual_blocks_take_the_native_kernel_unless_kernels_are_off(tiny_engine: MusicGenEngine) -> None:
    from generation import native
    from generation.codec import _NativeResnetBlock

    if native.load() is None:
        pytest.skip("the native kernels need an AVX2 CPU and a C++ compiler")
    encodec = tiny_engine.model.audio_encoder

    def fused(decoder: EncodecDecoder) -> int:
        return sum(isinstance(layer, _NativeResnetBlock) for layer in decoder.local_layers)

    # the tiny codec's blocks of 32, 16 and 8 channels; 4 channels (2 inside) stay with EnCodec's own
    assert fused(EncodecDecoder(encodec, torch.device("cpu"))) == 3
    assert fused(EncodecDecoder(encodec, torch.device("cpu"), kernels=False)) == 0


def test_the_lstm_takes_the_native_recurrence_unless_kernels_are_off(tiny_engine: MusicGenEngine) -> None:
    from generation import native
    from generation.codec import _NativeLSTM

    if native.load() is None:
        pytest.skip("the native kernels need an AVX2 CPU and a C++ compiler")
    encodec = tiny_engine.model.audio_encoder

    def native_lstms(decoder: EncodecDecoder) -> int:
        return sum(isinstance(layer, _NativeLSTM) for layer in decoder.global_layers)

    assert native_lstms(EncodecDecoder(encodec, torch.device("cpu"))) == 1
    assert native_lstms(EncodecDecoder(encodec, torch.device("cpu"), kernels=False)) == 0
    assert not any(isinstance(layer, _NativeLSTM) for layer in encodec.decoder.layers)  # the model's own stay


@pytest.mark.parametrize(
    ("rows", "steps", "width", "layers"),
    [(1, 1, 16, 1), (1, 30, 64, 2), (3, 7, 48, 2), (8, 20, 32, 2), (9, 5, 64, 1), (13, 9, 16, 3)],
)
def test_native_lstm_equals_encodecs_to_fp32_rounding(rows: int, steps: int, width: int, layers: int) -> None:
    """Every row count the kernel groups (eight rows per weight load, then the rest), one to three layers,
    in the saturating range of the gates too (inputs and weights scaled up)."""
    from transformers import EncodecConfig
    from transformers.models.encodec.modeling_encodec import EncodecLSTM

    from generation import native
    from generation.codec import _NativeLSTM

    kernels = native.load()
    if kernels is None:
        pytest.skip("the native kernels need an AVX2 CPU and a C++ compiler")
    torch.manual_seed(rows * 100 + steps)
    block = EncodecLSTM(EncodecConfig(num_lstm_layers=layers), width).eval()
    with torch.no_grad():
        for weight in block.lstm.parameters():
            weight.mul_(3.0)
    x = torch.randn(rows, width, steps) * 2
    ours = _NativeLSTM(block, kernels)
    with torch.inference_mode():
        want, got = block(x), ours(x)
        alone = ours(x[rows - 1 :])
    assert got.shape == want.shape == (rows, width, steps)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert torch.equal(alone[0], got[rows - 1])  # a row's audio is its own, whatever else is in the batch


def test_upsamplings_and_the_last_convolution_take_the_kernels_with_their_elus(
    tiny_engine: MusicGenEngine,
) -> None:
    from torch.nn import ELU, Identity

    from generation import native
    from generation.codec import _NarrowConv1d, _NativeLastConv, _NativeUpsample

    if native.load() is None:
        pytest.skip("the native kernels need an AVX2 CPU and a C++ compiler")
    encodec = tiny_engine.model.audio_encoder
    before = [type(layer) for layer in encodec.decoder.layers]
    decoder = EncodecDecoder(encodec, torch.device("cpu"))
    layers = decoder.local_layers
    upsampling = [i for i, layer in enumerate(layers) if isinstance(layer, _NativeUpsample)]
    # the tiny codec's 32 -> 16 (stride 5), 16 -> 8 and 8 -> 4 channels (stride 4 each): on AMX's tiles
    # where the channels fit them, else the fp32 kernel
    amx = native.load().amx
    assert len(upsampling) == 3
    assert [layers[i].amx for i in upsampling] == [amx, False, False]
    assert isinstance(decoder.global_layers[-1], _NativeUpsample)  # 64 -> 32, stride 8
    assert decoder.global_layers[-1].amx == amx
    assert isinstance(layers[-1], _NativeLastConv) and layers[-1].activate
    for i in [*upsampling, len(layers) - 1]:  # each one's ELU now runs inside it
        assert isinstance(layers[i - 1], Identity)
    assert all(layer.activate for layer in layers if isinstance(layer, _NativeUpsample))
    # the model's own layers are untouched: EnCodec's decode still has its ELUs and convolutions
    assert [type(layer) for layer in encodec.decoder.layers] == before
    assert sum(isinstance(layer, ELU) for layer in encodec.decoder.layers) > 2
    assert not isinstance(encodec.decoder.layers[-1].conv, _NarrowConv1d)

    off_decoder = EncodecDecoder(encodec, torch.device("cpu"), kernels=False)
    off = off_decoder.local_layers
    assert not any(isinstance(layer, (_NativeUpsample, _NativeLastConv, Identity)) for layer in off)
    assert not any(isinstance(layer, _NativeUpsample) for layer in off_decoder.global_layers)
    assert isinstance(off[-1].conv, _NarrowConv1d)


@pytest.mark.parametrize(
    ("stride", "rows", "length", "left", "channels"),
    [
        (4, 1, 1, 2, (24, 12)),
        (4, 2, 17, 2, (24, 12)),
        (4, 3, 40, 1, (24, 12)),
        (4, 1, 64, 3, (24, 12)),
        (4, 1, 130, 4, (70, 16)),  # a second tile of q's, 70 inputs: a chunk and a part of one
        (8, 2, 63, 4, (40, 33)),  # phases in two passes; 33 outputs: a block of 16 and one of 1
        (5, 1, 66, 2, (8, 48)),  # blocks of 3 q's, 15 of a transposition's 16 slots
        (2, 2, 9, 0, (3, 5)),
        (3, 1, 70, 3, (16, 16)),
        (6, 1, 20, 3, (16, 17)),
    ],
)
def test_native_upsampling_equals_torchs_transposed_convolution(
    stride: int, rows: int, length: int, left: int, channels: tuple[int, int]
) -> None:
    from generation import native

    kernels = native.load()
    if kernels is None:
        pytest.skip("the native kernels need an AVX2 CPU and a C++ compiler")
    g = torch.Generator().manual_seed(length)
    cin, cout = channels
    x = torch.randn(rows, cin, length, generator=g)
    weight, bias = torch.randn(cin, cout, 2 * stride, generator=g) / 5, torch.randn(cout, generator=g)
    for activate in (False, True):
        full = torch.nn.functional.conv_transpose1d(
            torch.nn.functional.elu(x) if activate else x, weight, bias, stride=stride
        )
        want = full[..., left : full.shape[-1] - (stride - left)]
        packed = kernels.pack_upsample(weight)
        got = kernels.upsample(x, packed, bias, stride, left, activate=activate)
        assert got.shape == want.shape == (rows, cout, stride * length)
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_native_upsampling_refuses_strides_it_has_no_blocks_for() -> None:
    from generation import native

    kernels = native.load()
    if kernels is None:
        pytest.skip("the native kernels need an AVX2 CPU and a C++ compiler")
    weight = torch.randn(8, 16, 14)
    with pytest.raises(ValueError, match="x"):
        kernels.upsample(
            torch.randn(1, 8, 5), kernels.pack_upsample(weight), torch.randn(16), 7, 3, activate=False
        )
    assert not native.fits_upsample(8, 16, 14, 7) and not native.fits_upsample(8, 16, 10, 4)
    assert native.fits_upsample(1024, 512, 16, 8) and native.fits_upsample(512, 256, 10, 5)


@pytest.mark.parametrize(("outs", "length", "taps"), [(1, 301, 7), (3, 8, 7), (2, 64, 3), (1, 5, 9)])
def test_native_last_convolution_with_its_elu_and_padding_equals_encodecs(
    outs: int, length: int, taps: int
) -> None:
    from generation import native

    kernels = native.load()
    if kernels is None:
        pytest.skip("the native kernels need an AVX2 CPU and a C++ compiler")
    g = torch.Generator().manual_seed(length)
    x = torch.randn(2, 16, length, generator=g)
    weight, bias = torch.randn(outs, 16, taps, generator=g) / 4, torch.randn(outs, generator=g)
    padding = taps - 1
    left = padding - padding // 2
    for activate in (False, True):
        inner = torch.nn.functional.elu(x) if activate else x
        padded = torch.nn.functional.pad(inner, (left, padding - left), mode="reflect")
        want = torch.nn.functional.conv1d(padded, weight, bias)
        got = kernels.narrow_conv(x, weight, bias, left, activate=activate)
        assert got.shape == want.shape == (2, outs, length)
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_a_wider_codec_decodes_in_pieces_on_amx_to_the_same_audio() -> None:
    # 16 filters: residual blocks of 128 and 64 channels and upsamplings of strides 8, 5 and 4 that fit
    # AMX's tiles (the tiny codec's are too narrow), inside the real decode in pieces
    from transformers import EncodecConfig, EncodecModel

    from generation import native
    from generation.codec import _NativeResnetBlock, _NativeUpsample
    from generation.random_models import TINY

    kernels = native.load()
    if kernels is None or not kernels.amx:
        pytest.skip("needs the native kernels on a CPU with AMX")
    torch.manual_seed(0)
    encodec = EncodecModel(EncodecConfig(**{**TINY["audio_encoder"], "num_filters": 16})).eval()
    for layer in encodec.quantizer.layers:
        layer.codebook.embed.copy_(torch.randn_like(layer.codebook.embed))
    decoder = EncodecDecoder(encodec, torch.device("cpu"))
    layers = decoder.global_layers + decoder.local_layers
    assert sum(isinstance(layer, _NativeResnetBlock) and layer.amx for layer in layers) == 2
    assert sum(isinstance(layer, _NativeUpsample) and layer.amx for layer in layers) == 4
    codes = torch.randint(
        0, encodec.config.codebook_size, (4, 4, 37), generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        whole = encodec.decode(codes[None], [None] * 4).audio_values
        pieces = decoder(codes)
    assert pieces.shape == whole.shape == (4, 1, 37 * 640)
    assert (pieces - whole).abs().max().item() <= 1e-5 * whole.abs().max().item()


def test_building_a_decoder_leaves_the_shared_model_as_it_was(tiny_model_dir) -> None:
    from torch.nn.utils import parametrize
    from transformers import MusicgenForConditionalGeneration

    encodec = MusicgenForConditionalGeneration.from_pretrained(str(tiny_model_dir)).audio_encoder.eval()
    layers = list(encodec.decoder.layers)
    normed = [m for m in encodec.modules() if parametrize.is_parametrized(m, "weight")]
    state = {k: v.clone() for k, v in encodec.state_dict().items()}
    assert normed  # the checkpoint's convolutions are weight-normed
    EncodecDecoder(encodec, torch.device("cpu"))
    assert list(encodec.decoder.layers) == layers
    assert all(parametrize.is_parametrized(m, "weight") for m in normed)
    assert all(torch.equal(v, encodec.state_dict()[k]) for k, v in state.items())


def test_a_placed_model_has_its_weight_norm_folded_into_plain_weights(tiny_engine: MusicGenEngine) -> None:
    from torch.nn.utils import parametrize

    assert not any(
        parametrize.is_parametrized(m, "weight") for m in tiny_engine.model.audio_encoder.modules()
    )
