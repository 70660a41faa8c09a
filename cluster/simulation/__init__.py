"""Offline simulation of the eviction policies: trace readers and generators, Belady's optimum,
and the simulator behind `raycache simulate` (and `python -m benchmarks.simulate`)."""
