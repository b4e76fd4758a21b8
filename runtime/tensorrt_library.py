"""Which TensorRT this machine has, and which GPU: the one place that knows TensorRT from TensorRT-RTX.

Full TensorRT (`tensorrt`) builds engines for the GPU it runs on. TensorRT-RTX (`tensorrt_rtx_bindings`,
from the PyPI wheels tensorrt-rtx-cu12-libs and -bindings) builds ahead of time for chosen compute
capabilities, also on a machine without a GPU. Both are imported lazily: nothing else in moecc needs them.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType

from runtime.errors import MoeccError

# Flavour name -> module, in order of preference: full TensorRT where installed.
FLAVOURS = {"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt_rtx_bindings"}
INSTALL_HINT = "install TensorRT-RTX: pip install 'moecc[tensorrt]'"


class TensorRTMissing(MoeccError):
    """Neither TensorRT nor TensorRT-RTX is importable."""


def label(flavour: str, version: str) -> str:
    """How a flavour and version read to users, e.g. 'TensorRT-RTX 1.7.1.116'."""
    return f"{'TensorRT-RTX' if flavour == 'tensorrt_rtx' else 'TensorRT'} {version}"


@dataclass(frozen=True)
class Library:
    flavour: str  # a key of FLAVOURS
    version: str
    module: ModuleType

    @property
    def label(self) -> str:
        return label(self.flavour, self.version)

    @property
    def targets_compute_capabilities(self) -> bool:
        """Whether the builder takes the compute capabilities to build for (TensorRT-RTX), or uses the GPU it runs on."""
        return hasattr(self.module, "ComputeCapability")

    def compute_capability(self, name: str):
        """'sm86' -> the builder's enum value; raises with the supported names."""
        members = self.module.ComputeCapability.__members__
        key = name.upper()
        if key not in members or key in ("NONE", "CURRENT"):
            supported = ", ".join(n.lower() for n in members if n.startswith("SM"))
            raise MoeccError(f"{self.label} cannot build for compute capability {name!r}; it supports {supported}")
        return members[key]


@functools.cache
def load() -> Library:
    """The installed TensorRT, full TensorRT first; raises TensorRTMissing with how to install one."""
    for flavour, module_name in FLAVOURS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        return Library(flavour, module.__version__, module)
    raise TensorRTMissing("neither TensorRT nor TensorRT-RTX is installed", hint=INSTALL_HINT)


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str  # e.g. "sm86"


def current_gpu() -> Gpu | None:
    """The first CUDA device, or None when there is no usable one (no driver, no device, no CUDA bindings)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    error, count = cudart.cudaGetDeviceCount()
    if error != cudart.cudaError_t.cudaSuccess or count < 1:
        return None
    error, properties = cudart.cudaGetDeviceProperties(0)
    if error != cudart.cudaError_t.cudaSuccess:
        return None
    return Gpu(properties.name.decode(errors="replace").rstrip("\x00"), f"sm{properties.major}{properties.minor}")
