"""Open a CPU session with moecc's kernels in place of ONNX Runtime's: moecc.FusedDecoder (fused_decoder.c) for
the whole graph of a decoder it runs (a dense draft, a float32 MoE main model), else moecc.Attention
(attention.c) for GroupQueryAttention, moecc.MoE (moe.c) for float32 MoE, moecc.QMoE (moe.c) for INT4 and INT8
QMoE, and moecc.MatMul (matmul.c) for MatMuls by large float32 constant weights.

The artifact keeps the standard nodes, which every ONNX Runtime and the TensorRT lowering read; the swap
happens in memory when a CPU session loads, for each kind of node only when every node of that kind is one
the kernel implements, and the weights stay in the artifact's external data, read by ONNX Runtime as before.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Iterable, Literal, get_args

import onnx
import onnxruntime as ort

from runtime.errors import MoeccError
from runtime.kernels import DOMAIN, attention, fused_decoder, matmul, moe
from runtime.kernels.build import KernelUnavailable, library

Kernels = Literal["auto", "moecc", "onnxruntime"]  # auto: moecc's kernels where they build and apply, else ONNX Runtime's
KERNELS: tuple[str, ...] = get_args(Kernels)
EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"  # where a model loaded from bytes finds its weights

_log = logging.getLogger(__name__)

# Each kernel: the op type it stands in for (com.microsoft's, or the standard domain's), why it cannot in a model,
# and its swap.
_KERNELS = {
    "moecc.FusedDecoder": ("GroupQueryAttention", fused_decoder.why_not, fused_decoder.swap),
    "moecc.Attention": ("GroupQueryAttention", attention.why_not, attention.swap),
    "moecc.MoE": ("MoE", lambda model, head_dim: moe.why_not(model), lambda model, head_dim: moe.swap(model)),
    "moecc.QMoE": ("QMoE", lambda model, head_dim: moe.why_not_quantized(model), lambda model, head_dim: moe.swap_quantized(model)),
    "moecc.MatMul": ("MatMul", lambda model, head_dim: matmul.why_not(model), lambda model, head_dim: matmul.swap(model)),
}
# Kernels that stand in node by node: the nodes they cannot run (a router's narrow MatMul) are not a fallback.
_NODE_BY_NODE = {"moecc.MatMul"}
# Kernels that stand in for the whole graph where they apply, and leave it to the others where they do not.
_WHOLE_GRAPH = {"moecc.FusedDecoder"}


@contextmanager
def withholding(kernels: Iterable[str]):
    """Sessions opened inside run none of `kernels` (names of _KERNELS): their nodes run what they would without
    them (ONNX Runtime's kernel; for moecc.FusedDecoder, moecc's kernels node by node). For benchmarks against
    a kernel and an ONNX Runtime profile per op type; not for concurrent use, since it changes the kernels every
    session of the process chooses from while it lasts."""
    withheld = {name: _KERNELS.pop(name) for name in kernels if name in _KERNELS}  # nested: the outer one restores
    try:
        yield
    finally:
        _KERNELS.update(withheld)


def node_by_node():
    """withholding() the kernels that run a whole graph in one node: moecc's kernels node by node."""
    return withholding(_WHOLE_GRAPH)


@cache
def _warn_once(message: str) -> None:
    _log.warning(message)


def check_kernels(kernels: str) -> None:
    if kernels not in KERNELS:
        raise MoeccError(f"unknown kernels {kernels!r}; available: {', '.join(KERNELS)}")


def use_kernels(model_path: Path, model: onnx.ModelProto, head_dim: int, options: ort.SessionOptions, kernels: Kernels) -> tuple[str, ...]:
    """Which of moecc's kernels ("moecc.FusedDecoder", or "moecc.Attention", "moecc.MoE", "moecc.QMoE", "moecc.MatMul") sessions of the model at `model_path` run. Where
    `kernels` asks for them and they apply, the graph `model` (without weights) is rewritten in place and
    `options` load the kernels; a session is then made from the graph's bytes, with EXTERNAL_FOLDER set.
    "moecc" refuses to fall back: every attention, float MoE and QMoE node must run moecc's kernel (MatMuls run
    it where it applies)."""
    check_kernels(kernels)
    if kernels == "onnxruntime":
        return ()
    # Checked before the build, so that a model the kernels cannot run never needs a compiler.
    ops = {node.op_type for node in model.graph.node if node.domain in ("com.microsoft", "", "ai.onnx")}
    reasons = {name: why_not(model, head_dim) for name, (op_type, why_not, _) in _KERNELS.items() if op_type in ops}
    refused = {name: reason for name, reason in reasons.items() if reason and name not in _NODE_BY_NODE | _WHOLE_GRAPH}
    if kernels == "moecc" and refused:
        raise MoeccError(f"{model_path}: moecc's kernels do not apply: {'; '.join(f'{name}: {reason}' for name, reason in refused.items())}",
                         hint="load with kernels='auto'")  # fmt: skip
    for name, reason in reasons.items():
        if reason:
            instead = "the node-by-node kernels" if name in _WHOLE_GRAPH else "ONNX Runtime's kernel"
            _log.info("%s: %s instead of %s (%s)", model_path, instead, name, reason)
    chosen = [name for name, reason in reasons.items() if reason is None]
    chosen = [name for name in chosen if name in _WHOLE_GRAPH][:1] or chosen
    if not chosen:
        return ()
    try:
        path = library()
    except KernelUnavailable as error:
        if kernels == "moecc":
            raise MoeccError(f"{model_path}: moecc's kernels are unavailable: {error}", hint="load with kernels='onnxruntime'") from error
        _warn_once(f"moecc's kernels are unavailable, so the model runs on ONNX Runtime's slower ones: {error}")
        return ()
    for name in chosen:
        _KERNELS[name][2](model, head_dim)
    model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    options.register_custom_ops_library(str(path))
    return tuple(chosen)


def open_session(
    model_path: Path, model: onnx.ModelProto, head_dim: int, options: ort.SessionOptions, kernels: Kernels
) -> tuple[ort.InferenceSession, tuple[str, ...]]:
    """A CPU session of the model at `model_path` (whose graph, without weights, is `model`) and which of moecc's
    kernels it runs (see use_kernels)."""
    if used := use_kernels(model_path, model, head_dim, options, kernels):
        options.add_session_config_entry(EXTERNAL_FOLDER, str(model_path.parent))
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), used
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"]), ()
