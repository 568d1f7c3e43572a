"""Writing files so that a reader never sees half of one: checkpoints, run logs and caches.

Every file aiflow-fl writes that something later trusts goes through :func:`atomic_write_bytes`: the
bytes go to a temporary file in the same folder, are flushed to disk, and the temporary file is
renamed over the target (``os.replace`` is atomic on POSIX and Windows). A crash leaves either the old
file or the new one, and concurrent writers (devices sharing a cache) never interleave.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (module docstring); creates the parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
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
