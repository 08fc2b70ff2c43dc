"""The command line as a user runs it: a real process, real files, exit statuses."""

import json
import os
import subprocess
import sys
from pathlib import Path

FEDSEG = str(Path(sys.executable).with_name("fedseg"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FEDSEG, *args], capture_output=True, text=True, timeout=600)


def test_synth_writes_checks_and_summarizes(tmp_path):
    result = run(
        "synth", "--out", str(tmp_path), "--sites", "2", "--cases-per-site", "1",
        "--size", "32", "--seed", "4", "--check",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "site-2" in result.stdout and "GE MEDICAL SYSTEMS" in result.stdout
    assert "OK" in result.stdout and "read back with SimpleITK" in result.stdout
    assert (tmp_path / "site-1" / "manifest.csv").is_file()
    assert (tmp_path / "synth.json").is_file()


def test_bad_arguments_get_a_clear_error_and_no_output(tmp_path):
    result = run("synth", "--out", str(tmp_path / "out"), "--sites", "0")
    assert result.returncode == 2
    assert "--sites must be at least 1" in result.stderr
    assert not (tmp_path / "out").exists()


def test_demo_with_an_unknown_configuration_fails_before_any_work(tmp_path):
    result = run("demo", "--workdir", str(tmp_path / "demo"), "--config", "tinny")
    assert result.returncode == 2 and "tinny: no such file or built-in profile" in result.stderr
    assert not (tmp_path / "demo").exists()


def test_demo_runs_end_to_end(tmp_path):
    result = run("demo", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "Simulated hospitals" in result.stdout
    assert "12 series read back with SimpleITK" in result.stdout
    for site, cases in (("site-1", 5), ("site-2", 4), ("site-3", 3)):
        datalist = json.loads((tmp_path / "datasets" / site / "datalist.json").read_text())
        assert len(datalist["training"]) + len(datalist["validation"]) == cases
    federation = json.loads((tmp_path / "job" / "report" / "federation.json").read_text())
    assert federation["sites"] == ["site-1", "site-2", "site-3"]
    assert "federation.html" in result.stdout


def test_a_dead_site_timeout_below_the_heartbeat_interval_is_refused(tmp_path):
    result = run(
        "poc", "prepare", "--workspace", str(tmp_path / "federation"), "--dead-site-seconds", "5"
    )
    assert result.returncode != 0
    assert "dead_site_seconds must be at least 20" in result.stdout + result.stderr
    assert not (tmp_path / "federation").exists()


def test_rejoining_without_a_running_federation_says_so(tmp_path):
    result = run(
        "job", "rejoin", "some-job", "--workspace", str(tmp_path), "--workdir", str(tmp_path / "w")
    )
    assert result.returncode != 0
    assert "holds no federation" in result.stdout + result.stderr


def test_ingest_into_an_existing_file_is_refused_with_exit_status_2(tmp_path):
    """Runs this checkout's code (the installed ``fedseg`` may come from another one)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "afile").write_text("keep me")
    for output in (tmp_path / "afile", tmp_path / "afile" / "dataset"):
        result = subprocess.run(
            [sys.executable, "-m", "fedseg.cli", "ingest", "--input", str(tmp_path / "in"),
             "--output", str(output)],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "is a file, not a folder; give --output a folder" in result.stderr
        assert "Traceback" not in result.stderr
    assert (tmp_path / "afile").read_text() == "keep me"
