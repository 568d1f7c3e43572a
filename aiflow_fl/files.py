"""Writing files so that a reader never sees half of one, and checking that what is read is what was written.

Every file aiflow-fl writes that something later trusts goes through :func:`atomic_write_bytes`: the
bytes go to a temporary file in the same folder, are flushed to disk, and the temporary file is
renamed over the target (``os.replace`` is atomic on POSIX and Windows). A crash leaves either the old
file or the new one, and concurrent writers (devices sharing a cache) never interleave. Folders
written as a whole (a family, the model cache) are assembled in :func:`temp_dir_beside` and renamed.
Files and folders get the user's umask (``tempfile`` alone would make them 0600 / 0700).

Integrity: :func:`sha256_file` is the digest the model cache and family folders record when they are
written; :func:`write_manifest` / :func:`manifest_mismatches` record and check the digests of the
files of a folder (``{"format": 1, "sha256": {file name: hex digest}}``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

MANIFEST_FORMAT = 1


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def user_mode(directory: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file or folder under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (module docstring); creates the parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, user_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``, atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def temp_dir_beside(folder: Path) -> Path:
    """An empty hidden folder next to ``folder`` (same file system, so it can be renamed into place),
    with the user's umask rather than ``mkdtemp``'s 0700."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    tmp.chmod(user_mode(directory=True))
    return tmp


def apply_user_mode(folder: Path) -> None:
    """Give every file directly in ``folder`` the user's umask (writers such as safetensors create
    their files 0600)."""
    mode = user_mode()
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(mode)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 4 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, names: Iterable[str], manifest: str) -> None:
    """Record the SHA-256 of ``folder/name`` for each of ``names`` in ``folder/manifest`` (atomically)."""
    digests = {name: sha256_file(folder / name) for name in sorted(names)}
    atomic_write_bytes(folder / manifest, json.dumps({"format": MANIFEST_FORMAT, "sha256": digests}, indent=1).encode())


def manifest_mismatches(folder: Path, manifest: str) -> list[str] | None:
    """Files of ``folder/manifest`` that are missing or whose bytes differ from their recorded SHA-256
    (empty: all match); None when there is no readable manifest."""
    try:
        recorded = json.loads((folder / manifest).read_text())
        digests = recorded["sha256"] if recorded.get("format") == MANIFEST_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(digests, dict) or not digests:
        return None
    return [name for name, digest in digests.items() if not (folder / name).is_file() or sha256_file(folder / name) != digest]
