"""The label manifest: ``case_id,series_uid,label``, label paths relative to the manifest.

``fedseg synth`` writes it and ``fedseg ingest --manifest`` reads it. ``series_uid`` names a
DICOM SeriesInstanceUID, or, for a NIfTI image, its path relative to the ingested folder.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

MANIFEST_HEADER = ("case_id", "series_uid", "label")


@dataclass(frozen=True)
class ManifestEntry:
    """One manifest row, with the label path resolved against the manifest's folder."""

    case_id: str
    series_uid: str
    label: Path


def read_manifest(path: Path) -> list[ManifestEntry]:
    """Reads and validates a manifest (UTF-8, with or without a byte order mark).

    Args:
        path: The CSV file.

    Returns:
        One entry per row.

    Raises:
        FileNotFoundError: If the manifest does not exist.
        ValueError: If the header is wrong, a row is incomplete or a series is listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:  # Excel writes a BOM
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != MANIFEST_HEADER:
            raise ValueError(
                f"{path}: header is {','.join(reader.fieldnames or [])!r}, "
                f"expected {','.join(MANIFEST_HEADER)!r}"
            )
        entries = []
        for line, row in enumerate(reader, start=2):
            if not all(row.get(column) for column in MANIFEST_HEADER):
                raise ValueError(f"{path}, line {line}: every column needs a value")
            entries.append(
                ManifestEntry(row["case_id"], row["series_uid"], path.parent / row["label"])
            )
    seen = set()
    for entry in entries:
        if entry.series_uid in seen:
            raise ValueError(f"{path}: series {entry.series_uid} is listed twice")
        seen.add(entry.series_uid)
    return entries
