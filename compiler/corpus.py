"""The CPython standard-library corpus: a deterministic train / held-out split of its source files."""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from pathlib import Path

# Test suites and IDLE are left out: their text is repetitive (test data) or GUI glue.
_SKIPPED_PARTS = {"site-packages", "test", "tests", "idlelib", "__pycache__"}
_HELD_OUT_BUCKETS = 10  # one file in ten is held out for evaluation


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_held_out(relative: str) -> bool:
    # The split depends only on the file's path, so it is the same on every machine.
    return hashlib.sha256(relative.encode()).digest()[0] % _HELD_OUT_BUCKETS == 0


@functools.lru_cache(maxsize=2)
def _stdlib_files(split: str) -> tuple[Path, ...]:
    root = stdlib_root()
    chosen = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in _SKIPPED_PARTS)  # prune site-packages and tests early
        for name in files:
            if name.endswith(".py"):
                relative = Path(folder, name).relative_to(root).as_posix()
                if _is_held_out(relative) == (split == "heldout"):
                    chosen.append(Path(folder, name))
    return tuple(sorted(chosen))


def stdlib_files(split: str) -> list[Path]:
    """Source files of the standard library in a stable order; split is "train" or "heldout"."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    return list(_stdlib_files(split))


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def heldout_prompts(count: int, prompt_chars: int = 160) -> list[str]:
    """Prompts cut from held-out files at the start of a top-level definition, for evaluation."""
    prompts = []
    for path in stdlib_files("heldout"):
        text = read_text(path)
        start = text.find("\ndef ")
        if start < 0:
            start = text.find("\nclass ")
        if start < 0:
            continue
        prompts.append(text[start + 1 : start + 1 + prompt_chars])
        if len(prompts) == count:
            break
    return prompts
