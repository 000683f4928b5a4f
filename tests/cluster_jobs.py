"""Test jobs for the PRODUCTION-mode cluster: prove inputs from two parties meet in SPU.

Party processes import a job by module path, so a test that launches one puts this folder
on the parties' PYTHONPATH (`JOBS_ENV`) and names it ``cluster_jobs:<function>``.

``smoke_job`` is what ``launch_parties(cluster, "cluster_jobs:smoke_job", env=JOBS_ENV)``
runs in every party: alice's PYU makes ``x``, bob's PYU makes ``y`` (each on its own
device, so the plaintext never exists in another process), SPU evaluates a jitted JAX
function of both, and every party reveals the same value. ``smoke_plaintext`` recomputes
it in the clear so a test can check the MPC answer against fixed-point tolerance.

``failing_job`` makes one party raise while the others enter ``sf.init`` and block
waiting for it: the case the launcher must kill promptly.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from secfwt_jax.runtime.cluster import ClusterConfig, sf_party_session

#: The environment a launch of these jobs gives its party processes.
JOBS_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")) if p)}  # fmt: skip

__all__ = [
    "JOBS_ENV",
    "big_product_fn",
    "big_product_job",
    "big_product_plaintext",
    "failing_job",
    "make_x",
    "make_y",
    "sleep_job",
    "smoke_fn",
    "smoke_job",
    "smoke_plaintext",
]


def make_x(n: int, seed: int) -> np.ndarray:
    """alice's private input; deterministic so a test can recompute the plaintext."""
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, n)).astype(np.float32)


def make_y(n: int, seed: int) -> np.ndarray:
    """bob's private input."""
    return np.random.default_rng(seed + 1).uniform(-1, 1, size=(n, 2)).astype(np.float32)


def smoke_fn(x, y):
    """x @ y, plus a reduction and an elementwise product: matmul, sum and mul under MPC."""
    import jax.numpy as jnp

    z = jnp.matmul(x, y)
    return z + jnp.sum(x) * 0.5 + y * y


def smoke_plaintext(n: int = 4, seed: int = 0) -> np.ndarray:
    """The value every party should reveal, computed in the clear (float64 reference)."""
    x = make_x(n, seed).astype(np.float64)
    y = make_y(n, seed).astype(np.float64)
    return x @ y + x.sum() * 0.5 + y * y


def smoke_job(
    party: str,
    cluster: ClusterConfig,
    n: int = 4,
    seed: int = 0,
    x_party: str = "alice",
    y_party: str = "bob",
) -> dict[str, Any]:
    """Run ``smoke_fn`` on SPU with x from ``x_party``'s PYU and y from ``y_party``'s PYU."""
    import secretflow as sf

    t0 = time.monotonic()
    with sf_party_session(cluster, party, job_name="secfwt-smoke") as spu:
        t_init = time.monotonic() - t0
        x = sf.PYU(x_party)(make_x)(n, seed)
        y = sf.PYU(y_party)(make_y)(n, seed)
        out = spu(smoke_fn)(x.to(spu), y.to(spu))
        value = np.asarray(sf.reveal(out))
        t_compute = time.monotonic() - t0 - t_init
    return {
        "party": party,
        "value": value.tolist(),
        "init_s": round(t_init, 3),
        "compute_s": round(t_compute, 3),
        "total_s": round(time.monotonic() - t0, 3),
    }


def big_product_fn(x, y, repeat: int):
    """A large secret product from small inputs: tile both to ``repeat`` times their
    size inside SPU (no link traffic) and multiply, so one message of the product is large
    while the inputs cross the links cheaply. Returns the sum. A public ramp is added to
    one factor so that the compiler cannot multiply before tiling."""
    import jax.numpy as jnp

    ramp = jnp.arange(x.size * repeat, dtype=x.dtype) * 1e-6
    return jnp.sum((jnp.tile(x, repeat) + ramp) * jnp.tile(y, repeat))


def big_product_job(party: str, cluster: ClusterConfig, n: int = 1000, repeat: int = 500, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """``big_product_fn`` on SPU (x from alice, y from bob, both of ``n`` elements), with
    the SPU links' timeouts scaled to the product's largest message
    (`ClusterConfig.spu_link_timeouts`); returns the value, the timeouts and how long the
    product took."""
    import secretflow as sf

    from secfwt_jax.compile.network import message_bound_bytes
    from secfwt_jax.compile.protocols import FIELD_BITS

    timeouts = cluster.spu_link_timeouts(message_bound_bytes(n * repeat, FIELD_BITS[cluster.field] // 8))  # fmt: skip
    with sf_party_session(cluster, party, job_name="secfwt-big-product", open_spu=False) as lazy:
        spu = lazy.device(timeouts.link_desc())
        x = sf.PYU("alice")(lambda: np.random.default_rng(seed).uniform(-1, 1, n).astype(np.float32))()  # fmt: skip
        y = sf.PYU("bob")(lambda: np.random.default_rng(seed + 1).uniform(-1, 1, n).astype(np.float32))()  # fmt: skip
        xs, ys = x.to(spu), y.to(spu)
        sf.reveal(spu(lambda a, b: a[0] + b[0])(xs, ys))  # the links are up
        t0 = time.monotonic()

        def big_product(a, b):
            return big_product_fn(a, b, repeat)

        value = float(sf.reveal(spu(big_product)(xs, ys)))
        seconds = time.monotonic() - t0
    return {"party": party, "value": value, "product_s": round(seconds, 2),
            "recv_timeout_ms": timeouts.recv_timeout_ms, "http_timeout_ms": timeouts.http_timeout_ms}  # fmt: skip


def big_product_plaintext(n: int = 1000, repeat: int = 500, seed: int = 0) -> float:
    x = np.random.default_rng(seed).uniform(-1, 1, n).astype(np.float32).astype(np.float64)
    y = np.random.default_rng(seed + 1).uniform(-1, 1, n).astype(np.float32).astype(np.float64)
    ramp = np.arange(n * repeat, dtype=np.float32).astype(np.float64) * 1e-6
    return float(np.sum((np.tile(x, repeat) + ramp) * np.tile(y, repeat)))


def failing_job(
    party: str, cluster: ClusterConfig, fail_party: str = "bob", stage: str = "in_session"
) -> None:
    """``fail_party`` raises; the others are left blocked waiting for it.

    ``stage="before_init"``: it raises at once, peers block in ``sf.init``'s barrier.
    ``stage="in_session"``: it raises after ``sf.init`` and ``sf.SPU`` came up, peers block
    in ``sf.reveal`` waiting for a value only it would have sent (a mid-job crash).
    """
    if stage not in ("before_init", "in_session"):
        raise ValueError(f"stage must be 'before_init' or 'in_session', got {stage!r}")
    if stage == "before_init" and party == fail_party:
        raise RuntimeError(f"injected failure in party {party} before sf.init")
    import secretflow as sf

    with sf_party_session(cluster, party, job_name="secfwt-fail") as spu:
        if party == fail_party:
            raise RuntimeError(f"injected failure in party {party} inside the session")
        x = sf.PYU(fail_party)(make_x)(2, 0)
        sf.reveal(x.to(spu))


def sleep_job(party: str, cluster: ClusterConfig, seconds: float = 60.0) -> None:
    """Never finishes in time: exercises the launcher's timeout path without SecretFlow."""
    time.sleep(seconds)
