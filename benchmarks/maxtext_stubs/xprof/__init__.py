"""A stand-in for xprof, the 32 MB profiler wheel MaxText's kernels library (tokamax) imports at
start for its benchmarking helpers: benchmarks/gpu.sh carries this instead (see there)."""
