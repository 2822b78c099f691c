"""A decoding step of our own over the MusicGen decoder's weights: the hot loop, without the framework.

transformers' decoder spends a third of a bf16 step in Python and dispatch (cache objects, mask
builders, kwargs plumbing) and grows its KV cache with ``torch.cat``. Here the weights are gathered
once (Q/K/V fused into one matrix, the four LM heads into one), keys and values go into buffers
allocated once for the whole pass (keys stored transposed, so each step's slice feeds the matmul
directly), and attention over one query row is a plain matmul-softmax-matmul, which beats the
default CPU SDPA kernel for a single row. The prefill still runs through transformers (once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


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
    """``x @ W.T`` for the step's weights: oneDNN-prepacked in bf16 on the CPU, plain elsewhere.

    Prepacking puts each weight in the blocked layout oneDNN's bf16 kernels read fastest (about 1.4x
    on the weight products, which are most of a step) and fuses GELU into ``fc1``. It is kept out of
    fp32, where plain ``linear`` is what makes our codes match transformers' exactly.
    """

    def __init__(self, sample: torch.Tensor) -> None:
        self.packed = (
            sample.device.type == "cpu"
            and sample.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
        )

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        weight = weight.detach().contiguous()
        return torch.ops.mkldnn._reorder_linear_weight(weight) if self.packed else weight

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
        return F.linear(x, weight)

    def gelu(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, "gelu", [], "none")
        return F.gelu(F.linear(x, weight))


class FastDecoderWeights:
    """The decoder's weights rearranged for single-row steps; built once per loaded model."""

    def __init__(self, causal_lm: Any) -> None:
        model = causal_lm.model.decoder
        config = causal_lm.config
        self.heads: int = config.num_attention_heads
        self.hidden: int = config.hidden_size
        self.head_dim = self.hidden // self.heads
        self.codebooks: int = config.num_codebooks
        self.scale = self.head_dim**-0.5
        self.embeddings = [e.weight for e in model.embed_tokens]
        self.positions = model.embed_positions
        self.activation = config.activation_function
        self.final_ln = _ln(model.layer_norm)
        heads = causal_lm.lm_heads
        self.vocab = heads[0].weight.shape[0]
        self.linear = _Linears(heads[0].weight)
        self.gelu_fused = self.activation == "gelu"
        self.lm_head = self.linear.prepare(torch.cat([h.weight for h in heads]))
        self.layers = [self._layer(layer) for layer in model.layers]

    def _layer(self, layer: Any) -> _Layer:
        attn = layer.self_attn
        cross = getattr(layer, "encoder_attn", None)
        pack = self.linear.prepare
        return _Layer(
            ln1=_ln(layer.self_attn_layer_norm),
            qkv=pack(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])),
            out=pack(attn.out_proj.weight),
            ln2=_ln(layer.encoder_attn_layer_norm) if cross is not None else None,
            cross_q=pack(cross.q_proj.weight) if cross is not None else None,
            cross_out=pack(cross.out_proj.weight) if cross is not None else None,
            ln3=_ln(layer.final_layer_norm),
            fc1=pack(layer.fc1.weight),
            fc2=pack(layer.fc2.weight),
        )

    def feed_forward(self, h: torch.Tensor, layer: _Layer) -> torch.Tensor:
        if self.gelu_fused:
            return self.linear(self.linear.gelu(h, layer.fc1), layer.fc2)
        return self.linear(_activate(self.linear(h, layer.fc1), self.activation), layer.fc2)


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
        self.keys_t = first.new_empty((len(weights.layers), rows, heads, head_dim, length))
        self.values = first.new_empty((len(weights.layers), rows, heads, length, head_dim))
        for i, layer in enumerate(self_cache.layers):
            self.keys_t[i, ..., :filled] = layer.keys.transpose(-1, -2)
            self.values[i, :, :, :filled] = layer.values
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] = []
        if hasattr(cache, "cross_attention_cache") and weights.layers[0].cross_q is not None:
            for layer in cache.cross_attention_cache.layers:
                self.cross.append((layer.keys.transpose(-1, -2).contiguous(), layer.values.contiguous()))
        self.cross_mask = cross_mask

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``(rows, codebooks, vocab)`` of the next column, given this one ``(rows, codebooks)``."""
        w, pos = self.w, self.filled
        if pos >= self.length:
            raise IndexError("the decoding pass is longer than its buffers")
        x = sum(F.embedding(tokens[:, k], w.embeddings[k]) for k in range(w.codebooks))
        x = x + w.positions.weights[pos]
        x = x[:, None, :]  # (rows, 1, hidden)
        rows, heads, head_dim = self.rows, w.heads, w.head_dim
        linear = w.linear
        for i, layer in enumerate(w.layers):
            h = F.layer_norm(x, (w.hidden,), *layer.ln1[:2], layer.ln1[2])
            q, k, v = linear(h, layer.qkv).view(rows, 3, heads, head_dim).unbind(1)
            self.keys_t[i, :, :, :, pos] = k
            self.values[i, :, :, pos] = v
            scores = torch.matmul(q[:, :, None, :], self.keys_t[i, ..., : pos + 1]) * w.scale
            attn = torch.matmul(scores.softmax(-1), self.values[i, :, :, : pos + 1])
            x = x + linear(attn.reshape(rows, 1, w.hidden), layer.out)
            if self.cross:
                h = F.layer_norm(x, (w.hidden,), *layer.ln2[:2], layer.ln2[2])  # type: ignore[index,misc]
                q = linear(h, layer.cross_q).view(rows, heads, 1, head_dim)  # type: ignore[arg-type]
                keys_t, values = self.cross[i]
                scores = torch.matmul(q, keys_t) * w.scale
                if self.cross_mask is not None:
                    scores = scores + self.cross_mask
                attn = torch.matmul(scores.softmax(-1), values)
                x = x + linear(attn.reshape(rows, 1, w.hidden), layer.cross_out)  # type: ignore[arg-type]
            h = F.layer_norm(x, (w.hidden,), *layer.ln3[:2], layer.ln3[2])
            x = x + w.feed_forward(h, layer)
        self.filled = pos + 1
        x = F.layer_norm(x, (w.hidden,), *w.final_ln[:2], w.final_ln[2])
        return linear(x[:, 0], w.lm_head).view(rows, w.codebooks, w.vocab)


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


def _ln(module: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
    return module.weight, module.bias, float(module.eps)


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
