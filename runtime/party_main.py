"""Entry point of one party process: ``python -m secfwt_jax.runtime.party_main``.

The launcher starts one of these per party. It imports the job (``module:function``),
calls ``job(party, cluster, **job_args)``, and writes ``{"party", "result", "seconds"}`` as
JSON to ``--result`` via a temp file and ``os.replace``, so the launcher never reads a half
written result. It leaves with ``os._exit`` because SecretFlow's cross-silo gRPC/brpc
threads can keep a normal interpreter exit waiting forever after a peer died.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from secfwt_jax.files import write_json_atomic
from secfwt_jax.runtime.cluster import ClusterConfig


def resolve_job(spec: str) -> Callable[..., Any]:
    """Import ``'pkg.module:function'`` and return the function."""
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"job must be 'module:function', got {spec!r}")
    fn = getattr(importlib.import_module(mod_name), fn_name, None)
    if not callable(fn):
        raise ValueError(f"job {spec!r}: {fn_name!r} is not a callable in {mod_name}")
    return fn


def _to_jsonable(obj: Any) -> Any:
    """JSON fallback for numpy/jax values a job may return (arrays become nested lists)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"result value of type {type(obj).__name__} is not JSON-serialisable")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--party", required=True)
    ap.add_argument("--cluster", required=True, help="path to the cluster config JSON")
    ap.add_argument("--job", required=True, help="module:function")
    ap.add_argument("--args", required=True, help="path to the job_args JSON")
    ap.add_argument("--result", required=True, help="where to write the result JSON")
    ns = ap.parse_args(argv)

    t0 = time.monotonic()
    with open(ns.cluster) as f:
        cluster = ClusterConfig.from_dict(json.load(f))
    with open(ns.args) as f:
        job_args = json.load(f)
    job = resolve_job(ns.job)
    result = job(ns.party, cluster, **job_args)
    write_json_atomic(
        ns.result,
        {"party": ns.party, "result": result, "seconds": time.monotonic() - t0},
        private=True,  # the party's summary: its accuracies and, at the data owner, losses
        default=_to_jsonable,
        indent=None,
    )
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:  # argparse errors: keep their exit code
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # report anything, then hard-exit below
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
