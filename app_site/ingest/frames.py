"""Reading DICOM files into frames: one 2D image with its own geometry and rescale.

A single-frame file gives one frame; an enhanced multi-frame file gives one frame per entry of
its per-frame functional groups (position, orientation, pixel spacing and rescale are looked
up per frame first, then in the shared groups). Nothing here decides what a series is.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian

#: SOP classes that never hold an image volume to ingest.
_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"
SEGMENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: Prefix of the radiotherapy SOP classes (RT Image, Dose, Structure Set, Plan, records...).
_RADIOTHERAPY_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481."

#: Attributes of the image modules: a file holding one of them claims to be an image.
_IMAGE_ATTRIBUTES = (
    "ImageType",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
)


class UnreadableFileError(Exception):
    """A DICOM file that cannot be used; the message says why (and holds no patient data).

    Attributes:
        series_uid: SeriesInstanceUID the file carries ('' when unknown): that series lacks
            the file, so it cannot be complete.
    """

    def __init__(self, message: str, series_uid: str = "") -> None:
        """Keeps the message and the series the file belongs to."""
        super().__init__(message)
        self.series_uid = series_uid


class NotDicomError(UnreadableFileError):
    """A file that is not DICOM at all (no preamble and no DICOM structure)."""


@dataclass(frozen=True)
class RawPixels:
    """Location and type of uncompressed little-endian pixel data inside a file.

    Attributes:
        offset: Byte offset of the first pixel value.
        dtype: numpy dtype of one stored value.
        rows: Rows of the image.
        columns: Columns of the image.
    """

    offset: int
    dtype: str
    rows: int
    columns: int


@dataclass(frozen=True)
class Frame:
    """One 2D image of a series, with everything needed to place it in patient space.

    Attributes:
        path: File holding the frame.
        frame_number: 0-based frame index in a multi-frame file; ``None`` for single-frame.
        series_uid: SeriesInstanceUID.
        position: LPS position of the first pixel (ImagePositionPatient), in millimetres.
        row_direction: LPS unit vector along a row (first half of ImageOrientationPatient).
        column_direction: LPS unit vector down a column (second half).
        pixel_spacing: (between rows, between columns) in millimetres.
            Position, directions and spacing are kept as read when they hold NaN or infinity,
            for :func:`app_site.ingest.series.decide` to reject the series.
        rows: Number of rows.
        columns: Number of columns.
        rescale_slope: RescaleSlope (1 when absent).
        rescale_intercept: RescaleIntercept (0 when absent).
        modality: Modality.
        manufacturer: Manufacturer ('' when absent).
        image_type: ImageType values, upper case.
        file_digest: SHA-256 of the file's bytes.
        raw_pixels: Where uncompressed pixel data can be read directly, or ``None`` when it
            needs pydicom's decoders (compression, big endian, packed bits, multi-frame).
    """

    path: Path
    frame_number: int | None
    series_uid: str
    position: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    rescale_slope: float
    rescale_intercept: float
    modality: str
    manufacturer: str
    image_type: tuple[str, ...]
    file_digest: str
    raw_pixels: RawPixels | None = None

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal: row direction x column direction."""
        normal = np.cross(self.row_direction, self.column_direction)
        return normal / np.linalg.norm(normal)


@dataclass(frozen=True)
class DicomFile:
    """What one readable DICOM file holds: image frames, or a reason it holds none.

    Attributes:
        path: The file.
        sop_class_uid: Its SOP class.
        frames: Image frames (none for non-image objects).
        skip_reason: Why it holds no image to ingest, or ``None``.
        segmented_series_uid: For a DICOM SEG object, the series it segments ('' when it
            names none); ``None`` for other objects.
    """

    path: Path
    sop_class_uid: str
    frames: tuple[Frame, ...]
    skip_reason: str | None
    segmented_series_uid: str | None = None


def read_dicom_file(path: Path) -> DicomFile:
    """Reads a file's header (not its pixels) into frames.

    Args:
        path: File to read.

    Returns:
        The file's frames, or no frames and ``skip_reason`` for files that hold no image
        (directories, structured reports, segmentations, radiotherapy objects).

    Raises:
        UnreadableFileError: If the file is not DICOM, is truncated inside its header, claims
            to be an image but lacks Rows, Columns or pixel data (truncated), or lacks the
            tags needed to place its pixels in space. ``series_uid`` names its series when
            the file carries one.
    """
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if data[:2] == b"\x1f\x8b":
        raise NotDicomError("gzip-compressed file: decompress it to ingest it")
    has_preamble = data[128:132] == b"DICM"
    stream = io.BytesIO(data)
    try:
        dataset = pydicom.dcmread(stream, stop_before_pixels=True, force=True)
        sop_class = str(dataset.get("SOPClassUID", "") or _meta(dataset, "MediaStorageSOPClassUID"))
        series_uid = dataset.get("SeriesInstanceUID")
    except Exception as error:  # pydicom raises many types for broken headers
        if has_preamble:
            raise UnreadableFileError(
                f"corrupt or truncated DICOM header ({type(error).__name__})"
            ) from error
        raise NotDicomError("not a DICOM file") from error
    if not sop_class and series_uid is None:
        if has_preamble:
            raise UnreadableFileError("DICOM file without SOP class or series UID")
        raise NotDicomError("not a DICOM file")
    if sop_class == _DIRECTORY_SOP_CLASS:
        return DicomFile(path, sop_class, (), "DICOMDIR index, holds no image")
    if sop_class == SEGMENTATION_SOP_CLASS:
        referenced = dataset.get("ReferencedSeriesSequence")
        segmented = str(referenced[0].get("SeriesInstanceUID", "")) if referenced else ""
        return DicomFile(path, sop_class, (), "DICOM SEG object", segmented)
    radiotherapy = _radiotherapy_object(dataset, sop_class)
    if radiotherapy:
        return DicomFile(path, sop_class, (), f"{radiotherapy}, not a diagnostic image volume")
    missing = [key for key in ("Rows", "Columns") if key not in dataset]
    if _ends_before_pixels(dataset, data, stream.tell()):
        missing.append("PixelData")
    if missing and _claims_image(dataset, sop_class):
        raise UnreadableFileError(
            f"truncated or incomplete image (no {'/'.join(missing)}): copy or export the "
            "file again",
            str(series_uid or ""),
        )
    if missing:
        return DicomFile(path, sop_class, (), f"holds no image (no {'/'.join(missing)})")
    has_geometry = (
        "ImagePositionPatient" in dataset or "PerFrameFunctionalGroupsSequence" in dataset
    )
    if not has_geometry and str(dataset.get("Modality", "")) not in ("MR", "CT"):
        return DicomFile(
            path,
            sop_class,
            (),
            "image without patient position: not a cross-sectional slice "
            "(secondary capture, radiograph, ultrasound...)",
        )
    try:
        raw_pixels = _raw_pixels(dataset, data, stream.tell())
        frames = tuple(_frames(path, dataset, digest, raw_pixels))
    except Exception as error:  # pydicom raises many types for malformed elements
        raise UnreadableFileError(
            f"image geometry unreadable: {error}", str(series_uid or "")
        ) from error
    return DicomFile(path, sop_class, frames, None)


def _ends_before_pixels(dataset: Dataset, data: bytes, position: int) -> bool:
    """Whether the file ends where pydicom stopped before the pixel data: it holds none.

    Unknown (``False``) for a deflated file, whose dataset pydicom reads from another stream.
    """
    meta = getattr(dataset, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return syntax != DeflatedExplicitVRLittleEndian and len(data) <= position


def _radiotherapy_object(dataset: Dataset, sop_class: str) -> str:
    """Describes a radiotherapy object (dose grid, structure set, plan, portal image), or ''.

    Recognized by its SOP class, else by a Modality starting with ``RT``.
    """
    if sop_class.startswith(_RADIOTHERAPY_SOP_CLASS):
        return f"radiotherapy object ({UID(sop_class).name})"
    modality = str(dataset.get("Modality", "") or "")
    if modality.startswith("RT"):
        return f"radiotherapy object (Modality {modality})"
    return ""


def _claims_image(dataset: Dataset, sop_class: str) -> bool:
    """Whether a file claims to hold an image.

    It does when its SOP class is an image storage class, or, without a SOP class, when it
    holds a series UID and attributes of the image modules.
    """
    if sop_class:
        return "Image Storage" in UID(sop_class).name
    return "SeriesInstanceUID" in dataset and any(key in dataset for key in _IMAGE_ATTRIBUTES)


def decode_frames(path: Path, raw_pixels: RawPixels | None = None) -> np.ndarray:
    """Decodes a file's stored pixel values (any transfer syntax pydicom's plugins decode).

    Args:
        path: DICOM file.
        raw_pixels: Where to read uncompressed pixels directly (skips a second parse).

    Returns:
        ``[frames, rows, columns]`` stored values (one frame for single-frame files).

    Raises:
        UnreadableFileError: If the pixel data is missing, truncated or cannot be decoded.
    """
    if raw_pixels is not None:
        data = path.read_bytes()
        try:
            count = raw_pixels.rows * raw_pixels.columns
            values = np.frombuffer(data, raw_pixels.dtype, count, raw_pixels.offset)
        except ValueError as error:
            raise UnreadableFileError(f"{path.name}: pixel data truncated") from error
        return values.reshape(1, raw_pixels.rows, raw_pixels.columns)
    try:
        pixels = pydicom.dcmread(path, force=True).pixel_array
    except Exception as error:  # pydicom raises many types for broken pixel data
        raise UnreadableFileError(
            f"{path.name}: pixel data unreadable ({type(error).__name__})"
        ) from error
    return pixels[None] if pixels.ndim == 2 else pixels


def _raw_pixels(dataset: Dataset, data: bytes, position: int) -> RawPixels | None:
    """Finds uncompressed, little-endian, single-frame, unpacked pixel data in ``data``.

    ``position`` is where pydicom stopped, before the PixelData element. Anything else
    (compression, big endian, several frames or samples, unused high bits) returns ``None``.
    """
    meta = getattr(dataset, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        return None
    bits = _little_endian_ushort(dataset, 0x00280100)  # BitsAllocated
    simple = (
        _little_endian_ushort(dataset, 0x00280002) in (None, 1)  # SamplesPerPixel
        and 0x00280008 not in dataset  # NumberOfFrames
        and bits in (8, 16, 32)
        and _little_endian_ushort(dataset, 0x00280101) == bits  # BitsStored
    )
    if not simple or data[position : position + 4] != _PIXEL_DATA_TAG:
        return None
    explicit = syntax == ExplicitVRLittleEndian
    header = 12 if explicit else 8
    length = int.from_bytes(data[position + header - 4 : position + header], "little")
    rows = _little_endian_ushort(dataset, 0x00280010)
    columns = _little_endian_ushort(dataset, 0x00280011)
    if not rows or not columns:
        return None
    if length != rows * columns * bits // 8 or len(data) < position + header + length:
        return None  # truncated or padded: let pydicom report it
    signed = _little_endian_ushort(dataset, 0x00280103) == 1  # PixelRepresentation
    return RawPixels(position + header, f"<{'i' if signed else 'u'}{bits // 8}", rows, columns)


def _little_endian_ushort(dataset: Dataset, tag: int) -> int | None:
    """Reads an unsigned short (US) element of a little-endian dataset, raw when unconverted."""
    if tag not in dataset:
        return None
    value = dataset.get_item(tag).value
    if isinstance(value, bytes):
        return int.from_bytes(value[:2], "little") if len(value) >= 2 else None
    return int(value) if value is not None else None


def _frames(path: Path, dataset: Dataset, digest: str, raw_pixels: RawPixels | None):
    series_uid = str(dataset.get("SeriesInstanceUID", ""))
    if not series_uid:
        raise ValueError("no SeriesInstanceUID")
    common = {
        "path": path,
        "series_uid": series_uid,
        "rows": int(dataset.Rows),
        "columns": int(dataset.Columns),
        "modality": str(dataset.get("Modality", "")),
        "manufacturer": str(dataset.get("Manufacturer", "")),
        "image_type": tuple(str(v).upper() for v in _as_list(dataset.get("ImageType", []))),
        "file_digest": digest,
        "raw_pixels": raw_pixels,
    }
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None and int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError("multi-frame file without per-frame functional groups: no slice positions")
    if per_frame is None:
        yield Frame(frame_number=None, **common, **_geometry([], dataset))
        return
    shared = dataset.get("SharedFunctionalGroupsSequence")
    shared_group = shared[0] if shared else Dataset()
    for number, group in enumerate(per_frame):
        yield Frame(frame_number=number, **common, **_geometry([group, shared_group], dataset))


def _geometry(groups: list[Dataset], dataset: Dataset) -> dict:
    """Position, orientation, spacing and rescale: from functional groups, else the top level.

    ``groups`` are a multi-frame file's per-frame then shared functional groups (empty for a
    single-frame file).
    """
    position = _lookup(groups, dataset, "PlanePositionSequence", "ImagePositionPatient")
    orientation = _lookup(groups, dataset, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = _lookup(groups, dataset, "PixelMeasuresSequence", "PixelSpacing")
    slope = _lookup(groups, dataset, "PixelValueTransformationSequence", "RescaleSlope", False)
    intercept = _lookup(
        groups, dataset, "PixelValueTransformationSequence", "RescaleIntercept", False
    )
    orientation = np.asarray(orientation, dtype=np.float64)
    if orientation.shape != (6,):
        raise ValueError("ImageOrientationPatient does not hold 6 values")
    row_direction, column_direction = _unit_directions(orientation)
    position = np.asarray(position, dtype=np.float64)
    spacing = tuple(float(v) for v in spacing)
    if position.shape != (3,) or len(spacing) != 2 or min(spacing) <= 0:
        raise ValueError("ImagePositionPatient or PixelSpacing malformed")
    return {
        "position": position,
        "row_direction": row_direction,
        "column_direction": column_direction,
        "pixel_spacing": spacing,
        "rescale_slope": slope[0] if slope else 1.0,
        "rescale_intercept": intercept[0] if intercept else 0.0,
    }


def _unit_directions(orientation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column unit vectors from ImageOrientationPatient's six values.

    Values holding NaN or infinity are passed on unchanged: the frame keeps its series, and
    :func:`app_site.ingest.series.decide` rejects that series naming the tag.

    Raises:
        ValueError: If a finite vector is not of unit length, or the two are not orthogonal.
    """
    row_direction, column_direction = orientation[:3], orientation[3:]
    if not np.all(np.isfinite(orientation)):
        return row_direction, column_direction
    for vector in (row_direction, column_direction):
        if abs(float(np.linalg.norm(vector)) - 1.0) > 1e-3:
            raise ValueError("ImageOrientationPatient holds a vector that is not of unit length")
    if abs(np.dot(row_direction, column_direction)) > 1e-3:
        raise ValueError("ImageOrientationPatient row and column directions are not orthogonal")
    return (
        row_direction / np.linalg.norm(row_direction),
        column_direction / np.linalg.norm(column_direction),
    )


def _lookup(
    groups: list[Dataset], dataset: Dataset, sequence: str, keyword: str, required: bool = True
) -> list[float] | None:
    """Reads a decimal element from the first functional group holding it, else the top level.

    Args:
        groups: Per-frame then shared functional groups (empty for single-frame files).
        dataset: The file's dataset.
        sequence: Functional group sequence that holds ``keyword``.
        keyword: The element.
        required: Raise when it is nowhere.

    Returns:
        Its values, or ``None`` when absent and not required.

    Raises:
        KeyError: If a required element is absent.
    """
    tag = tag_for_keyword(keyword)
    for group in groups:
        items = group.get(sequence)
        if items and tag in items[0]:
            return _decimals(items[0], tag)
    if tag in dataset:
        return _decimals(dataset, tag)
    if required:
        raise KeyError(f"{keyword} missing")
    return None


def _decimals(dataset: Dataset, tag: int) -> list[float]:
    """Reads a decimal-string (DS) element as floats.

    Parses the raw text directly when pydicom has not converted the element yet: much faster
    than building validated ``DSfloat`` objects, and malformed text still raises ValueError.
    """
    value = dataset.get_item(tag).value
    if isinstance(value, bytes):
        text = value.decode("latin-1").strip(" \0")
        return [float(part) for part in text.split("\\")] if text else []
    if isinstance(value, str | float | int):
        return [float(value)] if value != "" else []
    return [float(part) for part in value]


def _as_list(value) -> list:
    return list(value) if isinstance(value, list | tuple | pydicom.multival.MultiValue) else [value]


def _meta(dataset: Dataset, keyword: str) -> str:
    meta = getattr(dataset, "file_meta", None)
    return str(meta.get(keyword, "")) if meta is not None else ""
