"""What each TPU chip offers one JAX device: its HBM, its HBM bandwidth and its peak bf16 FLOP/s.

cai_jax/aot.py reads these to judge the programs it compiles. A v4 or v5p chip's two
TensorCores run as one JAX device (megacore), so every figure here is per chip.
"""

# HBM libtpu 0.0.42 lets one program use, GiB (what its out-of-memory errors report as
# available); aot.py asks the compiler itself first and falls back to this table.
AVAILABLE_HBM_GIB = {'v4': 30.75, 'v5e': 15.75, 'v5p': 95.74, 'v6e': 31.25}

# Peak dense bf16 FLOP/s per chip (Google Cloud TPU documentation), for MFU.
PEAK_FLOPS = {'v4': 275e12, 'v5e': 197e12, 'v5p': 459e12, 'v6e': 918e12}

# HBM bandwidth per chip, bytes/s (Google Cloud TPU documentation), for the roofline bound where
# libtpu's cost model gives no time.
HBM_BYTES_PER_S = {'v4': 1200e9, 'v5e': 819e9, 'v5p': 2765e9, 'v6e': 1640e9}
