"""scripts/profile_decode.py: where a call's time goes, op type by op type, for a main model and for a draft
that runs as one node (moecc.DenseDecoder, which also takes the number of tokens to propose)."""

from __future__ import annotations

import pytest

from script_modules import load_script


@pytest.mark.parametrize("role, op", [("main", "Attention"), ("draft", "DenseDecoder")])
def test_a_profile_times_the_ops_of_each_call(shipped_artifact, tmp_path, role, op):
    profile_decode = load_script("profile_decode")
    entry, text = profile_decode._entry_and_text(shipped_artifact, role)
    per_op = profile_decode.profile(shipped_artifact, entry, text, context=64, calls=4, new_tokens=1, threads=1, folder=tmp_path, kernels="moecc")
    assert per_op[op] > 0, per_op
