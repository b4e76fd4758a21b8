"""Folders that appear whole or not at all: written under a temporary name, then renamed into place.

A work folder's name carries the id of the process writing it, so the next run can remove the ones a
killed build left behind without touching those of a build still running.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

_WORK = re.compile(r"\.(?P<label>.+)-(?P<pid>\d+)-(?P<suffix>[A-Za-z0-9_]+)")


def work_folder(parent: Path, label: str) -> Path:
    """A new hidden folder in `parent` to write into before it is renamed into place."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{label}-{os.getpid()}-", dir=parent))


def retired_name(final: Path) -> Path:
    """Where `final` goes while its replacement is renamed in, until it is removed."""
    return final.with_name(f".retired-{final.name}-{os.getpid()}-old")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_abandoned(parent: Path) -> None:
    """Remove the work folders in `parent` whose process no longer runs (a killed build's)."""
    if not parent.is_dir():
        return
    for path in parent.iterdir():
        match = _WORK.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and int(match["pid"]) != os.getpid() and not _running(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)


def install_once(work: Path, final: Path) -> None:
    """Rename the finished folder `work` to `final`; if a concurrent writer put `final` there first (the same
    content: both were made from the same key), keep theirs and drop ours. A rename never exposes half a folder."""
    try:
        os.rename(work, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(work, ignore_errors=True)
