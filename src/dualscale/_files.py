"""File output that never leaves a half-written file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int | None = None, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never half-written.

    The temporary is created private (0600, ``O_EXCL``, so a symlink planted there is never written
    through) and the rename replaces a symlink at ``path`` rather than following it. ``mode`` sets
    the file's permissions before it appears under its name (umask cannot widen or narrow them);
    ``fsync`` makes the data durable before the rename (key files; not state rewritten every second).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode, follow_symlinks=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
