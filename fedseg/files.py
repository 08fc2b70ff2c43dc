"""Small file helpers shared by the site and the server: atomic writes and content hashes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path``; readers see the old file or the new one, never half of it.

    The text goes to a hidden temporary file beside ``path`` that replaces it in one step. If
    writing fails, the temporary file is removed and ``path`` keeps its old content.

    Args:
        path: Destination file (its folder must exist).
        text: Content, written as UTF-8.
    """
    path = Path(path)
    temporary = path.with_name(f".tmp-{path.name}")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json_atomic(
    path: Path, payload: object, indent: int | None = 2, **dumps_options: object
) -> None:
    """Writes ``payload`` as JSON, atomically (:func:`write_text_atomic`).

    Args:
        path: Destination file (its folder must exist).
        payload: JSON-serializable content.
        indent: Spaces per nesting level; ``None`` writes one line, several times faster to
            encode (Python 3.11's C encoder does not indent), for large machine-read files
            written often.
        **dumps_options: Further options of :func:`json.dumps` (``sort_keys``, ``allow_nan``).
    """
    write_text_atomic(path, json.dumps(payload, indent=indent, **dumps_options) + "\n")


def replace_folder(staging: Path, final: Path) -> None:
    """Moves a fully written ``staging`` folder to ``final``, replacing what was there whole.

    The old folder is renamed aside (``.NAME.retired`` beside it) before ``staging`` takes
    its place and is removed after, so ``final`` never mixes old files with new ones; a run
    stopped in between leaves the old folder under the retired name, and the next run removes
    it.

    Args:
        staging: The new content, on the same file system as ``final``.
        final: Where it goes.
    """
    retired = final.with_name(f".{final.name}.retired")
    if retired.exists():
        shutil.rmtree(retired)
    if final.exists():
        final.rename(retired)
    staging.rename(final)
    if retired.exists():
        shutil.rmtree(retired)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex (read in blocks: models can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
