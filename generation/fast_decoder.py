"""A decoding step of our own over the MusicGen decoder's weights: the hot loop, without the framework.

Here the weights are gathered once (Q/K/V fused into one matrix, the LM heads into one), attention
over one query row is a plain matmul-softmax-matmul, and keys and values never grow by ``torch.cat``:
the exact (fp32 reference) path writes them into buffers allocated once; the fast CPU path keeps them
contiguous so oneDNN never copies them (see ``_ContiguousAttention``). On a CPU with AVX-512 BF16 a
bf16 step runs on our own kernels instead (``generation.native``), with torch's kernels as the
fallback. A text-only pass starts with one of these steps; known columns (an audio prompt) and the
melody model's prefix are prefilled through transformers (once). On CUDA the engine uses the steps of
``generation.static_step`` instead. Measured speeds: docs/engine.md.
"""

from __future__ import annotations

import logging
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from generation import native, weight_cache
from generation.loader import cpu_has_vnni

log = logging.getLogger(__name__)

# How int8 weights are derived from a checkpoint (``int8_quantize`` of ``_Matrices.matrix``);
# part of their cache key: change it when either changes.
INT8_FORMAT = "int8 per-channel symmetric, q scaled, v1"


@dataclass(frozen=True)
class _Layer:
    ln1: tuple[torch.Tensor, torch.Tensor, float]
    qkv: torch.Tensor
    out: torch.Tensor
    ln2: tuple[torch.Tensor, torch.Tensor, float] | None
    cross_q: torch.Tensor | None
    cross_out: torch.Tensor | None
    ln3: tuple[torch.Tensor, torch.Tensor, float]
    fc1: torch.Tensor
    fc2: torch.Tensor


class _Linears:
    """``x @ W.T`` for the step's weights, in one of five forms chosen once per model.

    - ``plain``: ``F.linear`` with transformers' order of operations, so fp32 codes match it exactly.
    - ``native``: bf16 weights packed for our own kernel (``generation.native``); GELU and the residual
      add are fused into the product.
    - ``onednn``: bf16 weights prepacked in oneDNN's blocked layout, with GELU and the residual add fused
      into the products. Used where the native kernels cannot be built and oneDNN runs bf16.
    - ``native-int8``: per-channel int8 weights packed for our own kernel (``NativeKernels.pack_int8``),
      bf16 activations quantized per row in the kernel: half the bytes of bf16 to stream each step.
    - ``int8``: the same int8 weights through fbgemm's dynamic-quantized linear (activations are
      quantized per call, in fp32). Used where the native kernels cannot run int8.
    """

    def __init__(
        self, sample: torch.Tensor, int8: bool = False, kernels: bool = True, int8_fits: bool = True
    ) -> None:
        bf16_cpu = sample.device.type == "cpu" and sample.dtype == torch.bfloat16
        if not bf16_cpu:
            self.kernels = None
        elif int8:
            self.kernels = int8_kernels(kernels) if int8_fits else None
        else:
            self.kernels = native.load() if kernels else None
        onednn = bf16_cpu and onednn_bf16_supported()
        kind = "native" if self.kernels else "onednn" if onednn else "plain"
        self.kind = ("native-int8" if self.kernels else "int8") if int8 else kind
        # Without VNNI, fbgemm's u8 x s8 products can saturate 16-bit sums: use 7-bit activations there.
        self.reduce_range = int8 and not cpu_has_vnni()

    @property
    def activation_dtype(self) -> torch.dtype | None:
        """The dtype activations must have (None: the model's own)."""
        return torch.float32 if self.kind == "int8" else None

    def prepare(self, weight: torch.Tensor) -> Any:
        """A weight in the form torch's kernels take (``onednn``, ``plain``). Our kernels' weights and
        int8 ones are packed all at once instead (``FastDecoderWeights._prepare_all``)."""
        if self.kernels is not None or self.kind == "int8":
            raise ValueError(f"{self.kind} weights are packed all at once, not one by one")
        weight = weight.detach().contiguous()
        if self.kind == "onednn":
            return torch.ops.mkldnn._reorder_linear_weight(weight)
        return weight

    def __call__(self, x: torch.Tensor, weight: Any) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.linear(x.contiguous(), weight)
        if self.kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
        if self.kind == "int8":
            return torch.ops.quantized.linear_dynamic(x, weight, self.reduce_range)
        return F.linear(x, weight)

    def gelu(self, x: torch.Tensor, weight: Any) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.linear(x.contiguous(), weight, gelu=True)
        if self.kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, "gelu", [], "none")
        return F.gelu(self(x, weight))

    def add(self, x: torch.Tensor, weight: Any, residual: torch.Tensor) -> torch.Tensor:
        """``residual + x @ W.T`` (fused into the product with the native kernel and oneDNN)."""
        if self.kernels is not None:
            return self.kernels.linear(x.contiguous(), weight, residual.contiguous())
        if self.kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, None, "add")
        return residual + self(x, weight)


def onednn_bf16_supported() -> bool:
    """Whether oneDNN's bf16 products run on this CPU (they need AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def int8_quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric per-output-channel int8 weights: ``ints`` (rows, cols) and fp32 ``scales`` (rows,)."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    ints = (weight / scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return {"ints": ints, "scales": scales}


def int8_shapes(rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What ``int8_quantize`` makes of a (rows, cols) matrix."""
    return {"ints": ((rows, cols), torch.int8), "scales": ((rows,), torch.float32)}


def int8_prepack(ints: torch.Tensor, scales: torch.Tensor) -> Any:
    """Quantized weights in fbgemm's packed layout (made in each process: it is not portable)."""
    zero_points = torch.zeros(ints.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # quantized tensors are marked deprecated; the kernels are not
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch._make_per_channel_quantized_tensor(ints, scales.double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(quantized, None)


def int8_pack(parts: dict[str, torch.Tensor], kernels: native.NativeKernels | None) -> Any:
    """One matrix's ``int8_quantize`` parts packed for our kernels (``kernels``) or else for fbgemm."""
    return kernels.pack_int8(**parts) if kernels is not None else int8_prepack(**parts)


def int8_pack_all(
    quantized: dict[str, dict[str, torch.Tensor]], kernels: native.NativeKernels | None
) -> dict[str, Any]:
    """``int8_pack`` of every matrix, on all of torch's threads (fbgemm packs one matrix on one thread;
    ours packs each on all, into one buffer on huge pages: see ``native.huge_page_buffer``)."""
    if kernels is not None:
        sizes = [
            (parts["ints"].shape[0], parts["ints"].shape[1] + native.INT8_EXTRA)
            for parts in quantized.values()
        ]
        buffer = native.huge_page_buffer((sum(rows * cols for rows, cols in sizes),), torch.int8)
        ours: dict[str, Any] = {}
        at = 0
        for (name, parts), (rows, cols) in zip(quantized.items(), sizes, strict=True):
            ours[name] = kernels.pack_int8(**parts, out=buffer[at : at + rows * cols].view(rows, cols))
            at += rows * cols
        return ours
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        packed = pool.map(lambda parts: int8_pack(parts, None), quantized.values())
        return dict(zip(quantized, packed, strict=True))


def native_pack_all(matrices: _Matrices, kernels: native.NativeKernels) -> dict[str, torch.Tensor]:
    """Every step matrix packed for our bf16 kernel, all in one buffer. A stacked matrix (Q/K/V, the LM
    heads) is its parts packed one after the other: the same layout as packing the stack (a panel holds
    32 rows of one part), without stacking them into new memory first.

    On 4 kB pages, then asked for 2 MB ones (``native.ask_huge_pages``), which khugepaged gathers
    within minutes: a worker's steps get them without its start paying for them. One request's bf16
    steps stream all 688 MB (musicgen-small), on 4 kB pages 170,000 page walks a step: on the 2-core
    EPYC, an engine on 2 MB pages against one on 4 kB (16 rounds of 5 s, passes in turn) took 8-27%
    less time for one request in the median (best 9-13%), 6-9% for four. Faulting 0.7 GB of 2 MB pages
    in from the start cost 0.1-0.4 s more than 4 kB pages on the EPYC once the VM's memory had been
    touched and up to 1.4 s on memory it had not, 1.3-1.7 s on the Xeon (where a step gained 3-5%), and
    faulting them in during the load or the imports slowed those as much (``MADV_POPULATE_WRITE`` in a
    thread), which the 3 s start cannot afford.
    """
    shapes = {name: matrices.shape(name) for name in matrices.names}
    buffer = torch.empty(sum(rows * cols for rows, cols in shapes.values()), dtype=torch.bfloat16)
    packed: dict[str, torch.Tensor] = {}
    at = 0
    for name, (rows, cols) in shapes.items():
        packed[name] = buffer[at : at + rows * cols].view(rows, cols)
        for weight, factor in matrices.parts(name):
            part = weight.detach() * factor if factor != 1.0 else weight.detach()
            kernels.pack(part, out=buffer[at : at + part.numel()].view(part.shape))
            at += part.numel()
    native.ask_huge_pages(buffer)
    return packed


def int8_kernels(kernels: bool = True) -> native.NativeKernels | None:
    """Our kernels where they run int8 products on this CPU (and ``kernels`` allows them), else None."""
    loaded = native.load() if kernels else None
    return loaded if loaded is not None and loaded.int8 else None


def int8_key(checkpoint: str, source_dtype: torch.dtype) -> str:
    """The cache key of a checkpoint's int8 weights, quantized from its weights in ``source_dtype``."""
    return f"{INT8_FORMAT}\n{source_dtype}\n{checkpoint}"


class Int8Packing:
    """A checkpoint's cached int8 weights, read and packed (for ``kernels``, our kernels, or else fbgemm)
    in the background from before the model loads: packing is C++ that lets go of the interpreter,
    loading is mostly Python, so on two cores the two overlap. ``FastDecoderWeights`` takes the result
    once it knows the shapes to expect."""

    def __init__(
        self, checkpoint: str, source_dtype: torch.dtype, kernels: native.NativeKernels | None = None
    ) -> None:
        self.key = int8_key(checkpoint, source_dtype)
        self.kernels = kernels
        self._result: tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None = None
        self._thread = threading.Thread(target=self._pack, name="int8-packing", daemon=True)
        self._thread.start()

    def _pack(self) -> None:
        try:
            found = weight_cache.read(self.key)
            if found is not None:
                self._result = found, int8_pack_all(found, self.kernels)
        except Exception:  # a damaged file a packer refuses: the weights are made again instead
            log.warning("packing the cached int8 weights failed: they are made again", exc_info=True)

    def take(self, shapes: weight_cache.Shapes) -> dict[str, Any] | None:
        """The packed weights if the cache held exactly ``shapes``' tensors, else None (once)."""
        self._thread.join()
        result, self._result = self._result, None
        if result is None or not weight_cache.matches(result[0], shapes):
            return None
        return result[1]


class _Matrices:
    """The step's matrices by name (``lm_head``, ``<layer>.qkv``, ``.out``, ``.cross_q``, ``.cross_out``,
    ``.fc1``, ``.fc2``), stacked from the decoder's weights on demand, queries scaled by ``q_scale``."""

    def __init__(self, heads: Any, layers: Any, q_scale: float) -> None:
        self.heads, self.layers, self.q_scale = list(heads), list(layers), q_scale
        self.dtype: torch.dtype = self.heads[0].weight.dtype
        self.names = ["lm_head"]
        for index, layer in enumerate(self.layers):
            cross = ["cross_q", "cross_out"] if getattr(layer, "encoder_attn", None) is not None else []
            self.names += [f"{index}.{kind}" for kind in ("qkv", "out", *cross, "fc1", "fc2")]

    def parts(self, name: str) -> list[tuple[torch.Tensor, float]]:
        """The weights matrix ``name`` stacks, each with the factor it is scaled by."""
        if name == "lm_head":
            return [(head.weight, 1.0) for head in self.heads]
        index, kind = name.split(".")
        layer = self.layers[int(index)]
        attn, cross = layer.self_attn, getattr(layer, "encoder_attn", None)  # cross: with a cross_* name
        match kind:
            case "qkv":
                q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
                return [(q, self.q_scale), (k, 1.0), (v, 1.0)]
            case "out":
                return [(attn.out_proj.weight, 1.0)]
            case "cross_q" if cross is not None:
                return [(cross.q_proj.weight, self.q_scale)]
            case "cross_out" if cross is not None:
                return [(cross.out_proj.weight, 1.0)]
        return [(getattr(layer, kind).weight, 1.0)]  # fc1, fc2

    def shape(self, name: str) -> tuple[int, int]:
        """``(rows, cols)`` of matrix ``name``, without stacking it."""
        parts = self.parts(name)
        return sum(weight.shape[0] for weight, _ in parts), parts[0][0].shape[1]

    def matrix(self, name: str) -> torch.Tensor:
        parts = [weight * factor if factor != 1.0 else weight for weight, factor in self.parts(name)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class FastDecoderWeights:
    """The decoder's weights rearranged for single-row steps; built once per loaded model."""

    def __init__(
        self,
        causal_lm: Any,
        *,
        int8: bool = False,
        kernels: bool = True,
        checkpoint: str | None = None,
        packing: Int8Packing | None = None,
    ) -> None:
        """``checkpoint``: the checkpoint's fingerprint (``loader.checkpoint_fingerprint``), under which
        int8 weights are cached between runs (None: made afresh); ``packing``: those weights, being
        packed since before the model loaded."""
        model = causal_lm.model.decoder
        config = causal_lm.config
        self.heads: int = config.num_attention_heads
        self.hidden: int = config.hidden_size
        self.head_dim = self.hidden // self.heads
        self.codebooks: int = config.num_codebooks
        self.scale = self.head_dim**-0.5
        heads = causal_lm.lm_heads
        self.vocab = heads[0].weight.shape[0]
        ffn = model.layers[0].fc1.weight.shape[0]
        # The native kernels work in 32-wide pieces: every real MusicGen fits, the tiny test models not all.
        fits = (
            native.fits_attention(self.head_dim)
            and self.heads <= native.MAX_HEADS
            and native.fits_linear(self.hidden, ffn)
            and native.fits_linear(ffn, self.hidden)
            and native.fits_linear(self.vocab, self.hidden)  # each LM head packs on its own
        )
        int8_fits = native.fits_linear_int8(self.hidden, ffn) and native.fits_linear_int8(ffn, self.hidden)
        self.linear = _Linears(heads[0].weight, int8=int8, kernels=kernels and fits, int8_fits=int8_fits)
        self.dtype = self.linear.activation_dtype or heads[0].weight.dtype
        # Attention reads the whole cache every step: keep it in the model's dtype (bf16 halves its
        # bytes when int8 products need fp32 activations).
        self.cache_dtype = heads[0].weight.dtype
        self.embeddings = [self._small(e.weight) for e in model.embed_tokens]
        self.positions = self._small(model.embed_positions.weights)
        self.activation = config.activation_function
        self.final_ln = self._ln(model.layer_norm)
        # The fast paths fold attention's 1/sqrt(d) into the query weights and use fused kernels; the
        # plain path keeps transformers' exact order of operations (so fp32 codes match it exactly).
        self.fast_math = self.linear.kind != "plain"
        self.gelu = self.activation == "gelu"
        matrices = _Matrices(heads, model.layers, self.scale if self.fast_math else 1.0)
        packed = self._prepare_all(matrices, checkpoint, packing)
        self.lm_head = packed["lm_head"]
        self.layers = [self._layer(i, layer, packed) for i, layer in enumerate(model.layers)]

    def _layer(self, index: int, layer: Any, packed: dict[str, Any]) -> _Layer:
        cross = getattr(layer, "encoder_attn", None) is not None
        return _Layer(
            ln1=self._ln(layer.self_attn_layer_norm),
            qkv=packed[f"{index}.qkv"],
            out=packed[f"{index}.out"],
            ln2=self._ln(layer.encoder_attn_layer_norm) if cross else None,
            cross_q=packed[f"{index}.cross_q"] if cross else None,
            cross_out=packed[f"{index}.cross_out"] if cross else None,
            ln3=self._ln(layer.final_layer_norm),
            fc1=packed[f"{index}.fc1"],
            fc2=packed[f"{index}.fc2"],
        )

    def _prepare_all(
        self, matrices: _Matrices, checkpoint: str | None, packing: Int8Packing | None
    ) -> dict[str, Any]:
        """Every step matrix in the form ``self.linear`` computes with. bf16 weights for our kernels are
        packed into one buffer. int8 weights are quantized once per checkpoint (kept in
        ``generation.weight_cache``) and packed on all threads, or taken from ``packing`` (packed from
        the cache while the model loaded)."""
        if self.linear.kind == "native":
            assert self.linear.kernels is not None
            return native_pack_all(matrices, self.linear.kernels)
        if self.linear.kind not in ("int8", "native-int8"):
            return {name: self.linear.prepare(matrices.matrix(name)) for name in matrices.names}
        shapes = {name: int8_shapes(*matrices.shape(name)) for name in matrices.names}
        key = None if checkpoint is None else int8_key(checkpoint, matrices.dtype)
        if packing is not None and packing.key == key and packing.kernels is self.linear.kernels:
            packed = packing.take(shapes)
            if packed is not None:
                return packed
        quantized = weight_cache.cached(
            key, shapes, lambda name: int8_quantize(matrices.matrix(name).detach())
        )
        return int8_pack_all(quantized, self.linear.kernels)

    def feed_forward(self, h: torch.Tensor, layer: _Layer, residual: torch.Tensor) -> torch.Tensor:
        if self.gelu:
            inner = self.linear.gelu(h, layer.fc1)
        else:
            inner = _activate(self.linear(h, layer.fc1), self.activation)
        return self.linear.add(inner, layer.fc2, residual)

    def _small(self, tensor: torch.Tensor) -> torch.Tensor:
        """Non-matrix weights in the activations' dtype."""
        return tensor.detach().to(self.dtype)

    def _ln(self, module: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self._small(module.weight), self._small(module.bias), float(module.eps)


class FastDecoderState:
    """The self-attention keys/values (and fixed cross-attention ones) of one decoding pass."""

    def __init__(
        self, weights: FastDecoderWeights, cache: Any, length: int, cross_mask: torch.Tensor | None
    ) -> None:
        self.w = weights
        self_cache = cache.self_attention_cache if hasattr(cache, "self_attention_cache") else cache
        prefix = [(layer.keys, layer.values) for layer in self_cache.layers]
        self.rows, _, self.filled, _ = prefix[0][0].shape
        self.length = length
        self.attention: _PlainAttention | _ContiguousAttention | _NativeAttention
        if weights.linear.kernels is not None:
            int8 = weights.linear.kind == "native-int8"  # int8 weights attend over int8 caches
            self.attention = _NativeAttention(prefix, length, weights.linear.kernels, int8)
        elif weights.fast_math:
            self.attention = _ContiguousAttention(prefix, weights.cache_dtype)
        else:
            self.attention = _PlainAttention(prefix, length, weights.scale, weights.dtype)
        cross_layers = []
        if hasattr(cache, "cross_attention_cache") and weights.layers[0].cross_q is not None:
            cross_layers = [(layer.keys, layer.values) for layer in cache.cross_attention_cache.layers]
        # Guidance's unconditional rows come last and attend over the text of no prompt: values that are
        # all zero (the projections have no biases), so their cross-attention adds exactly zero. Only
        # the rows before them take part.
        self.cross_rows = self.rows
        while self.cross_rows > 0 and all(not v[self.cross_rows - 1].any() for _, v in cross_layers):
            self.cross_rows -= 1
        # One fused SDPA kernel is the faster over the few text positions for one request's two rows;
        # from four rows on, matmul-softmax-matmul in fp32 is, and the exact path always uses matmuls.
        # Keys are stored the way each product wants them.
        # The native kernel takes the text's keys/values position-major, (rows, text, heads * head_dim).
        self.cross_native = weights.linear.kernels is not None
        self.cross_fused = weights.fast_math and self.cross_rows <= 2 and not self.cross_native
        self.cross_dtype = (
            weights.dtype if self.cross_fused or self.cross_native or not weights.fast_math else torch.float32
        )
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] = []
        for keys, values in cross_layers:
            keys, values = keys[: self.cross_rows], values[: self.cross_rows]
            if self.cross_native:  # (rows, heads, text, head_dim) → (rows, text, hidden)
                keys, values = (t.transpose(1, 2).flatten(2) for t in (keys, values))
            elif not self.cross_fused:
                keys = keys.transpose(-1, -2)
            self.cross.append(
                (keys.to(self.cross_dtype).contiguous(), values.to(self.cross_dtype).contiguous())
            )
        kernels, text = weights.linear.kernels, self.cross[0][0].shape[1] if self.cross else 0
        self.cross_scratch = (
            kernels.attention_scratch(weights.heads, weights.head_dim, text)
            if kernels and self.cross
            else None
        )
        self.cross_mask = None
        if cross_mask is not None:
            cross_mask = cross_mask[: self.cross_rows]
        if cross_mask is not None and self.cross_native:  # fp32 (rows, text); reshape refuses any other size
            self.cross_mask = (
                cross_mask.float().reshape(self.cross_rows, text or cross_mask.shape[-1]).contiguous()
            )
        elif cross_mask is not None:
            self.cross_mask = cross_mask.to(self.cross_dtype)
        # The native step reads each row's own prompt alone (lengths in place of a padding mask: the same
        # sums, without reading the padding), and the int8 step the text's keys and values as int8 caches
        # too (then the bf16 ones are not kept). Python's steps (no GELU) and any mask other than a padding
        # prefix keep the mask.
        self.cross_int8: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cross_lengths: torch.Tensor | None = None
        native_step = isinstance(self.attention, _NativeAttention) and weights.gelu
        if native_step and kernels is not None and self.cross:
            self.cross_lengths = prompt_lengths(self.cross_mask, self.cross_rows, text)
            if self.cross_lengths is not None and weights.linear.kind == "native-int8":
                self.cross_int8 = [kernels.int8_caches(k, v, weights.heads, text) for k, v in self.cross]
                self.cross, self.cross_mask = [], None
        # With the native kernels (and GELU, as every MusicGen has) the whole step is one native call.
        self.native_step = self._native_step() if native_step else None

    def _native_step(self) -> native.NativeStep:
        w, attention = self.w, self.attention
        assert isinstance(attention, _NativeAttention) and w.linear.kernels is not None and w.gelu
        layers = []
        for i, layer in enumerate(w.layers):
            fields = {
                "ln1": layer.ln1, "ln2": layer.ln2, "ln3": layer.ln3, "qkv": layer.qkv, "out": layer.out,
                "cross_q": layer.cross_q, "cross_out": layer.cross_out, "fc1": layer.fc1, "fc2": layer.fc2,
                "keys": attention.keys[i], "values": attention.values[i],
            }  # fmt: skip
            if self.cross_rows:
                fields["cross_keys"], fields["cross_values"] = (self.cross_int8 or self.cross)[i]
            layers.append(fields)
        return native.NativeStep(
            w.linear.kernels,
            heads=w.heads,
            embeddings=w.embeddings,
            positions=w.positions,
            final_ln=w.final_ln,
            lm_head=w.lm_head,
            layers=layers,
            rows=self.rows,
            cross_rows=self.cross_rows,
            cross_mask=self.cross_mask if self.cross_rows and self.cross_lengths is None else None,
            cross_lengths=self.cross_lengths if self.cross_rows else None,
        )

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``(rows, codebooks, vocab)`` of the next column, given this one ``(rows, codebooks)``."""
        w, pos = self.w, self.filled
        if pos >= self.length:
            raise IndexError("the decoding pass is longer than its buffers")
        if self.native_step is not None:
            logits = self.native_step(tokens.contiguous(), pos)
            self.filled = pos + 1
            self.attention.advance()
            return logits
        x = sum(F.embedding(tokens[:, k], w.embeddings[k]) for k in range(w.codebooks))
        x = x + w.positions[pos]
        x = x[:, None, :]  # (rows, 1, hidden)
        rows, hidden = self.rows, w.hidden
        linear = w.linear
        for i, layer in enumerate(w.layers):
            h = F.layer_norm(x, (hidden,), *layer.ln1[:2], layer.ln1[2])
            attn = self.attention(i, linear(h, layer.qkv))
            x = linear.add(attn.reshape(rows, 1, hidden), layer.out, x)
            if self.cross_rows:
                a = self.cross_rows
                seen = x[:a]
                h = F.layer_norm(seen, (hidden,), *layer.ln2[:2], layer.ln2[2])  # type: ignore[index,call-arg]
                q = linear(h, layer.cross_q)
                attn = self._cross_attention(q, i)
                seen = linear.add(attn.reshape(a, 1, hidden), layer.cross_out, seen)
                x = seen if a == rows else torch.cat([seen, x[a:]])
            h = F.layer_norm(x, (hidden,), *layer.ln3[:2], layer.ln3[2])
            x = w.feed_forward(h, layer, x)
        self.filled = pos + 1
        self.attention.advance()
        x = F.layer_norm(x, (hidden,), *w.final_ln[:2], w.final_ln[2])
        return linear(x[:, 0], w.lm_head).view(rows, w.codebooks, w.vocab)

    def _cross_attention(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        """Attention of the projected queries ``(rows, 1, hidden)`` over the text, ``(rows, ..., hidden)``."""
        keys, values = self.cross[layer]
        if self.cross_native:
            kernels = self.w.linear.kernels
            return kernels.cross_attend(q, keys, values, self.cross_mask, self.w.heads, self.cross_scratch)  # type: ignore[union-attr]
        q = q.view(self.cross_rows, self.w.heads, 1, self.w.head_dim)
        if self.cross_fused:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.cross_mask, scale=1.0)
        scores = torch.matmul(q.to(keys.dtype), keys)
        if not self.w.fast_math:  # the fast paths fold the scale into the query weights
            scores = scores * self.w.scale
        if self.cross_mask is not None:
            scores = scores + self.cross_mask
        return torch.matmul(scores.softmax(-1), values).to(q.dtype)


class _PlainAttention:
    """Self-attention over buffers allocated once, in transformers' order of operations (exact in fp32)."""

    def __init__(
        self,
        prefix: list[tuple[torch.Tensor, torch.Tensor]],
        length: int,
        scale: float,
        dtype: torch.dtype,
    ) -> None:
        rows, heads, filled, head_dim = prefix[0][0].shape
        shape = (len(prefix), rows, heads)
        self.scale = scale
        self.keys_t = prefix[0][0].new_empty((*shape, head_dim, length), dtype=dtype)
        self.values = prefix[0][0].new_empty((*shape, length, head_dim), dtype=dtype)
        for i, (keys, values) in enumerate(prefix):
            self.keys_t[i, ..., :filled] = keys.transpose(-1, -2)
            self.values[i, :, :, :filled] = values
        self.filled = filled

    def __call__(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = _split_heads(qkv, self.keys_t.shape[2])
        pos = self.filled
        self.keys_t[layer, :, :, :, pos] = k
        self.values[layer, :, :, pos] = v
        scores = torch.matmul(q[:, :, None, :], self.keys_t[layer, ..., : pos + 1]) * self.scale
        return torch.matmul(scores.softmax(-1), self.values[layer, :, :, : pos + 1])

    def advance(self) -> None:
        self.filled += 1


class _ContiguousAttention:
    """Self-attention whose keys and values stay contiguous, so the products never copy them.

    oneDNN's batched product copies any operand that is a slice of a longer buffer, and over a growing
    cache that copy costs more than the product (at 8 rows, two thirds of the attention time). So each
    layer's cache is one contiguous tensor with room for more positions: every step attends over all
    of it, the positions not written yet masked out, and when the room is used up each tensor is copied
    into a larger one. The room is a quarter of what is filled (at least ``MIN_ROOM``): about 12% wasted
    columns on average, and a copy of the cache every ``filled / 4`` steps, which keeps a 30 s pass at
    about 20 copies. Five operations a layer: at one request's two rows a step is mostly dispatch.
    """

    MIN_ROOM = 16

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> None:
        rows, self.heads, self.filled, head_dim = prefix[0][0].shape
        self.batch = rows * self.heads
        flat = [t.to(dtype).reshape(self.batch, self.filled, head_dim) for pair in prefix for t in pair]
        self.keys, self.values = flat[0::2], flat[1::2]
        self._grow()

    def _grow(self) -> None:
        """Room for more positions, zeros (finite: masked scores and values stay clean)."""
        room = max(self.MIN_ROOM, self.filled // 4)
        for cache in (self.keys, self.values):
            for i, t in enumerate(cache):  # one layer at a time: the old tensor goes before the next grows
                cache[i] = torch.cat([t, t.new_zeros((self.batch, room, t.shape[2]))], 1)
                del t
        self.mask = self.keys[0].new_full((1, 1, self.filled + room), float("-inf"))
        self.mask[..., : self.filled + 1] = 0.0

    def __call__(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = _split_heads(qkv, self.heads)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, self.filled] = k.reshape(self.batch, -1)
        values[:, self.filled] = v.reshape(self.batch, -1)
        scores = torch.bmm(q.reshape(self.batch, 1, -1).to(keys.dtype), keys.transpose(1, 2))
        scores += self.mask
        return torch.bmm(scores.softmax(-1), values).to(q.dtype)

    def advance(self) -> None:
        self.filled += 1
        if self.filled == self.keys[0].shape[1]:
            self._grow()
        else:
            self.mask[..., self.filled] = 0.0


class _NativeAttention:
    """Self-attention by the native kernel: caches allocated once, written and read in one call a layer.

    The kernel reads only the positions filled so far, so the caches can be allocated for the whole
    pass at once (no regrowth, no mask), and it writes the new key and value itself. They are
    position-major, ``(rows, capacity, heads * head_dim)``: a row's keys are one stream for all its
    heads (per-head slices of a few kB ran at two thirds of the memory's speed). With ``int8`` (the int8
    steps) they are int8, each head of a position on its own scale: half the bytes to stream a step.
    """

    def __init__(
        self,
        prefix: list[tuple[torch.Tensor, torch.Tensor]],
        length: int,
        kernels: native.NativeKernels,
        int8: bool = False,
    ) -> None:
        rows, self.heads, self.filled, head_dim = prefix[0][0].shape
        self.kernels = kernels
        width = self.heads * head_dim
        cache_width = native.int8_cache_width(width, self.heads) if int8 else width
        if int8:  # int8 values lie four positions together
            length = native.int8_cache_capacity(length)
        # every layer's keys, then values, in one buffer; positions are read only once written
        buffer = native.huge_page_buffer(
            (2, len(prefix), rows, length, cache_width), torch.int8 if int8 else torch.bfloat16
        )
        self.keys, self.values = list(buffer[0]), list(buffer[1])  # a contiguous view a layer
        for layer, pair in enumerate(prefix):
            for caches, is_keys, source in zip((self.keys, self.values), (True, False), pair, strict=True):
                # (rows, heads, filled, head_dim) → position-major (rows, filled, width)
                source = source.transpose(1, 2).reshape(rows, self.filled, width)
                if int8:
                    kernels.fill_int8_cache(caches[layer], source.contiguous(), self.heads, keys=is_keys)
                else:
                    caches[layer][:, : self.filled] = source
        self.scratch = kernels.attention_scratch(self.heads, head_dim, length)

    def __call__(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        return self.kernels.attend(
            qkv, self.keys[layer], self.values[layer], self.heads, self.filled, self.scratch
        )

    def advance(self) -> None:
        self.filled += 1


def _split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, 1, 3 * hidden)`` fused projections → q, k, v of ``(rows, heads, head_dim)``."""
    rows = qkv.shape[0]
    return qkv.view(rows, 3, heads, -1).unbind(1)  # type: ignore[return-value]


def prompt_lengths(mask: torch.Tensor | None, rows: int, text: int) -> torch.Tensor | None:
    """Each row's prompt length ``(rows,)`` int32, where an additive cross-attention ``mask (rows, text)``
    (None: nothing masked) lets each row see a prefix of the text, at least one position, and hides the
    rest so that it weighs exactly nothing (a mask under -1e30: exp gives 0 in fp32); else None."""
    if rows == 0 or text == 0:
        return None
    if mask is None:
        return torch.full((rows,), text, dtype=torch.int32)
    mask = mask.reshape(rows, text)
    seen, hidden = mask == 0, mask < -1e30
    lengths = seen.sum(-1)
    prefix = torch.arange(text)[None, :] < lengths[:, None]
    if not (bool((seen == prefix).all()) and bool((hidden == ~prefix).all()) and int(lengths.min()) >= 1):
        return None
    return lengths.to(torch.int32)


def cross_attention_mask(
    decoder_config: Any, mask: torch.Tensor, hidden: torch.Tensor
) -> torch.Tensor | None:
    """The additive cross-attention mask transformers builds for one query row (None: nothing masked)."""
    from transformers.masking_utils import create_bidirectional_mask

    query = hidden.new_zeros((hidden.shape[0], 1, hidden.shape[-1]))
    built = create_bidirectional_mask(
        config=decoder_config, inputs_embeds=query, attention_mask=mask, encoder_hidden_states=hidden
    )
    if built is None:
        return None
    if built.dtype == torch.bool:
        return torch.zeros(built.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
            ~built, torch.finfo(hidden.dtype).min
        )
    return built


def _activate(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"unsupported activation {name!r}")
