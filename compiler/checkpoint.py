"""Hugging Face checkpoints read lazily from safetensors, tensor by tensor, and checked against their architecture."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from compiler.architectures import Architecture, ModelDims, architecture_of, dims_of, expected_tensors
from compiler.errors import CheckpointError
from runtime.artifact import sha256_of

_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]


class Checkpoint:
    """A checkpoint folder: config.json plus one or more safetensors files, opened memory-mapped."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.config = self._read_config()
        self.arch: Architecture = architecture_of(self.config)
        self.dims: ModelDims = dims_of(self.arch, self.config)
        self.files = self._weight_files()
        self.tensors = self._index()

    def _read_config(self) -> dict[str, Any]:
        path = self.folder / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{self.folder}: no config.json", hint="a checkpoint folder holds config.json and *.safetensors") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read config: {exc}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: config is not a JSON object")
        return config

    def _weight_files(self) -> list[Path]:
        files = sorted(self.folder.glob("*.safetensors"))
        if files:
            return files
        if list(self.folder.glob("*.bin")):
            raise CheckpointError(
                f"{self.folder}: weights are pickle .bin files, which can run code when loaded",
                hint="convert the checkpoint to safetensors",
            )
        raise CheckpointError(f"{self.folder}: no *.safetensors weight files")

    def _index(self) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            try:
                with safe_open(path, framework="numpy") as handle:
                    for name in handle.keys():
                        piece = handle.get_slice(name)
                        tensors[name] = TensorInfo(path.name, piece.get_dtype(), tuple(piece.get_shape()))
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})", hint="the file may be truncated; download it again") from None
        return tensors

    def validate(self) -> None:
        """Every expected tensor present with the right shape and a float dtype; nothing is read yet."""
        expected = expected_tensors(self.arch, self.dims)
        missing = [name for name in expected if name not in self.tensors]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.folder}: missing tensor {missing[0]}{more} (expected by {self.arch.hf_class})")
        for name, shape in expected.items():
            info = self.tensors[name]
            if info.shape != shape:
                raise CheckpointError(f"{self.folder}: tensor {name} has shape {list(info.shape)}, expected {list(shape)} from config.json")
            if info.dtype not in _FLOAT_DTYPES:
                supported = ", ".join(_FLOAT_DTYPES)
                raise CheckpointError(f"{self.folder}: tensor {name} has dtype {info.dtype}; supported: {supported}")

    def read(self, name: str) -> np.ndarray:
        """One tensor as float32, checked for NaN and Inf."""
        info = self.tensors[name]
        try:
            with safe_open(self.folder / info.file, framework="numpy") as handle:
                array = handle.get_tensor(name).astype(np.float32, copy=False)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{self.folder / info.file}: cannot read tensor {name} ({exc})") from None
        if not np.isfinite(array).all():
            raise CheckpointError(f"{self.folder}: tensor {name} holds NaN or Inf values")
        return array

    @functools.cached_property
    def _digests(self) -> dict[str, str]:
        paths = [self.folder / "config.json", *self.files]
        return {path.name: sha256_of(path) for path in paths}

    def digests(self) -> dict[str, str]:
        """sha256 of config.json and every weight file, the identity of this checkpoint (hashed once)."""
        return dict(self._digests)
