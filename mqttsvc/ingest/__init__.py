"""
Ingest.
"""
