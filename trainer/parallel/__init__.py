"""The layout of the processes: the process group, ParallelDims and its mesh, one apply_* per strategy, precision."""
