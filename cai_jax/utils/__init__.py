"""Utilities below everything else: meshes and shardings, the resumable JSONL records, the
wheel-held data, chip facts, the compile log."""
