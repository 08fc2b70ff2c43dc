"""The reports as a person sees them: rendered in headless Chromium (Debian's package)."""

import json
import shutil
import subprocess

import SimpleITK as sitk

from app_server.report import write_reports

from .test_report import collected, site_document

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium(tmp_path, *arguments) -> subprocess.CompletedProcess:
    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is needed (make test installs it)"
    return subprocess.run(
        [executable, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_site_and_federation_pages_render_with_their_numbers(tmp_path):
    documents = [site_document(site, dice) for site, dice in (("site-1", 0.82), ("site-2", 0.64))]
    write_reports(tmp_path, collected(*documents))
    for page in ("site-1.html", "federation.html"):
        screenshot = tmp_path / f"{page}.png"
        chromium(tmp_path, "--window-size=1000,1400", f"--screenshot={screenshot}",
                 (tmp_path / page).as_uri())  # fmt: skip
        pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(screenshot))).astype(float)
        assert pixels.shape[0] == 1400 and pixels.std() > 10, f"{page} renders blank"
        assert (pixels.reshape(-1, pixels.shape[-1])[:, :3].min(axis=1) < 100).mean() > 0.005
        dom = chromium(tmp_path, "--dump-dom", (tmp_path / page).as_uri()).stdout
        summary = json.loads((tmp_path / "site-1.json").read_text())["summary"]
        assert f"{summary['metrics']['dice_WT']:.3f}" in dom
        assert "<svg" in dom and "polyline" in dom
    federation = chromium(tmp_path, "--dump-dom", (tmp_path / "federation.html").as_uri()).stdout
    site_2 = json.loads((tmp_path / "site-2.json").read_text())["summary"]["metrics"]
    assert "site-2" in federation and f"{site_2['dice_WT']:.3f}" in federation
