"""Compiled kernels the optimizers hand to :mod:`lightning_soaa.functional` (built and loaded at run
time: compilers, caches and shared libraries live here, never in the pure-math ``functional/``)."""
