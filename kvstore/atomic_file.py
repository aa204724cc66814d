"""Writing a file so that readers see either the old bytes or all of the new ones, owner-only.

Files are 0600 and the folders made for them 0700 unless a caller asks otherwise: what Zumik
writes (KV blocks, models it builds) is for its own processes, not for other users of the host.
A folder that already exists and is not the caller's (another user made it first, in a shared
place such as /dev/shm) is refused: its files could be read or replaced by that user.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


class ForeignFolderError(PermissionError):
    """A folder Zumik would write into is a link, not a folder, or another user's."""


def claim_private_dir(folder: Path) -> None:
    """``folder`` (and missing parents) created 0700; an existing one must be a folder of this
    user (not a link; ``ForeignFolderError`` otherwise), and loses group and other access."""
    make_private_dirs(folder)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise ForeignFolderError(
            f"{folder} is not a folder of this user (uid {os.geteuid()}): remove it or choose another "
            "place; Zumik does not write KV blocks where another user can read or replace them"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        folder.chmod(PRIVATE_DIR_MODE)


def make_private_dirs(folder: Path) -> None:
    """``folder`` and its missing parents created 0700 (``mkdir(parents=True)`` would give the
    parents the umask's mode); existing folders are left as they are."""
    missing: list[Path] = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            path.mkdir(mode=PRIVATE_DIR_MODE)


def write_atomic(path: Path, data: bytes, *, mode: int = PRIVATE_FILE_MODE) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it into place.

    A crash leaves either no file or a complete one under ``path`` (never a truncated one), and
    the temporary file is removed on any error.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
