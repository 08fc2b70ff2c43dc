"""Client script of the segmentation job (run by NVFlare's ScriptRunner at each site)."""

from pathlib import Path

from app_site.training_task import run

if __name__ == "__main__":
    run(Path(__file__).resolve().parent)
