"""Client script of the harmonization job (run by NVFlare's ScriptRunner at each site)."""

from app_site.harmonization_task import run

if __name__ == "__main__":
    run()
