"""Sessions with moecc's kernels (runtime/kernels/session.py): the shipped pair decodes as with ONNX Runtime's,
a machine without a compiler falls back or is refused as asked, and loading the kernels changes nothing else."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

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


# Counts the allocations made from moecc's kernel library while counting is on: preloaded, its malloc takes every
# caller's (glibc's own does the allocating) and records the sizes of those whose return address lies in the
# library.
MALLOC_COUNTER = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <string.h>
extern void *__libc_malloc(size_t);
enum { MOST = 1 << 16 };
static __thread int inside;
static int counting, count;
static size_t sizes[MOST];
void count_kernel_mallocs(int on) { if (on) count = 0; counting = on; }
int kernel_malloc_count(void) { return count < MOST ? count : MOST; }
size_t kernel_malloc_size(int i) { return sizes[i]; }
void *malloc(size_t size) {
  void *caller = __builtin_return_address(0), *memory = __libc_malloc(size);
  Dl_info info;
  if (counting && !inside) {
    inside = 1;
    if (dladdr(caller, &info) && info.dli_fname && strstr(info.dli_fname, "moecc-kernels")) {
      int i = __atomic_fetch_add(&count, 1, __ATOMIC_RELAXED);
      if (i < MOST) sizes[i] = size;
    }
    inside = 0;
  }
  return memory;
}
"""

# In a process with the counter preloaded: the sizes of the kernels' allocations in a prompt's prefill and, at each
# context, over decode steps and verify calls after a few of each (a kernel's buffers may grow while a context is new).
ALLOCATIONS_BY_CONTEXT = r"""
import ctypes, json, os, sys
import runtime
counter = ctypes.CDLL(os.environ["LD_PRELOAD"])
counter.kernel_malloc_size.restype = ctypes.c_size_t
def counted(run):
    counter.count_kernel_mallocs(1)
    run()
    counter.count_kernel_mallocs(0)
    return sorted(counter.kernel_malloc_size(i) for i in range(counter.kernel_malloc_count()))
generator = runtime.load(sys.argv[1], kernels="moecc")
ids = [(7 * i) % 200 + 5 for i in range(2000)]
found = {}
for context in (100, 1500):
    cache = generator.main.new_cache()
    found[f"prefill {context}"] = counted(lambda: cache.feed(ids[:context], last=1))
    def steps():
        for step in range(4):
            cache.feed(ids[context + step : context + step + 1])
            cache.feed(ids[context + step + 1 : context + step + 10], last=9)  # a verify of 8 proposals, rolled back
            cache.keep(context + step + 1)
    steps()
    found[context] = counted(steps)
print(json.dumps(found))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="counts allocations through glibc's malloc")
def test_decoding_allocates_nothing_that_grows_with_the_context(shipped_artifact, tmp_path):
    """The issue's "no per-token allocation that grows with context", for moecc's kernels: decode steps and verify
    calls after 1,500 cached tokens make the same allocations as after 100 (the attention's scores, which grow with
    the context, live in buffers each thread keeps: thread_scratch). The shipped main model splits its cache into
    parts of 512 rows, so the longer context also merges parts."""
    counter = tmp_path / "count_mallocs.so"
    source = tmp_path / "count_mallocs.c"
    source.write_text(MALLOC_COUNTER)
    subprocess.run([*build._compiler(), "-shared", "-fPIC", "-O1", str(source), "-o", str(counter), "-ldl"], check=True, capture_output=True)
    result = subprocess.run(
        [sys.executable, "-c", ALLOCATIONS_BY_CONTEXT, str(shipped_artifact)], capture_output=True, text=True, env=os.environ | {"LD_PRELOAD": str(counter)}
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["prefill 100"], "the counter sees the kernels' allocations (a prompt's buffers)"
    assert found["1500"] == found["100"], "allocations that follow the context"
