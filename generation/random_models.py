"""MusicGen models with random weights, built offline: real architectures for benchmarks, tiny ones for tests.

Random weights of a real shape cost exactly what the real model costs, which is all a speed benchmark
needs; nothing here reaches the Hugging Face hub.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    EncodecConfig,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    MusicgenMelodyConfig,
    MusicgenMelodyDecoderConfig,
    MusicgenMelodyForConditionalGeneration,
    T5Config,
    T5Tokenizer,
)

from generation.catalog import SIZES

log = logging.getLogger(__name__)

# The stored architectures; every published checkpoint's shape is one of them or derived from them
# (melody-large: MusicGen-Melody with the large decoder; stereo-*: two channels of four codebooks each,
# interleaved L1 R1 L2 R2 ..., as facebook/musicgen-stereo-* store them).
STORED = ("small", "medium", "large", "melody")
ARCHITECTURES = SIZES

_CORPUS = [
    "calm lo-fi piano with rain",
    "upbeat electronic dance music with heavy bass",
    "epic orchestral soundtrack, strings and brass, cinematic",
    "acoustic guitar folk song, warm and gentle",
    "jazz trio, walking bass, brushed drums, soft saxophone",
    "80s synthwave with arpeggios and a driving beat",
    "ambient drone pad, slow evolving textures",
    "hip hop beat with vinyl crackle and mellow keys",
    "rock anthem with distorted guitars and loud drums",
    "chiptune video game music, fast and happy",
    "reggae groove with offbeat guitar and deep bass",
    "classical string quartet, romantic and slow",
]

# A small but complete MusicGen: real 32 kHz EnCodec geometry (hop 640, 50 frames/s, 4 codebooks).
TINY = {
    "text_encoder": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
    "audio_encoder": {
        "sampling_rate": 32000,
        "upsampling_ratios": [8, 5, 4, 4],
        # 4 quantizers: bandwidth = 4 codebooks x 50 frames/s x log2(64) bits = 1.2 kbps
        "target_bandwidths": [1.2],
        "codebook_size": 64,
        "codebook_dim": 16,
        "num_filters": 4,
        "hidden_size": 16,
        "num_lstm_layers": 1,
        "num_residual_layers": 1,
        "kernel_size": 7,
        "last_kernel_size": 7,
        "residual_kernel_size": 3,
        "dilation_growth_rate": 2,
        "compress": 2,
        "use_conv_shortcut": False,  # as in every real MusicGen (its residual blocks take the native kernel)
        "norm_type": "weight_norm",
        "pad_mode": "reflect",
        "normalize": False,
        "use_causal_conv": False,
        "trim_right_ratio": 1.0,
    },
    "decoder": {
        "vocab_size": 64,
        "max_position_embeddings": 2048,
        # heads of 32 and widths in 32s: the shapes the native bf16 step kernels take (real models' too)
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "ffn_dim": 128,
        "num_codebooks": 4,
        "audio_channels": 1,
    },
}


def architecture(name: str) -> dict[str, Any]:
    """The real architecture of a published checkpoint: ``small`` ... ``stereo-melody-large``."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(ARCHITECTURES)}")
    stereo = name.startswith("stereo-")
    base = name.removeprefix("stereo-")
    if base == "melody-large":
        arch = _stored("melody")
        large = _stored("large")["decoder"]
        arch["decoder"].update({k: large[k] for k in ("hidden_size", "num_hidden_layers", "ffn_dim")})
        arch["decoder"]["num_attention_heads"] = large["num_attention_heads"]
    else:
        arch = _stored(base)
    return widen(arch) if stereo else arch


def widen(arch: dict[str, Any]) -> dict[str, Any]:
    """The stereo form of a mono architecture: two channels of the same codebooks."""
    arch = json.loads(json.dumps(arch))
    arch["decoder"]["num_codebooks"] = 2 * arch["decoder"]["num_codebooks"]
    arch["decoder"]["audio_channels"] = 2
    return arch


def _stored(name: str) -> dict[str, Any]:
    text = resources.files("generation").joinpath("model_configs", f"musicgen-{name}.json").read_text()
    return json.loads(text)


def tiny_architecture(melody: bool = False, stereo: bool = False) -> dict[str, Any]:
    arch: dict[str, Any] = json.loads(json.dumps(TINY))
    arch["model_type"] = "musicgen_melody" if melody else "musicgen"
    if melody:
        arch["num_chroma"] = 12
        arch["chroma_length"] = 235
    return widen(arch) if stereo else arch


def build_tokenizer(vocab_size: int = 200) -> T5Tokenizer:
    """A T5 tokenizer with a small Unigram vocabulary trained here (no sentencepiece, no hub)."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    return T5Tokenizer(vocab=[(piece, score) for piece, score in vocab], extra_ids=0)


def build_model(arch: dict[str, Any], seed: int = 0) -> tuple[Any, T5Tokenizer]:
    """A model of the given architecture with random weights, generation defaults as on the hub."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    melody = arch["model_type"] == "musicgen_melody"
    text_arch = _strip(arch["text_encoder"])
    text = T5Config(**{**text_arch, "vocab_size": max(len(tokenizer), text_arch.get("vocab_size", 32))})
    audio = EncodecConfig(**_strip(arch["audio_encoder"]))
    dec = _strip(arch["decoder"])
    codebook_size = audio.codebook_size
    dec.update(vocab_size=codebook_size, pad_token_id=codebook_size, bos_token_id=codebook_size)
    config: Any
    model: Any
    if melody:
        config = MusicgenMelodyConfig(
            text_encoder=text,
            audio_encoder=audio,
            decoder=MusicgenMelodyDecoderConfig(**dec),
            num_chroma=arch.get("num_chroma", 12),
            chroma_length=arch.get("chroma_length", 235),
        )
        model = MusicgenMelodyForConditionalGeneration(config)
    else:
        config = MusicgenConfig(text_encoder=text, audio_encoder=audio, decoder=MusicgenDecoderConfig(**dec))
        model = MusicgenForConditionalGeneration(config)
    _fill_codebooks(model)
    gen = model.generation_config
    gen.decoder_start_token_id = gen.pad_token_id = gen.bos_token_id = codebook_size
    gen.max_length = 1500
    gen.do_sample = True
    gen.guidance_scale = 3.0
    model.eval()
    return model, tokenizer


def save_model(arch: dict[str, Any], directory: Path, seed: int = 0) -> Path:
    """Build a random model and save it (model + tokenizer) the way hub checkpoints are laid out."""
    model, tokenizer = build_model(arch, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    log.info("saved a random %s model to %s", arch["model_type"], directory)
    return directory


def _strip(section: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k != "model_type"}


def _fill_codebooks(model: Any) -> None:
    """A fresh EnCodec has all-zero codebooks (every code sounds alike): give them noise instead."""
    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:
            embed = layer.codebook.embed
            embed.copy_(torch.randn_like(embed))
