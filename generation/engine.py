"""MusicGen generation with a decoding loop of our own around the transformers modules.

Why our own loop: transformers' ``generate`` runs the prefill twice, ignores streamers, crashes when
stopped early, and shares one RNG across a batch. Here each row has its own seed, progress is reported
every step, cancellation returns the audio decoded so far, and audio prompts (continuations) are
first-class. In fp32 with greedy decoding it produces exactly ``generate``'s codes (tested).
"""

from __future__ import annotations

import gc
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from generation import audio as audio_ops
from generation.codec import EncodecDecoder
from generation.errors import GenerationCancelled, InvalidRequest, ModelLoadError, OutOfMemory
from generation.fast_decoder import (
    FastDecoderState,
    FastDecoderWeights,
    Int8Packing,
    cross_attention_mask,
    int8_kernels,
)
from generation.loader import (
    Placement,
    checkpoint_fingerprint,
    choose_placement,
    dtype_advice,
    import_model_stack,
    load_checkpoint,
)
from generation.request import (
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    SamplingParams,
    Track,
    check_batch,
)
from generation.sampling import next_tokens, pass_uniforms

if TYPE_CHECKING:
    from generation.static_step import StaticSteps

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]

MIN_STATIC_CAPACITY = 256  # static KV buffers come in powers of two from here: few shapes, few graphs
GRAPH_CHECK_STEPS = 4  # steps the captured graph must match the eager step on, when the model loads
KEPT_STATIC_SHAPES = 4  # batch shapes whose buffers (and graphs) stay allocated between generations
PASS_SECONDS = 30.0  # MusicGen was trained on 30 s windows
CONTEXT_SECONDS = 10.0  # how much of the previous window each long-track window continues from
SEAM_SECONDS = 0.25  # cross-fade at each window seam and extension
LOOP_BLEND_SECONDS = 1.0  # extra audio blended into a loop's head


@dataclass(frozen=True)
class _Window:
    context: float  # seconds of audio prompt
    new: float  # seconds to generate after it


class MusicGenEngine:
    """A loaded MusicGen (or MusicGen-Melody) that turns compatible requests into finished tracks."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        source: str,
        placement: Placement,
        checkpoint: str | None = None,
        int8_packing: Int8Packing | None = None,
    ) -> None:
        """``checkpoint``: the checkpoint's fingerprint (``loader.checkpoint_fingerprint``), under which
        int8 weights are cached (None: made afresh); ``int8_packing``: those cached weights, packed while
        the model loaded."""
        self.model = model
        self._checkpoint = checkpoint
        self._packing = int8_packing
        self.tokenizer = tokenizer
        self.placement = placement
        self.timings: dict[str, float] = {}  # seconds each stage of load_engine took
        self._weights: FastDecoderWeights | None = None
        self._decoder: EncodecDecoder | None = None
        # On CUDA every decoding step runs on the device over static buffers, captured as CUDA graphs
        # (off when the graph fails its check at load); elsewhere the steps of fast_decoder serve.
        self.static_steps = placement.device.type == "cuda"
        self.graphs = self.static_steps
        self._static: dict[tuple[Any, ...], StaticSteps] = {}
        self._graphs: dict[tuple[Any, ...], Any] = {}
        config = model.config
        self.sample_rate: int = int(config.audio_encoder.sampling_rate)
        self.frame_rate: int = int(config.audio_encoder.frame_rate)
        self.hop = round(self.sample_rate / self.frame_rate)
        # Stereo checkpoints interleave the channels' codebooks (L1 R1 L2 R2 ...); channel c's k-th
        # codebook is number k * channels + c, and both channels' k-th codebooks share one delay.
        self.codebooks: int = int(config.decoder.num_codebooks)
        self.channels: int = int(getattr(config.decoder, "audio_channels", 1))
        self.channel_codebooks = self.codebooks // max(1, self.channels)
        check_servable(model, source)
        self.melody = config.model_type == "musicgen_melody"
        gen = model.generation_config
        start = gen.decoder_start_token_id
        self.pad_token = int(start if start is not None else config.decoder.pad_token_id)
        limit = (config.decoder.max_position_embeddings - self.channel_codebooks) / self.frame_rate
        if self.melody:
            limit -= config.chroma_length / self.frame_rate
        self.pass_seconds = min(PASS_SECONDS, math.floor(limit))
        self.info = ModelInfo(
            name=name,
            source=source,
            model_type=config.model_type,
            device=str(placement.device),
            dtype=placement.label,
            sample_rate=self.sample_rate,
            frame_rate=self.frame_rate,
            max_seconds_per_pass=self.pass_seconds,
            supports_melody=self.melody,
            channels=self.channels,
        )

    # --- public ---

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> list[GenerationResult]:
        """Generate a compatible batch (see ``check_batch``): one result per request, tracks in seed order."""
        check_batch(requests)
        requests = [r.with_seed() for r in requests]
        first = requests[0]
        self._check_request(first)
        started = time.perf_counter()
        rows = [(r, seed) for r in requests for seed in r.row_seeds]
        try:
            with torch.inference_mode():
                audio, cancelled = self._render(
                    first, [r.prompt for r, _ in rows], [s for _, s in rows], progress, cancel
                )
        except torch.OutOfMemoryError:
            self._free_memory()
            raise OutOfMemory(len(rows)) from None
        elapsed = time.perf_counter() - started
        return self._results(requests, audio, cancelled, elapsed)

    def prepare(self) -> None:
        """Make now what the first request would otherwise wait for: the step weights (packed, or
        quantized and cached) and EnCodec's decoder."""
        if not self.static_steps:
            self._fast_weights()
        self._codec_decoder()

    def close(self) -> None:
        """Drop the model and give its memory back."""
        self.model = None
        self.tokenizer = None
        self._weights = None
        self._decoder = None
        self._static.clear()
        self._graphs.clear()
        self._free_memory()

    def codes_to_audio(self, codes: torch.Tensor) -> np.ndarray:
        """EnCodec-decode ``(rows, codebooks, frames)`` codes to float32 ``(rows, channels, samples)``.

        Each channel's codebooks are decoded as a row of their own, all channels in one call.
        """
        decoder = self._codec_decoder()
        rows, _, frames = codes.shape
        per_channel = codes.reshape(rows, self.channel_codebooks, self.channels, frames).transpose(1, 2)
        with torch.inference_mode():
            audio = decoder(
                per_channel.reshape(rows * self.channels, self.channel_codebooks, frames).to(
                    self.placement.device
                )
            )
        return audio.float().cpu().numpy().reshape(rows, self.channels, -1)

    # --- planning ---

    def _check_request(self, request: GenerationRequest) -> None:
        if request.melody is not None and not self.melody:
            raise InvalidRequest(
                "melody", f"the {self.info.name} model cannot follow a melody: use the melody model"
            )
        if request.continuation is not None and request.continuation.seconds < 1.0:
            raise InvalidRequest("continuation", "the track to extend must be at least 1 s long")
        if self.melody and request.continuation is not None:
            raise InvalidRequest("continuation", "the melody model cannot continue a track: use another size")
        if self.melody and request.duration > self.pass_seconds:
            raise InvalidRequest(
                "duration", f"the melody model makes at most {self.pass_seconds:g} s in one piece"
            )

    def _windows(self, request: GenerationRequest) -> list[_Window]:
        """One pass when it fits; else windows that each continue the previous one's tail."""
        total = request.duration + (LOOP_BLEND_SECONDS if request.loop else 0.0)
        windows: list[_Window] = []
        if request.continuation is None:
            first = min(total, self.pass_seconds)
            windows.append(_Window(0.0, first))
            made = first
        else:
            made = 0.0
            total = request.duration
        context = min(CONTEXT_SECONDS, self.pass_seconds / 3)
        hop = self.pass_seconds - context
        while made < total - 1e-9:
            new = min(hop, total - made + SEAM_SECONDS)
            windows.append(_Window(context, new))
            made += new - SEAM_SECONDS
        return windows

    def _frames(self, seconds: float) -> int:
        return max(1, math.ceil(round(seconds * self.sample_rate) / self.hop))

    def _steps(self, window: _Window) -> int:
        return self._frames(window.new) + self.channel_codebooks - 1

    # --- rendering ---

    def _render(
        self,
        request: GenerationRequest,
        prompts: list[str],
        seeds: list[int],
        progress: ProgressFn | None,
        cancel: threading.Event | None,
    ) -> tuple[np.ndarray, bool]:
        """Float32 ``(rows, channels, samples)`` audio for all rows, and whether it was cut short."""
        windows = self._windows(request)
        total_steps = sum(self._steps(w) for w in windows)
        done = 0

        def on_step() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total_steps)

        generators = [torch.Generator(device=self.placement.device).manual_seed(s) for s in seeds]
        conditioning = self._condition(prompts, request)
        seam = int(SEAM_SECONDS * self.sample_rate)
        made: np.ndarray | None = None
        if request.continuation is not None:
            source = audio_ops.resample(
                request.continuation.samples, request.continuation.sample_rate, self.sample_rate
            )
            made = np.repeat(self._fit_channels(source)[None], len(prompts), axis=0)
        for window in windows:
            prompt_codes, context = None, 0
            if window.context > 0:
                assert made is not None
                # Whole frames, so that the re-synthesised prompt is exactly as long as the context.
                context = min(int(window.context * self.sample_rate), made.shape[-1]) // self.hop * self.hop
                prompt_codes = self._encode(made[..., made.shape[-1] - context :])
            codes, cancelled = self._decode(
                conditioning,
                prompt_codes,
                self._frames(window.new),
                request.sampling,
                generators,
                on_step,
                cancel,
            )
            if codes.shape[-1] == 0:
                if made is None or (request.continuation is not None and made.shape[-1] == 0):
                    raise GenerationCancelled(done)
                return made, True
            out = self.codes_to_audio(codes)
            if made is None:
                made = out
            else:
                overlap = min(seam, context)
                made = audio_ops.join(made, out[..., context - overlap :], overlap)
            if cancelled:
                return made, True
        assert made is not None
        return made, False

    def _fit_channels(self, audio: np.ndarray) -> np.ndarray:
        """``(channels, samples)`` audio with this model's channels: mixed down, or mono widened."""
        if audio.shape[0] == self.channels:
            return audio
        mono = audio.mean(axis=0, keepdims=True, dtype=np.float32)
        return np.repeat(mono, self.channels, axis=0)

    def _encode(self, audio: np.ndarray) -> torch.Tensor:
        """EnCodec codes ``(rows, codebooks, frames)`` of ``(rows, channels, samples)`` audio."""
        rows, channels, samples = audio.shape
        values = torch.from_numpy(np.ascontiguousarray(audio)).to(self.placement.device, torch.float32)
        values = values.reshape(rows * channels, 1, samples)
        encoded = self.model.audio_encoder.encode(values, torch.ones_like(values[:, 0], dtype=torch.long))
        codes = encoded.audio_codes[0]  # (rows * channels, codebooks of a channel, frames)
        frames = codes.shape[-1]
        return codes.reshape(rows, channels, -1, frames).transpose(1, 2).reshape(rows, -1, frames)

    def _condition(self, prompts: list[str], request: GenerationRequest) -> _Conditioning:
        guided = request.sampling.guidance > 1.0
        model = self.model
        if self.melody:
            tokens = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.placement.device)
            hidden = model.text_encoder(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
            ).last_hidden_state
            return self._melody_conditioning(hidden, tokens.attention_mask, request, guided)
        project = (
            model.text_encoder.config.hidden_size != model.decoder.config.hidden_size
            and model.decoder.config.cross_attention_hidden_size is None
        )
        hidden, mask = self._text_states(prompts, model.enc_to_dec_proj if project else None)
        if guided:
            hidden = torch.cat([hidden, torch.zeros_like(hidden)])
            mask = torch.cat([mask, torch.zeros_like(mask)])
        return _CrossAttention(model.decoder, self._fast_weights(), hidden, mask, guided)

    def _text_states(
        self, prompts: list[str], project: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The text encoder's states of each prompt, ``(rows, text, hidden)`` zero past a prompt's end, and
        their mask ``(rows, text)``. Each distinct prompt is encoded alone: in a batch (padded to its
        longest prompt, or just more rows) the encoder's products round differently, so a track would
        change with whatever else it was made with and its seed could not make it again."""
        states: dict[str, torch.Tensor] = {}
        for prompt in dict.fromkeys(prompts):
            tokens = self.tokenizer([prompt], return_tensors="pt").to(self.placement.device)
            encoded = self.model.text_encoder(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
            ).last_hidden_state
            states[prompt] = (project(encoded) if project is not None else encoded)[0]
        longest = max(state.shape[0] for state in states.values())
        first = next(iter(states.values()))
        hidden = first.new_zeros((len(prompts), longest, first.shape[-1]))
        mask = torch.zeros((len(prompts), longest), dtype=torch.long, device=first.device)
        for row, prompt in enumerate(prompts):
            hidden[row, : states[prompt].shape[0]] = states[prompt]
            mask[row, : states[prompt].shape[0]] = 1
        return hidden, mask

    def _melody_conditioning(
        self, hidden: torch.Tensor, mask: torch.Tensor, request: GenerationRequest, guided: bool
    ) -> _Conditioning:
        from generation.melody import chroma_features

        model, config = self.model, self.model.config
        if model.text_encoder.config.hidden_size != model.decoder.config.hidden_size:
            hidden = model.enc_to_dec_proj(hidden)
        rows = hidden.shape[0]
        null = torch.zeros((rows, 1, config.num_chroma), device=hidden.device, dtype=hidden.dtype)
        null[:, :, 0] = 1
        if request.melody is not None:
            chroma = chroma_features(request.melody, self.sample_rate, config.num_chroma)
            chroma_rows = chroma.to(hidden.device, hidden.dtype)[None].expand(rows, -1, -1)
            null = torch.zeros_like(chroma_rows)
            null[:, :, 0] = 1
        else:
            chroma_rows = null
        if guided:
            hidden = torch.cat([hidden, torch.zeros_like(hidden)])
            mask = torch.cat([mask, torch.zeros_like(mask)])
            chroma_rows = torch.cat([chroma_rows, null])
        hidden = hidden * mask[..., None]
        audio_hidden = chroma_rows
        if config.num_chroma != model.decoder.config.hidden_size:
            audio_hidden = model.audio_enc_to_dec_proj(audio_hidden)
        if audio_hidden.shape[1] < config.chroma_length:
            audio_hidden = audio_hidden.repeat(1, math.ceil(config.chroma_length / audio_hidden.shape[1]), 1)
        prefix = torch.cat([audio_hidden[:, : config.chroma_length], hidden], dim=1)
        return _Prefix(model.decoder, self._fast_weights(), prefix, guided)

    def _decode(
        self,
        conditioning: _Conditioning,
        prompt_codes: torch.Tensor | None,
        new_frames: int,
        params: SamplingParams,
        generators: list[torch.Generator],
        on_step: Callable[[], None],
        cancel: threading.Event | None,
    ) -> tuple[torch.Tensor, bool]:
        """Sample codes with the delay pattern: codebook ``i`` of frame ``f`` sits at column ``f + d + 1``,
        its delay ``d`` being its number within its channel."""
        rows, k = len(generators), self.channel_codebooks
        given = 0 if prompt_codes is None else prompt_codes.shape[-1]
        length = 1 + given + new_frames + k - 1
        pattern = self._delay_pattern(rows, length, prompt_codes)
        first = given + 1
        if self.static_steps:
            return self._decode_static(conditioning, pattern, first, params, generators, on_step, cancel)
        logits = conditioning.prefill(pattern[..., :first], length)
        draws = pass_uniforms(generators, length, self.codebooks)  # as the static steps draw them
        kernels = self._fast_weights().linear.kernels  # the choice in one native call where they run
        last = first - 1
        cancelled = False
        for t in range(first, length):
            tokens = next_tokens(logits, rows, params, draws[t], kernels)
            column = pattern[..., t]
            column = torch.where(column == -1, tokens, column)
            pattern[..., t] = column
            last = t
            on_step()
            if t == length - 1:
                break
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
            logits = conditioning.step(column)
        return self._codes(pattern, last), cancelled

    def _codes(self, pattern: torch.Tensor, last: int) -> torch.Tensor:
        """The frames complete in every codebook up to column ``last``, the delays taken out."""
        frames = max(0, last - self.channel_codebooks + 1)
        delays = [i // self.channels for i in range(self.codebooks)]
        return torch.stack([pattern[:, i, d + 1 : d + 1 + frames] for i, d in enumerate(delays)], dim=1)

    def _decode_static(
        self,
        conditioning: _Conditioning,
        pattern: torch.Tensor,
        first: int,
        params: SamplingParams,
        generators: list[torch.Generator],
        on_step: Callable[[], None],
        cancel: threading.Event | None,
    ) -> tuple[torch.Tensor, bool]:
        """``_decode`` with every step on the device (``generation.static_step``): no step waits for the
        host; on CUDA each step is one replay of a CUDA graph."""
        from generation.static_step import TEXT_BUCKET, bucket

        rows, length = len(generators), pattern.shape[-1]
        logits, cache = conditioning.run_prefill(pattern[..., :first])
        prefix = cache.get_seq_length() - first
        text = conditioning.text_length()
        steps = self._static_for(
            rows,
            conditioning.guided,
            bucket(prefix + length, MIN_STATIC_CAPACITY),
            -(-text // TEXT_BUCKET) * TEXT_BUCKET,
            params,
        )
        steps.load(
            cache,
            conditioning.cross_mask(),
            pattern,
            first,
            pass_uniforms(generators, length, self.codebooks),
            logits,
        )
        runner = self._graphs.get(steps.key(), steps)
        last, cancelled = first - 1, False
        for t in range(first, length):
            runner.step()
            last = t
            on_step()
            if t < length - 1 and cancel is not None and cancel.is_set():
                cancelled = True
                break
        return self._codes(steps.pattern[..., :length].clone(), last), cancelled

    def check_graphs(self, capture: Callable[[StaticSteps], Any] | None = None) -> bool:
        """Capture the step of a short guided pass and compare it with the eager step on the same inputs
        (``capture`` makes the stepper to check: a CUDA graph by default). If they differ, or capturing
        fails, graphs stay off with a log line and every step runs eagerly on the device."""
        from generation.static_step import GraphedSteps, agree

        capture = capture or GraphedSteps
        request = GenerationRequest("a check of the captured decoding step", duration=1.0, seed=0)
        rows, length = 1, GRAPH_CHECK_STEPS + self.channel_codebooks + 1
        generators = [torch.Generator(device=self.placement.device).manual_seed(0)]
        atol = 1e-5 if self.placement.dtype == torch.float32 else 1e-2
        try:
            with torch.inference_mode():
                conditioning = self._condition([request.prompt], request)
                pattern = self._delay_pattern(rows, length, None)
                logits, cache = conditioning.run_prefill(pattern[..., :1])
                text = conditioning.text_length()
                steps = self._new_static(
                    rows, conditioning.guided, MIN_STATIC_CAPACITY, text, request.sampling
                )
                steps.load(
                    cache,
                    conditioning.cross_mask(),
                    pattern,
                    1,
                    pass_uniforms(generators, length, self.codebooks),
                    logits,
                )
                same = agree(steps, capture(steps), GRAPH_CHECK_STEPS, atol)
            reason = "the captured step differs from the eager one"
        except Exception as exc:  # any failure to capture or replay: the eager step still serves
            same, reason = False, f"capturing the step failed: {exc}"
        if not same:
            self.graphs = False
            self._graphs.clear()
            log.warning("CUDA graphs off for %s: %s; every step runs eagerly", self.info.name, reason)
        return same

    def _new_static(
        self, rows: int, guided: bool, capacity: int, text: int, params: SamplingParams
    ) -> StaticSteps:
        from generation.static_step import StaticSteps

        return StaticSteps(
            self._fast_weights(),
            rows=rows,
            guided=guided,
            capacity=capacity,
            text=text,
            params=params,
            device=self.placement.device,
        )

    def _static_for(
        self, rows: int, guided: bool, capacity: int, text: int, params: SamplingParams
    ) -> StaticSteps:
        """The buffers (and on CUDA the graph) of this batch shape, made on first use; a few are kept."""
        from generation.static_step import GraphedSteps

        key = (rows, guided, capacity, text, params)
        steps = self._static.pop(key, None)
        if steps is None:
            while len(self._static) >= KEPT_STATIC_SHAPES:
                oldest = next(iter(self._static))
                del self._static[oldest]
                self._graphs.pop(oldest, None)
            steps = self._new_static(rows, guided, capacity, text, params)
            if self.graphs:
                self._graphs[key] = GraphedSteps(steps)
        self._static[key] = steps  # most recently used last
        return steps

    def _delay_pattern(self, rows: int, length: int, prompt_codes: torch.Tensor | None) -> torch.Tensor:
        k = self.channel_codebooks
        pattern = torch.full(
            (rows, self.codebooks, length), -1, dtype=torch.long, device=self.placement.device
        )
        for i in range(self.codebooks):
            d = i // self.channels
            pattern[:, i, : d + 1] = self.pad_token
            if k - 1 - d:
                pattern[:, i, length - (k - 1 - d) :] = self.pad_token
            if prompt_codes is not None:
                pattern[:, i, d + 1 : d + 1 + prompt_codes.shape[-1]] = prompt_codes[:, i]
        return pattern

    # --- results ---

    def _results(
        self, requests: list[GenerationRequest], audio: np.ndarray, cancelled: bool, elapsed: float
    ) -> list[GenerationResult]:
        finished = iter(self._finish_all([r for r in requests for _ in r.row_seeds], audio, cancelled))
        results = []
        for request in requests:
            tracks = tuple(Track(next(finished), seed) for seed in request.row_seeds)
            results.append(
                GenerationResult(
                    request,
                    tracks,
                    self.sample_rate,
                    self.info.name,
                    elapsed,
                    cancelled,
                    notes=self._notes(request),
                )
            )
        return results

    def _notes(self, request: GenerationRequest) -> tuple[str, ...]:
        source = request.continuation
        if source is None or source.samples.shape[0] == self.channels:
            return ()
        if self.channels == 1:
            return (f"the stereo original was mixed down to mono: the {self.info.name} model makes mono",)
        return (f"the mono original was widened to stereo: the {self.info.name} model makes stereo",)

    def _finish_all(
        self, rows: list[GenerationRequest], audio: np.ndarray, cancelled: bool
    ) -> list[np.ndarray]:
        """Each row's track finished (``_finish``), a batch's on all threads at once: loudness, limiting
        and resampling are numpy, scipy and soxr, which let go of the interpreter, and no track's finish
        depends on another's (four 5 s tracks: 90 ms one after the other, 50 ms on two threads)."""
        if len(rows) == 1:
            return [self._finish(rows[0], audio[0], cancelled)]
        with ThreadPoolExecutor(min(len(rows), max(1, torch.get_num_threads()))) as pool:
            return list(pool.map(lambda r, a: self._finish(r, a, cancelled), rows, audio))

    def _finish(self, request: GenerationRequest, audio: np.ndarray, cancelled: bool) -> np.ndarray:
        length = round(request.duration * self.sample_rate)
        if request.continuation is not None:
            source = request.continuation
            kept = audio_ops.resample(source.samples, source.sample_rate, self.sample_rate).shape[-1]
            seam = min(int(SEAM_SECONDS * self.sample_rate), kept)
            return audio_ops.finish_extension(audio[..., : kept + length], kept - seam, self.sample_rate)
        if request.loop and not cancelled:
            return audio_ops.finish(audio_ops.make_loop(audio, length), self.sample_rate, loop=True)
        return audio_ops.finish(audio[..., :length], self.sample_rate)

    def close_steps(self) -> None:
        """Drop the step weights (rebuilt on the next generation); the model stays loaded."""
        self._weights = None
        self._static.clear()
        self._graphs.clear()
        self._free_memory()

    def _fast_weights(self) -> FastDecoderWeights:
        if self._weights is None:
            self._weights = FastDecoderWeights(
                self.model.decoder,
                int8=self.placement.int8_steps,
                kernels=self.placement.kernels,
                checkpoint=self._checkpoint,
                packing=self._packing,
            )
            self._packing = None
        return self._weights

    def _codec_decoder(self) -> EncodecDecoder:
        if self._decoder is None:
            self._decoder = EncodecDecoder(
                self.model.audio_encoder, self.placement.device, kernels=self.placement.kernels
            )
        return self._decoder

    def _free_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def cache_keyword(decoder: Any) -> str:
    """The name under which transformers' decoder takes its cache: ``cache`` since transformers 5.24,
    ``past_key_values`` before (5.24 - 5.39 take both, the old name with a warning)."""
    return "cache" if "cache" in inspect.signature(type(decoder).forward).parameters else "past_key_values"


def check_servable(model: Any, source: str) -> None:
    """Refuse, when it loads, a checkpoint whose shape the engine cannot serve, naming what is unsupported."""
    config = model.config
    decoder = config.decoder
    channels = int(getattr(decoder, "audio_channels", 1))
    codebooks = int(decoder.num_codebooks)
    if channels not in (1, 2):
        raise ModelLoadError(
            source, f"{source} has {channels} audio channels: only mono and stereo are supported"
        )
    if codebooks % channels:
        raise ModelLoadError(
            source, f"{source} has {codebooks} codebooks, which {channels} channels cannot share evenly"
        )
    encodec = model.audio_encoder
    quantizers = encodec.quantizer.get_num_quantizers_for_bandwidth(config.audio_encoder.target_bandwidths[0])
    if quantizers != codebooks // channels:
        raise ModelLoadError(
            source,
            f"{source} predicts {codebooks // channels} codebooks per channel but its EnCodec encodes "
            f"{quantizers}: they must match",
        )
    if decoder.vocab_size != config.audio_encoder.codebook_size:
        raise ModelLoadError(
            source,
            f"{source} predicts {decoder.vocab_size} codes per codebook but its EnCodec has "
            f"{config.audio_encoder.codebook_size}: they must match",
        )


class _Conditioning:
    """How the decoder sees the prompt: the known columns (and any prefix) once through transformers, or,
    for the start column alone over cross-attended text, our first step; then our own fast steps."""

    def __init__(self, decoder: Any, weights: FastDecoderWeights, guided: bool) -> None:
        self.decoder, self.weights, self.guided = decoder, weights, guided
        self.state: FastDecoderState | None = None

    def _prefill_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError

    def _cross_mask(self) -> torch.Tensor | None:
        return None

    def prefill(self, ids: torch.Tensor, length: int) -> torch.Tensor:
        """Run the known columns (and any prefix); keep room for ``length`` columns in all."""
        if ids.shape[-1] == 1 and self.text_length():
            # Only the start column, the text across cross-attention: it is our first step, over caches
            # that hold just the text's projections (transformers' pass would read every decoder weight
            # for one column; from a cold disk, seconds).
            self.state = FastDecoderState(self.weights, self._text_cache(), length, self._cross_mask())
            return self.step(ids[..., 0])
        logits, cache = self.run_prefill(ids)
        room = cache.get_seq_length() - ids.shape[-1] + length
        self.state = FastDecoderState(self.weights, cache, room, self._cross_mask())
        return logits

    def run_prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The known columns' (and any prefix's) pass through transformers: the last logits and the cache."""
        return self._transformers_prefill(ids, self._prefill_kwargs())

    def _transformers_prefill(self, ids: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        if self.guided:
            ids = torch.cat([ids, ids])
        from transformers import DynamicCache, EncoderDecoderCache

        rows, k, known = ids.shape
        config = self.decoder.config
        cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
        kwargs = {**kwargs, cache_keyword(self.decoder): cache}
        out = self.decoder(input_ids=ids.reshape(rows * k, known), use_cache=True, **kwargs)
        return out.logits.reshape(rows, k, -1, out.logits.shape[-1])[:, :, -1], cache

    def text_length(self) -> int:
        """Positions of text the decoder attends to across (0: none, the prefix is in the sequence)."""
        return 0

    def _text_cache(self) -> _TextCache:
        raise NotImplementedError

    def cross_mask(self) -> torch.Tensor | None:
        return self._cross_mask()

    def step(self, column: torch.Tensor) -> torch.Tensor:
        assert self.state is not None, "prefill first"
        return self.state.step(torch.cat([column, column]) if self.guided else column)


class _CrossAttention(_Conditioning):
    """MusicGen: text states reach the decoder through cross-attention."""

    def __init__(
        self,
        decoder: Any,
        weights: FastDecoderWeights,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        guided: bool,
    ) -> None:
        super().__init__(decoder, weights, guided)
        self.hidden, self.mask = hidden, mask

    def _prefill_kwargs(self) -> dict[str, Any]:
        return {"encoder_hidden_states": self.hidden, "encoder_attention_mask": self.mask}

    def _cross_mask(self) -> torch.Tensor | None:
        return cross_attention_mask(self.decoder.config, self.mask, self.hidden)

    def text_length(self) -> int:
        return int(self.hidden.shape[1])

    def _text_cache(self) -> _TextCache:
        """Empty self-attention caches and each layer's cross-attention keys and values of the text, as
        transformers' attention computes them: each row's projected alone over its own text (a batch's
        products would round them differently), zero past its end, where the mask hides them."""
        layers = self.decoder.model.decoder.layers
        rows, text, _ = self.hidden.shape
        heads, lengths = self.weights.heads, self.mask.sum(dim=-1).tolist()

        def projected(project: Any) -> torch.Tensor:  # (rows, text, hidden) → (rows, heads, text, d)
            states = self.hidden.new_zeros((rows, text, project.out_features))
            for row, length in enumerate(lengths):
                if length:  # guidance's unconditional rows have no text: zeros (no biases)
                    states[row, :length] = project(self.hidden[row : row + 1, :length])[0]
            return states.view(rows, text, heads, -1).transpose(1, 2)

        cross = [
            _KeysValues(projected(a.k_proj), projected(a.v_proj))
            for a in (layer.encoder_attn for layer in layers)
        ]
        empty = self.hidden.new_empty((rows, heads, 0, self.weights.head_dim))
        return _TextCache(_Layers([_KeysValues(empty, empty) for _ in layers]), _Layers(cross))

    def run_prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The known columns through transformers one row at a time (with its unconditional twin), over
        the row's own text, then the rows' logits and caches side by side: the same for a row whatever
        else is in the batch (a batch's products round differently)."""
        rows, text = ids.shape[0], self.text_length()
        lengths = self.mask.sum(dim=-1).tolist()
        twins = [[row, rows + row] if self.guided else [row] for row in range(rows)]
        parts = []
        for row in range(rows):
            length = max(1, lengths[row])
            kwargs = {
                "encoder_hidden_states": self.hidden[twins[row], :length],
                "encoder_attention_mask": self.mask[twins[row], :length],
            }
            parts.append(self._transformers_prefill(ids[row : row + 1], kwargs))
        order = [
            (row, twin) for twin in range(len(twins[0])) for row in range(rows)
        ]  # conditional rows first

        def side_by_side(tensors: list[torch.Tensor], pad: bool) -> torch.Tensor:
            picked = [tensors[row][twin : twin + 1] for row, twin in order]
            if pad:  # cross-attention's (1, heads, length, d): zeros past each row's text
                picked = [F.pad(t, (0, 0, 0, text - t.shape[2])) for t in picked]
            return torch.cat(picked)

        logits = side_by_side([logits for logits, _ in parts], pad=False)
        caches = [cache for _, cache in parts]
        layers = range(len(caches[0].self_attention_cache.layers))

        def merged(which: str, pad: bool) -> _Layers:
            def layer(i: int) -> _KeysValues:
                kept = [getattr(c, which).layers[i] for c in caches]
                return _KeysValues(
                    side_by_side([k.keys for k in kept], pad), side_by_side([k.values for k in kept], pad)
                )

            return _Layers([layer(i) for i in layers])

        merged_cache = _TextCache(
            merged("self_attention_cache", False), merged("cross_attention_cache", True)
        )
        return logits, _PrefilledCache(merged_cache, caches[0].get_seq_length())


@dataclass(frozen=True)
class _KeysValues:
    keys: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class _Layers:
    layers: list[_KeysValues]


@dataclass(frozen=True)
class _TextCache:
    """What FastDecoderState reads of transformers' EncoderDecoderCache, before the first column."""

    self_attention_cache: _Layers
    cross_attention_cache: _Layers


class _PrefilledCache:
    """The rows' caches of a prefill run row by row, side by side (as FastDecoderState and the static
    steps read transformers' EncoderDecoderCache), with the positions they hold."""

    def __init__(self, merged: _TextCache, filled: int) -> None:
        self.self_attention_cache = merged.self_attention_cache
        self.cross_attention_cache = merged.cross_attention_cache
        self.filled = filled

    def get_seq_length(self) -> int:
        return self.filled


class _Prefix(_Conditioning):
    """MusicGen-Melody: chroma and text states are prepended to the decoder's input once."""

    def __init__(self, decoder: Any, weights: FastDecoderWeights, prefix: torch.Tensor, guided: bool) -> None:
        super().__init__(decoder, weights, guided)
        self.prefix = prefix

    def _prefill_kwargs(self) -> dict[str, Any]:
        return {"encoder_hidden_states": self.prefix}


def load_engine(
    source: str,
    *,
    name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    kernels: bool = True,
) -> MusicGenEngine:
    """Load a checkpoint (hub id or directory) into an engine; ``name`` is what users see (e.g. ``small``).

    ``kernels=False`` keeps bf16 CPU steps and EnCodec on torch's kernels instead of the native ones.
    """
    placement = replace(choose_placement(device, dtype, kernels), kernels=kernels)
    advice = dtype_advice(device, dtype, placement)
    if advice is not None:
        log.warning("%s", advice)
    imported = time.perf_counter()
    import_model_stack()
    started = time.perf_counter()
    fingerprint = checkpoint_fingerprint(source) if placement.int8_steps else None
    packing = None
    if fingerprint is not None:
        ours = int8_kernels(placement.kernels) if placement.dtype == torch.bfloat16 else None
        packing = Int8Packing(fingerprint, placement.dtype, ours)
    model, tokenizer = load_checkpoint(source, placement)
    loaded = time.perf_counter()
    if placement.device.type == "cpu" and placement.dtype == torch.bfloat16 and placement.kernels:
        from generation import native

        native.load()  # built (or found wanting) while loading, not under the first progress bar
    engine = MusicGenEngine(
        model,
        tokenizer,
        name=name or source,
        source=source,
        placement=placement,
        checkpoint=fingerprint,
        int8_packing=packing,
    )
    engine.prepare()
    prepared = time.perf_counter()
    if engine.graphs:
        engine.check_graphs()
    engine.timings = {
        "imports": started - imported,
        "load": loaded - started,
        "prepare": prepared - loaded,
    }
    log.info(
        "loaded %s on %s in %s: ready in %.1f s (weights %.1f s, preparing the steps %.1f s)",
        source,
        placement.device,
        placement.label,
        time.perf_counter() - started,
        loaded - started,
        prepared - loaded,
    )
    return engine
