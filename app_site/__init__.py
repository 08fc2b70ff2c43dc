"""Code that runs at a hospital: ingestion, harmonization statistics, training, site reports."""
