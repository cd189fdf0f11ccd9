"""Write a file that holds key material: mode 0600, atomic, durable.

    write(path, data, what="wireguard key")   # KernelError naming ``what`` and the path on failure

A temporary file beside the target is created exclusively (O_EXCL,
O_NOFOLLOW: never through a planted symlink) with mode 0600 set exactly
(fchmod: the umask does not apply), written, fsynced and renamed over the
target; the directory is fsynced so the rename survives a power cut. On any
failure the old file, if any, is intact. Errors never carry the data.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.errors import KernelError

FILE_MODE = 0o600


def write(path: Path, data: bytes, what: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)  # left over by a crash between create and rename
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        # Retryable (disk full, read-only mount): the old file, if any, is intact.
        raise KernelError(f"{what}: cannot write {path}: {e.strerror}", e.errno) from e
