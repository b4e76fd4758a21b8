"""Build moecc's C kernels into an ONNX Runtime custom-op library, once per machine, on first use.

Built for the machine that runs them (-march=native), as Triton or torch's cpp_extension build theirs, so the
inner loops use every vector unit the CPU has. The library is cached by the hash of its sources, compiler,
flags and CPU, built in a temporary folder and renamed into place, so concurrent first uses cannot load a
half-written file.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from runtime.errors import MoeccError

SOURCES = tuple(Path(__file__).with_name(name) for name in ("ops.c", "attention.c", "moe.c", "matmul.c", "fused_decoder.c"))
HEADERS = Path(__file__).with_name("include")
# fast-math: vectorized expf. No -Werror: a warning a newer compiler adds must not cost users the kernels; the
# tests compile the sources with it (tests/runtime/test_kernel_session.py). -Wno-psabi: the vector helpers are
# static, so GCC's note that their ABI differs between vector extensions concerns no caller.
# -march: native, as users get it; the tests also build for other machines this one can run (-march=x86-64,
# haswell), so that each vector width's code is checked where the suite runs.
FLAGS = ("-O3", "-ffast-math", "-std=c11", "-fPIC", "-Wall", "-Wno-psabi")


class KernelUnavailable(MoeccError):
    """The kernels cannot be built here (no C compiler, or it refused the sources)."""


def cache_folder() -> Path:
    if folder := os.environ.get("MOECC_KERNEL_CACHE"):
        return Path(folder)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moecc" / "kernels"


def _compiler() -> list[str]:
    """The compiler's command: $CC (which may carry arguments, as "ccache gcc"), else cc, gcc or clang."""
    command = shlex.split(os.environ.get("CC", "")) or [next((name for name in ("cc", "gcc", "clang") if shutil.which(name)), "cc")]
    if not shutil.which(command[0]):
        raise KernelUnavailable("no C compiler found for moecc's kernels", hint="install one (apt install gcc) or set CC")
    return command


def _cpu() -> str:
    """What -march=native sees: the CPU's feature flags where Linux lists them, else the architecture."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return platform.machine()


def library(march: str = "native") -> Path:
    """The custom-op library's path, built for `march` (gcc's -march) on this machine's first call; raises
    KernelUnavailable."""
    built = _build(march)
    if isinstance(built, KernelUnavailable):
        raise built
    return built


@cache  # a process tries once per march, whatever the outcome
def _build(march: str) -> Path | KernelUnavailable:
    try:
        return _compile(march)
    except KernelUnavailable as error:
        return error
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:  # an unwritable cache, no home folder, a compile past its time
        return KernelUnavailable(f"moecc's kernels could not be built: {error}", hint="set MOECC_KERNEL_CACHE to a writable folder")


def _compile(march: str) -> Path:
    compiler, flags = _compiler(), (*FLAGS, f"-march={march}")
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise KernelUnavailable(f"the C compiler {' '.join(compiler)} does not run: {error}", hint="install gcc or set CC") from error
    digest = hashlib.sha256()
    # The key: the sources and headers, this file (its flags and build steps), the compiler, -march and the CPU.
    for part in (*(path.read_bytes() for path in (*SOURCES, *sorted(HEADERS.glob("*.h")), *sorted(Path(__file__).parent.glob("*.h")), Path(__file__))), " ".join(compiler).encode(), version.encode(), march.encode(), _cpu().encode()):
        digest.update(hashlib.sha256(part).digest())
    folder = cache_folder()
    target = folder / f"moecc-kernels-{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".building-") as building:
        objects = [str(Path(building) / f"{source.stem}.o") for source in SOURCES]
        # Compiled with fast-math but linked without it: linking with it would add a constructor that sets the
        # CPU to flush subnormal floats to zero, for the whole process that loads the library.
        steps = [[*compiler, *flags, "-I", str(HEADERS), "-c", str(source), "-o", obj] for source, obj in zip(SOURCES, objects)]
        steps.append([*compiler, "-shared", *objects, "-o", str(Path(building) / target.name), "-lm", "-ldl", "-lpthread"])
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True, timeout=300)
            if result.returncode:
                raise KernelUnavailable(f"{' '.join(compiler)} could not build moecc's kernels:\n{result.stderr.strip()}", hint="set CC to another C compiler")
        os.replace(Path(building) / target.name, target)
    return target
