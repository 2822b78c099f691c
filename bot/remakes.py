"""Requests made from a finished job: more variations of it, or a continuation of one of its tracks."""

from __future__ import annotations

from bot.jobs import Job, JobKind
from generation import GenerationRequest


def variations_request(parent: Job, count: int, tweak: str | None = None) -> GenerationRequest:
    """More takes of a job: its prompt (plus the tweak) and settings, new seeds."""
    prompt = parent.request.prompt
    if tweak and tweak.strip():
        prompt = f"{prompt}, {tweak.strip()}"
    duration = parent.request.duration
    if parent.kind is JobKind.EXTEND and parent.result is not None:
        duration = parent.result.seconds
    return GenerationRequest(
        prompt=prompt,
        duration=duration,
        sampling=parent.request.sampling,
        variations=count,
        loop=parent.request.loop,
    )


def extension_request(parent: Job) -> GenerationRequest:
    """Continue a track by as many seconds as its job asked for."""
    return GenerationRequest(
        prompt=parent.request.prompt, duration=parent.request.duration, sampling=parent.request.sampling
    )
