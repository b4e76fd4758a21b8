"""TensorRT engines in the speculative loop: checked before they are deserialized, run with CUDA buffers.

An engine is native code for one TensorRT version and a set of GPUs, so before a byte of it reaches the
deserializer the runtime checks (after the artifact's digests): the installed TensorRT flavour and version
against the manifest's, that there is a GPU, that its compute capability is one the engine was built for,
and TensorRT's own validity check of the engine header. Each refusal names both sides and says to rebuild.

The engines take the appended-KV contract (runtime.appended_kv): per layer one device buffer
[1, capacity, kv heads, D]; a call binds its first P rows as the past and the rows after them as the
present output, so new keys and values land in place, and a rollback moves a length.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from runtime import tensorrt_library
from runtime.appended_kv import AppendedKvCache
from runtime.artifact import EngineEntry, ModelEntry
from runtime.decoder import KV_DTYPES, check_external_data, kv_names
from runtime.errors import ArtifactError

_REBUILD = "rebuild the artifact on this machine with `moecc build RECIPE`, or load it with target='cpu'"


class EngineRefused(ArtifactError):
    """An engine that this machine's TensorRT or GPU cannot run; nothing of it was deserialized."""


_DETECT = object()


def mismatch(entry: EngineEntry, library: tensorrt_library.Library, gpu: tensorrt_library.Gpu | None) -> tuple[str, str] | None:
    """Why this machine cannot run the engine (the reason, and what to do), or None when its identity matches."""
    if (library.flavour, library.version) != (entry.flavour, entry.version):
        return f"the engine was built with {tensorrt_library.label(entry.flavour, entry.version)}; this machine has {library.label}", _REBUILD
    wanted = ", ".join(entry.compute_capabilities) or "the GPU it was built on"
    if gpu is None:
        return f"no NVIDIA GPU on this machine; the engine runs on {wanted}", "run it on such a GPU, or load the artifact with target='cpu'"
    if entry.compute_capabilities and gpu.compute_capability not in entry.compute_capabilities:
        return f"the engine was built for {wanted}; this GPU ({gpu.name}) is {gpu.compute_capability}", _REBUILD
    return None


def check_engine(engine_path: Path, entry: EngineEntry, library: tensorrt_library.Library | None = None, gpu=_DETECT) -> bytes:
    """The engine's bytes, once its recorded identity matches this machine; raises EngineRefused otherwise.

    `gpu` defaults to the machine's first CUDA device (None: no GPU).
    """
    library = library or tensorrt_library.load()
    problem = mismatch(entry, library, tensorrt_library.current_gpu() if gpu is _DETECT else gpu)
    if problem is not None:
        reason, hint = problem
        raise EngineRefused(f"{engine_path}: {reason}", hint=hint)
    blob = engine_path.read_bytes()
    trt = library.module
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    if hasattr(runtime, "get_engine_validity"):  # TensorRT-RTX and TensorRT 10.x: reads the header only
        validity, diagnostics = runtime.get_engine_validity(blob[: runtime.engine_header_size])
        if validity == trt.EngineValidity.INVALID:
            reasons = [name for name, flag in trt.EngineInvalidityDiagnostics.__members__.items() if diagnostics & int(flag)]
            raise EngineRefused(f"{engine_path}: {library.label} reports the engine invalid here ({', '.join(reasons) or 'no reason given'})", hint=_REBUILD)
    return blob


def _cuda(result):
    """cuda-python returns (error, value...): raise on error, return the value(s)."""
    from cuda.bindings import runtime as cudart

    error, *values = result
    if error != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA call failed: {cudart.cudaGetErrorName(error)[1].decode()}")
    return values[0] if values else None


class TensorRTDecoder:
    """One deserialized engine with an execution context per profile; caches hold their own buffers.

    A profile serves one context at a time, so calls from several threads (each with its own cache) take
    turns on the contexts under a lock: each caller still gets what it would get alone.
    """

    def __init__(self, artifact: Path, entry: ModelEntry, allowed_files: set[str]):
        if entry.engine is None:
            raise ArtifactError(f"{artifact}: the {entry.path} model has no TensorRT engine", hint="build the recipe with targets: [cpu, tensorrt]")
        engine_entry = entry.engine
        blob = check_engine(artifact / engine_entry.path, engine_entry)
        trt = tensorrt_library.load().module
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise EngineRefused(f"{artifact / engine_entry.path}: TensorRT could not deserialize the engine", hint=_REBUILD)
        if "STRIP_PLAN" in engine_entry.builder_flags:  # weights come from the lowered ONNX model beside it
            check_external_data(artifact, engine_entry.onnx_path, allowed_files)  # the refitter follows its external-data paths
            refitter = trt.Refitter(self.engine, self.logger)
            if not trt.OnnxParserRefitter(refitter, self.logger).refit_from_file(str(artifact / engine_entry.onnx_path)) or not refitter.refit_cuda_engine():
                raise EngineRefused(f"{artifact / engine_entry.onnx_path}: refitting the weight-stripped engine failed", hint=_REBUILD)
        self.entry = entry
        self.profiles = {profile.name: (index, profile) for index, profile in enumerate(engine_entry.profiles)}
        from cuda.bindings import runtime as cudart

        self._cudart = cudart
        self.stream = _cuda(cudart.cudaStreamCreate())
        self.lock = threading.Lock()
        self.contexts = {}
        for name, (index, _) in self.profiles.items():
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(index, int(self.stream))
            self.contexts[name] = context

    def __del__(self):
        if getattr(self, "stream", None) is not None:
            self._cudart.cudaStreamDestroy(self.stream)

    def profile_for(self, tokens: int) -> str:
        """decode for one token, verify for a draft's proposals, prefill for longer chunks."""
        if tokens == 1:
            return "decode"
        return "verify" if tokens <= self.profiles["verify"][1].tokens[2] else "prefill"

    def new_cache(self, capacity: int | None = None) -> TensorRTKvCache:
        return TensorRTKvCache(self, capacity or self.entry.max_sequence_length)


class TensorRTKvCache(AppendedKvCache):
    """Device buffers for one sequence: keys and values per layer, input ids and logits for the longest call."""

    def __init__(self, decoder: TensorRTDecoder, capacity: int):
        super().__init__(capacity)
        self.decoder = decoder
        entry = decoder.entry
        cudart = self._cudart = decoder._cudart
        self.longest_call = decoder.profiles["prefill"][1].tokens[2]
        itemsize = np.dtype(KV_DTYPES[entry.engine.precision]).itemsize
        self.row_bytes = entry.num_kv_heads * entry.head_dim * itemsize  # one position of one layer's keys
        self.kv_shape = (entry.num_kv_heads, entry.head_dim)
        self.names = kv_names(entry.num_layers)
        self.buffers = [_cuda(cudart.cudaMalloc(capacity * self.row_bytes)) for _ in self.names]
        self.ids_buffer = _cuda(cudart.cudaMalloc(self.longest_call * 8))
        self.logits_buffer = _cuda(cudart.cudaMalloc(self.longest_call * entry.vocab_size * 4))

    def __del__(self):
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for pointer in (*getattr(self, "buffers", []), getattr(self, "ids_buffer", 0), getattr(self, "logits_buffer", 0)):
            if pointer:
                cudart.cudaFree(pointer)

    def _call(self, tokens: list[int], past: int, last: int) -> np.ndarray:
        if len(tokens) > self.longest_call:  # a long prompt: in chunks the prefill profile takes
            rest = tokens[self.longest_call :]
            head = self._call(tokens[: self.longest_call], past, max(0, last - len(rest)))
            return np.concatenate([head, self._call(rest, past + self.longest_call, min(last, len(rest)))])
        decoder, cudart = self.decoder, self._cudart
        ids = np.asarray([tokens], dtype=np.int64)
        vocab = decoder.entry.vocab_size
        logits = np.empty((last, vocab), dtype=np.float32)  # the engine computes every position's; only these come back
        to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with decoder.lock:
            context, stream = decoder.contexts[decoder.profile_for(len(tokens))], decoder.stream
            context.set_input_shape("input_ids", ids.shape)
            context.set_tensor_address("input_ids", self.ids_buffer)
            for (past_name, present_name), base in zip(self.names, self.buffers):
                context.set_input_shape(past_name, (1, past, *self.kv_shape))
                context.set_tensor_address(past_name, base)
                context.set_tensor_address(present_name, base + past * self.row_bytes)  # the new rows, in place
            context.set_tensor_address("logits", self.logits_buffer)
            _cuda(cudart.cudaMemcpyAsync(self.ids_buffer, ids.ctypes.data, ids.nbytes, to_device, stream))
            if not context.execute_async_v3(int(stream)):
                raise RuntimeError("TensorRT could not run the engine")
            if last:
                kept_rows = self.logits_buffer + (len(tokens) - last) * vocab * 4
                _cuda(cudart.cudaMemcpyAsync(logits.ctypes.data, kept_rows, logits.nbytes, to_host, stream))
            _cuda(cudart.cudaStreamSynchronize(stream))
        return logits
