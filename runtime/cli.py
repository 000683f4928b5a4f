"""`secfwt` command line.

    secfwt demo [--protocol ABY3|SEMI2K|CHEETAH] [--steps N] [--json PATH]

Bad input exits non-zero with a one-line `secfwt: error: ...` that names the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path


def write_json_atomic(path: str | Path, payload) -> None:
    """Write JSON to a temporary file in the same folder, then rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _demo(args: argparse.Namespace) -> int:
    from secfwt_jax.runtime.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        protocol=args.protocol,
        field=args.field,
        steps=args.steps,
        seed=args.seed,
        schedule=dataclasses.replace(DemoConfig().schedule, total_steps=args.steps),
    )
    summary = run_demo(cfg)
    if args.json:
        write_json_atomic(args.json, summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secfwt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="walking skeleton: SPSA steps of a tiny RFA BERT under SPU")
    demo.add_argument("--protocol", default="ABY3", choices=["ABY3", "SEMI2K", "CHEETAH"])
    demo.add_argument("--field", default="FM64", choices=["FM64", "FM128"])
    demo.add_argument("--steps", type=int, default=3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", help="also write the summary to this JSON file")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "steps", 1) < 1:
        parser.error("--steps: must be >= 1")
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"secfwt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
