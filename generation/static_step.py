"""Decoding steps over buffers of fixed size, with nothing in a step that waits for the host.

A step here does all of a decoding step's work on the device: the decoder over a static KV cache (one
buffer per layer, as long as the pass can grow; positions not written yet are masked out), guidance,
the choice of each row's tokens from random numbers drawn for the whole pass beforehand from its own
seed, and the delay pattern's bookkeeping (the column and the position are device tensors). Shapes are
fixed for a batch size, so on CUDA the whole step is captured once as a CUDA graph and replayed
(``GraphedSteps``); the graph checks itself against the eager step on the same inputs before it is
used, and the eager step serves where it differs. Every part also runs on the CPU, where it is tested.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F

from generation.fast_decoder import FastDecoderWeights
from generation.request import SamplingParams
from generation.sampling import choose, guide

log = logging.getLogger(__name__)

TEXT_BUCKET = 32  # text positions are padded (and masked) to a multiple of this


def bucket(n: int, least: int) -> int:
    """``n`` rounded up to a power of two, at least ``least``."""
    return max(least, 1 << max(0, math.ceil(math.log2(max(1, n)))))


class StaticSteps:
    """The buffers of one batch size (rows, KV capacity, text length) and the step that runs over them.

    ``load`` fills them for a new pass (the prefix of keys and values the prefill made, the delay
    pattern, the random numbers and the prefill's logits); each ``step`` then chooses column ``t``'s
    tokens, writes them into the pattern and runs the decoder on them for column ``t + 1``'s logits.
    """

    def __init__(
        self,
        weights: FastDecoderWeights,
        *,
        rows: int,
        guided: bool,
        capacity: int,
        text: int,
        params: SamplingParams,
        device: torch.device,
    ) -> None:
        self.w = weights
        self.rows, self.guided, self.capacity, self.text, self.params = rows, guided, capacity, text, params
        decoder_rows, layers = 2 * rows if guided else rows, len(weights.layers)
        heads, head_dim, dtype = weights.heads, weights.head_dim, weights.dtype
        shape = (decoder_rows, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        cross = weights.layers[0].cross_q is not None and text > 0
        text_shape = (decoder_rows, heads, text, head_dim)
        cross_layers = layers if cross else 0
        self.cross_keys = [torch.zeros(text_shape, dtype=dtype, device=device) for _ in range(cross_layers)]
        self.cross_values = [torch.zeros(text_shape, dtype=dtype, device=device) for _ in range(cross_layers)]
        self.cross_mask = torch.zeros((decoder_rows, 1, 1, text), dtype=dtype, device=device)
        codebooks, vocab = weights.codebooks, weights.vocab
        self.pattern = torch.zeros((rows, codebooks, capacity), dtype=torch.long, device=device)
        self.uniforms = torch.zeros((capacity, rows, codebooks), dtype=torch.float32, device=device)
        self.logits = torch.zeros((decoder_rows, codebooks, vocab), dtype=dtype, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.spots = torch.arange(capacity, device=device)
        self.scale = 1.0 if weights.fast_math else weights.scale

    def key(self) -> tuple[int, bool, int, int, SamplingParams]:
        return (self.rows, self.guided, self.capacity, self.text, self.params)

    def load(
        self,
        cache: Any,
        cross_mask: torch.Tensor | None,
        pattern: torch.Tensor,
        first: int,
        uniforms: torch.Tensor,
        logits: torch.Tensor,
    ) -> None:
        """Fill the buffers for a pass: the prefill's cache and logits, and the pass's pattern and numbers."""
        self_cache = cache.self_attention_cache if hasattr(cache, "self_attention_cache") else cache
        filled = 0
        for i, layer in enumerate(self_cache.layers):
            filled = layer.keys.shape[2]
            self.keys[i][:, :, :filled] = layer.keys
            self.values[i][:, :, :filled] = layer.values
        if self.cross_keys:
            for i, layer in enumerate(cache.cross_attention_cache.layers):
                text = layer.keys.shape[2]
                self.cross_keys[i].zero_()
                self.cross_values[i].zero_()
                self.cross_keys[i][:, :, :text] = layer.keys
                self.cross_values[i][:, :, :text] = layer.values
            self.cross_mask.fill_(torch.finfo(self.cross_mask.dtype).min)
            self.cross_mask[..., :text] = 0.0 if cross_mask is None else cross_mask.reshape(-1, 1, 1, text)
        length = pattern.shape[-1]
        self.pattern[..., :length] = pattern
        self.uniforms[:length] = uniforms
        self.logits.copy_(logits)
        # the column decoded first sits at position ``filled`` (the prefill's last column is at filled - 1)
        self.position.fill_(filled)
        self.column.fill_(first)

    def step(self) -> None:
        """Choose column ``t``'s tokens into the pattern, then decode them: logits of column ``t + 1``."""
        scores = guide(self.logits.float(), self.rows, self.params.guidance)
        uniforms = self.uniforms.index_select(0, self.column)[0]
        tokens = choose(scores, self.params, uniforms)
        known = self.pattern.index_select(2, self.column)[..., 0]
        chosen = torch.where(known == -1, tokens, known)
        self.pattern.index_copy_(2, self.column, chosen[..., None])
        self.logits.copy_(self._decode(torch.cat([chosen, chosen]) if self.guided else chosen))
        self.position += 1
        self.column += 1

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        w = self.w
        hidden, rows = w.hidden, tokens.shape[0]
        x = sum(F.embedding(tokens[:, k], w.embeddings[k]) for k in range(w.codebooks))
        x = (x + w.positions.index_select(0, self.position))[:, None, :]  # (rows, 1, hidden)
        hidden_mask = torch.zeros((1, self.capacity), dtype=x.dtype, device=x.device).masked_fill(
            self.spots > self.position, float("-inf")
        )
        linear = w.linear
        for i, layer in enumerate(w.layers):
            h = F.layer_norm(x, (hidden,), *layer.ln1[:2], layer.ln1[2])
            q, k, v = linear(h, layer.qkv).view(rows, 3, w.heads, w.head_dim).unbind(1)
            self.keys[i].index_copy_(2, self.position, k[:, :, None, :].to(self.keys[i].dtype))
            self.values[i].index_copy_(2, self.position, v[:, :, None, :].to(self.values[i].dtype))
            attn = self._attend(q, self.keys[i], self.values[i], hidden_mask)
            x = linear.add(attn.reshape(rows, 1, hidden), layer.out, x)
            if self.cross_keys:
                h = F.layer_norm(x, (hidden,), *layer.ln2[:2], layer.ln2[2])  # type: ignore[index,call-arg]
                q = linear(h, layer.cross_q).view(rows, w.heads, w.head_dim)
                attn = self._attend(q, self.cross_keys[i], self.cross_values[i], self.cross_mask)
                x = linear.add(attn.reshape(rows, 1, hidden), layer.cross_out, x)
            h = F.layer_norm(x, (hidden,), *layer.ln3[:2], layer.ln3[2])
            x = w.feed_forward(h, layer, x)
        x = F.layer_norm(x, (hidden,), *w.final_ln[:2], w.final_ln[2])
        return linear(x[:, 0], w.lm_head).view(rows, w.codebooks, w.vocab)

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """One query row per head over every position of ``keys``; ``mask`` hides the ones not to see."""
        scores = torch.matmul(q[:, :, None, :].to(keys.dtype), keys.transpose(-1, -2))
        if self.scale != 1.0:
            scores = scores * self.scale
        weights = (scores + mask).softmax(-1, dtype=torch.float32).to(values.dtype)
        return torch.matmul(weights, values).to(q.dtype)


class GraphedSteps:
    """A ``StaticSteps`` whose step is captured once as a CUDA graph and replayed."""

    def __init__(self, steps: StaticSteps) -> None:
        self.steps = steps
        state = _snapshot(steps)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph: allocations and kernel choices
            for _ in range(2):
                steps.step()
        torch.cuda.current_stream().wait_stream(stream)
        _restore(steps, state)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            steps.step()

    def step(self) -> None:
        self.graph.replay()


def _snapshot(steps: StaticSteps) -> list[torch.Tensor]:
    return [t.clone() for t in (steps.pattern, steps.logits, steps.position, steps.column)]


def _restore(steps: StaticSteps, state: list[torch.Tensor]) -> None:
    for target, saved in zip((steps.pattern, steps.logits, steps.position, steps.column), state, strict=True):
        target.copy_(saved)


def agree(eager: StaticSteps, replayed: Any, steps: int, atol: float) -> bool:
    """Whether ``replayed`` (a graph over ``eager``'s buffers, or any stepper) matches the eager step.

    Both start from the same loaded state; logits and chosen tokens are compared after every step.
    """
    state = _snapshot(eager)
    expected = []
    for _ in range(steps):
        eager.step()
        expected.append((eager.logits.float().clone(), eager.pattern.clone()))
    _restore(eager, state)
    same = True
    for logits, pattern in expected:
        replayed.step()
        if not torch.allclose(eager.logits.float(), logits, atol=atol, rtol=0) or not torch.equal(
            eager.pattern, pattern
        ):
            same = False
            break
    _restore(eager, state)
    return same
