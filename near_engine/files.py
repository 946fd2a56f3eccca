"""Writing files safely: every writer in the engine goes through here, so a failure never leaves half a file."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Callable

from .errors import NearError


def write_atomically(path: str | os.PathLike, write: Callable[[str], None],
                     error: type[NearError] = NearError) -> None:
    """Call `write(tmp_path)` on a temporary file in the target's folder, then move it over `path`.

    A crash or an exception leaves either the old file or the new one, never a partial file; an existing file keeps
    its permissions. Failures (missing folder, no permission, disk full, a writer's own error) raise `error` with a
    message naming the file.
    """
    target = Path(path)
    label = f"'{target.name}'"
    if target.is_dir():
        raise error(f"Could not write {label}: a folder of that name is in the way")
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mode = 0o644  # mkstemp makes owner-only files; a new output is readable like any other
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        tmp = None
    except (OSError, RuntimeError, ValueError) as exc:  # OS errors; RuntimeError/ValueError from format writers
        raise error(f"Could not write {label}: {getattr(exc, 'strerror', None) or exc}") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomically(path: str | os.PathLike, data: bytes, error: type[NearError] = NearError) -> None:
    """Write `data` to `path` atomically, flushing it to disk (fsync) before the rename."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    write_atomically(path, write, error)
