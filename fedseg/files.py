"""Small file helpers shared by the site and the server: atomic writes and content hashes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def write_json_atomic(path: Path, payload: object) -> None:
    """Writes ``payload`` as indented JSON; readers see the old file or the new one, never half.

    Args:
        path: Destination file (its folder must exist).
        payload: JSON-serializable content.
    """
    path = Path(path)
    temporary = path.with_name(f".tmp-{path.name}")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(temporary, path)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex (read in blocks: models can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
