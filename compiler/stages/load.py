"""Stage `load`: open a checkpoint lazily, check every tensor against its architecture, record its identity."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from pydantic import BaseModel, ConfigDict

from compiler.architectures import expected_tensors
from compiler.checkpoint import Checkpoint

VERSION = "1"


class LoadConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    check_values: bool = True  # read every tensor once to refuse NaN and Inf


class LoadResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    architecture: str
    hf_class: str
    dims: dict
    parameters: int
    tensors: int
    digests: dict[str, str]


def run(checkpoint: Checkpoint, config: LoadConfig, out_dir: Path | None = None, progress=None) -> LoadResult:
    """Writes nothing to out_dir: its result (identity and sizes) is all later stages need."""
    checkpoint.validate()
    expected = expected_tensors(checkpoint.arch, checkpoint.dims)
    if config.check_values:
        for done, name in enumerate(expected, start=1):
            checkpoint.read(name)  # raises CheckpointError naming the tensor; freed before the next one
            if progress:
                progress(done, len(expected))
    parameters = sum(_count(shape) for shape in expected.values())
    return LoadResult(
        architecture=checkpoint.arch.name,
        hf_class=checkpoint.arch.hf_class,
        dims=asdict(checkpoint.dims),
        parameters=parameters,
        tensors=len(expected),
        digests=checkpoint.digests(),
    )


def _count(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
