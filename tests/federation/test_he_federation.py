"""FedAvg with packed HE in a real local federation, driven through the admin API.

One provisioned federation (server, three sites, HE contexts from NVFlare's HEBuilder), started
as real processes; the harmonization fit and the encrypted segmentation job are exported,
submitted with ``submit_job``, waited for and downloaded; then the same job runs in plaintext
for comparison; then the federation is stopped by its process ids.
"""

import json
import math
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import torch

from app_server import federation as poc
from app_server.global_model import ENCRYPTED_MODEL_FILE, PLAINTEXT_MOMENTS_FILE
from app_server.site_reports import read_site_reports
from app_site.he_filters import AUDIT_FILE, DECLARED_META_KEYS
from fedseg.config import load_config
from fedseg.messages import PACKED_KEY
from fedseg.moments import MOMENTS_PREFIX
from fedseg.packed_ckks import MAGIC, CkksKeys, decrypt_model
from jobs.runner import run_in_federation
from tests.federation.homes import isolated_home

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federation_run(datasets, tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    names = {f"site-{n}": datasets[f"site-{n}"] for n in (1, 2, 3)}
    config = load_config("tiny")
    with isolated_home(root / "home") as home:
        federation = poc.prepare(root / "poc", 3, "packed", names)
        try:
            poc.start(federation)
            pids = dict(poc.running_processes(federation))
            encrypted = run_in_federation(federation, config, root / "he")
            plaintext = run_in_federation(
                federation, config, root / "plain", root / "he" / "harmonization.json", "none"
            )
            console = submit_through_the_admin_console(
                federation, root / "console", root / "he" / "harmonization.json"
            )
        finally:
            poc.stop(federation)
    job_ids = {
        name: next((root / name / "segmentation" / "result").iterdir()).name
        for name in ("he", "plain")
    }
    return {
        "job_ids": job_ids,
        "federation": federation,
        "pids": pids,
        "home": home,
        "he": root / "he",
        "plain": root / "plain",
        "reports": (encrypted, plaintext),
        "console": console,
    }


def submit_through_the_admin_console(federation, folder, artifact):
    """``fedseg job export``, then ``submit_job`` and ``download_job`` typed into fl_admin."""
    fedseg = str(Path(sys.executable).with_name("fedseg"))
    exported = subprocess.run(
        [fedseg, "job", "export", "--config", "tiny", "--out", str(folder / "job"),
         "--harmonization", str(artifact)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    job = next((folder / "job").rglob("meta.json")).parent
    admin = federation.kit(federation.admin) / "startup" / "fl_admin.sh"
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def console(*commands):
        script = "\n".join([*commands, "bye"]) + "\n"
        return subprocess.run(
            ["bash", str(admin)], input=script, capture_output=True, text=True, timeout=300,
            env=environment,
        ).stdout  # fmt: skip

    submitted = console(f"submit_job {job}")
    job_id = re.search(r"Submitted job: ([0-9a-f-]{36})", submitted).group(1)
    meta = poc.wait_for_job(federation, job_id, timeout=900)
    downloaded = console(f"download_job {job_id}")
    return {"export": exported.stdout, "job_id": job_id, "status": meta["status"],
            "download": downloaded}  # fmt: skip


def site_documents(report_dir):
    return {p.stem: json.loads(p.read_text()) for p in sorted(report_dir.glob("site-*.json"))}


def test_the_encrypted_job_finished_and_every_site_reported(federation_run):
    encrypted, _ = federation_run["reports"]
    documents = site_documents(encrypted)
    assert sorted(documents) == ["site-1", "site-2", "site-3"]
    for document in documents.values():
        assert document["mode"] == "he-packed"
        assert [r["round"] for r in document["rounds"]] == [0, 1]
        for entry in [*document["rounds"], document["final"]]:
            dice = [v for k, v in entry["metrics"].items() if k.startswith("dice")]
            assert dice and all(math.isfinite(v) and 0 <= v <= 1 for v in dice)
    federation = json.loads((encrypted / "federation.json").read_text())
    assert federation["round_contributors"] == {"0": federation["sites"], "1": federation["sites"]}
    artifact = json.loads((federation_run["he"] / "harmonization.json").read_text())
    assert {d["harmonization_hash"] for d in documents.values()} == {artifact["hash"]}
    assert artifact["n_sites"] == 3, "harmonization was fitted as a job in the same federation"


def test_the_server_holds_no_trained_weight_in_plaintext(federation_run):
    federation = federation_run["federation"]
    persisted = sorted((federation_run["he"] / "segmentation").rglob(ENCRYPTED_MODEL_FILE))
    assert persisted, "the server persisted its encrypted global model"
    assert persisted[0].read_bytes().startswith(MAGIC)
    final = decrypted_global_model(federation_run)  # only a site can do this
    initial = torch.load(
        next((federation_run["he"] / "segmentation").rglob("fedseg_initial_model.pt")),
        weights_only=True,
    )
    changed = [
        k for k, v in final.items() if v.size >= 8 and not np.allclose(v, initial[k].numpy())
    ]
    assert len(changed) > len(final) // 2, "training changed the model"
    needles = [final[k].ravel()[:8].astype(np.float32).tobytes() for k in changed]
    # The server's kit, its job store and snapshots (archives opened), the downloaded result;
    # the plaintext comparison job that ran later in the same federation is left out.
    he_job, plaintext_job = federation_run["job_ids"]["he"], federation_run["job_ids"]["plain"]
    folders = [federation.kit("server"), federation.workspace / "jobs-storage" / he_job]
    folders += [federation.workspace / "snapshot-storage", federation_run["he"] / "segmentation"]
    searched = 0
    for folder in folders:
        for name, content in file_contents(folder):
            if plaintext_job in name:
                continue
            searched += 1
            assert not [n for n in needles if n in content], f"{name}: trained weights in plaintext"
    assert searched > 50


def decrypted_global_model(federation_run):
    """The encrypted job's persisted global model, decrypted with a site's key."""
    federation = federation_run["federation"]
    (persisted,) = (federation_run["he"] / "segmentation").rglob(ENCRYPTED_MODEL_FILE)
    site_key = CkksKeys.from_file(federation.kit("site-1") / "startup" / "client_context.tenseal")
    return decrypt_model(site_key, persisted.read_bytes())


def test_the_encrypted_global_model_carries_the_sites_shared_moments(federation_run):
    """The packed aggregate averages the gradient RMS as the plaintext job does."""
    final = decrypted_global_model(federation_run)
    (plain_file,) = (federation_run["plain"] / "segmentation").rglob(PLAINTEXT_MOMENTS_FILE)
    plain = torch.load(plain_file, weights_only=True)
    assert plain and plain.keys() == {k for k in final if k.startswith(MOMENTS_PREFIX)}
    encrypted = np.concatenate([final[k].ravel() for k in sorted(plain)])
    reference = np.concatenate([plain[k].numpy().ravel() for k in sorted(plain)])
    assert np.linalg.norm(reference) > 0, "the sites shared non-zero moments"
    assert np.linalg.norm(encrypted - reference) <= 0.05 * np.linalg.norm(reference)


def file_contents(folder):
    """Every file's bytes under a folder, and every member of every zip archive."""
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    yield f"{path}:{member}", archive.read(member)
        else:
            yield str(path), path.read_bytes()


def test_every_update_left_its_site_as_ciphertext_plus_declared_metadata(federation_run):
    federation = federation_run["federation"]
    for site in federation.sites:
        audit = federation.kit(site) / federation_run["job_ids"]["he"] / AUDIT_FILE
        he_records = [json.loads(line) for line in audit.read_text().splitlines()]
        train = [r for r in he_records if r["task"] == "train"]
        assert [r["round"] for r in train] == [0, 1]
        for record in train:
            assert record["kind"] == "WEIGHTS"
            assert list(record["data"]) == [PACKED_KEY]
            assert record["data"][PACKED_KEY]["type"] == "bytes"
            assert set(record["meta"]) <= DECLARED_META_KEYS
        validate = [r for r in he_records if r["task"] == "validate"]
        assert validate and all(r["kind"] == "METRICS" for r in validate)
    server_log = "".join(
        p.read_text() for p in (federation_run["he"] / "segmentation" / "result").rglob("log.txt")
    )
    assert server_log.count("update added (round") == 3 * 2


def test_the_server_context_holds_no_secret_key(federation_run):
    federation = federation_run["federation"]
    server = federation.kit("server") / "startup" / "server_context.tenseal"
    assert not ts.context_from(server.read_bytes()).has_secret_key()
    assert not CkksKeys.from_file(server).can_decrypt
    for site in federation.sites:
        assert not (federation.kit(site) / "startup" / "server_context.tenseal").exists()


def test_packed_he_reaches_the_plaintext_dice(federation_run):
    encrypted, plaintext = federation_run["reports"]
    he, plain = site_documents(encrypted), site_documents(plaintext)
    for site in he:
        for region in ("TC", "WT", "ET"):
            key = f"dice_{region}"
            assert (
                abs(he[site]["final"]["metrics"][key] - plain[site]["final"]["metrics"][key])
                <= 0.005
            )
    federation = json.loads((plaintext / "federation.json").read_text())
    assert federation["mode"] == "plaintext" and federation["cross_site"]


def test_the_federation_stopped_by_process_id_and_left_home_alone(federation_run):
    assert len(federation_run["pids"]) == 4
    for pid in federation_run["pids"].values():
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    assert poc.running_processes(federation_run["federation"]) == {}
    assert list(federation_run["home"].iterdir()) == []


def test_the_exported_job_runs_when_typed_into_the_admin_console(federation_run):
    console = federation_run["console"]
    assert "submit_job" in console["export"]
    assert console["status"] == "FINISHED:COMPLETED"
    federation = federation_run["federation"]
    transfer = federation.kit(federation.admin) / "transfer" / console["job_id"]
    assert transfer.is_dir(), console["download"]
    collected = read_site_reports(transfer, federation.sites)
    assert collected["mode"] == "he-packed"
    assert collected["round_contributors"] == {"0": federation.sites, "1": federation.sites}
