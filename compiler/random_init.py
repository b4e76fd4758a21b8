"""Random-init checkpoints generated from a config, for size and speed work where trained weights do not matter.

A folder with config.json and tokenizer.json becomes a full checkpoint (sharded safetensors, one shard per
layer, fp32, normal weights with the config's initializer_range, norms at one) in the build cache. The bytes
depend only on the config, the tokenizer, the seed and VERSION, so the stage cache downstream stays valid.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from compiler.architectures import architecture_of, dims_of, expected_tensors
from compiler.folders import install_once, remove_abandoned, work_folder

VERSION = "1"
INDEX_FILE = "model.safetensors.index.json"
COPIED = ("config.json", "tokenizer.json")


def _shard_of(name: str) -> str:
    parts = name.split(".")
    return f"layer-{int(parts[2]):04d}" if name.startswith("model.layers.") else "other"


def _tensor(name: str, shape: tuple[int, ...], seed: int, std: float) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(shape, np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # per tensor: independent of order
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)


def materialize(folder: Path, seed: int, cache_root: Path) -> Path:
    """The generated checkpoint for `folder` (built on first use, then reused)."""
    digests = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in COPIED}
    key = hashlib.sha256(json.dumps({"files": digests, "seed": seed, "version": VERSION}, sort_keys=True).encode()).hexdigest()
    target = cache_root / "random-init" / key
    if (target / INDEX_FILE).is_file():
        return target
    config = json.loads((folder / "config.json").read_text())
    arch = architecture_of(config)
    shapes = expected_tensors(arch, dims_of(arch, config))
    std = float(config.get("initializer_range", 0.02))
    remove_abandoned(target.parent)
    work = work_folder(target.parent, key[:12])
    try:
        for name in COPIED:
            shutil.copyfile(folder / name, work / name)
        shards: dict[str, list[str]] = {}
        for name in shapes:
            shards.setdefault(_shard_of(name), []).append(name)
        weight_map, total = {}, 0
        for shard, names in shards.items():  # one layer in memory at a time
            tensors = {name: _tensor(name, shapes[name], seed, std) for name in names}
            save_file(tensors, str(work / f"{shard}.safetensors"))
            weight_map |= {name: f"{shard}.safetensors" for name in names}
            total += sum(t.nbytes for t in tensors.values())
        (work / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        install_once(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target
