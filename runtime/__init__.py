"""moecc runtime: load a built artifact and generate from it, with speculative decoding (numpy + ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path

from runtime.errors import ArtifactError, MoeccError
from runtime.generator import Generation, Generator, Stream
from runtime.sampling import SamplingParams
from runtime.speculative import GenerationStats

__all__ = ["load", "Generator", "Generation", "Stream", "SamplingParams", "GenerationStats", "MoeccError", "ArtifactError"]

TARGETS = ("cpu",)


def load(path: str | Path, target: str = "auto", threads: int | None = None) -> Generator:
    """Verify the artifact at `path` (digests, paths, no symlinks), then open its main and draft models."""
    if target not in ("auto", *TARGETS):
        raise MoeccError(f"unknown target {target!r}; available: auto, {', '.join(TARGETS)}")
    return Generator(path, threads=threads)
