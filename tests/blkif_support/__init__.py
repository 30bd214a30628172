"""Helpers for the blkif protocol-core tests (tests/test_blkif_*.py)."""
