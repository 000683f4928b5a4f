"""Bad input through the `secfwt` command line: one line naming the field, file or party,
a non-zero exit, nothing half-written and nothing of a previous run lost.

Every case id here is a row of `docs/bad_input.md` (checked below); the table also lists
the cases other test files hold."""

import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest

from secfwt_jax.runtime import cli
from secfwt_jax.runtime.cluster import loopback_cluster

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
DOC = ROOT / "docs" / "bad_input.md"


@pytest.fixture()
def place(tmp_path):
    """Files the cases point at: a plain file, a foreign folder, cluster files."""
    (tmp_path / "a_file").write_text("keep me")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "cluster_bad.yaml").write_text("parties: [alice, bob\nsf_ports: {\n")
    good = loopback_cluster(("alice", "bob", "carol")).to_dict()
    (tmp_path / "cluster.json").write_text(json.dumps(good))
    (tmp_path / "cluster_fm32.json").write_text(json.dumps(good | {"field": "FM32"}))
    (tmp_path / "cluster_key.json").write_text(json.dumps(good | {"portz": 1}))
    two = loopback_cluster(("alice", "dave", "carol")).to_dict()
    (tmp_path / "cluster_parties.json").write_text(json.dumps(two))
    extra = {"spu_runtime_extra": {"fxp_fraction_bits": 20}}
    (tmp_path / "cluster_runtime.json").write_text(json.dumps(good | extra))
    tls = {"ca_cert": str(tmp_path / "no_ca.crt"), "cert": "x", "key": "y"}
    (tmp_path / "cluster_tls.json").write_text(json.dumps(good | {"tls": tls}))
    (tmp_path / "data.csv").write_text("text,sentiment\n")
    (tmp_path / "dup.yaml").write_text(Path(TINY).read_text() + "tuning:\n  steps: 2\n")
    (tmp_path / "cluster_dup.yaml").write_text("field: FM64\nprotocol: ABY3\nfield: FM128\n")
    (tmp_path / "no_tokenizer").mkdir()
    (tmp_path / "no_tokenizer" / "config.json").write_text("{}")
    return tmp_path


def _ft(*sets: str) -> list[str]:
    return ["finetune", TINY, *[a for s in sets for a in ("--set", s)]]


# id -> (argv with {p} for the fixture folder, the text the one line must contain)
CASES = {
    "spec-unknown-key": (_ft("tuning.stepz=3"), "tuning.stepz"),
    "spec-negative-eps": (_ft("tuning.spsa.eps=-1"), "tuning.spsa.eps"),
    "spec-zero-steps": (_ft("tuning.steps=0"), "tuning.steps"),
    "spec-unknown-protocol": (_ft("protocol.name=XYZ"), "protocol.name"),
    "spec-fm32": (_ft("protocol.field=FM32"), "protocol.field"),
    "spec-probabilistic-truncation-aby3": (
        _ft("protocol.truncation=probabilistic"),
        "protocol.truncation",
    ),  # fmt: skip
    "spec-party-count": (_ft("parties.compute=[alice, bob]"), "parties.compute"),
    "spec-same-owner": (_ft("parties.data_owner=alice"), "data_owner"),
    "spec-timeout-zero": (_ft("backend.timeout_s=0"), "backend.timeout_s"),
    "link-on-simulator": ([*_ft(), "--link", "wan"], "--link: shaped links are for a cluster run"),
    "spec-timeout-negative": (_ft("backend.timeout_s=-5"), "backend.timeout_s"),
    "spec-batch-too-large": (_ft("tuning.batch_size=1000"), "tuning.batch_size"),
    "spec-mpc-examples-too-many": (_ft("evaluation.mpc_examples=1000"), "evaluation.mpc_examples"),
    "spec-k-too-large": (_ft("data.k=1000"), "data.k"),
    "spec-privacy-cma": (
        _ft(
            "tuning.method=cma",
            "tuning.trainable={kind: prompt, prompt_length: 2, intrinsic_dim: 6}",
            "tuning.privacy={clip: 1.0, epsilon: 1.0}",
        ),
        "tuning.privacy: CMA-ES candidates are public",
    ),  # fmt: skip
    "spec-privacy-epsilon-and-sigma": (
        _ft("tuning.privacy={clip: 1.0, epsilon: 1.0, noise_multiplier: 1.0}"),
        "tuning.privacy: give exactly one of epsilon and noise_multiplier",
    ),
    "spec-privacy-uncached": (
        _ft(
            "tuning.trainable={kind: top, top_layers: 1, cache_trunk: false}",
            "tuning.privacy={clip: 1.0, epsilon: 1.0}",
        ),
        "tuning.privacy: needs trainable.cache_trunk",
    ),  # fmt: skip
    "spec-cma-generations": (
        _ft("tuning.cma={population: 4, generations: 50}"),
        "tuning.cma.generations",
    ),
    "spec-cma-checkpoint": (
        _ft(
            "tuning.method=cma",
            "tuning.trainable={kind: prompt, prompt_length: 2, intrinsic_dim: 6}",
            "checkpoint.every=2",
        ),
        "checkpoint.every",
    ),  # fmt: skip
    "disk-too-small": (
        _ft("checkpoint.every=1", "checkpoint.keep=1000000000"),
        "MB free; this run writes about",
    ),  # fmt: skip
    "spec-mlm-inline-model": (_ft("model.head={kind: mlm}"), "model.head.kind"),
    "spec-set-without-equals": (_ft("tuning.steps"), "tuning.steps"),
    "spec-file-missing": (["finetune", "{p}/nope.yaml"], "nope.yaml"),
    "spec-malformed-yaml": (["finetune", "{p}/bad.yaml"], "bad.yaml"),
    "spec-duplicate-key": (
        ["finetune", "{p}/dup.yaml"],
        "key 'tuning' given twice (lines 23 and 35)",
    ),
    "spec-output-dir-placeholder": (
        _ft("output.dir=runs/{0}"),
        "output.dir: 'runs/{0}' has a positional",
    ),
    "tokenizer-files-missing": (
        _ft("model.tokenizer={p}/no_tokenizer"),
        "no_tokenizer: no tokenizer files",
    ),
    "data-file-missing": (_ft("data.path={p}/nope.csv"), "nope.csv"),
    "data-file-empty": (_ft("data.path={p}/data.csv"), "data.csv"),
    "data-column-missing": (_ft("data.label_column=nope"), "nope"),
    "out-is-a-file": ([*_ft(), "--out", "{p}/a_file"], "output.dir"),
    "out-under-a-file": ([*_ft(), "--out", "{p}/a_file/run"], "output.dir"),
    "cache-dir-is-a-file": ([*_ft(), "--cache-dir", "{p}/a_file"], "--cache-dir"),
    "compile-out-is-a-file": (["compile", TINY, "--out", "{p}/a_file"], "--out"),
    "compile-out-foreign": (["compile", TINY, "--out", "{p}/foreign"], "--out"),
    "bench-out-is-a-file": (["bench", "--out", "{p}/a_file"], "--out"),
    "cluster-file-missing": (
        [*_ft("backend.cluster={p}/nope.yaml"), "--backend", "cluster"],
        "nope.yaml",
    ),  # fmt: skip
    "cluster-malformed-yaml": (
        [*_ft("backend.cluster={p}/cluster_bad.yaml"), "--backend", "cluster"],
        "malformed YAML at line",
    ),  # fmt: skip
    "cluster-duplicate-key": (
        [*_ft("backend.cluster={p}/cluster_dup.yaml"), "--backend", "cluster"],
        "cluster_dup.yaml: key 'field' given twice (lines 1 and 3)",
    ),  # fmt: skip
    "cluster-fm32": (
        [*_ft("backend.cluster={p}/cluster_fm32.json"), "--backend", "cluster"],
        "ClusterConfig.field",
    ),  # fmt: skip
    "cluster-unknown-key": (
        [*_ft("backend.cluster={p}/cluster_key.json"), "--backend", "cluster"],
        "ClusterConfig.portz",
    ),  # fmt: skip
    "cluster-other-parties": (
        [*_ft("backend.cluster={p}/cluster_parties.json"), "--backend", "cluster"],
        "backend.cluster",
    ),  # fmt: skip
    "cluster-runtime-setting-differs": (
        [*_ft("backend.cluster={p}/cluster_runtime.json"), "--backend", "cluster"],
        "backend.cluster: spu_runtime_extra.fxp_fraction_bits is 20, but the spec's protocol.fxp_fraction_bits makes it 18",
    ),  # fmt: skip
    "cluster-semi2k-first-party": (
        [*_ft("protocol.name=SEMI2K", "parties.compute=[alice, bob]"), "--backend", "cluster"],
        "protocol.beaver_type",
    ),  # fmt: skip
    "party-not-compute": (
        ["party", TINY, "--party", "mallory", "--cluster", "{p}/cluster.json"],
        "--party",
    ),  # fmt: skip
    "party-negative-seed": (
        ["party", TINY, "--party", "alice", "--cluster", "{p}/cluster.json", "--private-seed=-1"],
        "--private-seed",
    ),  # fmt: skip
    "party-no-cluster-file": (["party", TINY, "--party", "bob"], "--cluster"),
    "party-tls-file-missing": (
        ["party", TINY, "--party", "bob", "--cluster", "{p}/cluster_tls.json"],
        "ClusterConfig.tls.ca_cert",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_line_and_a_nonzero_exit(case, place, capsys):
    argv, needle = CASES[case]
    argv = [a.replace("{p}", str(place)) for a in argv]
    before = {p: p.read_bytes() for p in place.rglob("*") if p.is_file()}
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code not in (0, None), err
    lines = [line for line in err.splitlines() if not line.startswith("[")]  # SPU's own log lines
    assert len(lines) == 1 and lines[0].startswith("secfwt: error: "), err
    assert needle in lines[0], lines[0]
    after = {p: p.read_bytes() for p in place.rglob("*") if p.is_file()}
    assert {p: after.get(p) for p in before} == before  # nothing lost or replaced
    assert not [p for p in after if p.name.endswith(".tmp")]  # nothing half-written


def test_a_port_in_use_is_named_before_the_party_starts(place, capsys):
    cluster = loopback_cluster(("alice", "bob", "carol"))
    (place / "cluster_port.json").write_text(json.dumps(cluster.to_dict()))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", cluster.sf_ports["bob"]))
        holder.listen()
        code = cli.main(["party", TINY, "--party", "bob", "--cluster", str(place / "cluster_port.json"),
                         "--out", str(place / "out")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and "ClusterConfig.sf_ports[bob]" in err and "not free" in err


def test_empty_input_to_the_encoder_is_refused_in_one_line():
    from secfwt_jax.data.batching import encode
    from secfwt_jax.data.loaders import DataError
    from secfwt_jax.models.classifier import Classifier
    from secfwt_jax.models.config import ModelConfig
    from secfwt_jax.models.heads import HeadConfig

    with pytest.raises(DataError, match="empty input"):
        encode([], np.zeros(0, np.int64), None, 8, head_kind="linear", num_labels=2)
    model = Classifier(ModelConfig(family="bert", vocab_size=50, hidden_size=8, num_layers=1, num_heads=2,
                                   intermediate_size=16, max_positions=16, type_vocab_size=2),
                       HeadConfig(kind="linear", num_labels=2))  # fmt: skip
    params = model.init(0)
    empty = {"input_ids": np.zeros((1, 0), np.int32), "attention_mask": np.zeros((1, 0), np.int32)}  # fmt: skip
    with pytest.raises(ValueError, match=r"input_ids: empty input, shape \[1, 0\]"):
        model.logits(params, empty)


def test_every_case_is_a_row_of_the_table():
    rows = set(re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(), flags=re.M))
    assert set(CASES) <= rows
    assert len(rows) >= 30
