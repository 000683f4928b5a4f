"""Compilation to SPU and its simulator (never imports secretflow)."""

from .threads import limit_openmp_threads

# before any module of this package imports SPU, whose OpenMP reads it once, on load
limit_openmp_threads()
