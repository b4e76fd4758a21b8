"""Folders that appear whole or not at all: written under a temporary name, then renamed into place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def install_once(work: Path, final: Path) -> None:
    """Rename the finished folder `work` to `final`; if a concurrent writer put `final` there first (the same
    content: both were made from the same key), keep theirs and drop ours. A rename never exposes half a folder."""
    try:
        os.rename(work, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(work, ignore_errors=True)
