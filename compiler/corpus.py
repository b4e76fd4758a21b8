"""The CPython standard-library corpus: a deterministic train / held-out split of its source files."""

from __future__ import annotations

import hashlib
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


def stdlib_files(split: str) -> list[Path]:
    """Source files of the standard library in a stable order; split is "train" or "heldout"."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    root = stdlib_root()
    chosen = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if _SKIPPED_PARTS.intersection(path.relative_to(root).parts):
            continue
        if _is_held_out(relative) == (split == "heldout"):
            chosen.append(path)
    return chosen


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
