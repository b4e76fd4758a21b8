"""The appended-KV contract of models lowered for TensorRT, and a reference that runs it on ONNX Runtime.

Such a model takes the cached keys and values as [B, P, kv heads, D] and returns only the S new entries,
[B, S, kv heads, D]. A cache keeps one buffer [1, capacity, kv heads, D] per layer and kind: the first P
rows are a contiguous prefix, passed as the past, and the call writes its new entries straight into the
rows after it, so nothing is copied and a rollback moves a length. The TensorRT backend does this with
device buffers; OrtAppendedDecoder does it with numpy buffers, which is how the build checks a lowered
model against its source and how tests run the speculative loop over the lowered graph without a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.decoder import KV_DTYPES, TokenLedger, check_last, kv_names, session_options


class AppendedKvCache(TokenLedger):
    """One sequence's appended-KV buffers; subclasses run the model (`_call`) on their device."""

    def _call(self, tokens: list[int], past: int, last: int) -> np.ndarray:
        """Run `tokens` after `past` cached ones, writing their keys and values at rows past..; the logits
        [last, V] after the `last` last of them (the model computes every position's; only those are read)."""
        raise NotImplementedError

    def feed(self, tokens: list[int], last: int | None = None) -> np.ndarray:
        """Run the new tokens through the model after the cached ones; returns the logits [last, V] after the
        `last` last of them (all by default)."""
        last = len(tokens) if last is None else last
        check_last([len(tokens)], [last])
        self._check_room(len(tokens))
        logits = self._call(tokens, len(self.ids), last)
        self.ids.extend(tokens)
        return logits


class OrtAppendedDecoder:
    """An appended-KV model on ONNX Runtime's CPU provider (the TensorRT lowering's reference)."""

    def __init__(self, model_path: Path, num_layers: int, num_kv_heads: int, head_dim: int, activations: str, options: dict[str, str] | None = None):
        self.session = ort.InferenceSession(str(model_path), session_options(options or {}), providers=["CPUExecutionProvider"])
        self.layout = (num_kv_heads, head_dim)
        self.names = kv_names(num_layers)
        self.dtype = KV_DTYPES[activations]

    def new_cache(self, capacity: int) -> OrtAppendedKvCache:
        return OrtAppendedKvCache(self, capacity)


class OrtAppendedKvCache(AppendedKvCache):
    def __init__(self, decoder: OrtAppendedDecoder, capacity: int):
        super().__init__(capacity)
        self.decoder = decoder
        self.buffers = [np.zeros((1, capacity, *decoder.layout), dtype=decoder.dtype) for _ in decoder.names]

    def _call(self, tokens: list[int], past: int, last: int) -> np.ndarray:
        binding = self.decoder.session.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray([tokens], dtype=np.int64))
        binding.bind_output("logits", "cpu")
        keep = []  # the OrtValues share the buffers' memory; they must live until the call returns
        for (past_name, present_name), buffer in zip(self.decoder.names, self.buffers):
            for name, view, bind in ((past_name, buffer[:, :past], binding.bind_ortvalue_input), (present_name, buffer[:, past : past + len(tokens)], binding.bind_ortvalue_output)):
                keep.append(ort.OrtValue.ortvalue_from_numpy(view))
                bind(name, keep[-1])
        self.decoder.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[0, len(tokens) - last :]
