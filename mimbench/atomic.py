"""Atomic file writes: the one place that knows how to replace a file without ever leaving half of it.

Every file the project writes (checkpoints, encoder files, run records, feature caches, the
segmentation backbone checkpoint, the generated segmentation set, resolved configs) is written the
same way: into a temporary file in the
target's own directory, fsynced, renamed over the target with ``os.replace``, and the directory fsynced
so that the rename itself survives a power cut. A crash at any point leaves the old file or the new one.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Callable

from mimbench.errors import MimbenchError


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where a directory cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mode_for(path: Path) -> int:
    """An existing file's permission bits, else what ``open(path, "w")`` would create (0666 minus the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[str], None], *, what: str, fix: str,
                 durable: bool = True) -> Path:
    """Call ``write(tmp_path)`` to produce the new content, then move it over ``path`` atomically.

    ``what`` names the file in the error (e.g. "the encoder file"), ``fix`` says what to do. Any
    OSError becomes a MimbenchError; the temporary file never outlives the call, and ``path`` keeps
    its previous content when any step fails. ``durable=False`` skips the two fsyncs, for the many
    small files of a set whose manifest (written last, durably) is the commit point: a crash can then
    lose such a file but never leave a partial one under its name.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, _mode_for(path))  # mkstemp makes 0600 files; give the permissions a plain write would
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise MimbenchError(f"Cannot write {what} {path}: {exc.strerror or exc}.", fix) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, *, what: str, fix: str, durable: bool = True) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), what=what, fix=fix,
                        durable=durable)


def check_writable_dir(directory: str | Path) -> Path:
    """Create ``directory`` if needed and prove it writable before any work starts (MimbenchError if not)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise MimbenchError(f"Output directory {directory} is not writable ({exc.strerror or exc}).",
                            "Pass an --out directory you can write to.") from exc
    return directory
