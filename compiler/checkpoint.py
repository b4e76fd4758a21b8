"""Hugging Face checkpoints read lazily, tensor by tensor, and checked against their architecture."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compiler.architectures import Architecture, ModelDims, architecture_of, dims_of, expected_tensors
from compiler.errors import CheckpointError
from compiler.safetensors_file import SafetensorsFormatError, TensorEntry, read_header, read_tensor
from runtime.artifact import sha256_of

_FLOAT_DTYPES = ("F32", "F16", "BF16")
_TORCH_DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}
_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]


class Checkpoint:
    """A checkpoint folder: config.json plus safetensors weights (single or sharded), or opted-in pickle weights."""

    def __init__(self, folder: Path, allow_pickle: bool = False, layers: int | None = None, experts_per_token: int | None = None):
        self.folder = folder
        self.layers = layers
        self.experts_per_token = experts_per_token
        self.config = self._read_config()
        if layers is not None:
            self.config = self._first_layers(layers)
        if experts_per_token is not None:
            self.config = self._routed_to(experts_per_token)
        self.arch: Architecture = architecture_of(self.config)
        self.dims: ModelDims = dims_of(self.arch, self.config)
        self.files = self._weight_files(allow_pickle)
        self._entries: dict[str, TensorEntry] = {}
        self._pickled: dict[str, Any] | None = None
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

    def _first_layers(self, layers: int) -> dict[str, Any]:
        """The config of the model cut after `layers` layers, keeping its embedding, final norm and head."""
        total = self.config.get("num_hidden_layers")
        if not isinstance(total, int) or not 1 <= layers <= total:
            raise CheckpointError(f"{self.folder}: cannot keep the first {layers} layers of a model with {total}")
        config = dict(self.config, num_hidden_layers=layers)
        if isinstance(config.get("layer_types"), list):
            config["layer_types"] = config["layer_types"][:layers]
        return config

    def _routed_to(self, experts: int) -> dict[str, Any]:
        """The config of the model routing each token to its top `experts` experts (same weights)."""
        total = self.config.get("num_experts") or self.config.get("num_local_experts")  # as architectures.dims_of reads it
        if not isinstance(total, int) or not 1 <= experts <= total:
            raise CheckpointError(f"{self.folder}: cannot route to {experts} experts in a model with {total or 'no'} experts per layer")
        return dict(self.config, num_experts_per_tok=experts)

    def _weight_files(self, allow_pickle: bool) -> list[Path]:
        index = self.folder / _INDEX
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise CheckpointError(f"{index}: malformed shard index ({exc})") from None
            for shard in shards:
                if Path(shard).name != shard or not (self.folder / shard).is_file():
                    raise CheckpointError(f"{index}: shard {shard!r} is missing from {self.folder}")
            return [self.folder / shard for shard in shards]
        files = sorted(self.folder.glob("*.safetensors"))
        if files:
            return files
        pickled = sorted(self.folder.glob("*.bin"))
        if pickled and not allow_pickle:
            raise CheckpointError(
                f"{self.folder}: weights are pickle .bin files, which can run code when loaded",
                hint="convert the checkpoint to safetensors, or set allow_pickle: true for this model in the recipe",
            )
        if pickled:
            return pickled
        raise CheckpointError(f"{self.folder}: no *.safetensors weight files")

    def _index(self) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            if path.suffix == ".bin":
                for name, value in self._load_pickled(path).items():
                    tensors[name] = TensorInfo(path.name, _TORCH_DTYPES.get(str(value.dtype), str(value.dtype)), tuple(value.shape))
                continue
            try:
                header = read_header(path)
            except (SafetensorsFormatError, OSError) as exc:
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})", hint="the file may be truncated; download it again") from None
            for name, entry in header.items():
                self._entries[name] = entry
                tensors[name] = TensorInfo(path.name, entry.dtype, entry.shape)
        return tensors

    def _load_pickled(self, path: Path) -> dict[str, Any]:
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{path}: reading pickle weights needs torch", hint="pip install 'moecc[torch]'") from None
        # weights_only refuses arbitrary objects; mmap keeps the file out of memory until a tensor is read.
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises several types for a refused or corrupt pickle
            raise CheckpointError(f"{path}: refused or unreadable pickle checkpoint ({exc})") from None
        self._pickled = {**(self._pickled or {}), **loaded}
        return loaded

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
                raise CheckpointError(f"{self.folder}: tensor {name} has dtype {info.dtype}; supported: {', '.join(_FLOAT_DTYPES)}")

    def read(self, name: str) -> np.ndarray:
        """One tensor as float32, checked for NaN and Inf."""
        info = self.tensors[name]
        try:
            if self._pickled is not None:
                array = self._pickled[name].float().numpy()
            else:
                array = read_tensor(self.folder / info.file, self._entries[name])
        except (SafetensorsFormatError, OSError) as exc:
            raise CheckpointError(f"{self.folder / info.file}: cannot read tensor {name} ({exc})") from None
        if not np.isfinite(array).all():
            raise CheckpointError(f"{self.folder}: tensor {name} holds NaN or Inf values")
        return array

    @functools.cached_property
    def _digests(self) -> dict[str, str]:
        paths = [self.folder / "config.json", *self.files]
        return {path.name: sha256_of(path) for path in paths}

    def digests(self) -> dict[str, str]:
        """sha256 of config.json and every weight file, the identity of this checkpoint (hashed once);
        a model derived from them (cut to its first layers, routed to fewer experts) says so, since its
        files are the full model's."""
        derived = {"first_layers": self.layers, "experts_per_token": self.experts_per_token}
        return dict(self._digests) | {key: str(value) for key, value in derived.items() if value is not None}

