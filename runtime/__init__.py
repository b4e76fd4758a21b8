"""moecc runtime: load a built artifact and generate from it, with speculative decoding (numpy + ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path

from runtime.errors import ArtifactError, MoeccError
from runtime.generator import PROPOSERS, Generation, Generator, Stream
from runtime.kernels.session import KERNELS, Kernels, check_kernels
from runtime.sampling import SamplingParams
from runtime.speculative import GenerationStats

__all__ = ["load", "TARGETS", "PLACEMENTS", "PROPOSERS", "KERNELS", "Generator", "Generation", "Stream", "SamplingParams", "GenerationStats", "MoeccError", "ArtifactError"]

TARGETS = ("cpu", "tensorrt")
PLACEMENTS = ("single", "expert-parallel")


def _auto_target(path: str | Path) -> str:
    """tensorrt where the artifact has engines and the machine has TensorRT and a GPU they were built for; else cpu."""
    from runtime import tensorrt_library
    from runtime.artifact import read_manifest

    engines = [model.engine for model in read_manifest(Path(path)).models.values()]
    if not engines or any(engine is None for engine in engines):
        return "cpu"
    try:
        library = tensorrt_library.load()
    except MoeccError:
        return "cpu"
    from runtime.tensorrt_backend import mismatch

    gpu = tensorrt_library.current_gpu()
    return "cpu" if any(mismatch(engine, library, gpu) for engine in engines) else "tensorrt"


def load(path: str | Path, target: str = "auto", threads: int | None = None, placement: str = "single", kernels: Kernels = "auto") -> Generator:
    """Verify the artifact at `path` (digests, paths, no symlinks), then open its main and draft models.

    target: cpu (ONNX Runtime), tensorrt (the artifact's engines; refused with the reason when this machine
    cannot run them), or auto: tensorrt when it can, else cpu.
    placement: single (the main model in one session or engine, every partition of its experts together) or
    expert-parallel (cpu target, a partitioned artifact: one worker per partition of the experts, the main
    model sending each MoE layer's tokens to the workers holding their experts and adding up what comes back).
    kernels (cpu target): auto (moecc's attention, MoE and MatMul kernels, built for this machine on first use,
    where they build and apply; else ONNX Runtime's GroupQueryAttention, MoE and MatMul), moecc (refuse to fall
    back) or onnxruntime.
    """
    if target not in ("auto", *TARGETS):
        raise MoeccError(f"unknown target {target!r}; available: auto, {', '.join(TARGETS)}")
    if placement not in PLACEMENTS:
        raise MoeccError(f"unknown placement {placement!r}; available: {', '.join(PLACEMENTS)}")
    if placement == "expert-parallel":
        if target == "tensorrt":
            raise MoeccError("expert-parallel placement runs on the cpu target; a TensorRT engine holds all of its experts", hint="load with target='cpu'")
        target = "cpu"
    target = _auto_target(path) if target == "auto" else target
    check_kernels(kernels)
    if kernels == "moecc" and target != "cpu":
        raise MoeccError(f"moecc's kernels run on the cpu target, not {target}", hint="load with kernels='auto'")
    return Generator(path, threads=threads, target=target, placement=placement, kernels=kernels)
