"""``fedseg ingest``: a site's folder of DICOM and NIfTI to a training dataset with QC.

Output::

    OUT/images/<case>.nii.gz    canonical RAS, rescaled values (int16 when integral, else float32)
    OUT/labels/<case>.nii.gz    uint8 tumour label on the image's grid (when one was given)
    OUT/datalist.json           MONAI decathlon-style lists: training, validation, test
    OUT/qc.json                 one record per series or NIfTI volume found, and per bad file

The source folder is only read. Every output file is written under a temporary name and
renamed into place; a re-run reuses cases whose inputs are unchanged (same content hash),
removes outputs of cases that are gone, and so ends in the same dataset as one clean run.
Case ids are hashes: no patient identifier reaches the outputs, and QC reasons name files by
their path under the source folder, never by an absolute path. A case that fails in an
unforeseen way becomes a rejected QC record, not the end of the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np

from app_site.ingest.frames import (
    DicomFile,
    Frame,
    NotDicomError,
    UnreadableFileError,
    read_dicom_file,
)
from app_site.ingest.labels import (
    LabelError,
    SegmentationMismatch,
    SegmentationObject,
    label_from_nifti,
    label_from_segmentation,
)
from app_site.ingest.manifest import ManifestEntry, read_manifest
from app_site.ingest.nifti_inputs import (
    NiftiInputError,
    is_nifti,
    load_nifti_image,
    pair_labels,
)
from app_site.ingest.series import (
    ACCEPTED,
    REJECTED,
    SKIPPED,
    SeriesDecision,
    decide,
    group_frames,
)
from app_site.ingest.volume import canonical, load_series, save_nifti_atomic, series_affine_ras
from fedseg.files import write_json_atomic

#: Version of the output format; part of every content hash, so a new version re-converts.
#: 2: NIfTI inputs with integer values are written as int16, like DICOM series.
INGEST_FORMAT_VERSION = 2

MODALITIES = ("MR", "CT")

TUMOUR_LABEL_NAMES = {
    "0": "background",
    "1": "necrotic core",
    "2": "edema",
    "3": "enhancing tumour",
}

#: Called as ``progress(stage, done, total)`` while ingesting.
Progress = Callable[[str, int, int], None]

#: An absolute path inside an error message: a slash that starts a word, up to a blank or quote.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/[^\s'\"]+")

#: Longest error text put into a QC reason.
_MAX_ERROR_TEXT = 200


@dataclass(frozen=True)
class IngestOptions:
    """What to ingest and how.

    Attributes:
        source: Folder to read (recursively); never written to.
        output: Dataset folder to write.
        manifest: Optional ``case_id,series_uid,label`` CSV naming label files.
        modality: Accept only this modality (``MR`` or ``CT``); ``None`` accepts both. NIfTI
            inputs, which hold no modality, are recorded with this one.
        resample_gaps: Resample series with missing slices or non-uniform spacing.
        resample_tilt: Resample series with gantry tilt onto an orthogonal grid.
        validation_fraction: Share of labelled cases put in the validation split.
        workers: Processes reading and converting in parallel; 1 works in this process.
    """

    source: Path
    output: Path
    manifest: Path | None = None
    modality: str | None = None
    resample_gaps: bool = False
    resample_tilt: bool = False
    validation_fraction: float = 0.2
    workers: int = 1

    def __post_init__(self) -> None:
        """Rejects options that cannot work."""
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if self.modality is not None and self.modality not in MODALITIES:
            raise ValueError(f"--modality must be one of {MODALITIES}, got {self.modality!r}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"--validation-fraction must be in [0, 1), got {self.validation_fraction}"
            )


@dataclass
class IngestReport:
    """What an ingestion run found and did.

    Attributes:
        output: The dataset folder.
        records: The QC records, as written to ``qc.json``.
        converted: Case ids converted in this run.
        unchanged: Case ids reused from an earlier run (same content hash).
    """

    output: Path
    records: list[dict]
    converted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        """Number of records with a status."""
        return sum(1 for record in self.records if record["status"] == status)


def ingest(options: IngestOptions, progress: Progress | None = None) -> IngestReport:
    """Ingests ``options.source`` into ``options.output``.

    Args:
        options: What to ingest and how.
        progress: Optional progress callback.

    Returns:
        The report; ``qc.json`` and ``datalist.json`` hold the same information.

    Raises:
        FileNotFoundError: If the source folder or the manifest does not exist, or the source
            holds no file at all.
        ValueError: If the output lies inside the source (or the reverse), the output or one
            of its parents is an existing file, or the manifest is malformed.
    """
    source, output = _check_folders(options.source, options.output)
    manifest = {}
    if options.manifest:
        manifest = {entry.series_uid: entry for entry in read_manifest(options.manifest)}
    files = _input_files(source)
    if not files:
        raise FileNotFoundError(f"{source}: folder holds no files to ingest")
    for folder in ("images", "labels"):
        (output / folder).mkdir(parents=True, exist_ok=True)
    _remove_temporaries(output)
    previous = _previous_records(output)
    report = IngestReport(output=output, records=[])

    with _executor(options.workers) as pool:
        chunk = max(1, len(files) // (8 * options.workers))
        scanned = []
        scan = partial(_scan_file, source=source)
        for done, result in enumerate(pool.map(scan, files, chunksize=chunk), start=1):
            scanned.append(result)
            if progress:
                progress("reading", done, len(files))
        inputs = _sort_scan(scanned, source, report)
        decisions = [
            _without_unreadable_files(
                decide(group, options.modality, options.resample_gaps, options.resample_tilt),
                inputs.unreadable,
                source,
            )
            for group in group_frames(inputs.frames)
        ]
        segmentations = inputs.segmentations
        named_labels = frozenset(entry.label.resolve() for entry in manifest.values())
        named_images = frozenset(source / series_uid for series_uid in manifest)
        pairing = pair_labels(inputs.niftis, named_labels, named_images)
        for orphan, image_name in sorted(pairing.orphans.items()):
            reason = (
                f"label file with no image {image_name} beside it; name its image in --manifest"
            )
            report.records.append(_file_record(orphan, source, SKIPPED, reason))
        jobs = []
        for decision in decisions:
            case_id = _dicom_case_id(decision)
            jobs.append(
                pool.submit(
                    _dicom_case,
                    decision,
                    case_id,
                    manifest.get(decision.series_uid),
                    segmentations.get(decision.series_uid, []),
                    source,
                    options,
                    previous.get(case_id),
                )
            )
        for image_path in pairing.images:
            relative = str(image_path.relative_to(source))
            entry = manifest.get(relative)
            candidates = pairing.labels.get(image_path, [])
            case_id = _case_id(f"nifti|{relative}")
            if entry is None and len(candidates) > 1:
                report.records.append(
                    _ambiguous_label_record(case_id, relative, candidates, source, options)
                )
                continue
            label_path = entry.label if entry else (candidates[0] if candidates else None)
            jobs.append(
                pool.submit(
                    _nifti_case,
                    image_path,
                    relative,
                    case_id,
                    label_path,
                    source,
                    options,
                    previous.get(case_id),
                )
            )
        for done, job in enumerate(jobs, start=1):
            record, outcome = job.result()
            report.records.append(record)
            if outcome == "converted":
                report.converted.append(record["case_id"])
            elif outcome == "unchanged":
                report.unchanged.append(record["case_id"])
            if progress:
                progress("converting", done, len(jobs))

    found = {d.series_uid for d in decisions} | {str(p.relative_to(source)) for p in pairing.images}
    for series_uid, entry in sorted(manifest.items()):
        if series_uid not in found:
            unreadable = inputs.unreadable.get(series_uid, [])
            report.records.append(_missing_series_record(series_uid, entry, unreadable, source))
    for series_uid, objects in sorted(segmentations.items()):
        if series_uid not in found:
            for segmentation in objects:
                reason = f"DICOM SEG for series {series_uid}, which is not in the input folder"
                report.records.append(_file_record(segmentation.path, source, SKIPPED, reason))

    _remove_stale_outputs(output, report.records)
    write_json_atomic(output / "datalist.json", _datalist(report.records, options))
    write_json_atomic(output / "qc.json", _qc_document(report.records, options))
    return report


@dataclass(frozen=True)
class _Scanned:
    """One file's header, or why it has none (passed back from worker processes).

    ``series_uid`` is the series an unreadable file belongs to ('' when unknown); ``skipped``
    marks an error that skips the file (not DICOM, a link to a folder) instead of rejecting it.
    """

    path: Path
    dicom: DicomFile | None = None
    error: str | None = None
    skipped: bool = False
    series_uid: str = ""


@dataclass
class _Inputs:
    """Scanned files sorted by kind.

    Attributes:
        frames: Image frames of DICOM files.
        segmentations: DICOM SEG objects by the series they segment.
        niftis: NIfTI files.
        unreadable: Files that belong to a series but cannot be read, by that series' UID.
    """

    frames: list[Frame] = field(default_factory=list)
    segmentations: dict[str, list[SegmentationObject]] = field(
        default_factory=lambda: defaultdict(list)
    )
    niftis: list[Path] = field(default_factory=list)
    unreadable: dict[str, list[Path]] = field(default_factory=lambda: defaultdict(list))


def _input_files(source: Path) -> list[Path]:
    """Every entry under ``source`` to ingest, sorted: files, broken links, links to folders.

    Links to folders are listed (to be recorded as skipped) but not followed: a link may loop or
    lead outside ``source``. Hidden files and everything inside hidden folders (``.git``,
    ``.DS_Store``...) are left out.
    """
    return sorted(
        path
        for path in source.rglob("*")
        if not any(part.startswith(".") for part in path.relative_to(source).parts)
        and (path.is_file() or path.is_symlink())
    )


def _scan_file(path: Path, source: Path) -> _Scanned:
    if path.is_dir():  # a link to a folder (rglob lists links but does not enter them)
        reason = (
            "link to a folder, not followed: copy the folder into the input, or ingest the "
            "folder it points to on its own"
        )
        return _Scanned(path, error=reason, skipped=True)
    if is_nifti(path):
        return _Scanned(path)
    try:
        return _Scanned(path, dicom=read_dicom_file(path))
    except NotDicomError as error:
        return _Scanned(path, error=str(error), skipped=True)
    except UnreadableFileError as error:
        return _Scanned(path, error=str(error), series_uid=error.series_uid)
    except OSError as error:
        return _Scanned(path, error=f"unreadable file ({_error_text(error, source)})")


def _sort_scan(scanned: list[_Scanned], source: Path, report: IngestReport) -> _Inputs:
    """Sorts scanned files by kind and records the files that hold nothing to ingest.

    Unreadable files are recorded and, when they carry a series UID, kept against that series.

    A byte-identical copy of an image file (``IM5 (1).dcm`` beside ``IM5.dcm``) is skipped,
    naming the copy kept.
    """
    inputs = _Inputs()
    copies = _identical_copies(scanned)
    for item in scanned:
        path, dicom = item.path, item.dicom
        if item.error is not None:
            status = SKIPPED if item.skipped else REJECTED
            report.records.append(_file_record(path, source, status, item.error))
            if item.series_uid:
                inputs.unreadable[item.series_uid].append(path)
        elif path in copies:
            kept = copies[path].relative_to(source)
            reason = f"byte-identical copy of {kept}: ignored, the series uses that file"
            report.records.append(_file_record(path, source, SKIPPED, reason))
        elif dicom is None:
            inputs.niftis.append(path)
        elif dicom.segmented_series_uid == "":
            reason = "DICOM SEG without ReferencedSeriesSequence: its series is unknown"
            report.records.append(_file_record(path, source, REJECTED, reason))
        elif dicom.segmented_series_uid:
            segmented = dicom.segmented_series_uid
            inputs.segmentations[segmented].append(SegmentationObject(path, segmented))
        elif dicom.skip_reason:
            report.records.append(_file_record(path, source, SKIPPED, dicom.skip_reason))
        else:
            inputs.frames.extend(dicom.frames)
    return inputs


def _identical_copies(scanned: list[_Scanned]) -> dict[Path, Path]:
    """Maps each byte-identical copy of a DICOM image file to the copy kept.

    The copy kept has the shortest name (``IM5.dcm`` rather than ``IM5 (1).dcm``), then the
    first path.
    """
    by_digest: dict[str, list[Path]] = defaultdict(list)
    for item in scanned:
        if item.dicom is not None and item.dicom.frames:
            by_digest[item.dicom.frames[0].file_digest].append(item.path)
    copies = {}
    for paths in by_digest.values():
        kept = min(paths, key=lambda path: (len(path.name), str(path)))
        copies.update({path: kept for path in paths if path != kept})
    return copies


def _without_unreadable_files(
    decision: SeriesDecision, unreadable: dict[str, list[Path]], source: Path
) -> SeriesDecision:
    """Rejects a series some of whose files are unreadable: it would lack their slices.

    A skipped series (localizer, other modality...) stays skipped.
    """
    files = unreadable.get(decision.series_uid)
    if not files or decision.status == SKIPPED:
        return decision
    names = ", ".join(str(path.relative_to(source)) for path in files[:3])
    more = f" and {len(files) - 3} more" if len(files) > 3 else ""
    reason = (
        f"{len(files)} file(s) of the series are truncated or unreadable ({names}{more}): "
        "copy or export the series again"
    )
    if decision.status == REJECTED:
        reason = f"{reason}; {decision.reason}"
    return replace(decision, status=REJECTED, reason=reason, resampled=False)


def _dicom_case_id(decision: SeriesDecision) -> str:
    first = decision.frames[0]
    orientation = np.round(np.r_[first.row_direction, first.column_direction], 3) + 0.0
    return _case_id(f"dicom|{decision.series_uid}|{orientation.tolist()}")


def _dicom_case(
    decision: SeriesDecision,
    case_id: str,
    entry: ManifestEntry | None,
    segmentations: list[SegmentationObject],
    source: Path,
    options: IngestOptions,
    earlier: dict | None,
) -> tuple[dict, str | None]:
    """Converts (or reuses) one decided DICOM series; returns its QC record and outcome.

    Every failure, foreseen or not, becomes a rejected record: one case never ends the run.
    """
    first = decision.frames[0]
    files = sorted({frame.path for frame in decision.frames})
    record = {
        "case_id": case_id,
        "series_uid": decision.series_uid,
        "status": decision.status,
        "reason": decision.reason,
        "output": None,
        "label": None,
        "shape": [first.columns, first.rows, len(decision.frames)],
        "spacing": [*(round(s, 4) for s in first.pixel_spacing[::-1]), None],
        "orientation": None,
        "oblique": None,
        "modality": first.modality,
        "manufacturer": first.manufacturer,
        "n_files": len(files),
        "n_frames": len(decision.frames),
        "resampled": decision.resampled,
        "content_hash": None,
    }
    if decision.status != ACCEPTED:
        record["source"] = _relative_folder(files, source)
        return record, None
    try:
        return _convert_dicom(record, decision, entry, segmentations, options, earlier)
    except Exception as error:  # one case's failure, foreseen or not, must not end the run
        return _rejected(record, files, source, _failure_reason(error, source)), None


def _convert_dicom(
    record: dict,
    decision: SeriesDecision,
    entry: ManifestEntry | None,
    segmentations: list[SegmentationObject],
    options: IngestOptions,
    earlier: dict | None,
) -> tuple[dict, str]:
    """Converts (or reuses) an accepted DICOM series and completes its record.

    The content hash covers the series' frames and every label source: the manifest's label,
    else every DICOM SEG that references the series.

    Raises:
        UnreadableFileError: If the series' pixels cannot be decoded.
        LabelError: If its label does not fit it.
    """
    digests = [f"{frame.file_digest}:{frame.frame_number}" for frame in decision.frames]
    labels = [entry.label] if entry else [segmentation.path for segmentation in segmentations]
    record["content_hash"] = _content_hash(digests, labels, options)
    if _reusable(earlier, record["content_hash"], options.output):
        return earlier, "unchanged"
    image = load_series(decision)
    record["orientation"] = "".join(nib.aff2axcodes(series_affine_ras(decision)))
    record["oblique"] = _is_oblique(image.affine)
    if entry is not None:
        if decision.resampled:
            raise LabelError(
                f"{entry.label.name}: a label file cannot describe a series that needed "
                "resampling; give the label as a DICOM SEG instead"
            )
        label = label_from_nifti(entry.label, canonical(image))
    else:
        label, not_applied = _segmentation_label(segmentations, decision)
        record["reason"] = "; ".join(filter(None, [decision.reason, *not_applied]))
    return _accept(record, canonical(image), label, options.output), "converted"


def _segmentation_label(
    segmentations: list[SegmentationObject], decision: SeriesDecision
) -> tuple[nib.Nifti1Image | None, list[str]]:
    """The canonical label from the one DICOM SEG drawn on the series' slices, if any.

    A SEG drawn on other planes labels another group of frames sharing the series UID; it is
    not applied, and said so.

    Returns:
        The label (``None`` when no SEG fits), and why each other SEG was not applied.

    Raises:
        LabelError: If a SEG on the series' slices does not fit them, or several do.
    """
    fitting, not_applied = [], []
    for segmentation in segmentations:
        try:
            fitting.append((segmentation, label_from_segmentation(segmentation, decision)))
        except SegmentationMismatch as mismatch:
            not_applied.append(str(mismatch))
    if len(fitting) > 1:
        names = ", ".join(segmentation.path.name for segmentation, _ in fitting)
        raise LabelError(f"several DICOM SEG objects label the series ({names}); keep one")
    return (canonical(fitting[0][1]) if fitting else None), not_applied


def _nifti_case(
    path: Path,
    relative: str,
    case_id: str,
    label_path: Path | None,
    source: Path,
    options: IngestOptions,
    earlier: dict | None,
) -> tuple[dict, str | None]:
    """Converts (or reuses) one NIfTI image; returns its QC record and outcome.

    Every failure, foreseen or not, becomes a rejected record: one case never ends the run.
    """
    record = _nifti_record(case_id, options.modality)
    if options.modality is None:
        record["reason"] = _UNDECLARED_MODALITY
    try:
        return _convert_nifti(record, path, label_path, options, earlier)
    except Exception as error:  # one case's failure, foreseen or not, must not end the run
        record.update(status=REJECTED, reason=_failure_reason(error, source), file=relative)
        return record, None


def _failure_reason(error: Exception, source: Path) -> str:
    """Why a case was rejected: a foreseen problem's own message, else the error's type and text."""
    if isinstance(error, UnreadableFileError | NiftiInputError):
        return str(error)
    if isinstance(error, LabelError):
        return f"label: {error}"
    return f"conversion failed ({_error_text(error, source)})"


#: Reason of a NIfTI image accepted without ``--modality``.
_UNDECLARED_MODALITY = (
    "modality unknown (NIfTI holds none): declare it with --modality MR|CT, which harmonization "
    "needs"
)


def _nifti_record(case_id: str, modality: str | None) -> dict:
    """A NIfTI image's QC record before conversion; its modality is the one declared."""
    return {
        "case_id": case_id,
        "series_uid": None,
        "status": ACCEPTED,
        "reason": "",
        "output": None,
        "label": None,
        "shape": None,
        "spacing": None,
        "orientation": None,
        "oblique": None,
        "modality": modality,
        "manufacturer": None,
        "n_files": 1,
        "n_frames": None,
        "resampled": False,
        "content_hash": None,
    }


def _ambiguous_label_record(
    case_id: str, relative: str, candidates: list[Path], source: Path, options: IngestOptions
) -> dict:
    """The rejected record of a NIfTI image with several candidate label files beside it."""
    names = ", ".join(str(path.relative_to(source)) for path in candidates)
    reason = (
        f"{len(candidates)} label files beside it ({names}): remove all but its tumour label, "
        "or name the label in --manifest"
    )
    return {
        **_nifti_record(case_id, options.modality),
        "status": REJECTED,
        "reason": reason,
        "file": relative,
    }


def _convert_nifti(
    record: dict, path: Path, label_path: Path | None, options: IngestOptions, earlier: dict | None
) -> tuple[dict, str]:
    """Converts (or reuses) a NIfTI image and completes its record.

    Raises:
        NiftiInputError: If the image is unusable.
        LabelError: If its label does not fit it.
    """
    labels = [label_path] if label_path else []
    record["content_hash"] = _content_hash(
        [_file_digest(path)], labels, options, declared_modality=options.modality
    )
    if _reusable(earlier, record["content_hash"], options.output):
        return earlier, "unchanged"
    image = load_nifti_image(path)
    label = label_from_nifti(label_path, image) if label_path else None
    record["orientation"] = "".join(nib.aff2axcodes(nib.load(path).affine))
    record["oblique"] = _is_oblique(image.affine)
    return _accept(record, image, label, options.output), "converted"


def _reusable(earlier: dict | None, content_hash: str, output: Path) -> bool:
    """Whether an earlier accepted record describes the same inputs and its outputs are there."""
    if not earlier or earlier.get("status") != ACCEPTED:
        return False
    if earlier.get("content_hash") != content_hash:
        return False
    outputs = [earlier.get("output"), earlier.get("label")]
    return all((Path(output) / p).is_file() for p in outputs if p)


def _accept(
    record: dict, image: nib.Nifti1Image, label: nib.Nifti1Image | None, output: Path
) -> dict:
    """Writes ``images/<case>.nii.gz`` (and ``labels/<case>.nii.gz``) and completes the record."""
    case_id = record["case_id"]
    output = Path(output)
    save_nifti_atomic(image, output / "images" / f"{case_id}.nii.gz")
    label_path = output / "labels" / f"{case_id}.nii.gz"
    if label is not None:
        save_nifti_atomic(label, label_path)
    elif label_path.exists():
        label_path.unlink()
    record["output"] = f"images/{case_id}.nii.gz"
    record["label"] = f"labels/{case_id}.nii.gz" if label is not None else None
    record["shape"] = [int(n) for n in image.shape]
    record["spacing"] = [round(float(z), 4) for z in image.header.get_zooms()[:3]]
    return record


def _rejected(record: dict, files: list[Path], source: Path, reason: str) -> dict:
    record.update(status=REJECTED, reason=reason, source=_relative_folder(files, source))
    return record


def _file_record(path: Path, source: Path, status: str, reason: str) -> dict:
    return {
        "case_id": None,
        "series_uid": None,
        "status": status,
        "reason": reason,
        "file": str(path.relative_to(source)),
        "n_files": 1,
    }


def _missing_series_record(
    series_uid: str, entry: ManifestEntry, unreadable: list[Path], source: Path
) -> dict:
    """The record of a manifest row whose series gave no volume: absent, or all unreadable."""
    reason = f"listed in the manifest (label {entry.label.name}) but not found in the input folder"
    if unreadable:
        reason = (
            f"listed in the manifest (label {entry.label.name}) but none of its "
            f"{len(unreadable)} file(s) is readable (first {unreadable[0].relative_to(source)}; "
            "see their records): copy or export the series again"
        )
    return {
        "case_id": None,
        "series_uid": series_uid,
        "status": REJECTED,
        "reason": reason,
        "n_files": 0,
    }


class _SameProcess(Executor):
    """Runs submitted work at once, in this process (``workers=1``)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        """Runs ``fn`` now and returns its finished future."""
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # handed to the caller through the future
            future.set_exception(error)
        return future


def _executor(workers: int) -> Executor:
    return _SameProcess() if workers <= 1 else ProcessPoolExecutor(max_workers=workers)


def _check_folders(source: Path, output: Path) -> tuple[Path, Path]:
    source, output = Path(source).resolve(), Path(output).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: input folder not found")
    existing = next(path for path in (output, *output.parents) if path.exists())
    if not existing.is_dir():
        raise ValueError(
            f"{existing}: is a file, not a folder; give --output a folder (new or existing)"
        )
    if output == source or source in output.parents:
        raise ValueError(f"{output}: the output folder must not lie inside the input folder")
    if output in source.parents:
        raise ValueError(f"{source}: the input folder must not lie inside the output folder")
    return source, output


def _case_id(key: str) -> str:
    return "case-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _content_hash(
    digests: list[str],
    labels: list[Path],
    options: IngestOptions,
    declared_modality: str | None = None,
) -> str:
    """Hash of a case's inputs: image digests, each label source's name and digest, options.

    ``declared_modality`` is the modality given for inputs that hold none (NIfTI).
    """
    payload = {
        "format_version": INGEST_FORMAT_VERSION,
        "inputs": digests,
        "labels": [[p.name, _file_digest(p) if p.is_file() else None] for p in labels],
        "resample_gaps": options.resample_gaps,
        "resample_tilt": options.resample_tilt,
        "declared_modality": declared_modality,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _error_text(error: BaseException, source: Path) -> str:
    """``Type: message`` of an error, fit for a QC reason.

    Paths under ``source`` become relative to it and any other absolute path is cut to its file
    name: no absolute path reaches ``qc.json``. Long messages are shortened.
    """
    message = str(error).replace(f"{source}{os.sep}", "")
    message = _ABSOLUTE_PATH.sub(lambda match: Path(match.group()).name, message)
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    if len(text) <= _MAX_ERROR_TEXT:
        return text
    return text[: _MAX_ERROR_TEXT - 3] + "..."


def _is_oblique(affine: np.ndarray) -> bool:
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return bool(np.max(np.abs(np.abs(directions) - np.round(np.abs(directions)))) > 1e-3)


def _relative_folder(files: list[Path], source: Path) -> str:
    common = Path(os.path.commonpath([str(p.parent) for p in files]))
    return str(common.relative_to(source)) or "."


def _previous_records(output: Path) -> dict[str, dict]:
    path = output / "qc.json"
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text())["series"]
    except (ValueError, KeyError, TypeError):
        return {}
    return {r["case_id"]: r for r in records if isinstance(r, dict) and r.get("case_id")}


def _remove_temporaries(output: Path) -> None:
    for folder in (output, output / "images", output / "labels"):
        for leftover in folder.glob(".tmp-*"):
            leftover.unlink()


def _remove_stale_outputs(output: Path, records: list[dict]) -> None:
    keep = {r["output"] for r in records if r.get("output")} | {
        r["label"] for r in records if r.get("label")
    }
    for folder in ("images", "labels"):
        for path in (output / folder).glob("case-*.nii.gz"):
            if f"{folder}/{path.name}" not in keep:
                path.unlink()


def _datalist(records: list[dict], options: IngestOptions) -> dict:
    accepted = sorted((r for r in records if r["status"] == ACCEPTED), key=lambda r: r["case_id"])
    labelled = [r for r in accepted if r.get("label")]
    n_validation = round(options.validation_fraction * len(labelled))
    if options.validation_fraction > 0 and len(labelled) >= 2:
        n_validation = min(max(1, n_validation), len(labelled) - 1)

    def entry(record: dict) -> dict:
        item = {"case_id": record["case_id"], "image": record["output"]}
        if record.get("label"):
            item["label"] = record["label"]
        return item

    modalities = sorted({r["modality"] for r in accepted if r.get("modality")})
    return {
        "name": "fedseg ingest",
        "description": "Site dataset written by fedseg ingest; paths relative to this file.",
        "modality": {str(i): m for i, m in enumerate(modalities)},
        "labels": TUMOUR_LABEL_NAMES,
        "numTraining": len(labelled) - n_validation,
        "numValidation": n_validation,
        "training": [entry(r) for r in labelled[n_validation:]],
        "validation": [entry(r) for r in labelled[:n_validation]],
        "test": [entry(r) for r in accepted if not r.get("label")],
    }


def _qc_document(records: list[dict], options: IngestOptions) -> dict:
    counts = {s: sum(1 for r in records if r["status"] == s) for s in (ACCEPTED, REJECTED, SKIPPED)}
    return {
        "format_version": INGEST_FORMAT_VERSION,
        "tool": "fedseg ingest",
        "options": {
            "modality": options.modality,
            "manifest": options.manifest is not None,
            "resample_gaps": options.resample_gaps,
            "resample_tilt": options.resample_tilt,
            "validation_fraction": options.validation_fraction,
        },
        "counts": counts,
        "series": records,
    }
