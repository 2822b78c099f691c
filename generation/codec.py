"""EnCodec decoding in short overlapping pieces: the same audio, with activations that stay in the caches.

EnCodec's decoder is a convolution stack behind an LSTM. Decoding a whole batch of tracks at once makes
every activation tens of megabytes (64 channels x 32000 samples per second per row), so each layer
streams its input from memory. Here the LSTM (the only part that sees the whole track) and the first
upsampling after it run once on the whole sequence, where activations are still small, and the
convolutions after that run on pieces of a few hundred milliseconds that stay in the caches, each with a
few frames of context on both sides that are cut away again. Those convolutions see less than two frames
to each side, so the result equals the one-call decode to float rounding (a test holds it to that).

Where the native kernels load (``generation.native``), the layers after the LSTM run on them, each
ELU folded into the layer it feeds: on AVX-512 the residual blocks of 64 and 128 channels, the stride-4
upsamplings and the last convolution, in fp32; with AMX every residual block and upsampling whose
channels fit its tiles, in three bf16 products (about 2^-16 of fp32).

Building a decoder changes nothing shared: the layer lists it runs hold wrappers and copies, the model's
own layers stay as they were (weight norm is folded and the allocator set up by ``loader.place_model``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.nn import ELU, Conv1d, ConvTranspose1d, Identity

from generation import native


class EncodecDecoder:
    """Decode ``(rows, codebooks, frames)`` codes to ``(rows, channels, samples)`` audio."""

    CONTEXT_FRAMES = 2  # frames of context on each side of a piece (one is enough: a test holds it)
    ROW_FRAMES = 120  # frames per piece, one row at a time: a piece's activations stay within the caches

    def __init__(self, encodec: Any, device: torch.device, *, kernels: bool = True) -> None:
        self.encodec = encodec
        config = encodec.config
        layers = list(encodec.decoder.layers)
        recurrent = [i for i, layer in enumerate(layers) if hasattr(layer, "lstm")]
        # Pieces only pay on a CPU, and only for the plain codec (no per-chunk scales or normalization).
        self.pieces = (
            device.type == "cpu" and bool(recurrent) and config.chunk_length is None and not config.normalize
        )
        # The whole sequence goes through the LSTM and the first upsampling after it: up to there the
        # activations are small (50-400 per second) and wide products on the whole track are efficient
        # (in pieces that first transposed convolution would see a few dozen columns a call). Pieces
        # start where the activations grow large.
        split = recurrent[-1] + 1 if recurrent else 0
        ratios = [int(r) for r in config.upsampling_ratios]
        first_up = next(
            (
                i
                for i in range(split, len(layers))
                if isinstance(getattr(layers[i], "conv", None), ConvTranspose1d)
            ),
            None,
        )
        self.upsampled = 1
        if first_up is not None and ratios:
            split, self.upsampled = first_up + 1, ratios[0]
        self.global_layers, self.local_layers = layers[:split], layers[split:]
        native_kernels = native.load() if self.pieces and kernels else None
        if self.pieces:  # wrappers and copies in these lists: the model's own layers stay as they are
            for part in (self.global_layers, self.local_layers):
                _native_layers(part, native_kernels)
        self.hop = 1  # output samples per column at the split
        for ratio in ratios:
            self.hop *= ratio
        self.hop //= self.upsampled

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        if not self.pieces:
            return self.encodec.decode(codes[None], [None] * codes.shape[0]).audio_values
        hidden = self.encodec.quantizer.decode(codes.transpose(0, 1))
        rows = range(hidden.shape[0])
        for layer in self.global_layers:
            # A row at a time (oneDNN's products round a row differently in a batch: a track must not
            # depend on what else was decoded with it), but for the LSTM, which keeps rows apart itself.
            batched = isinstance(layer, _NativeLSTM)
            hidden = layer(hidden) if batched else torch.cat([layer(hidden[row : row + 1]) for row in rows])
        columns = hidden.shape[-1]
        size = self.ROW_FRAMES * self.upsampled
        context = self.CONTEXT_FRAMES * self.upsampled
        tracks = []
        for row in rows:
            pieces = []
            for start in range(0, columns, size):
                end = min(columns, start + size)
                lo, hi = max(0, start - context), min(columns, end + context)
                piece = hidden[row : row + 1, :, lo:hi]
                for layer in self.local_layers:
                    piece = layer(piece)
                skip = (start - lo) * self.hop
                pieces.append(piece[..., skip : skip + (end - start) * self.hop])
            tracks.append(torch.cat(pieces, -1))
        return torch.cat(tracks)


class _NarrowConv1d(torch.nn.Module):
    """A convolution to a few channels (EnCodec's last: 64 channels to 1) as one product and shifted sums.

    oneDNN runs that last convolution far below its peak (with a layout copy first); here each tap is
    one row of a ``(out x taps, in) @ (in, time)`` product and the taps are summed at their offsets: the
    same sums in another order.
    """

    MAX_OUT = 4

    def __init__(self, conv: Conv1d) -> None:
        super().__init__()
        out, inp, taps = conv.weight.shape
        self.out, self.taps = out, taps
        # rows (o, j): output channel o's tap j over all input channels
        self.weight = conv.weight.detach().permute(0, 2, 1).reshape(out * taps, inp).contiguous()
        self.bias = None if conv.bias is None else conv.bias.detach()

    @classmethod
    def fits(cls, conv: Conv1d) -> bool:
        return (
            conv.out_channels <= cls.MAX_OUT
            and conv.groups == 1
            and conv.stride == (1,)
            and conv.dilation == (1,)
            and conv.padding == (0,)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1] - self.taps + 1
        taps = torch.matmul(self.weight, x).view(x.shape[0], self.out, self.taps, -1)
        y = taps[:, :, 0, :length].clone()
        for j in range(1, self.taps):
            y += taps[:, :, j, j : j + length]
        if self.bias is not None:
            y += self.bias[:, None]
        return y


class _NativeLSTM(torch.nn.Module):
    """EnCodec's LSTM block (a stacked unidirectional LSTM over the sequence, plus its input) on the native
    recurrence: each layer's input products are one matrix product over a row's whole sequence, then the
    kernel runs the steps with every row of the batch per load of the recurrent weights, each row's
    arithmetic its own. torch's batched
    path is twice as slow as its one-row path (0.33 against 0.18 s for 5 s at 1024 wide, the Xeon), so
    four tracks, or the two rows of one stereo track, cost about what one row does."""

    def __init__(self, block: Any, kernels: native.NativeKernels) -> None:
        super().__init__()
        lstm = block.lstm
        self.kernels = kernels
        self.layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for n in range(lstm.num_layers):
            w_ih = getattr(lstm, f"weight_ih_l{n}").detach().float()
            bias = (getattr(lstm, f"bias_ih_l{n}") + getattr(lstm, f"bias_hh_l{n}")).detach().float()
            w_hh = kernels.pack_lstm(getattr(lstm, f"weight_hh_l{n}").detach().float().contiguous())
            self.layers.append((w_ih.t().contiguous(), bias, w_hh))

    @staticmethod
    def fits(block: Any) -> bool:
        lstm = getattr(block, "lstm", None)
        return (
            isinstance(lstm, torch.nn.LSTM)
            and type(block).__name__ == "EncodecLSTM"
            and lstm.bias
            and not lstm.batch_first
            and not lstm.bidirectional
            and lstm.proj_size == 0
            and lstm.input_size == lstm.hidden_size
            and lstm.hidden_size % 16 == 0
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (rows, channels, frames), as EncodecLSTM takes
        sequence = x.permute(2, 0, 1).float().contiguous()  # (frames, rows, channels)
        rows = sequence.shape[1]
        hidden = sequence
        for w_ih_t, bias, w_hh in self.layers:
            # the input's products a row at a time (a batch's product would round a row differently)
            pre = torch.stack([torch.addmm(bias, hidden[:, row], w_ih_t) for row in range(rows)], dim=1)
            hidden = self.kernels.lstm(pre.contiguous(), w_hh)
        return (hidden + sequence).permute(1, 2, 0)


class _NativeResnetBlock(torch.nn.Module):
    """EnCodec's residual block (ELU, 3-tap convolution over the reflect-padded input, ELU, 1-tap
    convolution, plus the input) as one pass of the native kernel over tiles of 64 samples.

    At 64 and 128 channels oneDNN ran it as five passes over activations of tens of megabytes, with
    the padding and layout copies between them; at 256 and 512 channels the AVX-512 build makes 81 and
    106 G multiply-adds a second against oneDNN's 50-53 (the 2-core EPYC), where the AVX2 build (57
    and 59) ties and loses against oneDNN held to AVX2 (58 and 74), so there wider blocks stay in
    oneDNN. On AMX every block whose channels fit the tiles runs there, in three bf16 products (about
    2^-16 of fp32).
    """

    MAX_CHANNELS = 512  # the AVX-512 build's, as far as it was measured
    MAX_AVX2_CHANNELS = 128
    MAX_AMX_CHANNELS = 512

    def __init__(self, block: Any, kernels: native.NativeKernels) -> None:
        super().__init__()
        conv1, conv2 = block.block[1].conv, block.block[3].conv
        self.block, self.kernels = block, kernels
        self.amx = self._amx(kernels, conv1.in_channels, conv1.out_channels)
        if self.amx:  # taps first: (3, H, C) and (1, C, H)
            self.a1 = kernels.pack_amx_conv(conv1.weight.permute(2, 0, 1))
            self.a2 = kernels.pack_amx_conv(conv2.weight.permute(2, 0, 1))
        else:
            self.w1, self.w2 = kernels.pack_resblock(conv1.weight, conv2.weight)
        self.b1, self.b2 = (_bias(conv) for conv in (conv1, conv2))

    @classmethod
    def _amx(cls, kernels: native.NativeKernels, channels: int, hidden: int) -> bool:
        fits = native.fits_amx_resblock(channels, hidden)
        return kernels.amx and fits and channels <= cls.MAX_AMX_CHANNELS

    @classmethod
    def fits(cls, block: Any, kernels: native.NativeKernels) -> bool:
        layers = list(getattr(block, "block", ()))
        if len(layers) != 4 or not isinstance(getattr(block, "shortcut", None), Identity):
            return False
        elu1, pad_conv, elu2, point_conv = layers
        convs = (getattr(pad_conv, "conv", None), getattr(point_conv, "conv", None))
        if not all(isinstance(e, ELU) and e.alpha == 1.0 for e in (elu1, elu2)) or not all(
            isinstance(c, Conv1d)
            and c.stride == (1,)
            and c.dilation == (1,)
            and c.groups == 1
            and c.padding == (0,)
            for c in convs
        ):
            return False
        if any(w.causal or w.norm_type != "weight_norm" for w in (pad_conv, point_conv)):
            return False
        first, second = convs
        assert first is not None and second is not None  # both are Conv1d, checked above
        channels, hidden = first.in_channels, first.out_channels
        widest = cls.MAX_CHANNELS if kernels.vector_bits == 512 else cls.MAX_AVX2_CHANNELS
        wide_enough = channels <= widest or cls._amx(kernels, channels, hidden)
        return (
            pad_conv.pad_mode == "reflect"
            and first.kernel_size == (3,)
            and second.kernel_size == (1,)
            and channels == second.out_channels
            and wide_enough
            and hidden == second.in_channels
            and native.fits_resblock(channels, hidden)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < 2 or x.dtype != torch.float32:
            return self.block(x)
        if self.amx:
            return self.kernels.resblock_amx(x.contiguous(), self.a1, self.b1, self.a2, self.b2)
        return self.kernels.resblock(x.contiguous(), self.w1, self.b1, self.w2, self.b2)


class _NativeUpsample(torch.nn.Module):
    """EnCodec's transposed convolutions (stride S, kernel 2S) by the native kernels, with the ELU before
    each folded in. Elsewhere than on AMX the fp32 kernel takes them (strides 2-6 and 8: EnCodec's 8, 5
    and 4), sixteen output channels in a vector's lanes and a block of q's and phases summed in registers
    while the input channels pass once: 95-102 G multiply-adds a second on the EPYC against oneDNN's
    27-67; its AVX2 build made 45-57 against oneDNN's 28-51 held to AVX2 (behind it only at stride 5,
    by a tenth). On AMX every stride runs on the tiles, its S phases as two-tap products of three bf16
    parts (about 2^-16 of fp32).
    """

    def __init__(self, layer: Any, kernels: native.NativeKernels, *, activate: bool) -> None:
        super().__init__()
        conv = layer.conv
        self.layer, self.kernels, self.activate = layer, kernels, activate
        self.amx = self._amx(conv, kernels)
        self.stride = conv.stride[0]
        # Panels in AMX's layout (a pair of tensors), or one packed tensor.
        self.weight: Any = (
            kernels.pack_upsample_amx(conv.weight) if self.amx else kernels.pack_upsample(conv.weight)
        )
        self.bias = _bias(conv)
        padding = conv.kernel_size[0] - self.stride
        self.left = padding - padding // 2  # EnCodec trims the rest at the end

    @staticmethod
    def _amx(conv: ConvTranspose1d, kernels: native.NativeKernels) -> bool:
        doubled = conv.kernel_size[0] == 2 * conv.stride[0]
        return kernels.amx and doubled and native.fits_amx_conv(conv.out_channels, conv.in_channels)

    @classmethod
    def fits(cls, layer: Any, kernels: native.NativeKernels) -> bool:
        conv = getattr(layer, "conv", None)
        if not isinstance(conv, ConvTranspose1d):
            return False
        sizes = (conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0])
        return (
            not getattr(layer, "causal", True)
            and getattr(layer, "norm_type", None) == "weight_norm"
            and conv.groups == 1
            and conv.dilation == (1,)
            and conv.padding == (0,)
            and conv.output_padding == (0,)
            and (native.fits_upsample(*sizes) or cls._amx(conv, kernels))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.shape[-1] == 0:
            return self.layer(torch.nn.functional.elu(x) if self.activate else x)
        x = x.contiguous()
        if self.amx:
            return self.kernels.upsample_amx(
                x, self.weight, self.bias, self.stride, self.left, activate=self.activate
            )
        return self.kernels.upsample(
            x, self.weight, self.bias, self.stride, self.left, activate=self.activate
        )


class _NativeLastConv(torch.nn.Module):
    """EnCodec's last convolution (to the audio's channel) by the native kernel, with its reflect padding
    and the ELU before it folded in: one pass over tiles of 64 samples, with no padded copy, separate
    ELU or layout copy passing over the piece.
    """

    def __init__(self, layer: Any, kernels: native.NativeKernels, *, activate: bool) -> None:
        super().__init__()
        conv = layer.conv
        self.layer, self.kernels, self.activate = layer, kernels, activate
        self.weight, self.bias = conv.weight.detach().float().contiguous(), _bias(conv)
        padding = conv.kernel_size[0] - 1
        self.left = padding - padding // 2  # EnCodec's split of a stride-1 convolution's padding

    @classmethod
    def fits(cls, layer: Any) -> bool:
        conv = getattr(layer, "conv", None)
        return (
            isinstance(conv, Conv1d)
            and not getattr(layer, "causal", True)
            and getattr(layer, "pad_mode", None) == "reflect"
            and getattr(layer, "norm_type", None) == "weight_norm"
            and conv.stride == (1,)
            and conv.dilation == (1,)
            and conv.groups == 1
            and conv.padding == (0,)
            and native.fits_narrow(conv.out_channels, conv.kernel_size[0])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reach = max(self.left, self.weight.shape[-1] - 1 - self.left)
        if x.dtype != torch.float32 or x.shape[-1] <= reach:  # EnCodec pads short inputs its own way
            return self.layer(torch.nn.functional.elu(x) if self.activate else x)
        return self.kernels.narrow_conv(
            x.contiguous(), self.weight, self.bias, self.left, activate=self.activate
        )


def _native_layers(layers: list[Any], kernels: native.NativeKernels | None) -> None:
    """The layers (in order) that the native kernels or the narrow product can take, swapped for them."""
    for i, layer in enumerate(layers):
        if kernels is not None and _NativeLSTM.fits(layer):
            layers[i] = _NativeLSTM(layer, kernels)
            continue
        conv = getattr(layer, "conv", None)
        # an ELU that only feeds the next layer's kernel is applied inside it, as the kernel reads its
        # input (padding first is the same: ELU(0) = 0, and reflection only copies samples)
        fuse = kernels is not None and i > 0 and _is_elu(layers[i - 1])
        if kernels is not None and _NativeLastConv.fits(layer):
            layers[i] = _NativeLastConv(layer, kernels, activate=fuse)
        elif isinstance(conv, Conv1d) and _NarrowConv1d.fits(conv):
            layers[i] = _with_conv(layer, _NarrowConv1d(conv))
            fuse = False
        elif kernels is not None and _NativeUpsample.fits(layer, kernels):
            layers[i] = _NativeUpsample(layer, kernels, activate=fuse)
        else:
            fuse = False
        if kernels is not None and _NativeResnetBlock.fits(layer, kernels):
            layers[i] = _NativeResnetBlock(layer, kernels)
        if fuse:
            layers[i - 1] = Identity()


def _with_conv(layer: Any, conv: torch.nn.Module) -> Any:
    """A copy of an EnCodec convolution layer (its padding) around another inner convolution: the model's
    own layer stays as it was, for ``encodec.decode`` and any other decoder of the same model."""
    clone = copy.copy(layer)
    clone._modules = layer._modules.copy()
    clone.conv = conv
    return clone


def _is_elu(layer: Any) -> bool:
    return isinstance(layer, ELU) and layer.alpha == 1.0 and not layer.inplace


def _bias(conv: Conv1d | ConvTranspose1d) -> torch.Tensor:
    if conv.bias is None:
        return torch.zeros(conv.out_channels, dtype=torch.float32)
    return conv.bias.detach().float().contiguous()
