"""Export memory benchmark: peak RSS of the export of a large random-init Qwen3-MoE bf16 sharded checkpoint.

    .venv/bin/python scripts/bench_export_memory.py --workdir /tmp/moecc-mem

Generates checkpoints tensor by tensor (never whole in memory), then exports each in a fresh
process and reports that process's peak RSS against the checkpoint size, and export time as the
number of experts grows. Goal: peak RSS <= 0.5 x checkpoint size + 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GIB = 1 << 30


def _config(experts: int, layers: int) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 4096, "hidden_size": 1024,
        "intermediate_size": 3072, "moe_intermediate_size": 768, "num_hidden_layers": layers, "num_attention_heads": 16,
        "num_key_value_heads": 4, "head_dim": 64, "num_experts": experts, "num_experts_per_tok": 4, "norm_topk_prob": True,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "max_position_embeddings": 4096, "torch_dtype": "bfloat16",
    }


def _bf16_bytes(shape: tuple[int, ...], rng: np.random.Generator, scale: float) -> bytes:
    values = (rng.standard_normal(shape, dtype=np.float32) * scale) if len(shape) > 1 else np.ones(shape, np.float32)
    return (values.view(np.uint32) >> 16).astype("<u2").tobytes()  # truncation to bfloat16


def _write_shard(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    """A safetensors file written tensor by tensor: header first, then each tensor's bytes as generated."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for shape in shapes.values():
            handle.write(_bf16_bytes(shape, rng, 0.02))


def generate(folder: Path, experts: int, layers: int) -> int:
    from compiler.architectures import REGISTRY, dims_of, expected_tensors

    config = _config(experts, layers)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    shapes = expected_tensors(REGISTRY["Qwen3MoeForCausalLM"], dims_of(REGISTRY["Qwen3MoeForCausalLM"], config))
    rng = np.random.default_rng(0)
    weight_map = {}
    groups = [[n for n in shapes if f"layers.{layer}." in n] for layer in range(layers)]
    groups.append([n for n in shapes if ".layers." not in n])
    for index, names in enumerate(groups):
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        _write_shard(folder / shard, {n: shapes[n] for n in names}, rng)
        weight_map |= {n: shard for n in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def export_in_this_process(folder: Path, out: Path) -> None:
    """The measured part: what the pipeline's load and export stages do, in a process of its own."""
    from compiler.checkpoint import Checkpoint
    from compiler.stages import export

    started = time.perf_counter()
    checkpoint = Checkpoint(folder)
    checkpoint.validate()
    out.mkdir(parents=True, exist_ok=True)
    export.run(checkpoint, export.ExportConfig(), out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss": peak}))


def measure(folder: Path, out: Path) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--export-only", str(folder), str(out)], capture_output=True, text=True, check=True
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    shutil.rmtree(out)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moecc-export-memory"))
    parser.add_argument("--layers", type=int, default=14, help="layers of the 64-expert model (14 gives about 4.2 GiB in bf16)")
    parser.add_argument("--scaling-layers", type=int, default=2)
    parser.add_argument("--export-only", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export_only:
        export_in_this_process(*args.export_only)
        return

    rows = []
    for experts, layers in ((16, args.scaling_layers), (32, args.scaling_layers), (64, args.scaling_layers), (64, args.layers)):
        folder = args.workdir / f"e{experts}-l{layers}"
        size = generate(folder, experts, layers)
        figures = measure(folder, args.workdir / "export")
        shutil.rmtree(folder)
        rows.append({
            "experts": experts, "layers": layers, "checkpoint_gib": round(size / GIB, 3),
            "peak_rss_gib": round(figures["peak_rss"] / GIB, 3), "goal_gib": round(0.5 * size / GIB + 1, 3),
            "export_seconds": round(figures["seconds"], 1),
        })
        print(json.dumps(rows[-1]), flush=True)
    print("\n| experts | layers | checkpoint (GiB, bf16) | peak RSS (GiB) | goal (GiB) | export s |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['experts']} | {row['layers']} | {row['checkpoint_gib']} | {row['peak_rss_gib']} | {row['goal_gib']} | {row['export_seconds']} |")


if __name__ == "__main__":
    main()
