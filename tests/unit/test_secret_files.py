"""Secret files: owner-only modes, atomic first-writer-wins creation, clear errors when missing."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from zumik_serve.home import ZumikHome
from zumik_serve.secret_files import (
    SecretFileError,
    read_or_create_secret_file,
    read_secret_file,
    secrets_dir,
    write_private_file,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_secret_is_0600_in_a_0700_folder(tmp_path: Path) -> None:
    target = tmp_path / "secrets" / "one.key"
    assert write_private_file(target, b"abc")
    assert target.read_bytes() == b"abc"
    assert mode(target) == 0o600
    assert mode(target.parent) == 0o700
    assert [p.name for p in target.parent.iterdir()] == ["one.key"]  # no temporary left behind


def test_first_writer_wins_unless_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "s" / "k"
    assert write_private_file(target, b"first")
    assert not write_private_file(target, b"second")
    assert target.read_bytes() == b"first"
    assert write_private_file(target, b"third", overwrite=True)
    assert target.read_bytes() == b"third" and mode(target) == 0o600


def test_read_or_create_generates_once(tmp_path: Path) -> None:
    calls: list[int] = []

    def generate() -> bytes:
        calls.append(1)
        return b"x" * 32

    target = tmp_path / "s" / "salt"
    assert read_or_create_secret_file(target, generate) == b"x" * 32
    assert read_or_create_secret_file(target, lambda: b"other") == b"x" * 32
    assert len(calls) == 1


def test_missing_secret_names_file_and_fix(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match=r"the salt secret is missing: no file .*nope\. Run it"):
        read_secret_file(tmp_path / "nope", what="the salt secret", how_to_fix="Run it.")


def test_secrets_dir_from_env_or_home(tmp_path: Path) -> None:
    home = ZumikHome(tmp_path / "home")
    assert secrets_dir(home, {}) == tmp_path / "home" / "secrets"
    assert secrets_dir(home, {"ZUMIK_SECRETS_DIR": "/etc/zumik/secrets"}) == Path("/etc/zumik/secrets")


def test_home_folders_are_owner_only(tmp_path: Path) -> None:
    home = ZumikHome(tmp_path / "home")
    home.root.mkdir(mode=0o755)
    home.root.chmod(0o755)
    home.ensure()
    for folder in (home.root, home.models_dir, home.redis_dir, home.run_dir):
        assert mode(folder) == 0o700, folder
