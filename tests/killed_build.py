"""Run a build that kills itself (SIGKILL: no cleanup runs) at a chosen point; the crash-safety test drives it.

    python tests/killed_build.py RECIPE OUTPUT LOG POINT

POINT: after:MODEL:STAGE (once that stage has finished), export-data (halfway through writing the exported
weights), publish-data (halfway through copying a model's weights into the artifact), or never. Each
finished stage is appended to LOG as one JSON line (model, stage, cached).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import onnx_ir

from compiler import pipeline
from compiler.recipe import load_recipe


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _half_then_die(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
    _die()


class Observer:
    def __init__(self, log: Path, point: str):
        self.log, self.point = log, point

    def stage_started(self, model: str, stage: str) -> None: ...

    def stage_progress(self, done: int, total: int) -> None: ...

    def stage_finished(self, record) -> None:
        with open(self.log, "a") as handle:
            handle.write(json.dumps({"model": record.model, "stage": record.stage, "cached": record.cached}) + "\n")
        if self.point == f"after:{record.model}:{record.stage}":
            _die()


def main(recipe: str, output: str, log: str, point: str) -> None:
    if point == "export-data":
        save = onnx_ir.save

        def partial_save(model, path, external_data=None, **options):
            save(model, path, external_data=external_data, **options)
            data = Path(path).parent / external_data
            _half_then_die(data, data.read_bytes())

        onnx_ir.save = partial_save
    elif point == "publish-data":
        copy = shutil.copyfile

        def partial_copy(source, target, **options):
            if Path(target).name.endswith(".data") and ".staging-" in str(target):
                _half_then_die(Path(target), Path(source).read_bytes())
            return copy(source, target, **options)

        pipeline.shutil.copyfile = partial_copy
    pipeline.build(load_recipe(recipe), Path(output), Observer(Path(log), point))


if __name__ == "__main__":
    main(*sys.argv[1:])
