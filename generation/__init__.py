"""MusicGen behind a small API. Knows prompts, seconds, seeds and audio; never users or Discord.

Importing this package does not import torch: the model stack loads in ``generation.engine`` only
when a model is loaded.
"""

from generation.errors import (
    AudioInputError,
    GenerationCancelled,
    GenerationError,
    InvalidRequest,
    ModelLoadError,
    ModelUnavailable,
    NonFiniteScores,
    OutOfMemory,
)
from generation.request import (
    AudioClip,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    SamplingParams,
    Track,
    check_batch,
    random_seed,
)
from generation.router import MelodyRouter
from generation.worker import Engine, EngineLoader, GenerationWorker, WorkerDied

__all__ = [
    "AudioClip",
    "AudioInputError",
    "Engine",
    "EngineLoader",
    "GenerationCancelled",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "GenerationWorker",
    "InvalidRequest",
    "MelodyRouter",
    "ModelInfo",
    "ModelLoadError",
    "ModelUnavailable",
    "NonFiniteScores",
    "OutOfMemory",
    "SamplingParams",
    "Track",
    "WorkerDied",
    "check_batch",
    "random_seed",
]
