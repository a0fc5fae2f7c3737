"""Storing results: Parquet tables (schema.py, writer.py) and the run manifest (manifest.py)."""
