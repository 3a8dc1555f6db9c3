"""Files a privileged process may read: owned by root or by the running user, writable by no one else.

The actuator runs as root, so anything it reads (its config, key files, the node policy, an NVML
library, the sim state file) is a way in for whoever can write that file or swap it for a symlink.
Every such file is opened with ``O_NOFOLLOW`` (a planted symlink fails to open), checked on the
open descriptor (no check-then-open race) and refused with the file's name and the reason when:

- it is not a regular file;
- its owner is neither root nor the user this process runs as (as root: root only);
- group or others may write it (secret files: group or others may read it either);
- a directory on its path is writable by another user (so the file could be replaced), unless it is
  a root-owned sticky directory such as ``/tmp``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dualscale.errors import ConfigError

#: Largest file read by :func:`read_trusted` unless a caller asks otherwise (configs and keys are small).
MAX_FILE_BYTES = 1 << 20


def trusted_uids() -> frozenset[int]:
    """Owners a file may have: root, and the user this process runs as."""
    return frozenset({0, os.geteuid()})


def _owner_ok(st: os.stat_result) -> bool:
    return st.st_uid in trusted_uids()


def check_dirs(path: Path, what: str) -> None:
    """Refuse ``path`` when a directory above it could be written by another user."""
    for d in Path(os.path.abspath(path)).parents:
        try:
            st = os.stat(d)
        except OSError as e:
            raise ConfigError(f"{what} {path}: cannot inspect directory {d}: {e.strerror or e}") from e
        sticky_root = st.st_uid == 0 and st.st_mode & stat.S_ISVTX
        if not _owner_ok(st):
            raise ConfigError(f"{what} {path}: directory {d} is owned by uid {st.st_uid}, not by root or "
                              f"uid {os.geteuid()}: another user could replace the file")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_root:
            raise ConfigError(f"{what} {path}: directory {d} is writable by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}): another user could replace the file")


def check_fd(fd: int, path: Path, what: str, *, secret: bool = False) -> os.stat_result:
    """Refuse an open file that another user could have written (or, ``secret``, could read)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {path}: not a regular file")
    if not _owner_ok(st):
        raise ConfigError(f"{what} {path}: owned by uid {st.st_uid}; must be owned by root or by the user "
                          f"running this process (uid {os.geteuid()})")
    bad = stat.S_IRWXG | stat.S_IRWXO if secret else stat.S_IWGRP | stat.S_IWOTH
    if st.st_mode & bad:
        fix = "chmod 600" if secret else "chmod go-w"
        raise ConfigError(f"{what} {path}: mode {stat.S_IMODE(st.st_mode):04o} lets "
                          f"{'group or others read or write it' if secret else 'group or others write it'} "
                          f"({fix} {path})")
    return st


def open_trusted(path: str | Path, what: str, *, flags: int = os.O_RDONLY, mode: int = 0o600,
                 secret: bool = False) -> int:
    """Open ``path`` without following a symlink and check it (see the module docstring); returns the
    descriptor (the caller closes it). ``flags`` may add ``O_RDWR | O_CREAT`` (created with ``mode``)."""
    p = Path(path)
    check_dirs(p, what)
    try:
        fd = os.open(p, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as e:
        reason = "is a symbolic link (refused)" if e.errno == 40 else f"cannot open: {e.strerror or e}"  # ELOOP
        raise ConfigError(f"{what} {p}: {reason}") from e
    try:
        check_fd(fd, p, what, secret=secret)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_trusted(path: str | Path, what: str, *, secret: bool = False, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The contents of a checked file (see :func:`open_trusted`), at most ``max_bytes``."""
    fd = open_trusted(path, what, secret=secret)
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ConfigError(f"{what} {path}: larger than {max_bytes} bytes")
    return data
