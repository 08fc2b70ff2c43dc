"""NVFlare job definitions (recipe builders) and the job folders users submit."""
