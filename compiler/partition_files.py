"""Writing a partitioned model so that each partition's expert weights live in a file of their own.

The quantize stage names every tensor of partition N with a `.pN` component; here those tensors go to
`model.experts.pN.data` and everything else to the model's usual data file, so a deployment can fetch or
place partitions separately. The whole model is read into memory once to do it.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx
from onnx.external_data_helper import set_external_data, write_external_data_tensors

from compiler.stages.export import DATA_FILE, MODEL_FILE

_PARTITION = re.compile(r"\.p(\d+)(?=\.|$)")
_INLINE_BELOW = 1024  # bytes; onnx's own default threshold for external data


def partition_file(partition: int) -> str:
    return f"model.experts.p{partition}.data"


def save_partitioned(source: Path, target: Path) -> list[str]:
    """Copy the model in `source` to `target` with its partitions' tensors in their own files; returns the data files written.

    `target` must be a fresh, empty folder: onnx writes external data by opening the file at its location,
    which would follow a symlink or hard link already there to a file outside. onnx refuses source
    locations outside `source` when it reads them in."""
    if any(target.iterdir()):
        raise FileExistsError(f"{target}: not empty; a partitioned model is written into a fresh folder only")
    model = onnx.load(str(source / MODEL_FILE))  # external data read in
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data") or len(tensor.raw_data) < _INLINE_BELOW:
            continue  # small constants stay in the model, where shape inference can read them
        match = _PARTITION.search(tensor.name)
        set_external_data(tensor, partition_file(int(match[1])) if match else DATA_FILE)
    write_external_data_tensors(model, str(target))
    onnx.save(model, str(target / MODEL_FILE))
    return sorted(path.name for path in target.glob("*.data"))
