"""scripts/bench_vs_transformers.py compares an artifact with the checkpoints its recipe names: only with
those the artifact was built from."""

from __future__ import annotations

import pytest

from compiler.recipe import load_recipe
from conftest import REPO, SHIPPED_RECIPE
from runtime.artifact import verify_artifact
from script_modules import load_script

bench_vs_transformers = load_script("bench_vs_transformers")


def test_an_artifact_built_from_other_checkpoints_is_refused(shipped_artifact):
    manifest = verify_artifact(shipped_artifact)
    bench_vs_transformers.check_built_from(manifest, load_recipe(SHIPPED_RECIPE), shipped_artifact)  # its own recipe
    with pytest.raises(SystemExit, match=r"was not built from .*small-coder.yaml's main checkpoint .*moecc build"):
        bench_vs_transformers.check_built_from(manifest, load_recipe(REPO / "recipes" / "small-coder.yaml"), shipped_artifact)
