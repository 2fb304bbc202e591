"""Writing outputs all-or-nothing: everything is staged under a temporary name beside its destination and renamed
into place, so a crash, a kill or a full disk never leaves a half-written file where a finished one belongs.

Staged files and directories get the permissions an ordinary `open()` / `mkdir()` would give under the user's
umask before they are renamed into place: `tempfile` creates them private (0600 / 0700), and so does safetensors'
`save_file`, which would make a run's outputs unreadable to a colleague or to a serving process under another
user.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Every staging name starts with this, so a later start can tell our leftovers from anything else.
STAGING_PREFIX = ".pyprefopt-tmp-"
# An existing directory moved aside while its replacement is renamed in. Not a staging name: until the
# replacement is in place it is the only copy, so no cleanup of staging leftovers may take it.
MOVED_ASIDE_PREFIX = ".pyprefopt-old-"


def _umask() -> int:
    # Reading the umask means setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def staging_dir(parent: Path, label: str) -> Path:
    """A new, empty directory in `parent` (created if missing); call `publishable` on it before renaming it."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{label}-", dir=parent))


def publishable(path: Path) -> Path:
    """`path` and everything under it given open()'s and mkdir()'s permissions under the user's umask."""
    mask = _umask()
    path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    return path


def replace_dir(staged: Path, dest: Path, label: str):
    """Rename the finished directory `staged` (made publishable) onto `dest`. A directory cannot be renamed over
    a non-empty one, so an existing `dest` is moved aside first (`MOVED_ASIDE_PREFIX` + `label`), put back if the
    rename fails, and deleted once `staged` is in place."""
    publishable(staged)
    if not dest.exists():
        os.rename(staged, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{MOVED_ASIDE_PREFIX}{label}-", dir=dest.parent))
    os.rename(dest, old / dest.name)
    try:
        os.rename(staged, dest)
    except OSError:
        os.rename(old / dest.name, dest)
        raise
    shutil.rmtree(old)


def atomic_write(path: Path, write):
    """Call write(temporary path) and rename the file it wrote onto `path`; on any failure nothing is left."""
    fd, tmp = tempfile.mkstemp(prefix=f"{STAGING_PREFIX}{path.name}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(publishable(Path(tmp)), path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def remove_stale_staging(directory: Path) -> list[Path]:
    """Delete what an earlier process killed mid-write left in `directory` (only our own staging names)."""
    stale = sorted(directory.glob(f"{STAGING_PREFIX}*")) if directory.is_dir() else []
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return stale
