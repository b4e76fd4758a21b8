"""Running an exported decoder over a token stream in fixed windows with ONNX Runtime (no cache kept between windows)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnxruntime as ort


def run_windows(session: ort.InferenceSession, ids: list[int], window: int, outputs: list[str]) -> Iterator[list[np.ndarray]]:
    """For each window of `ids`, the requested outputs of one forward pass that starts from an empty cache
    (logits, and the head's input, at every position of the window)."""
    empty_past = {}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            dtype = {"tensor(float16)": np.float16, "tensor(int8)": np.int8}.get(value.type, np.float32)  # an INT8 cache, or the activations'
            empty_past[value.name] = np.zeros((1, value.shape[1], 0, value.shape[3]), dtype)
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        feeds = {
            "input_ids": np.asarray([chunk], dtype=np.int64),
            "seqlens_k": np.asarray([len(chunk) - 1], np.int32),
            "total_sequence_length": np.asarray(len(chunk), np.int32),
            "query_seqlens": np.asarray([len(chunk)], np.int32),
            "logit_positions": np.arange(len(chunk), dtype=np.int64)[None, :, None],
        }
        yield session.run(outputs, feeds | empty_past)
