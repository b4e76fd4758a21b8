"""Sessions with moecc's kernels (runtime/kernels/session.py): the shipped pair decodes as with ONNX Runtime's,
a machine without a compiler falls back or is refused as asked, and loading the kernels changes nothing else."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

import runtime
from kernel_sessions import compiler_targets_x86
from runtime.errors import MoeccError
from runtime.kernels import build


def test_models_decode_alike_with_either_kernels(shipped_artifact):
    """The shipped pair (a Qwen3-MoE main model and a Qwen3 draft, each one moecc.FusedDecoder) with moecc's kernels
    and with ONNX Runtime's: logits within float rounding, token-exact greedy output in a padded batch
    with speculation (rollbacks), and for a single sequence."""
    ours, theirs = (runtime.load(shipped_artifact, target="cpu", kernels=kernels) for kernels in ("moecc", "onnxruntime"))
    assert (ours.main.kernels, ours.draft.kernels, theirs.main.kernels) == (("moecc.FusedDecoder",), ("moecc.FusedDecoder",), ())
    history = ours.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    np.testing.assert_allclose(ours.main.new_cache(128).feed(history), theirs.main.new_cache(128).feed(history), atol=1e-4, rtol=0)
    prompts = [history, history[:7], ours.encode("import os\nimport sys\n\n\ndef main():\n")]
    for speculative in (False, True):
        batch, _ = ours.generate_batch_ids(prompts, max_new_tokens=24, speculative=speculative)
        assert batch == theirs.generate_batch_ids(prompts, max_new_tokens=24, speculative=speculative)[0]
    single = [token for step in ours.stream_ids(history, max_new_tokens=24) for token in step]
    assert single == [token for step in theirs.stream_ids(history, max_new_tokens=24, speculative=False) for token in step]


def test_without_a_compiler_auto_falls_back_and_moecc_refuses(tiny_artifact, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(build, "_build", build._build.__wrapped__)  # no cached library from earlier tests
    with pytest.raises(build.KernelUnavailable, match="no C compiler"):
        build.library()
    generator = runtime.load(tiny_artifact, kernels="auto")
    assert "unavailable" in caplog.text and generator.main.kernels == ()
    assert generator.generate("def", max_new_tokens=4).token_ids
    with pytest.raises(MoeccError, match="moecc's kernels are unavailable: no C compiler"):
        runtime.load(tiny_artifact, kernels="moecc")
    with pytest.raises(MoeccError, match="unknown kernels"):
        runtime.load(tiny_artifact, kernels="flash")


def test_loading_the_kernel_leaves_the_processors_float_state_alone(tiny_artifact):
    """Built with fast-math, linked without it: subnormal floats keep their value in the loading process."""
    runtime.load(tiny_artifact, kernels="moecc")
    subnormal = np.array([1e-40], dtype=np.float32)
    assert (subnormal * np.float32(1.0))[0] == subnormal[0] != 0


@pytest.mark.parametrize("target", ["native", "x86-64", "sandybridge", "haswell", "skylake-avx512"], ids=lambda target: target)
def test_kernel_sources_compile_without_warnings(target, tmp_path):
    """With warnings as errors, for this machine and, where the compiler targets x86, for SSE2, AVX, AVX2 and
    AVX-512 machines: each vector width's code path compiles cleanly wherever the library may be built."""
    compiler = build._compiler()
    if target != "native" and not compiler_targets_x86():
        pytest.skip("the compiler does not target x86")
    for source in build.SOURCES:
        result = subprocess.run(
            [*compiler, *build.FLAGS, f"-march={target}", "-Werror", "-I", str(build.HEADERS), "-c", str(source), "-o", str(tmp_path / "kernel.o")],
            capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
