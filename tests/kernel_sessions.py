"""ONNX Runtime sessions of a one-node test model, with ONNX Runtime's kernel or with moecc's swapped in."""

from __future__ import annotations

from typing import Callable

import onnx
import onnxruntime as ort
from onnx import helper

from runtime.kernels import DOMAIN, build


def kernel_session(model: onnx.ModelProto, swap: Callable[[onnx.ModelProto], int] | None, optimized: str | None = None) -> ort.InferenceSession:
    """A 2-thread session of `model`; with `swap` (which must swap exactly one node) on a copy of it, with moecc's
    kernel library loaded. `optimized`: where ONNX Runtime writes the graph it runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if swap:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        assert swap(model) == 1
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
        options.register_custom_ops_library(str(build.library()))
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
