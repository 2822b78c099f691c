"""Audio finishing and encoding: loudness, peak safety, fades, loops, seams, WAV/FLAC in memory."""

from __future__ import annotations

import io
import logging

import numpy as np
import pyloudnorm
import soundfile as sf
import soxr
from scipy.ndimage import minimum_filter1d, uniform_filter1d

from generation.errors import AudioInputError
from generation.request import AudioClip

log = logging.getLogger(__name__)

TARGET_LUFS = -14.0
TRUE_PEAK_CEILING_DB = -1.0
FADE_IN_SECONDS = 0.01
FADE_OUT_SECONDS = 0.05
SEAM_RAMP_SECONDS = 0.25
LIMITER_LOOKAHEAD_SECONDS = 0.005
FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16")}
PCM_SCALE = 32767.0


def db_to_gain(db: float) -> float:
    return float(10.0 ** (db / 20.0))


def true_peak(audio: np.ndarray, sample_rate: int) -> float:
    """Peak of ``(channels, n)`` audio after 4x oversampling (ITU-R BS.1770 true peak), linear."""
    if audio.size == 0:
        return 0.0
    upsampled = soxr.resample(audio.T.astype(np.float64), sample_rate, 4 * sample_rate, quality="HQ")
    return float(max(np.abs(upsampled).max(), np.abs(audio).max()))


def loudness(audio: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness in LUFS (ITU-R BS.1770-4); ``-inf`` for silence or audio under 0.4 s."""
    if audio.shape[-1] < int(0.4 * sample_rate) + 1:
        return float("-inf")
    meter = pyloudnorm.Meter(sample_rate)
    return float(meter.integrated_loudness(audio.T.astype(np.float64)))


def normalise(
    audio: np.ndarray,
    sample_rate: int,
    target_lufs: float = TARGET_LUFS,
    ceiling_db: float = TRUE_PEAK_CEILING_DB,
    *,
    loop: bool = False,
) -> np.ndarray:
    """Loudness to ``target_lufs``, true peaks held under ``ceiling_db`` by a look-ahead limiter.

    A single gain cannot do both for peaky audio (it would stop at the ceiling, quieter than the
    target), so the gain goes to the target and the limiter takes the few peaks above the ceiling
    down smoothly; a second pass makes up the loudness the limiter took.
    """
    out = audio.astype(np.float32, copy=True)
    if not np.isfinite(loudness(out, sample_rate)):  # silence, or too short to measure: peaks only
        peak = true_peak(out, sample_rate)
        return out * min(1.0, db_to_gain(ceiling_db) / peak) if peak > 0 else out
    previous = None
    for _ in range(4):
        current = loudness(out, sample_rate)
        if abs(current - target_lufs) < 0.05 or (previous is not None and abs(current - previous) < 0.05):
            break  # on target, or the limiter takes all that is added (noise-like audio): stop there
        previous = current
        out = limit(out * db_to_gain(target_lufs - current), sample_rate, ceiling_db, loop=loop)
    peak = true_peak(out, sample_rate)  # the limiter's estimate is close; make the ceiling certain
    if peak > db_to_gain(ceiling_db):
        out *= db_to_gain(ceiling_db) / peak
    return out


def limit(
    audio: np.ndarray,
    sample_rate: int,
    ceiling_db: float = TRUE_PEAK_CEILING_DB,
    lookahead: float = LIMITER_LOOKAHEAD_SECONDS,
    *,
    loop: bool = False,
) -> np.ndarray:
    """Look-ahead true-peak limiter: a smooth gain that dips just enough around each peak.

    The gain each sample needs comes from the 4x-oversampled signal (true peak); a minimum filter
    ``lookahead`` wide on each side starts the dip before a peak and holds it after, and a moving
    average half as wide rounds its edges without letting any peak through. A loop is processed as
    a circle so that its wrap-around gets the same gain on both sides.
    """
    ceiling = db_to_gain(ceiling_db)
    width = max(1, int(lookahead * sample_rate))
    pad = 2 * width
    padded = np.concatenate([audio[..., -pad:], audio, audio[..., :pad]], axis=-1) if loop else audio
    upsampled = soxr.resample(np.ascontiguousarray(padded.T, dtype=np.float64), sample_rate, 4 * sample_rate)
    n = padded.shape[-1]
    envelope = np.abs(upsampled).reshape(-1, upsampled.shape[-1] if upsampled.ndim > 1 else 1).max(axis=1)
    envelope = np.pad(envelope, (0, max(0, 4 * n - envelope.size)))[: 4 * n].reshape(n, 4).max(axis=1)
    envelope = np.maximum(envelope, np.abs(padded).max(axis=0))
    need = np.minimum(1.0, ceiling / np.maximum(envelope, 1e-12))
    if need.min() >= 1.0:
        return audio.astype(np.float32, copy=True)
    gain = minimum_filter1d(need, size=2 * width + 1, mode="nearest")
    gain = uniform_filter1d(gain, size=width // 2 * 2 + 1, mode="nearest")
    limited = (padded * gain).astype(np.float32)
    return limited[..., pad:-pad] if loop else limited


def fade(
    audio: np.ndarray, sample_rate: int, fade_in: float = FADE_IN_SECONDS, fade_out: float = FADE_OUT_SECONDS
) -> np.ndarray:
    """Short raised-cosine fades so a track starts and ends in silence, without clicks."""
    out = audio.astype(np.float32, copy=True)
    n = out.shape[-1]
    n_in, n_out = min(int(fade_in * sample_rate), n // 2), min(int(fade_out * sample_rate), n // 2)
    if n_in:
        out[..., :n_in] *= _half_cosine(n_in)
    if n_out:
        out[..., n - n_out :] *= _half_cosine(n_out)[::-1]
    return out


def equal_power_crossfade(tail: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Blend ``tail`` (fading out) into ``head`` (fading in), both ``(channels, n)``, at constant power."""
    n = tail.shape[-1]
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    out_gain, in_gain = np.cos(t * np.pi / 2), np.sin(t * np.pi / 2)
    return (tail * out_gain + head * in_gain).astype(np.float32)


def join(first: np.ndarray, second: np.ndarray, overlap: int) -> np.ndarray:
    """``first`` then ``second``, cross-faded over ``overlap`` samples."""
    if overlap <= 0:
        return np.concatenate([first, second], axis=-1)
    seam = equal_power_crossfade(first[..., -overlap:], second[..., :overlap])
    return np.concatenate([first[..., :-overlap], seam, second[..., overlap:]], axis=-1)


def make_loop(audio: np.ndarray, length: int) -> np.ndarray:
    """Exactly ``length`` samples whose end flows into the start: the extra tail is blended into the head."""
    extra = audio.shape[-1] - length
    if extra <= 0:
        raise ValueError("a loop needs audio beyond its length to blend into its start")
    out = audio[..., :length].astype(np.float32, copy=True)
    # Sample `length` of the generated audio would follow the loop's last sample, so the head turns into it.
    out[..., :extra] = equal_power_crossfade(audio[..., length : length + extra], audio[..., :extra])
    return out


def finish(audio: np.ndarray, sample_rate: int, *, loop: bool = False) -> np.ndarray:
    """Loudness-normalised, peak-safe ``(channels, n)`` float32; fades unless it is a loop."""
    out = normalise(audio, sample_rate, loop=loop)
    return out if loop else fade(out, sample_rate)


def finish_extension(audio: np.ndarray, kept: int, sample_rate: int) -> np.ndarray:
    """An extended track: the first ``kept`` samples stay as they are; the rest matches their loudness."""
    out = audio.astype(np.float32, copy=True)
    head, rest = out[..., :kept], out[..., kept:]
    target = loudness(head, sample_rate)
    current = loudness(rest, sample_rate)
    gain = db_to_gain(target - current) if np.isfinite(target) and np.isfinite(current) else 1.0
    peak = true_peak(rest, sample_rate)
    if peak > 0:
        gain = min(gain, db_to_gain(TRUE_PEAK_CEILING_DB) / peak)
    ramp = min(rest.shape[-1], int(SEAM_RAMP_SECONDS * sample_rate))
    gains = np.full(rest.shape[-1], gain, dtype=np.float32)
    gains[:ramp] = np.linspace(
        1.0, gain, ramp, dtype=np.float32
    )  # no step in level where the new part starts
    out[..., kept:] = rest * gains
    return fade(out, sample_rate, fade_in=0.0)


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str = "wav") -> bytes:
    """16-bit PCM WAV or FLAC bytes of ``(channels, n)`` float audio, in memory."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use wav or flac")
    container, subtype = FORMATS[fmt]
    # Scale to 16 bits here (x 32767, as decode_audio divides): libsndfile writes floats x 32767 but
    # reads them back / 32768, which would move every sample of a re-encoded track by one step.
    pcm = np.round(np.clip(samples, -1.0, 1.0) * PCM_SCALE).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm.T, sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


UNKNOWN_LENGTH = 2**62  # libsndfile's frame count for a stream of unknown length is about 2**63


def decode_audio(
    data: bytes, *, max_bytes: int | None = None, max_seconds: float | None = None, name: str = "audio"
) -> AudioClip:
    """Any audio file soundfile reads (WAV, FLAC, OGG, MP3) as float32 ``(channels, n)``.

    ``max_seconds`` refuses a file whose header claims more than that before anything is decoded: a
    FLAC header can claim 20 hours in 400 bytes, and decoding reserves memory for all it claims (12.9
    GiB for that one) before it finds out. ``name`` is what that refusal calls the file.
    """
    if not data:
        raise AudioInputError("empty", "the audio file is empty")
    if max_bytes is not None and len(data) > max_bytes:
        raise AudioInputError(
            "too_large",
            f"the audio file is too large ({len(data) / 2**20:.1f} MiB; at most {max_bytes / 2**20:.0f} MiB)",
        )
    if max_seconds is not None:
        _check_declared_length(data, max_seconds, name)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate = f.samplerate
            if f.subtype == "PCM_16":  # the exact inverse of encode_audio
                samples = f.read(dtype="int16", always_2d=True).astype(np.float32) / PCM_SCALE
            else:
                samples = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioInputError(
            "not_audio", "the file is not audio that can be read (use WAV, FLAC, OGG or MP3)"
        ) from exc
    if samples.shape[0] == 0:
        raise AudioInputError("empty", "the audio file holds no samples")
    if not np.isfinite(samples).all():
        raise AudioInputError("not_audio", "the audio file holds invalid samples")
    return AudioClip(np.ascontiguousarray(samples.T), int(rate))


def _check_declared_length(data: bytes, max_seconds: float, name: str) -> None:
    try:
        info = sf.info(io.BytesIO(data))
    except Exception:  # unreadable: decoding it says why, in its own words
        return
    if info.samplerate <= 0 or info.frames >= UNKNOWN_LENGTH:
        return
    seconds = info.frames / info.samplerate
    if seconds > max_seconds:
        raise AudioInputError("too_long", f"the {name} is {seconds:.0f} s long; at most {max_seconds:.0f} s")


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """``(channels, n)`` audio at another rate (libsoxr, high quality)."""
    if from_rate == to_rate:
        return audio.astype(np.float32, copy=False)
    out = soxr.resample(np.ascontiguousarray(audio.T), from_rate, to_rate, quality="HQ")
    return np.ascontiguousarray(np.atleast_2d(out.T if out.ndim == 2 else out[None, :])).astype(np.float32)


def _half_cosine(n: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32)
