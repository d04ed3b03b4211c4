"""Files written so that a crash never leaves half of one, and the hashes that tell versions of a file apart.

At the bottom of the stack: imports nothing from posttrain.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

MARKER = "COMPLETE"  # written last into a folder made by atomic_dir; a folder without it is a torn write


def atomic_dir(dest: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh temporary folder next to ``dest``, then rename it to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        (tmp / MARKER).write_text("ok\n")
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def read_complete_jsonl(path: Path) -> list[Any]:
    """Every line of a JSON-lines file that ends in a newline, parsed; a last line without one is left out, since a
    run appending to the file (metrics.jsonl of a live run) may be half-way through writing it."""
    data = Path(path).read_bytes()
    return [json.loads(line) for line in data.split(b"\n")[:-1] if line.strip()]


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it is missing or unreadable (a page or a cache, never the training data)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def sha256_of(path: str | Path) -> str:
    """The full sha256 hex digest of a file's bytes (what a model card states for its data)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes (the first 16 hex digits are plenty to tell versions of one file apart)."""
    return sha256_of(path)[:16]


def content_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
