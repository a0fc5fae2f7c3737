"""The spectral measures of an update end to end (issue 25): the matrices columns, the spectra rows of role
"delta" and their sigma_ratio / angle_bound, the pairs table, on a full fine-tune, a LoRA, an rsLoRA, a DoRA
and a fan_in_fan_out (GPT-2 Conv1D) adapter, against the float64 numpy oracle of tests/numerics/test_spectral.py;
degenerate cases (dW = 0, k above the rank, one tuned model); and old results directories.

Tolerances: runs at fp64 agree with the oracle to 1e-8 (relative) wherever the quantity is well conditioned:
the amplification and the subspace overlaps need a gap after their r (k) singular values, and matrices where
that gap is below 1e-3 of sigma_max are skipped (counted, and most matrices must be checked).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import checkpoints
import lorascale
from lorascale.errors import OutputError
from lorascale.store.schema import MANIFEST, MATRICES, PAIRS, SPECTRA, UPDATE_FIELDS
from runs import compare
from test_formats import Full, Lora, OracleMatrix, oracle_matrices, read_table
from oracle import np_agreement, np_amplification, np_energy_rank, np_phi

pytestmark = pytest.mark.usefixtures("one_thread")
K = 10
NEW_COLUMNS = [f.name for f in UPDATE_FIELDS]


def _gap(s: np.ndarray, r: int) -> float:
    return (s[r - 1] - s[r]) / s[0] if r < len(s) else 1.0


def _top(x: np.ndarray, side: str, k: int) -> np.ndarray:
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u[:, :k] if side == "left" else vt[:k].T


def check_measures(out: Path, expected: dict[tuple[str, str], OracleMatrix], ranks: dict[str, int], *,
                   sides=("left",), k: int = K, rtol: float = 1e-8) -> int:
    """Every new matrices column and spectra row against the oracle; returns how many amplifications were checked."""
    matrices = {(r["model"], r["matrix"]): r for r in read_table(out, MATRICES)}
    spectra = read_table(out, SPECTRA)
    assert set(matrices) == set(expected)
    checked = 0
    for (model, name), o in expected.items():
        row = matrices[model, name]
        s_delta, s0 = np.linalg.svd(o.delta, compute_uv=False), np.linalg.svd(o.w0, compute_uv=False)
        s_w = np.linalg.svd(o.w, compute_uv=False)
        assert row["delta_rank_90"] == np_energy_rank(s_delta, 0.90), (model, name)
        assert row["delta_rank_99"] == np_energy_rank(s_delta, 0.99), (model, name)
        assert row["base_rank_90"] == np_energy_rank(s0, 0.90)
        assert row["delta_stable_rank"] == pytest.approx(np.sum(s_delta ** 2) / s_delta[0] ** 2, rel=rtol)
        assert row["tuned_stable_rank"] == pytest.approx(np.sum(s_w ** 2) / s_w[0] ** 2, rel=rtol)
        r = min(ranks[model], *o.w.shape)
        assert row["amplification_rank"] == r
        if _gap(s_delta, r) > 1e-3:
            assert row["amplification"] == pytest.approx(np_amplification(o.w0, o.delta, r), rel=1e-6), (model, name)
            checked += 1
        for side, column in (("left", "subspace_overlap"), ("right", "subspace_overlap_right")):
            if side not in sides:
                assert row[column] is None
                continue
            kk = min(k, len(s_w))
            if _gap(s_w, kk) > 1e-3 and _gap(s0, kk) > 1e-3:
                assert row[column] == pytest.approx(np_phi(_top(o.w, side, kk), _top(o.w0, side, kk)), rel=1e-6)
        delta_rows = sorted((x for x in spectra if x["model"] == model and x["matrix"] == name
                             and x["role"] == "delta" and x["side"] == sides[0]), key=lambda x: x["rank"])
        stored = np.array([x["sigma"] for x in delta_rows])
        np.testing.assert_allclose(stored, s_delta[:len(stored)], rtol=0, atol=1e-10 * s_delta[0])
        assert len(stored) == (ranks[model] if o.update == "lora" else len(s_delta))
        for x in spectra:
            if x["model"] == model and x["matrix"] == name and x["role"] == "tuned" and x["side"] == "left":
                assert x["sigma_ratio"] == pytest.approx(s_w[x["rank"]] / s0[x["argmax"]], rel=1e-8)
    for row in matrices.values():  # never NaN or inf in a non-null cell
        assert all(row[c] is None or math.isfinite(row[c]) for c in NEW_COLUMNS)
    return checked


def check_pairs(out: Path, expected: dict[tuple[str, str], OracleMatrix], *, side: str = "left", k: int = K) -> None:
    rows = [r for r in read_table(out, PAIRS) if r["side"] == side]
    models = sorted({m for m, _ in expected})
    names = {n for _, n in expected}
    assert len(rows) == len(names) * len(models) * (len(models) - 1)  # every ordered pair, both ways round
    for row in rows:
        a, b = expected[row["model_a"], row["matrix"]], expected[row["model_b"], row["matrix"]]
        sa, sb = np.linalg.svd(a.w, compute_uv=False), np.linalg.svd(b.w, compute_uv=False)
        kk = min(k, len(sa))
        if _gap(sa, kk) < 1e-3 or _gap(sb, kk) < 1e-3:
            continue
        ua, ub = _top(a.w, side, kk), _top(b.w, side, kk)
        assert row["subspace_overlap"] == pytest.approx(np_phi(ua, ub), rel=1e-6)
        if min(np.min(-np.diff(sa[:kk + 1])), np.min(-np.diff(sb[:kk + 1]))) > 1e-3 * sa[0]:
            assert row["agreement"] == pytest.approx(np_agreement(ua, ub), rel=1e-6)


def test_full_lora_and_rslora_match_the_oracle(llama, tmp_path):
    base, full, lora, rslora = llama.base["fp32"], llama.tuned["fp32"], llama.lora, llama.rslora
    tuned = {str(full): Full(full), str(lora.path): Lora(lora), str(rslora.path): Lora(rslora)}
    expected = oracle_matrices(base, tuned)
    compare(str(base), list(tuned), tmp_path / "out", device="cpu", precision="fp64", side="both")
    ranks = {str(full): 16, str(lora.path): 4, str(rslora.path): 4}
    assert check_measures(tmp_path / "out", expected, ranks, sides=("left", "right")) >= len(expected) // 2
    check_pairs(tmp_path / "out", expected, side="left")
    check_pairs(tmp_path / "out", expected, side="right")
    assert lorascale.load(tmp_path / "out").pairs.num_rows == 6 * 14 * 2  # the API exposes the pairs table
    check_summary_and_report(tmp_path / "out")


def check_summary_and_report(out: Path) -> None:
    """Summary medians (per model, and per module) are the medians of the matrices columns; the report draws
    the three figures."""
    from lorascale.report import build_report, format_summary, summary_rows

    rows = read_table(out, MATRICES)
    for by in (None, "module"):
        for summary in summary_rows(out, by=by):
            mine = [r for r in rows if r["model"] == summary["model"] and (by is None or r[by] == summary[by])]
            for key, column in (("median_delta_rank_90", "delta_rank_90"), ("median_amplification", "amplification"),
                                ("median_subspace_overlap", "subspace_overlap")):
                values = [r[column] for r in mine if r[column] is not None]
                assert summary[key] == pytest.approx(float(np.median(values))), (key, by)
    assert "median amplification" in format_summary(summary_rows(out), "table")
    index = build_report(out)
    for stem in ("energy-rank", "amplification", "pair-agreement"):
        assert (index.parent / f"{stem}.png").is_file() and stem in index.read_text()


def test_dora_and_fan_in_fan_out_match_the_oracle(llama, gpt2, tmp_path):
    from test_dora import dora_oracle

    dora = llama.dora
    compare(str(llama.base["fp32"]), [str(dora.path)], tmp_path / "dora", device="cpu", precision="fp64")
    check_measures(tmp_path / "dora", dora_oracle(llama.base["fp32"], str(dora.path), dora), {str(dora.path): 4})
    expected = oracle_matrices(gpt2.base, {str(gpt2.lora.path): Lora(gpt2.lora)})
    expected |= dora_oracle(gpt2.base, str(gpt2.dora.path), gpt2.dora)
    compare(str(gpt2.base), [str(gpt2.lora.path), str(gpt2.dora.path)], tmp_path / "gpt2", device="cpu",
            precision="fp64")
    assert check_measures(tmp_path / "gpt2", expected, {str(gpt2.lora.path): 4, str(gpt2.dora.path): 4}) > 0
    check_pairs(tmp_path / "gpt2", expected)


def test_fp32_topk_stores_values_within_the_claim_and_angle_bounds_that_hold(llama, tmp_path):
    base, lora = llama.base["fp32"], llama.lora
    expected = oracle_matrices(base, {str(lora.path): Lora(lora)})
    # angle_bound bounds the tuned vector's error; the run computes against fp16-rounded base vectors, which
    # moves max_cos by up to another 2^-11 (store/svd_cache.compact).
    compare(str(base), [str(lora.path)], tmp_path / "topk", device="cpu", top_k=40, use_cache=False)
    compare(str(base), [str(lora.path)], tmp_path / "exact", device="cpu", mode="exact", use_cache=False)
    methods = {r["matrix"]: r["method"] for r in read_table(tmp_path / "topk", MATRICES)}
    for x in read_table(tmp_path / "topk", SPECTRA):
        if x["role"] != "tuned" or x["side"] != "left":
            continue
        o = expected[x["model"], x["matrix"]].side("left")
        assert abs(x["sigma"] - o["s"][x["rank"]]) <= 1e-5 * o["s"][0]  # every stored value, not only j < k
        if methods[x["matrix"]] == "topk":
            assert x["angle_bound"] is not None or x["rank"] >= K  # the counted vectors are bounded
            if x["angle_bound"] is not None:  # null beyond k: no gap known, the bound is infinite
                assert abs(x["max_cos"] - o["max_cos"][x["rank"]]) <= x["angle_bound"] + 1e-5 + 2.0 ** -11
        else:
            assert x["angle_bound"] is None
    assert all(x["angle_bound"] is None for x in read_table(tmp_path / "exact", SPECTRA))
    assert "topk" in methods.values()


def test_zero_update_and_k_above_the_rank(llama, tmp_path):
    """dW = 0 (a full copy of the base, and a LoRA whose B is zero): ranks 0, amplification and stable rank
    null, no NaN or inf anywhere; k = 100 above every matrix's rank (exact mode)."""
    base = llama.base["fp32"]
    same = checkpoints.copy_checkpoint(base, tmp_path / "same")
    zero = checkpoints.copy_checkpoint(llama.lora.path, tmp_path / "zero-lora")
    for name in [n for n in checkpoints.load_float64(zero) if n.endswith("lora_B.weight")]:
        checkpoints.rewrite_tensor(checkpoints.weight_files(zero)[0], name, lambda x: x * 0)
    compare(str(base), [str(same), str(zero)], tmp_path / "out", device="cpu", mode="exact", k=100)
    rows = read_table(tmp_path / "out", MATRICES)
    assert rows and len({r["model"] for r in rows}) == 2
    for row in rows:
        assert row["delta_rank_90"] == row["delta_rank_99"] == 0
        assert row["delta_stable_rank"] is None and row["amplification"] is None
        assert row["base_rank_90"] > 0 and row["tuned_stable_rank"] > 0
        # W = W0, all min(m, n) < k vectors; against the cache's fp16-rounded base vectors phi moves by < 2^-11
        assert row["subspace_overlap"] == pytest.approx(1.0, abs=2.0 ** -11)
        assert all(row[c] is None or math.isfinite(row[c]) for c in NEW_COLUMNS)
    for x in read_table(tmp_path / "out", SPECTRA):
        assert all(x[c] is None or math.isfinite(x[c]) for c in ("sigma", "max_cos", "sigma_ratio"))
    pairs = read_table(tmp_path / "out", PAIRS)
    assert pairs and all(r["subspace_overlap"] == pytest.approx(1.0) for r in pairs)  # both are W0


def test_one_tuned_model_has_no_pairs_rows_and_an_old_run_resumes_without_recomputing(llama, tmp_path):
    base, lora = llama.base["fp32"], llama.lora
    out = tmp_path / "out"
    compare(str(base), [str(lora.path)], out, device="cpu")
    assert not (out / PAIRS).exists() and lorascale.load(out).pairs.num_rows == 0  # not an error
    manifest = json.loads((out / MANIFEST).read_text())
    assert "amplification_rank" not in manifest["options"]  # the default leaves the run identity as it was
    # Make it a run written before issue 25: no new columns, no delta rows.
    for table, drop in ((MATRICES, NEW_COLUMNS), (SPECTRA, ["sigma_ratio", "angle_bound"])):
        for part in (out / table).glob("part-*.parquet"):
            old = pq.read_table(part)
            if table == SPECTRA:
                old = old.filter(ds.field("role") != "delta")
            pq.write_table(old.drop_columns(drop), part)
    result = compare(str(base), [str(lora.path)], out, device="cpu")
    assert result.computed == 0 and result.planned > 0
    loaded = lorascale.load(out)
    assert loaded.matrices.column("amplification").null_count == loaded.matrices.num_rows  # old rows read as null
    with pytest.raises(OutputError, match="different run"):  # another r: other numbers, another run
        compare(str(base), [str(lora.path)], out, device="cpu", amplification_rank=8)


def test_amplification_rank_option_applies_to_full_fine_tunes(llama, tmp_path):
    from lorascale.cli.flags import command_line
    from lorascale.request import build_request

    base, full, lora = llama.base["fp32"], llama.tuned["fp32"], llama.lora
    compare(str(base), [str(full), str(lora.path)], tmp_path / "out", device="cpu", amplification_rank=3,
            include=("*.q_proj.weight",))
    ranks = {r["model"]: r["amplification_rank"] for r in read_table(tmp_path / "out", MATRICES)}
    assert ranks == {str(full): 3, str(lora.path): 4}  # an adapter keeps its own rank
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["options"]["amplification_rank"] == 3
    request = build_request("b", "t", "o", amplification_rank=3)
    assert "--amplification-rank 3" in command_line(request)
    shutil.rmtree(tmp_path / "out")
