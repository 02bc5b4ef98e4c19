"""Benchmarks: each prints ratios against a reference measured in the same run."""


def shared_prefix(a, b) -> int:
  """How many leading tokens two generations share: where greedy runs of two precisions part."""
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n
