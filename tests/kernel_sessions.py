"""ONNX Runtime sessions of a one-node test model, with ONNX Runtime's kernel or with moecc's swapped in, built
for this machine or for another whose code this one runs (MARCHES)."""

from __future__ import annotations

import platform
import subprocess
from typing import Callable

import onnx
import onnxruntime as ort
from onnx import helper

from runtime.kernels import DOMAIN, build


def compiler_targets_x86() -> bool:
    """Whether the kernels' compiler builds x86-64 code (raises KernelUnavailable without a compiler)."""
    return subprocess.run([*build._compiler(), "-dumpmachine"], capture_output=True, text=True).stdout.startswith("x86_64")


def _marches() -> list[str]:
    """native, and on x86 the narrower vector widths this CPU also runs: SSE2 (x86-64) and, where native takes
    AVX-512's code, AVX2's (haswell); where native has AVX-512 VNNI, AVX-512 without it (skylake-avx512), whose
    integer products take other instructions. The kernels pick their loops by instruction set at compile time,
    so a suite run on one kind of machine would otherwise check one set's code only."""
    try:
        x86 = platform.machine() in ("x86_64", "AMD64") and compiler_targets_x86()
    except build.KernelUnavailable:  # no compiler: the kernel tests say so when they build
        return ["native"]
    if not x86:
        return ["native"]
    flags = set(build._cpu().split())
    haswell = {"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c"} <= flags and "avx512f" in flags
    skylake = {"avx512bw", "avx512dq", "avx512vl", "avx512_vnni"} <= flags
    return ["native", "x86-64", *(["haswell"] if haswell else []), *(["skylake-avx512"] if skylake else [])]


MARCHES = _marches()


def kernel_session(
    model: onnx.ModelProto, swap: Callable[[onnx.ModelProto], int] | None, optimized: str | None = None, march: str = "native"
) -> ort.InferenceSession:
    """A 2-thread session of `model`; with `swap` (which must swap exactly one node) on a copy of it, with moecc's
    kernel library built for `march` loaded. `optimized`: where ONNX Runtime writes the graph it runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if swap:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        assert swap(model) == 1
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
        options.register_custom_ops_library(str(build.library(march)))
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
