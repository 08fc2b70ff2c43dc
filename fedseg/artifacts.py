"""Fit/apply artifacts: JSON files with a kind, a format version and a content hash.

A job records the hash of the artifact it was built with; a site refuses to go on when its
copy is missing, was edited (its content no longer matches its hash) or is another version.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedseg.files import write_json_atomic


class ArtifactError(Exception):
    """An artifact that is missing, altered, of the wrong kind or not the expected one."""


def content_hash(payload: dict) -> str:
    """SHA-256 of the payload's canonical JSON, without its ``hash`` field.

    Args:
        payload: The artifact's content.

    Returns:
        Hex digest.
    """
    content = {key: value for key, value in payload.items() if key != "hash"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_artifact(payload: dict, path: Path) -> str:
    """Adds the content hash and writes the artifact atomically.

    Args:
        payload: Content; must hold ``kind`` and ``format_version``.
        path: Destination file.

    Returns:
        The content hash.
    """
    if "kind" not in payload or "format_version" not in payload:
        raise ValueError("an artifact needs a kind and a format_version")
    document = {**payload, "hash": content_hash(payload)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, document, sort_keys=True)
    return document["hash"]


def read_artifact(
    path: Path, kind: str, format_version: int, expected_hash: str | None = None
) -> dict:
    """Reads and verifies an artifact.

    Args:
        path: The file.
        kind: Kind it must be.
        format_version: Version it must have.
        expected_hash: Hash it must have (a job's record of it), or ``None``.

    Returns:
        The artifact, ``hash`` included.

    Raises:
        ArtifactError: If it is missing, unreadable, altered, of another kind or version, or
            not the expected one; the message names the file and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: {kind} artifact missing; fit it first")
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{path}: not a readable JSON artifact ({error})") from error
    if not isinstance(document, dict) or document.get("kind") != kind:
        raise ArtifactError(f"{path}: not a {kind} artifact")
    if document.get("format_version") != format_version:
        raise ArtifactError(
            f"{path}: format version {document.get('format_version')}, this fedseg reads "
            f"{format_version}; fit it again"
        )
    if document.get("hash") != content_hash(document):
        raise ArtifactError(f"{path}: content does not match its hash; it was altered")
    if expected_hash is not None and document["hash"] != expected_hash:
        raise ArtifactError(
            f"{path}: hash {document['hash'][:12]} is not the job's {expected_hash[:12]}; "
            "install the artifact the job was built with"
        )
    return document
