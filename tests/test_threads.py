"""SPU's matmuls get one OpenMP thread per caller on a small machine: set on import of
`secfwt_jax.compile`, before SPU loads, unless the user chose a limit."""

from __future__ import annotations

import os
import subprocess
import sys

from secfwt_jax.compile.threads import (
    THREAD_LIMIT_ENV,
    available_cores,
    limit_openmp_threads,
    omp_thread_limit,
)
from secfwt_jax.runtime.launcher import offline_env


def test_thread_limit_fills_the_cores_with_the_simulators_concurrent_matmuls():
    assert omp_thread_limit(2) == 1
    assert omp_thread_limit(6) == 1
    assert omp_thread_limit(13) == 2
    assert omp_thread_limit(128) == 4  # SPU asks Eigen for 4; more would change nothing


def test_a_limit_the_user_set_is_kept():
    env = {THREAD_LIMIT_ENV: "3"}
    assert limit_openmp_threads(env) == "3" and env[THREAD_LIMIT_ENV] == "3"
    env = {}
    assert limit_openmp_threads(env) == env[THREAD_LIMIT_ENV]


def test_spus_openmp_sees_the_limit_set_on_import():
    # a fresh interpreter without the variable: SPU's libgomp must read the limit
    code = (
        "import ctypes, os, secfwt_jax.compile.simulator\n"
        "print(os.environ['OMP_THREAD_LIMIT'], ctypes.CDLL('libgomp.so.1').omp_get_thread_limit())"
    )
    env = {k: v for k, v in os.environ.items() if k != THREAD_LIMIT_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)  # fmt: skip
    set_value, seen = out.stdout.split()
    assert set_value == seen == str(omp_thread_limit(available_cores()))


def test_party_processes_get_one_openmp_thread_unless_told_otherwise():
    assert offline_env({})[THREAD_LIMIT_ENV] == "1"
    assert offline_env({THREAD_LIMIT_ENV: "2"})[THREAD_LIMIT_ENV] == "2"
