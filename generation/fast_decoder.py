"""A decoding step of our own over the MusicGen decoder's weights: the hot loop, without the framework.

transformers' decoder spends a third of a bf16 step in Python and dispatch (cache objects, mask
builders, kwargs plumbing) and grows its KV cache with ``torch.cat``. Here the weights are gathered
once (Q/K/V fused into one matrix, the four LM heads into one), keys and values go into buffers
allocated once for the whole pass (keys stored transposed, so each step's slice feeds the matmul
directly), and attention over one query row is a plain matmul-softmax-matmul, which beats the
default CPU SDPA kernel for a single row. The prefill still runs through transformers (once).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from generation.loader import cpu_has_vnni


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
    """``x @ W.T`` for the step's weights, in one of three forms chosen once per model.

    - ``plain``: ``F.linear`` with transformers' order of operations, so fp32 codes match it exactly.
    - ``onednn``: bf16 weights prepacked in oneDNN's blocked layout (about 1.4x on the weight products,
      which are most of a step), with GELU and the residual add fused into the products.
    - ``int8``: per-channel int8 weights through fbgemm's dynamic-quantized linear (activations are
      quantized per call): half the bytes of bf16 to stream each step, about 3x faster products.
    """

    def __init__(self, sample: torch.Tensor, int8: bool = False) -> None:
        onednn = (
            sample.device.type == "cpu"
            and sample.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
        )
        self.kind = "int8" if int8 else "onednn" if onednn else "plain"
        # Without VNNI, fbgemm's u8 x s8 products can saturate 16-bit sums: use 7-bit activations there.
        self.reduce_range = int8 and not cpu_has_vnni()

    @property
    def activation_dtype(self) -> torch.dtype | None:
        """The dtype activations must have (None: the model's own)."""
        return torch.float32 if self.kind == "int8" else None

    def prepare(self, weight: torch.Tensor) -> Any:
        weight = weight.detach().contiguous()
        if self.kind == "onednn":
            return torch.ops.mkldnn._reorder_linear_weight(weight)
        if self.kind == "int8":
            return _int8_pack(weight)
        return weight

    def __call__(self, x: torch.Tensor, weight: Any) -> torch.Tensor:
        if self.kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
        if self.kind == "int8":
            return torch.ops.quantized.linear_dynamic(x, weight, self.reduce_range)
        return F.linear(x, weight)

    def gelu(self, x: torch.Tensor, weight: Any) -> torch.Tensor:
        if self.kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, "gelu", [], "none")
        return F.gelu(self(x, weight))

    def add(self, x: torch.Tensor, weight: Any, residual: torch.Tensor) -> torch.Tensor:
        """``residual + x @ W.T`` (fused into the product with oneDNN)."""
        if self.kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, None, "add")
        return residual + self(x, weight)


def _int8_pack(weight: torch.Tensor) -> Any:
    """Symmetric per-output-channel int8 weights, prepacked for fbgemm."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # quantized tensors are marked deprecated; the kernels are not
        quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(quantized, None)


class FastDecoderWeights:
    """The decoder's weights rearranged for single-row steps; built once per loaded model."""

    def __init__(self, causal_lm: Any, *, int8: bool = False) -> None:
        model = causal_lm.model.decoder
        config = causal_lm.config
        self.heads: int = config.num_attention_heads
        self.hidden: int = config.hidden_size
        self.head_dim = self.hidden // self.heads
        self.codebooks: int = config.num_codebooks
        self.scale = self.head_dim**-0.5
        heads = causal_lm.lm_heads
        self.vocab = heads[0].weight.shape[0]
        self.linear = _Linears(heads[0].weight, int8=int8)
        self.dtype = self.linear.activation_dtype or heads[0].weight.dtype
        self.embeddings = [self._small(e.weight) for e in model.embed_tokens]
        self.positions = self._small(model.embed_positions.weights)
        self.activation = config.activation_function
        self.final_ln = self._ln(model.layer_norm)
        # The fast paths fold attention's 1/sqrt(d) into the query weights and use fused kernels; the
        # plain path keeps transformers' exact order of operations (so fp32 codes match it exactly).
        self.fast_math = self.linear.kind != "plain"
        self.gelu = self.activation == "gelu"
        self.lm_head = self.linear.prepare(torch.cat([h.weight for h in heads]))
        self.layers = [self._layer(layer) for layer in model.layers]

    def _layer(self, layer: Any) -> _Layer:
        attn = layer.self_attn
        cross = getattr(layer, "encoder_attn", None)
        pack = self.linear.prepare
        q_scale = self.scale if self.fast_math else 1.0
        return _Layer(
            ln1=self._ln(layer.self_attn_layer_norm),
            qkv=pack(torch.cat([attn.q_proj.weight * q_scale, attn.k_proj.weight, attn.v_proj.weight])),
            out=pack(attn.out_proj.weight),
            ln2=self._ln(layer.encoder_attn_layer_norm) if cross is not None else None,
            cross_q=pack(cross.q_proj.weight * q_scale) if cross is not None else None,
            cross_out=pack(cross.out_proj.weight) if cross is not None else None,
            ln3=self._ln(layer.final_layer_norm),
            fc1=pack(layer.fc1.weight),
            fc2=pack(layer.fc2.weight),
        )

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
    """Preallocated self-attention keys/values (and fixed cross-attention ones) for one decoding pass."""

    def __init__(
        self, weights: FastDecoderWeights, cache: Any, length: int, cross_mask: torch.Tensor | None
    ) -> None:
        self.w = weights
        self_cache = cache.self_attention_cache if hasattr(cache, "self_attention_cache") else cache
        first = self_cache.layers[0].keys
        rows, heads, filled, head_dim = first.shape
        self.rows, self.filled, self.length = rows, filled, length
        shape = (len(weights.layers), rows, heads)
        self.keys_t = first.new_empty((*shape, head_dim, length), dtype=weights.dtype)
        self.values = first.new_empty((*shape, length, head_dim), dtype=weights.dtype)
        for i, layer in enumerate(self_cache.layers):
            self.keys_t[i, ..., :filled] = layer.keys.transpose(-1, -2)
            self.values[i, :, :, :filled] = layer.values
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] = []
        if hasattr(cache, "cross_attention_cache") and weights.layers[0].cross_q is not None:
            for layer in cache.cross_attention_cache.layers:
                keys = layer.keys if weights.fast_math else layer.keys.transpose(-1, -2)
                self.cross.append(
                    (keys.to(weights.dtype).contiguous(), layer.values.to(weights.dtype).contiguous())
                )
        self.cross_mask = None if cross_mask is None else cross_mask.to(weights.dtype)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``(rows, codebooks, vocab)`` of the next column, given this one ``(rows, codebooks)``."""
        w, pos = self.w, self.filled
        if pos >= self.length:
            raise IndexError("the decoding pass is longer than its buffers")
        x = sum(F.embedding(tokens[:, k], w.embeddings[k]) for k in range(w.codebooks))
        x = x + w.positions[pos]
        x = x[:, None, :]  # (rows, 1, hidden)
        rows, heads, head_dim, hidden = self.rows, w.heads, w.head_dim, w.hidden
        linear, fast = w.linear, w.fast_math
        for i, layer in enumerate(w.layers):
            h = F.layer_norm(x, (hidden,), *layer.ln1[:2], layer.ln1[2])
            q, k, v = linear(h, layer.qkv).view(rows, 3, heads, head_dim).unbind(1)
            self.keys_t[i, :, :, :, pos] = k
            self.values[i, :, :, pos] = v
            scores = torch.matmul(q[:, :, None, :], self.keys_t[i, ..., : pos + 1])
            if not fast:
                scores = scores * w.scale
            attn = torch.matmul(scores.softmax(-1), self.values[i, :, :, : pos + 1])
            x = linear.add(attn.reshape(rows, 1, hidden), layer.out, x)
            if self.cross:
                h = F.layer_norm(x, (hidden,), *layer.ln2[:2], layer.ln2[2])  # type: ignore[index,misc]
                q = linear(h, layer.cross_q).view(rows, heads, 1, head_dim)  # type: ignore[arg-type]
                attn = self._cross_attention(q, i)
                x = linear.add(attn.reshape(rows, 1, hidden), layer.cross_out, x)  # type: ignore[arg-type]
            h = F.layer_norm(x, (hidden,), *layer.ln3[:2], layer.ln3[2])
            x = w.feed_forward(h, layer, x)
        self.filled = pos + 1
        x = F.layer_norm(x, (hidden,), *w.final_ln[:2], w.final_ln[2])
        return linear(x[:, 0], w.lm_head).view(rows, w.codebooks, w.vocab)

    def _cross_attention(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        keys, values = self.cross[layer]
        if self.w.fast_math:  # one fused kernel: fastest for the few text positions
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.cross_mask, scale=1.0)
        scores = torch.matmul(q, keys) * self.w.scale
        if self.cross_mask is not None:
            scores = scores + self.cross_mask
        return torch.matmul(scores.softmax(-1), values)


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
