"""Atomic writes: a reader sees the old file or the new one, and a failed write loses nothing."""

import json

import pytest

from fedseg.files import replace_folder, write_json_atomic, write_text_atomic


def test_a_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "report.html"
    write_text_atomic(path, "<p>round 1</p>")
    write_text_atomic(path, "<p>round 2</p>")
    assert path.read_text() == "<p>round 2</p>"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_a_failed_write_keeps_the_old_content(tmp_path):
    path = tmp_path / "report.html"
    write_text_atomic(path, "<p>round 1</p>")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "<p>\udc80</p>")  # a lone surrogate cannot be UTF-8
    assert path.read_text() == "<p>round 1</p>"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_json_is_indented_and_takes_json_dumps_options(tmp_path):
    path = tmp_path / "site-1.json"
    write_json_atomic(path, {"b": float("nan"), "a": 1}, sort_keys=True)
    assert path.read_text().startswith('{\n  "a": 1,')
    with pytest.raises(ValueError):
        write_json_atomic(path, {"dice": float("nan")}, allow_nan=False)
    assert json.loads(path.read_text().replace("NaN", "null")) == {"a": 1, "b": None}


def test_a_folder_is_replaced_whole_and_a_retired_one_left_behind_is_cleared(tmp_path):
    final, staging = tmp_path / "report", tmp_path / ".report.partial"
    final.mkdir()
    (final / "site-9.html").write_text("an earlier run's site")
    (tmp_path / ".report.retired").mkdir()  # a run stopped between the two renames
    staging.mkdir()
    (staging / "site-1.html").write_text("this run")
    replace_folder(staging, final)
    assert [p.name for p in final.iterdir()] == ["site-1.html"]
    assert [p.name for p in tmp_path.iterdir()] == ["report"]
    (tmp_path / "new").mkdir()
    replace_folder(tmp_path / "new", tmp_path / "first")  # nothing to replace
    assert (tmp_path / "first").is_dir() and not (tmp_path / "new").exists()
