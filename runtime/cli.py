"""`secfwt` command line.

    secfwt finetune RUN.yaml [--set key=value ...] [--backend sim|cluster] [--out DIR]
    secfwt cluster launch RUN.yaml [--link lan|wan|edge]   all parties as processes on this host
    secfwt party RUN.yaml --party NAME        one party on its own host
    secfwt adapt RUN.yaml [--text FILE]       the model owner's attention adaptation
    secfwt compile RUN.yaml --out DIR [--profile] [--cache-dir DIR | --no-cache]
    secfwt bench [--shapes ...] [--seqs ...] [--protocols ...] [--out DIR]

Bad input exits non-zero with a one-line `secfwt: error: ...` that names the field.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from secfwt_jax.files import check_writable_dir
from secfwt_jax.runtime.link_shaper import PROFILES


def _finetune(args: argparse.Namespace) -> int:
    """Fine-tune as the run spec says: simulator (embedded default) or SecretFlow parties."""
    from secfwt_jax.run.spec import load_spec
    from secfwt_jax.runtime.finetune import PrivateSeeds
    from secfwt_jax.runtime.sim_run import finetune_in_simulator, summary_lines

    spec = load_spec(args.spec, args.set)
    if args.backend:
        spec = spec.replace(backend={**spec.backend.model_dump(), "kind": args.backend})
    given = _given_seed(args)
    if spec.backend.kind == "cluster":
        return _launch(spec, args, given)
    if args.link is not None:
        raise ValueError("--link: shaped links are for a cluster run (--backend cluster); the simulator has no links")  # fmt: skip
    seeds = None if given is None else PrivateSeeds(given)  # None: drawn from the OS
    cache = cache_dir_for(spec, args.cache_dir, "--cache-dir")
    report = finetune_in_simulator(spec, seeds=seeds, cache_dir=cache, out_dir=Path(args.out) if args.out else None, resume=args.resume)  # fmt: skip
    print("\n".join(summary_lines(report)))
    return 0


def _given_seed(args: argparse.Namespace) -> int | None:
    """--private-seed, checked, with the warning that a chosen seed is guessable."""
    if getattr(args, "private_seed", None) is None:
        return None
    from secfwt_jax.seeds import check_private_seed

    seed = check_private_seed(args.private_seed)
    print("note: --private-seed makes the model owner's draws as guessable as the seed you chose (for tests and reproducing figures only)", file=sys.stderr)  # fmt: skip
    return seed


def _launch(spec, args: argparse.Namespace, private_seed: int | None) -> int:
    from secfwt_jax.runtime.cluster_run import launch_local, summary_json

    results = launch_local(spec, args.spec, args.set, private_seed, Path(args.out) if args.out else None, resume=args.resume, link=args.link)  # fmt: skip
    print(summary_json(results))
    return 0


def _cluster_launch(args: argparse.Namespace) -> int:
    """All of the spec's parties as SecretFlow processes on this host."""
    from secfwt_jax.run.spec import load_spec

    spec = load_spec(args.spec, args.set)
    return _launch(spec, args, _given_seed(args))


def _party(args: argparse.Namespace) -> int:
    """One party of the spec's cluster, on its own host."""
    from secfwt_jax.run.spec import load_spec
    from secfwt_jax.runtime.cluster import load_cluster_config
    from secfwt_jax.runtime.cluster_run import finetune_as_party

    spec = load_spec(args.spec, args.set)
    cluster_file = args.cluster or spec.resolve(spec.backend.cluster)
    if cluster_file is None:
        raise ValueError("--cluster: a party needs the cluster file (or backend.cluster in the spec)")  # fmt: skip
    cluster = load_cluster_config(cluster_file)
    out = Path(args.out) if args.out else spec.output_dir
    report = finetune_as_party(spec, args.party, cluster, _given_seed(args), out, progress=True, resume=args.resume, cache_dir=args.cache_dir)  # fmt: skip
    print(json.dumps({k: report[k] for k in ("party", "spec_hash", "programs", "files")}))
    return 0


def _adapt(args: argparse.Namespace) -> int:
    """The model owner's attention adaptation on public text -> an adapted checkpoint dir."""
    from secfwt_jax.models.config import AttentionConfig
    from secfwt_jax.run.spec import load_spec
    from secfwt_jax.runtime.adapt import _public_texts, adapt_checkpoint

    spec = load_spec(args.spec, args.set)
    if spec.model.checkpoint is None:
        raise ValueError("model.checkpoint: adaptation needs a pretrained checkpoint")
    out = Path(args.out) if args.out else spec.resolve(spec.model.adapted_checkpoint)
    if out is None:
        raise ValueError("--out: give a directory (or model.adapted_checkpoint in the spec)")
    texts = _public_texts(spec.resolve(args.text), args.text_column, args.rows)
    attention: AttentionConfig = spec.model.attention
    info = adapt_checkpoint(spec.resolve(spec.model.checkpoint), texts, out, attention,
                            steps=args.steps, learning_rate=args.lr, max_len=spec.data.max_len,
                            gelu_impl=spec.model.gelu, normaliser_margin=args.normaliser_margin,
                            normaliser_weight=args.normaliser_weight)  # fmt: skip
    print(json.dumps({"out": str(out), **info}, indent=2))
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    """A GGUF file (llama.cpp) as an ordinary Hugging Face directory."""
    from secfwt_jax.models.gguf_checkpoint import read_gguf, write_hf_dir

    source = Path(args.file)
    if str(args.file) == "bundled:smollm2":
        from secfwt_jax.models.gguf_checkpoint import bundled_smollm2_file

        source = bundled_smollm2_file()
    out = check_writable_dir(args.out, "--out")
    checkpoint = read_gguf(source)
    write_hf_dir(checkpoint, out)
    config = checkpoint.config
    print(json.dumps({"out": str(out), "source": str(source), "model_type": config.model_type,
                      "layers": config.num_hidden_layers, "hidden": config.hidden_size,
                      "tied": config.tie_word_embeddings}))  # fmt: skip
    return 0


def default_cache_dir() -> Path:
    """$SECFWT_CACHE_DIR, else $XDG_CACHE_HOME/secfwt/compile (~/.cache/secfwt/compile)."""
    if os.environ.get("SECFWT_CACHE_DIR"):
        return Path(os.environ["SECFWT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "secfwt" / "compile"


def cache_dir_for(spec, given: str | Path | None, field: str) -> Path:
    """The compile cache a run uses: `given`, else the spec's `output.cache_dir`, else
    `default_cache_dir()`; refused in one line naming `field` if it cannot be written."""
    return check_writable_dir(given or spec.resolve(spec.output.cache_dir) or default_cache_dir(), field)  # fmt: skip


def _check_out_dir(out: Path) -> None:
    """--out may be new, empty, or a previous compile output (replaced); nothing else."""
    check_writable_dir(out, "--out")
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if not (p / "metadata.json").is_file()]
        if foreign:
            raise ValueError(f"--out: {out} holds {foreign[0]!r}, not a compile output; refusing to replace it")  # fmt: skip


def _compile(args: argparse.Namespace) -> int:
    """The run's programs as SPU artifacts, through the same cache `finetune` uses."""
    from secfwt_jax.compile.protocols import preset_of
    from secfwt_jax.compile.spec_programs import compile_run
    from secfwt_jax.run.spec import load_spec

    out = Path(args.out)
    _check_out_dir(out)
    spec = load_spec(args.spec, args.set)
    cache = None if args.no_cache else cache_dir_for(spec, args.cache_dir, "--cache-dir")
    preset = preset_of(spec)
    print(f"run {spec.name} ({spec.spec_hash[:12]}): {preset.name} {preset.field}, fraction bits {preset.fxp_fraction_bits}")  # fmt: skip
    for artifact, hit in compile_run(spec, cache, out):
        meta = artifact.metadata
        secret = sum(i["visibility"] == "secret" for i in meta["inputs"])
        how = "cache hit" if hit else f"compiled in {meta['compile_seconds']:.1f} s"
        print(
            f"  {meta['name']}: key {meta['key'][:16]}... ({how}); inputs {len(meta['inputs'])} "
            f"(secret {secret}), outputs {len(meta['outputs'])} -> {out / meta['name']}"
        )
    if args.profile:
        from secfwt_jax.compile.spec_programs import profile_run
        from secfwt_jax.files import write_json_atomic

        print("profile (one call of each program on zeros; cost depends on shapes only):")
        prof = profile_run(spec, cache)
        write_json_atomic(out / "profile.json", prof, indent=1)
        nets = prof["network_s_without_compute"]
        print(f"whole run: {prof['run_total_bytes'] / 1e9:,.2f} GB, {prof['run_total_rounds']:,.0f} rounds, "
              f"and the owners' shares, {prof['input_share_bytes_per_party'] / 1e6:,.1f} MB to each party; "
              f"network alone LAN {nets['lan']:,.0f} s, WAN100 {nets['wan100']:,.0f} s -> {out / 'profile.json'}")  # fmt: skip
    return 0


LINK_HELP = "send every party's links through a user-space shaper of this profile (one relay per direction of each pair, SecretFlow and SPU ports): lan 1 Gbps/0.5 ms, wan 100 Mbps/20 ms, edge 10 Mbps/50 ms one way; none relays unshaped"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secfwt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="compile a run's SPU programs to artifacts (bytecode + metadata)")  # fmt: skip
    comp.add_argument("spec", help="run spec (YAML), see configs/")
    comp.add_argument("--out", required=True, help="directory to write, one artifact folder per program")  # fmt: skip
    comp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    comp.add_argument("--profile", action="store_true",
                      help="also run each program once on zeros and report its bytes and rounds, and the whole run's")  # fmt: skip
    cache = comp.add_mutually_exclusive_group()
    cache.add_argument("--cache-dir", help="compile cache (default $SECFWT_CACHE_DIR or ~/.cache/secfwt/compile)")  # fmt: skip
    cache.add_argument("--no-cache", action="store_true", help="always compile; no cache")
    comp.set_defaults(handler=_compile)
    imp = sub.add_parser("import-gguf", help="write a GGUF file (Llama) as a Hugging Face checkpoint directory")  # fmt: skip
    imp.add_argument("file", help="the .gguf file (bundled:smollm2 for the shipped SmolLM2-135M-Instruct)")  # fmt: skip
    imp.add_argument("--out", required=True, help="directory to write (new or empty)")
    imp.set_defaults(handler=_import_gguf)
    fine = sub.add_parser("finetune", help="fine-tune a checkpoint on a data owner's file under MPC (run spec)")  # fmt: skip
    fine.add_argument("spec", help="run spec (YAML), see configs/")
    fine.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field, e.g. tuning.steps=5")  # fmt: skip
    fine.add_argument("--backend", choices=["sim", "cluster"], help="override backend.kind")
    fine.add_argument("--out", help="output directory (default: the spec's output.dir)")
    fine.add_argument("--cache-dir", help="compile cache (default $SECFWT_CACHE_DIR or ~/.cache/secfwt/compile)")  # fmt: skip
    fine.add_argument("--private-seed", type=int, help="the model owner's private seed, for tests and reproducing figures only (default: 128 bits from the OS, kept 0600 in <out>/<model owner>/private_seed)")  # fmt: skip
    fine.add_argument("--resume", action="store_true", help="restart from the newest checkpoint every party holds (same spec; the model owner reuses its saved seed, or give the same --private-seed again)")  # fmt: skip
    fine.add_argument("--link", choices=sorted(PROFILES), help=LINK_HELP)
    fine.set_defaults(handler=_finetune)
    adapt = sub.add_parser("adapt", help="model owner: adapt the checkpoint to RFA (and model.gelu) on public text (plaintext)")  # fmt: skip
    adapt.add_argument("spec", help="run spec (its model section: checkpoint, attention, adapted_checkpoint)")  # fmt: skip
    adapt.add_argument("--text", default="bundled:sentiment", help="public unlabelled text: CSV/TSV/JSONL")  # fmt: skip
    adapt.add_argument("--text-column", default="text")
    adapt.add_argument("--rows", type=int, default=4000, help="use the first N rows")
    adapt.add_argument("--steps", type=int, default=600)
    adapt.add_argument("--lr", type=float, default=2e-4, help="peak step size (warmup, cosine decay)")  # fmt: skip
    adapt.add_argument("--normaliser-margin", type=float, default=None,
                       help="keep RFA normalisers above this on the public text (default 0.1)")  # fmt: skip
    adapt.add_argument("--normaliser-weight", type=float, default=None,
                       help="weight of that term in the loss (default 1.0; 0 turns it off)")  # fmt: skip
    adapt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    adapt.add_argument("--out", help="output directory (default: the spec's model.adapted_checkpoint)")  # fmt: skip
    adapt.set_defaults(handler=_adapt)
    bench = sub.add_parser("bench", help="MPC cost benchmark: bytes, rounds, LAN/WAN by row, shape and protocol (JSON, markdown, PNG)")  # fmt: skip
    from secfwt_jax.compile import bench as bench_module

    bench_module.add_arguments(bench)
    bench.set_defaults(handler=bench_module.command)
    cl = sub.add_parser("cluster", help="SecretFlow cluster commands")
    cl_sub = cl.add_subparsers(dest="cluster_command", required=True)
    launch = cl_sub.add_parser("launch", help="run the spec's parties as processes on this host (loopback)")  # fmt: skip
    launch.add_argument("spec", help="run spec (YAML)")
    launch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    launch.add_argument("--out", help="output directory (default: the spec's output.dir)")
    launch.add_argument("--private-seed", type=int, help="the model owner's private seed, for tests and reproducing figures only (default: 128 bits from the OS, kept 0600 in <out>/<model owner>/private_seed)")  # fmt: skip
    launch.add_argument("--resume", action="store_true", help="restart from the newest checkpoint every party holds (same spec; the model owner reuses its saved seed, or give the same --private-seed again)")  # fmt: skip
    launch.add_argument("--link", choices=sorted(PROFILES), help=LINK_HELP)
    launch.set_defaults(handler=_cluster_launch)
    party = sub.add_parser("party", help="run one party of a SecretFlow cluster (real deployment)")
    party.add_argument("spec", help="run spec (YAML), the same file at every party")
    party.add_argument("--party", required=True, help="this party's name")
    party.add_argument("--cluster", help="cluster file (default: the spec's backend.cluster)")
    party.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    party.add_argument("--out", help="output directory (default: the spec's output.dir)")
    party.add_argument("--private-seed", type=int, help="the model owner's private seed, for tests only (default: 128 bits from the OS)")  # fmt: skip
    party.add_argument("--resume", action="store_true", help="restart from the newest checkpoint every party holds (same spec; the model owner reuses its saved seed, or give the same --private-seed again)")  # fmt: skip
    party.add_argument("--cache-dir", help="compile cache (default $SECFWT_CACHE_DIR or ~/.cache/secfwt/compile)")  # fmt: skip
    party.set_defaults(handler=_party)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every cleanup on the way out runs: the
    launcher stops the parties it started (each process group, SIGTERM then SIGKILL), and
    the model owner's private-seed file is removed. A BaseException, as KeyboardInterrupt
    is, so no `except Exception` on the way swallows it."""


def _terminated(signum, _frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "steps", 1) < 1:
        parser.error("--steps: must be >= 1")
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return args.handler(args)
    except Terminated:
        print("secfwt: stopped by SIGTERM; cleaned up (any party processes this command started are stopped, and a cluster launch's temporary private-seed file is removed)", file=sys.stderr)  # fmt: skip
        return 128 + signal.SIGTERM
    except (ValueError, FileNotFoundError) as err:
        print(f"secfwt: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)  # fmt: skip
        return 2
    except RuntimeError as err:  # a party failed (PartyFailedError) or SPU refused to run
        print(f"secfwt: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    except OSError as err:  # a disk that filled up or a file-size limit, outside our writers
        where = f"{err.filename}: " if err.filename else ""
        print(f"secfwt: error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
