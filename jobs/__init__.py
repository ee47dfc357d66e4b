"""Batch jobs on Ray Data: bulk narration of books/rows and prompt catalogs, written to file:// or s3://."""
