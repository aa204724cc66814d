"""Files that hold secrets, and folders that hold them: owner-only, written atomically.

Rules kept here: a secret file is created 0600 inside a 0700 folder, in one step (written to a
private temporary file, then renamed), so no other user can ever read it, not even half-written;
creation never overwrites (the first writer wins, a second reads what the first wrote); reading
one never creates it. Where the files live is ``ZUMIK_SECRETS_DIR`` (an operator's mounted
Kubernetes Secret, say), else ``$ZUMIK_HOME/secrets``.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from zumik_serve.home import ZumikHome

SECRETS_DIR_ENV = "ZUMIK_SECRETS_DIR"
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


class SecretFileError(RuntimeError):
    """A secret file is missing or unreadable; the message says which file and what to do."""


def secrets_dir(home: ZumikHome, environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    configured = env.get(SECRETS_DIR_ENV)
    return Path(configured).expanduser() if configured else home.root / "secrets"


def ensure_private_dir(path: Path) -> Path:
    """``path`` and any missing parents created; ``path`` itself made 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    if stat.S_IMODE(path.stat().st_mode) != PRIVATE_DIR_MODE:
        path.chmod(PRIVATE_DIR_MODE)
    return path


def write_private_file(path: Path, data: bytes, *, overwrite: bool = False) -> bool:
    """Write ``data`` to ``path`` as 0600, atomically. Without ``overwrite`` an existing file is
    kept and False returned (the first writer wins); True when this call wrote the file."""
    ensure_private_dir(path.parent)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600 by mkstemp
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails when path exists: never replaces another writer's secret
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def read_secret_file(path: Path, *, what: str, how_to_fix: str) -> bytes:
    """The bytes of ``path``; ``SecretFileError`` naming ``what`` and ``how_to_fix`` when the file
    is missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SecretFileError(f"{what} is missing: no file {path}. {how_to_fix}") from None
    except OSError as exc:
        raise SecretFileError(f"{what} cannot be read from {path}: {exc.strerror}. {how_to_fix}") from None


def read_or_create_secret_file(path: Path, generate: Callable[[], bytes]) -> bytes:
    """The bytes of ``path``, created (0600) with ``generate()`` when missing."""
    if not path.exists():
        write_private_file(path, generate())
    return path.read_bytes()
