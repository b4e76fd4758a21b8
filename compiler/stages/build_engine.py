"""Stage `build`: a serialized TensorRT engine from the lowered model, with one optimization profile per call kind.

TensorRT-RTX builds ahead of time for the recipe's compute capabilities, on any machine; full TensorRT
builds for the GPU it runs on. The network is strongly typed: the lowered graph's types (fp16 activations,
INT8/INT4 DequantizeLinear weights) are the engine's precisions. A parse failure names the ONNX node.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from compiler.checkpoint import Checkpoint
from compiler.errors import BuildError
from compiler.stages.export import MODEL_FILE
from runtime import tensorrt_library
from runtime.artifact import EngineProfile

VERSION = "1"
ENGINE_FILE = "model.engine"
LAYERS_FILE = "layers.txt"


class BuildEngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    flavour: str  # the library and version are part of the cache key: another TensorRT builds anew
    version: str
    compute_capabilities: list[str]
    precision: str
    profiles: list[EngineProfile]
    weight_streaming: bool
    strip_weights: bool


class BuildEngineResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    flavour: str
    version: str
    compute_capabilities: list[str]
    precision: str
    profiles: list[EngineProfile]
    builder_flags: list[str]
    build_seconds: float
    size: int
    layers: int
    layer_types: dict[str, int]
    files: list[str]


def _logger(trt):
    class Collecting(trt.ILogger):
        """Keeps TensorRT's errors for the failure message instead of printing over the progress display."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, message):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(message)

    return Collecting()


def _parse(trt, builder, logger, model_path: Path):
    # TensorRT-RTX networks are always strongly typed; full TensorRT needs the flag.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0] if errors else None
        where = f"node {first.node_name() or first.node()} ({first.node_operator()})" if first else "the model"
        reason = first.desc() if first else "; ".join(logger.errors) or "unknown"
        raise BuildError(f"TensorRT's ONNX parser refused {where}: {reason}", hint="the tensorrt lowering produced an op this TensorRT does not support")
    return network, parser


def _allow_decomposed_attention(trt, network) -> int:
    """Let attention without a dedicated kernel for its shapes (head counts, head size) run as its parts.

    TensorRT still uses a fused kernel where one exists; without this, such shapes fail the build.
    """
    marked = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type == trt.LayerType.ATTENTION_OUTPUT:
            layer.__class__ = trt.IAttentionOutputLayer  # the bindings return the base class; this is their documented downcast
            layer.attention.decomposable = True
            marked += 1
    return marked


def _profile(builder, network, profile: EngineProfile):
    optimization = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        if tensor.name == "input_ids":
            shapes = [(batch, tokens) for batch, tokens in zip(profile.batch, profile.tokens)]
        else:  # past keys or values [B, P, kv heads, D]
            kv_heads, head_dim = tensor.shape[2], tensor.shape[3]
            shapes = [(batch, past, kv_heads, head_dim) for batch, past in zip(profile.batch, profile.past)]
        optimization.set_shape(tensor.name, *shapes)
    return optimization


def run(checkpoint: Checkpoint, config: BuildEngineConfig, out_dir: Path, progress=None, *, lowered_dir: Path) -> BuildEngineResult:
    library = tensorrt_library.load()
    if config.strip_weights and tensorrt_library.current_gpu() is None:
        # Measured with TensorRT-RTX 1.7: every refittable-weights build (REFIT, REFIT_IDENTICAL, marked weights)
        # compiles kernels on a device at build time and fails without one; plain builds do not need one.
        raise BuildError(
            f"tensorrt.strip_weights needs a GPU at build time with {library.label} (refittable engines are compiled on the device)",
            hint="build this recipe on a machine with an NVIDIA GPU, or set tensorrt.strip_weights: false",
        )
    trt = library.module
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, lowered_dir / MODEL_FILE)  # the parser owns weights the network uses
    _allow_decomposed_attention(trt, network)
    builder_config = builder.create_builder_config()
    if library.targets_compute_capabilities:
        builder_config.num_compute_capabilities = len(config.compute_capabilities)
        for index, name in enumerate(config.compute_capabilities):
            builder_config.set_compute_capability(library.compute_capability(name), index)
    flags = (["WEIGHT_STREAMING"] if config.weight_streaming else []) + (["STRIP_PLAN", "REFIT_IDENTICAL"] if config.strip_weights else [])
    for flag in flags:
        builder_config.set_flag(trt.BuilderFlag.__members__[flag])
    for profile in config.profiles:
        builder_config.add_optimization_profile(_profile(builder, network, profile))
    if progress:
        progress(0, 1)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, builder_config)
    seconds = time.perf_counter() - started
    if serialized is None:
        raise BuildError(f"{library.label} could not build the engine: {'; '.join(logger.errors) or 'no reason given'}")
    (out_dir / ENGINE_FILE).write_bytes(memoryview(serialized))
    layers = [network.get_layer(index) for index in range(network.num_layers)]
    (out_dir / LAYERS_FILE).write_text("".join(f"{layer.type.name}\t{layer.name}\n" for layer in layers))
    if progress:
        progress(1, 1)
    return BuildEngineResult(
        flavour=library.flavour, version=library.version, compute_capabilities=config.compute_capabilities, precision=config.precision,
        profiles=config.profiles, builder_flags=flags, build_seconds=round(seconds, 3), size=(out_dir / ENGINE_FILE).stat().st_size,
        layers=len(layers), layer_types=dict(Counter(layer.type.name for layer in layers).most_common()), files=[ENGINE_FILE, LAYERS_FILE],
    )
