"""Site ingestion: DICOM series and NIfTI volumes to a geometry-correct dataset with QC.

``fedseg ingest`` calls :func:`app_site.ingest.pipeline.ingest`.
"""
