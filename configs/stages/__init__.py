"""Per-stage config defaults, one file per pipeline stage (and optimizer.py, the optimizer block the
trained stages share); `configs/base.py` assembles them."""
