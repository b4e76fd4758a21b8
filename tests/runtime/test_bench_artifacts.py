"""scripts/bench_artifacts.py: artifacts of one main model timed side by side, every case on the same prompts,
each speculative output checked against the main model's own greedy output."""

from __future__ import annotations

import pytest

from script_modules import load_script

bench_artifacts = load_script("bench_artifacts")


def test_every_case_runs_on_every_prompt_and_repeats_the_main_models_output(shipped_artifact):
    cases = bench_artifacts.compare([shipped_artifact, shipped_artifact], prompt_tokens=32, new_tokens=16, rounds=2, lengths=["2", "auto"], threads=1)
    assert [(case.mode, len(case.seconds_per_token)) for case in cases] == [(bench_artifacts.MAIN_ONLY, 2)] + [("2", 2), ("auto", 2)] * 2
    assert all(case.lossless for case in cases)
    assert all(case.tokens_per_verify and min(case.tokens_per_verify) >= 1 for case in cases)
    assert "speed-up over main only" in [column.header for column in bench_artifacts.table([shipped_artifact] * 2, cases, 2, 32).columns]


def test_artifacts_of_different_main_models_are_refused(shipped_artifact, tiny_artifact):
    with pytest.raises(SystemExit, match="another main checkpoint"):
        bench_artifacts.compare([shipped_artifact, tiny_artifact], prompt_tokens=32, new_tokens=8, rounds=1, lengths=["2"], threads=1)
