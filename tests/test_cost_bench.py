"""`secfwt bench` (compile/bench.py): the layer extrapolation against whole multi-layer
measurements, and the files a run writes."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from secfwt_jax.compile import bench, profile_cases, profiler, protocols
from secfwt_jax.models.classifier import Classifier
from secfwt_jax.models.heads import HeadConfig
from secfwt_jax.runtime.cli import main

ABY3 = protocols.preset("ABY3")
SHAPE = profile_cases.StepShape(1, 8, directions="rademacher")


def test_extrapolate_is_linear_through_the_two_deepest_points_and_flags_it():
    pts = [{"layers": 1, "total_bytes": 10, "rounds": 4, "compute_s": 1.0},
           {"layers": 2, "total_bytes": 16, "rounds": 6, "compute_s": 1.5}]  # fmt: skip
    got = bench.extrapolate(pts, 5)
    assert (got["total_bytes"], got["rounds"], got["extrapolated"]) == (34, 12, True)
    assert bench.extrapolate(pts, 2) == {
        **{k: pts[1][k] for k in bench.KEYS},
        "extrapolated": False,
    }
    with pytest.raises(ValueError, match="^layers_measured"):
        bench.extrapolate(pts[:1], 3)
    # Measured compute on a loaded machine: the deeper point took less; never negative.
    noisy = [{**pts[0], "compute_s": 9.0}, {**pts[1], "compute_s": 2.0}]
    assert bench.extrapolate(noisy, 24)["compute_s"] == 2.0


@pytest.mark.parametrize("row", ["forward_softmax", "spsa_rfa_poly", "sft_adam"])
def test_layer_extrapolation_is_within_2_percent_of_whole_3_and_4_layer_runs(row):
    base = bench.SHAPES["tiny"]
    measure = lambda n: bench.measure_row(row, base, n, SHAPE, ABY3, 4)  # noqa: E731
    pts = [measure(1), measure(2)]
    for layers in (3, 4):
        want, got = measure(layers), bench.extrapolate(pts, layers)
        for key in ("total_bytes", "rounds"):
            assert abs(got[key] - want[key]) <= 0.02 * want[key], (row, layers, key, got, want)
    assert pts[1]["total_bytes"] > pts[0]["total_bytes"]  # layers do cost something


TINY_LLAMA = dataclasses.replace(
    bench.SHAPES["smollm2-135m"], vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2,
    intermediate_size=48, num_layers=3, max_positions=64,
)  # fmt: skip


@pytest.mark.parametrize("base", [bench.SHAPES["tiny"], TINY_LLAMA], ids=["bert", "llama"])
@pytest.mark.parametrize("row", bench.FORWARD_ROWS)
def test_a_forward_by_parts_costs_exactly_what_the_whole_program_does(base, row):
    """rest + L x layer against the whole L-layer program: the same ops on the same
    shapes, so bytes are equal and rounds equal (what makes a Llama-7B row measurable)."""
    parts = bench.measure_parts(row, base, SHAPE, ABY3)
    clf = Classifier(bench.row_model(row, base, 3), HeadConfig(num_labels=2))
    fn, args, public = profile_cases.forward_case(clf, clf.init(0, seq_len=8), SHAPE)
    whole = bench._figures(profiler.profile_function(fn, args, public, ABY3))
    got = bench.by_parts(parts, 3)
    assert got["total_bytes"] == whole["total_bytes"]
    assert got["rounds"] == pytest.approx(whole["rounds"], rel=1e-9)
    assert parts["layer"]["total_bytes"] > 0 and parts["rest"]["total_bytes"] > 0
    assert got["by_parts"] and got["extrapolated"] and "built by hand" in got["exception"]


def test_a_spec_row_measures_the_program_secfwt_compile_profiles_for_its_spec(tmp_path):
    """The bench measures what finetune runs: a row is `configs/bench.yaml` plus the
    overrides bench.json records, and `secfwt compile --profile` on that spec reports the
    same bytes and rounds for the row's program; an exception row says why it is one."""
    cfg = bench.row_model("spsa_rfa_poly", bench.SHAPES["tiny"], 1)
    got = bench.measure_row("spsa_rfa_poly", bench.SHAPES["tiny"], 1, SHAPE, ABY3, 4)
    assert got["overrides"] == bench.row_overrides("spsa_rfa_poly", cfg, SHAPE, 4, "ABY3")
    sets = [a for o in got["overrides"] for a in ("--set", o)]
    out = tmp_path / "compiled"
    assert main(["compile", str(bench.BASE_SPEC), "--out", str(out), "--profile", "--no-cache", *sets]) == 0  # fmt: skip
    programs = {p["program"]: p for p in json.loads((out / "profile.json").read_text())["programs"]}
    assert set(programs) == {"spsa_step", "predict"}
    assert programs["spsa_step"]["bytes_per_call"] == got["total_bytes"]
    assert programs["spsa_step"]["rounds_per_call"] == got["rounds"]
    # the predict program is the forward row's, under the same spec
    fwd = bench.measure_row("forward_rfa", bench.SHAPES["tiny"], 1, SHAPE, ABY3, 4)
    assert programs["predict"]["bytes_per_call"] == fwd["total_bytes"]
    assert set(bench.EXCEPTIONS) == {"sft_adam", "bp_prompt"}
    assert set(bench.ROW_PROGRAM) | set(bench.EXCEPTIONS) == set(bench.ROWS)
    assert "backprop" in bench.measure_row("bp_prompt", bench.SHAPES["tiny"], 1, SHAPE, ABY3, 4)["exception"]  # fmt: skip


def test_by_parts_refuses_a_row_that_is_not_a_forward(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--shapes", "tiny", "--seqs", "8", "--by-parts",
                              "--rows", "forward_rfa", "spsa_rfa_poly", "--out", str(tmp_path)])  # fmt: skip
    with pytest.raises(ValueError, match=r"^--by-parts: .*--rows has spsa_rfa_poly$"):
        bench.command(args, log=lambda _: None)
    assert not (tmp_path / "bench.json").exists()


def test_run_writes_json_markdown_and_goals(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--shapes", "tiny", "--seqs", "8", "--protocols", "ABY3",
                              "--rows", "forward_rfa", "spsa_rfa_poly", "--out", str(tmp_path)])  # fmt: skip
    assert bench.command(args, log=lambda _: None) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["row"]: r for r in payload["results"]}
    assert set(rows) == {"forward_rfa", "spsa_rfa_poly"}
    assert all(r["extrapolated"] and r["layers"] == 3 and r["exception"] is None for r in rows.values())  # fmt: skip
    assert rows["spsa_rfa_poly"]["total_bytes"] > rows["forward_rfa"]["total_bytes"]
    goal = payload["goals"]["b tiny 8 ABY3 spsa_rfa_poly"]
    ratio = rows["spsa_rfa_poly"]["total_bytes"] / (2 * rows["forward_rfa"]["total_bytes"])
    assert goal["step_over_two_forwards"] == pytest.approx(ratio)
    assert "| tiny | 8 | 1 | ABY3 | spsa_rfa_poly |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_gelu_rfa_features_and_softmax_exp_options_reach_every_row(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    common = ["--shapes", "tiny", "--seqs", "8", "--protocols", "ABY3", "--rows", "forward_rfa",
              "forward_softmax", "--layers-measured", "1", "3"]  # fmt: skip
    runs = {}
    cheap_args = ["--gelu", "relu", "--rfa-features", "8", "--softmax-exp", "poly"]
    for name, extra in (("default", ["--softmax-exp", "exact"]), ("cheap", cheap_args)):
        args = parser.parse_args([*common, *extra, "--out", str(tmp_path / name)])
        assert bench.command(args, log=lambda _: None) == 0
        payload = json.loads((tmp_path / name / "bench.json").read_text())
        runs[name] = {r["row"]: r for r in payload["results"]}
    cheap, default = runs["cheap"], runs["default"]
    assert {r["gelu"] for r in cheap.values()} == {"relu"}
    assert cheap["forward_rfa"]["rfa_features"] == 8
    for row in ("forward_rfa", "forward_softmax"):  # relu is cheaper than piecewise GeLU
        assert cheap[row]["total_bytes"] < default[row]["total_bytes"]
    assert {cheap["forward_softmax"]["softmax_exp"], default["forward_softmax"]["softmax_exp"]} == {"poly", "exact"}  # fmt: skip
    table = (tmp_path / "cheap" / "bench.md").read_text()
    assert "| forward_rfa | relu | RFA m 8 |" in table
    assert "| forward_softmax | relu | softmax, poly exp |" in table
    assert (
        bench.row_model("forward_softmax", bench.SHAPES["tiny"], 1, 8).attention.kind == "softmax"
    )


def test_every_trainable_set_steps_for_at_most_two_forwards(tmp_path):
    """Goal (b) on every set: the Rademacher update is free, so the step is its population's
    forwards; frozen lower layers are computed once, not per perturbation."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--shapes", "tiny", "--seqs", "8", "--protocols", "ABY3", "--rows",
                              "forward_rfa", "--sets", "--out", str(tmp_path)])  # fmt: skip
    assert bench.command(args, log=lambda _: None) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    ratios = {r["set"]: r["step_over_two_forwards"] for r in payload["sets"]}
    assert set(ratios) == set(profile_cases.SET_KINDS)
    assert all(r <= 1.05 for r in ratios.values()), ratios
    assert ratios["head"] < 0.6 < ratios["top"] < 0.9 < ratios["full"]  # shared frozen trunk
    assert all(payload["goals"][f"b set {k} tiny 8 ABY3"]["met"] for k in ratios)


def test_goal_c_compares_one_head_against_both_softmax_exps():
    heads = bench.head_costs(ABY3, seqs=(16,), d=8, m=8)
    (h,) = heads
    assert h["softmax"]["total_bytes"] < h["softmax_spu_exp"]["total_bytes"]  # poly exp is cheaper
    assert h["bytes_ratio"] < h["bytes_ratio_spu_exp"]
    g = bench.goals([], heads)
    assert g["c n=16"]["bytes_ratio"] == pytest.approx(h["bytes_ratio"])
    assert g["c n=16 vs SPU exp"]["bytes_ratio"] == pytest.approx(h["bytes_ratio_spu_exp"])
    assert "ratio vs SPU exp" in bench.markdown([], heads, g)
