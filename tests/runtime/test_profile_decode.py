"""scripts/profile_decode.py: where a call's time goes, op type by op type, for models that run as one node
(moecc.FusedDecoder, which also takes the number of tokens to propose), and node by node on request."""

from __future__ import annotations

import pytest

from script_modules import load_script


@pytest.mark.parametrize("role, whole_graph, ops", [("main", False, {"Attention", "MoE"}), ("main", True, {"FusedDecoder"}), ("draft", True, {"FusedDecoder"})])
def test_a_profile_times_the_ops_of_each_call(shipped_artifact, tmp_path, role, whole_graph, ops):
    profile_decode = load_script("profile_decode")
    entry, text = profile_decode._entry_and_text(shipped_artifact, role)
    per_op = profile_decode.profile(shipped_artifact, entry, text, 64, 4, 1, 1, tmp_path, "moecc", whole_graph)
    assert all(per_op[op] > 0 for op in ops) and ("FusedDecoder" in per_op) == whole_graph, per_op
