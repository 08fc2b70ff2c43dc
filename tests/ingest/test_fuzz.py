"""Fuzzing ingestion with mutated real DICOM files: no crash, every bad file recorded."""

import hashlib
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .helpers import TEST_FILES, assert_no_absolute_paths, data_file, run_ingest

SEEDS = [
    TEST_FILES / "CT_small.dcm",
    TEST_FILES / "MR_small.dcm",
    TEST_FILES / "MR_small_RLE.dcm",
    TEST_FILES / "MR_small_jpeg_ls_lossless.dcm",
    data_file("emri_small.dcm"),
    data_file("eCT_Supplemental.dcm"),
    *sorted((TEST_FILES / "dicomdirtests" / "98892001" / "CT5N").iterdir())[:2],
]


@st.composite
def mutated_files(draw):
    """A real DICOM file cut short, with bytes overwritten, or with garbage spliced in."""
    original = draw(st.sampled_from(SEEDS)).read_bytes()
    kind = draw(st.sampled_from(["truncate", "overwrite", "insert", "header"]))
    if kind == "truncate":
        return original[: draw(st.integers(0, len(original) - 1))]
    if kind == "header":  # damage inside the first kilobyte, where the header lives
        position = draw(st.integers(0, min(1024, len(original) - 1)))
        junk = draw(st.binary(min_size=1, max_size=16))
        return original[:position] + junk + original[position + len(junk) :]
    position = draw(st.integers(0, len(original) - 1))
    junk = draw(st.binary(min_size=1, max_size=64))
    if kind == "insert":
        return original[:position] + junk + original[position:]
    return original[:position] + junk + original[position + len(junk) :]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(mutated_files(), min_size=1, max_size=4))
def test_mutated_files_never_crash_and_are_all_recorded(files):
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "in"
        source.mkdir()
        for index, content in enumerate(files):
            (source / f"file{index}.dcm").write_bytes(content)
        before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in source.iterdir()}
        report = run_ingest(source, Path(scratch) / "out")
        after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in source.iterdir()}
        assert after == before, "source files are never modified"
        assert sum(record["n_files"] for record in report.records) == len(files)
        for record in report.records:
            if record["status"] != "accepted":
                assert record["reason"], record
                assert record.get("file") or record.get("source"), record
        assert_no_absolute_paths(Path(scratch) / "out", source)
