"""OpenMP threads for SPU's local matmuls: a limit set before SPU's library loads.

SPU 0.9.3 multiplies ring matrices with Eigen on 4 OpenMP threads (`Eigen::setNbThreads(4)`
in `libspu/mpc/utils/linalg.h`), and an ABY3 party computes two of its share products at
once (`MatMulAA`): in the in-process simulator, three parties make 24 threads. On fewer
cores than that the threads wait on each other, most where the work is thin: measured on
this project's 2-core host, a secret [768, 3072] x [3072, 32] matmul took 709 ms, and
110 ms with one thread per caller; a [128, 512] x [512, 16] one 127 and 5.5 ms; a square
768^3 one 716 and 573 ms (`benchmarks/trunk_profile.py` runs the main run's trunk, whose
attention products are such thin matmuls). `Eigen::setNbThreads` overrides
OMP_NUM_THREADS, but OpenMP's OMP_THREAD_LIMIT caps it, and libgomp reads it once, when it
loads; so `secfwt_jax.compile` sets it on import, before any SPU import, unless the user
has set it. Party processes get it from `runtime.launcher.offline_env`.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: The OpenMP variable that caps the threads of each calling thread's teams.
THREAD_LIMIT_ENV = "OMP_THREAD_LIMIT"

#: Share-product matmuls that run at once in the simulator: 3 parties x 2 (ABY3).
CONCURRENT_MATMULS = 6

#: SPU's own thread count per matmul; a higher limit would change nothing.
EIGEN_THREADS = 4


def omp_thread_limit(cores: int, concurrent: int = CONCURRENT_MATMULS) -> int:
    """Threads per matmul such that `concurrent` matmuls fill `cores`: 1 to 4."""
    return max(1, min(EIGEN_THREADS, cores // concurrent))


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def limit_openmp_threads(environ: MutableMapping[str, str] | None = None) -> str:
    """Set OMP_THREAD_LIMIT from this machine's cores unless it is set; returns its value."""
    env = os.environ if environ is None else environ
    return env.setdefault(THREAD_LIMIT_ENV, str(omp_thread_limit(available_cores())))
