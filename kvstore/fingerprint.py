"""Fingerprints of model, tokenizer and adapter folders: the identity inputs of a compat key.

The model fingerprint covers ``config.json`` and every byte of every weight file (name, size,
SHA-256 of the whole file): two fine-tunes that share embeddings and ``lm_head`` still differ.
Hashing a 16 GB checkpoint takes tens of seconds, so each file's digest is kept in a small JSON
cache (``$ZUMIK_HOME/cache/fingerprints.json`` unless a caller names another) under the file's
absolute path, size and modification time; a file whose size or mtime changed is hashed again,
and a cache that cannot be read or written only costs the time of hashing. The tokenizer
fingerprint covers the tokenizer files whole (they are small); an adapter's covers every file of
its folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from kvstore.atomic_file import make_private_dirs, write_atomic

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
CACHE_FORMAT = "zumik-fingerprints/1"


def default_cache_path() -> Path:
    home = Path(os.environ.get("ZUMIK_HOME") or Path.home() / ".zumik").expanduser()
    return home / "cache" / "fingerprints.json"


def tokenizer_fingerprint(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(directory, name)
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def model_fingerprint(directory: Path, *, cache_path: Path | None = None) -> str:
    """SHA-256 over ``config.json`` and, per weight file in name order, its name, size and the
    SHA-256 of all its bytes (taken from the cache when the file's size and mtime are those the
    cache recorded)."""
    directory = Path(directory)
    weights = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    digest = hashlib.sha256()
    digest.update((directory / "config.json").read_bytes())
    with FileDigestCache(cache_path or default_cache_path()) as cache:
        for path in weights:
            digest.update(f"{path.name}\0{path.stat().st_size}\0{cache.sha256(path)}\0".encode())
    return digest.hexdigest()


def adapter_fingerprint(directory: Path, *, cache_path: Path | None = None) -> str:
    """SHA-256 over every file of an adapter folder (names and whole contents), or of one file."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else [directory]
    digest = hashlib.sha256()
    with FileDigestCache(cache_path or default_cache_path()) as cache:
        for path in files:
            name = path.relative_to(directory).as_posix() if path != directory else path.name
            digest.update(f"{name}\0{path.stat().st_size}\0{cache.sha256(path)}\0".encode())
    return digest.hexdigest()


class FileDigestCache:
    """SHA-256 of files, remembered by absolute path, size and ``st_mtime_ns`` in a JSON file.

    Used as a context manager: read on enter, written back (atomically, owner-only) on exit
    when something new was hashed. Concurrent writers lose at worst each other's new entries.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._entries: dict[str, dict[str, object]] = {}
        self._dirty = False

    def __enter__(self) -> FileDigestCache:
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and data.get("format") == CACHE_FORMAT:
                entries = data.get("files")
                if isinstance(entries, dict):
                    self._entries = entries
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._dirty:
            return
        payload = json.dumps({"format": CACHE_FORMAT, "files": self._entries}, sort_keys=True)
        with contextlib.suppress(OSError):
            make_private_dirs(self.path.parent)
            write_atomic(self.path, payload.encode())

    def sha256(self, path: Path) -> str:
        resolved = str(Path(path).resolve())
        info = os.stat(resolved)
        entry = self._entries.get(resolved)
        if (
            isinstance(entry, dict)
            and entry.get("size") == info.st_size
            and entry.get("mtime_ns") == info.st_mtime_ns
            and isinstance(entry.get("sha256"), str)
        ):
            return str(entry["sha256"])
        with open(resolved, "rb") as handle:
            value = hashlib.file_digest(handle, "sha256").hexdigest()
        self._entries[resolved] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": value}
        self._dirty = True
        return value
