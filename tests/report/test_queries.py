"""Query functions against brute-force numpy on the same tables, plus labels and ordering helpers."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
from report_fixtures import Tuned

from lorascale.report import queries, series
from lorascale.labels import short_labels, slug
from lorascale.report.tables import natural_key, open_run


@pytest.fixture
def run(make_run):
    root = make_run([Tuned("org/full-ft", "full"), Tuned("/x/lora", "lora")], side="both",
                    layers=2, modules=("q_proj", "k_proj"), extra_matrix=True)
    return open_run(root)


def _tuned_rows(run) -> list[dict]:
    table = ds.dataset(run.root / "spectra").to_table()
    return [r for r in table.to_pylist() if r["role"] == "tuned"]


def test_epsilon_curve_matches_brute_force_and_run_count(run) -> None:
    epsilons = np.array([0.1, 0.3, 0.5, 0.7, 0.95])
    counts = queries.intruders_vs_epsilon(run, epsilons, k=10)
    rows = _tuned_rows(run)
    for model in run.models:
        for side in ("left", "right"):
            expected = [sum(1 for r in rows if r["model"] == model and r["side"] == side and r["rank"] < 10
                            and r["max_cos"] < eps) for eps in epsilons]
            assert list(counts[(model, side)]) == expected
    # At the run's own (k, epsilon) the curve equals the matrices table's counts: `intruders` on the left
    # side, `intruders_right` on the right.
    for model, total in queries.total_intruders(run).items():
        assert int(counts[(model, "left")][2]) == total
        mine = run.matrices.filter(pc.equal(run.matrices.column("model"), model))
        assert int(counts[(model, "right")][2]) == pc.sum(mine.column("intruders_right")).as_py()


def test_k_fraction_curve_matches_brute_force(run) -> None:
    fractions = np.array([0.0, 0.05, 0.25, 0.5, 1.0])
    counts, coverage = queries.intruders_vs_k_fraction(run, fractions, epsilon=0.5)
    assert coverage == 1.0
    rows = _tuned_rows(run)
    n = 32  # min(48, 32) for the fixture's matrices
    for model in run.models:
        for side in ("left", "right"):
            expected = [sum(1 for r in rows if r["model"] == model and r["side"] == side
                            and r["rank"] < math.ceil(f * n) and r["max_cos"] < 0.5) for f in fractions]
            assert list(counts[(model, side)]) == expected


def test_grid_and_effective_rank(run) -> None:
    grid = queries.intruder_grid(run)
    assert grid.layers == ["0", "1", "other"]
    assert grid.modules == ["q_proj", "k_proj", "lm_head"]
    lora = grid.counts["/x/lora"]
    assert np.isnan(lora[2, 0]) and np.isnan(lora[0, 2])  # lm_head has no layer; no q_proj in "other"
    assert np.nansum(lora) == queries.total_intruders(run)["/x/lora"]
    ranks = queries.effective_rank_by_layer(run)
    assert list(ranks) == ["q_proj", "k_proj"]  # lm_head has no layer index
    layers, values = ranks["q_proj"]["org/full-ft"]
    assert list(layers) == [0, 1] and np.all(values > ranks["q_proj"]["/x/lora"][1])


def test_choose_matrices_and_blocks(run) -> None:
    chosen = queries.choose_matrices(run)
    assert len(chosen) == 3 and len({c.name for c in chosen}) == 3
    assert chosen[0].reason.startswith("most intruders")
    blocks = queries.similarity_blocks(run, chosen[0].name)
    assert set(blocks) == {(m, s) for m in run.models for s in ("left", "right")}
    assert all(b.shape == (10, 10) and np.nanmax(b) <= 1.0 for b in blocks.values())
    spectrum = queries.matrix_spectrum(run, chosen[0].name)
    assert len(spectrum.base) == 32 and np.all(np.diff(spectrum.base) <= 0)
    assert set(spectrum.tuned) == set(run.models)
    assert queries.choose_matrices(run, ["lm_head.weight"])[0].reason == "requested"


def test_series_tracks_follow_intruders(make_run) -> None:
    tuned = [Tuned(f"run/checkpoint-{s}", "lora", strength=s / 400) for s in (100, 200, 400)]
    run = open_run(make_run(tuned, layers=1, modules=("q_proj",)))
    tracks = series.series_tracks(run, series.series_matrix(run, run.models), run.models)
    assert tracks.models == run.models
    assert tracks.intruder_ranks and set(tracks.intruder_ranks) <= set(tracks.ranks)
    assert tracks.max_cos.shape == tracks.sigma.shape == (3, len(tracks.ranks))
    assert np.nanmin(tracks.max_cos) < run.epsilon


def test_natural_sort_and_order_option(make_run) -> None:
    names = ["run/checkpoint-1000", "run/checkpoint-200", "run/checkpoint-30", "run/final"]
    assert sorted(names, key=natural_key) == ["run/checkpoint-30", "run/checkpoint-200",
                                             "run/checkpoint-1000", "run/final"]
    root = make_run([Tuned(n, "lora") for n in names[:3]], layers=1, modules=("q_proj",))
    assert open_run(root).models == tuple(names[:3])
    assert open_run(root, order="name").models == ("run/checkpoint-30", "run/checkpoint-200",
                                                   "run/checkpoint-1000")


@pytest.mark.parametrize("refs", [
    ["org/model-a", "org/model-b"],
    ["/scratch/a/run/checkpoint-100", "/scratch/b/run/checkpoint-100", "/scratch/a/run/checkpoint-200"],
    ["results/x.safetensors", "other/x.safetensors", "x.safetensors"],
    ["a/b", "a//b"],
    ["/very/long/" + "d" * 80 + "/checkpoint-1", "/very/long/" + "d" * 80 + "/checkpoint-2"],
])
def test_short_labels_unique(refs: list[str]) -> None:
    labels = short_labels(refs)
    assert set(labels) == set(refs)
    assert len(set(labels.values())) == len(refs)
    if refs[0].startswith("/scratch"):
        assert labels[refs[0]] == "…/a/run/checkpoint-100"


def test_slug_is_file_safe() -> None:
    assert slug("model.layers.3.self_attn.q_proj.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert "/" not in slug("encoder/layer 1:attention?") and slug("...") == "matrix"


def test_share_vs_k_denominators_and_chance_line(run) -> None:
    from lorascale.numerics.metrics import null_intruder_probability

    fractions = np.array([0.0, 0.1, 0.5, 1.0])
    examined = queries.examined_vs_k_fraction(run, fractions)
    table = run.matrices.to_pylist()
    for model in run.models:
        sizes = [min(r["rows"], r["cols"]) for r in table if r["model"] == model]
        expected = [sum(math.ceil(f * n - 1e-9) for n in sizes) for f in fractions]
        assert examined[model].tolist() == expected
        counts, _ = queries.intruders_vs_k_fraction(run, fractions, epsilon=0.5)
        for side in run.sides:
            assert np.all(counts[(model, side)] <= examined[model])
    chance = queries.null_share_vs_k_fraction(run, fractions, epsilon=0.3)
    assert set(chance) == {"left", "right"} and np.isnan(chance["left"][0])
    # All matrices of the fixture share one shape: the share is that shape's probability at every k.
    rows, cols = table[0]["rows"], table[0]["cols"]
    assert chance["left"][1:] == pytest.approx(null_intruder_probability(rows, min(rows, cols), 0.3))
    assert chance["right"][1:] == pytest.approx(null_intruder_probability(cols, min(rows, cols), 0.3))
