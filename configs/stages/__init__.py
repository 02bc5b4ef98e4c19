"""Per-stage config defaults, one file per pipeline stage; `configs/base.py` assembles them."""
