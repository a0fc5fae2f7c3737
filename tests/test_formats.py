"""Every checkpoint format against the float64 numpy oracle (tests/oracle.py), and the output contract.

The oracle reads the same files with safetensors itself, upcasts them exactly to float64 and rebuilds W
from docs/METHOD.md (for adapters W = W0 + s * B @ A with s taken from peft's own live LoraLayer.scaling, so
the scale rule - alpha/r, alpha/sqrt(r), rank/alpha patterns - is checked against peft, not against a
copy of lorascale's rule).

Tolerances: singular values to 1e-5 * sigma_max (fp32) or 1e-10 * sigma_max (fp64).  A singular vector is
only as well defined as the gap to its neighbours, so quantities built from vectors (max_cos, similarity
block) are compared with `C * unit roundoff * sigma_max / gap` (Wedin's bound, C = 10), using the gaps the
oracle finds; each test also checks that those tolerances are tight for most entries (so it cannot pass
vacuously).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.dataset as ds
import pytest

import checkpoints
import oracle
from lorascale import __version__
from runs import compare
from lorascale.store.schema import MANIFEST, MATRICES, SCHEMAS, SIMILARITY, SPECTRA, TABLES

UNIT = {"fp32": 2.0 ** -24, "fp64": 2.0 ** -53}
SIGMA_TOL = {"fp32": 1e-5, "fp64": 1e-10}
DELTA_TOL = {"fp32": 1e-5, "fp64": 1e-10}  # relative, for delta_fro / delta_rel / delta_effective_rank
C = 10.0
K = 10

pytestmark = pytest.mark.usefixtures("one_thread")


# --- The oracle side --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Full:
    path: Path


@dataclass(frozen=True)
class Lora:
    adapter: checkpoints.Adapter


@dataclass
class OracleMatrix:
    w0: np.ndarray
    w: np.ndarray
    delta: np.ndarray
    update: str

    def side(self, side: str):
        s, mc, argmax, block = oracle.max_cos(self.w0, self.w, side)
        u, _, vt = np.linalg.svd(self.w, full_matrices=False)
        u0, s0, vt0 = np.linalg.svd(self.w0, full_matrices=False)
        vectors, base_vectors = (u, u0) if side == "left" else (vt.T, vt0.T)
        sim = np.abs(vectors.T @ base_vectors)
        second = np.sort(sim, axis=1)[:, -2] if sim.shape[1] > 1 else np.zeros(len(s))
        m, n = self.w.shape
        complement = m > n if side == "left" else n > m
        return {"s": s, "s0": s0, "max_cos": mc, "argmax": argmax, "block": block, "second": second,
                "gap": oracle.singular_value_gaps(s, complement), "gap0": oracle.singular_value_gaps(s0, complement)}


def oracle_matrices(base_dir: Path, tuned: dict[str, Full | Lora]) -> dict[tuple[str, str], OracleMatrix]:
    """(model reference, base matrix name) -> float64 W0, W, dW for every matrix a run should analyse."""
    base = checkpoints.load_float64(base_dir)
    expected: dict[tuple[str, str], OracleMatrix] = {}
    for reference, source in tuned.items():
        if isinstance(source, Full):
            tensors = checkpoints.load_float64(source.path)
            for name, w in tensors.items():
                if w.ndim == 2 and (".layers." in name or ".h." in name):
                    expected[reference, name] = OracleMatrix(base[name], w, w - base[name], "full")
        else:
            tensors = checkpoints.load_float64(source.adapter.path)
            for module in source.adapter.scaling:
                name = f"{module}.weight"
                delta = checkpoints.lora_delta(source.adapter, module, tensors)
                expected[reference, name] = OracleMatrix(base[name], base[name] + delta, delta, "lora")
    return expected


# --- Reading the run --------------------------------------------------------------------------------------------


def read_table(out: Path, table: str) -> list[dict]:
    return ds.dataset(Path(out) / table, format="parquet").to_table().to_pylist()


def by_key(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    grouped: dict[tuple, list[dict]] = {}
    for row in rows:
        grouped.setdefault(tuple(row[k] for k in keys), []).append(row)
    return grouped


def erank_sensitivity(s: np.ndarray, error: float) -> float:
    """Relative change of exp(entropy(s / sum s)) when every singular value moves by up to `error`:
    |d entropy| <= sum_i |dp_i| (1 + |ln p_i|), with |dp_i| <= 2 error / sum s."""
    total = s.sum()
    p = np.maximum(s / total, error / total)
    return float(np.sum(2 * error / total * (1 + np.abs(np.log(p)))))


def intruder_bounds(max_cos: np.ndarray, tol: np.ndarray, k: int, epsilon: float) -> tuple[int, int]:
    """The intruder counts compatible with max_cos known to +- tol: equal bounds when no value is near epsilon."""
    top, t = max_cos[:k], tol[:k]
    return int((top < epsilon - t).sum()), int((top < epsilon + t).sum())


def check_run(out: Path, base_ref: str, expected: dict[tuple[str, str], OracleMatrix], *, sides=("left",),
              k: int = K, epsilon: float = 0.5, precision: str = "fp32", strict_intruders: bool = False) -> dict:
    """Assert every number of the run's three tables against the oracle; return tolerance statistics."""
    unit, sigma_tol, delta_tol = UNIT[precision], SIGMA_TOL[precision], DELTA_TOL[precision]
    matrices = by_key(read_table(out, MATRICES), "model", "matrix")
    spectra = by_key(read_table(out, SPECTRA), "model", "role", "matrix", "side")
    similarity = by_key(read_table(out, SIMILARITY), "model", "matrix", "side")
    assert set(matrices) == set(expected), "the run analysed other (model, matrix) pairs than expected"
    vector_tols, exact_intruders = [], 0
    for (model, name), want in expected.items():
        (row,) = matrices[model, name]
        assert row["update"] == want.update
        assert (row["rows"], row["cols"]) == want.w0.shape
        fro = float(np.linalg.norm(want.delta))
        assert row["delta_fro"] == pytest.approx(fro, rel=delta_tol)
        assert row["delta_rel"] == pytest.approx(fro / np.linalg.norm(want.w0), rel=delta_tol)
        s_delta = np.linalg.svd(want.delta, compute_uv=False)
        if want.update == "lora":  # exactly rank r (from the r x r core): drop float64 round-off values
            s_delta = s_delta[s_delta > 1e-12 * s_delta[0]]
            erank_tol = delta_tol
        else:  # svdvals(W - W0) has absolute errors ~ unit * ||dW||_2 on every value, tiny ones included
            erank_tol = delta_tol + erank_sensitivity(s_delta, C * unit * s_delta[0])
        assert row["delta_effective_rank"] == pytest.approx(oracle.effective_rank(s_delta), rel=erank_tol)
        for index, side in enumerate(sides):
            o = want.side(side)
            p = len(o["s"])
            # Base rows: the base reference, role base, sigma of W0, no max_cos/argmax.
            base_rows = sorted(spectra[base_ref, "base", name, side], key=lambda r: r["rank"])
            assert [r["rank"] for r in base_rows] == list(range(p))
            np.testing.assert_allclose([r["sigma"] for r in base_rows], o["s0"], rtol=0, atol=sigma_tol * o["s0"][0])
            assert all(r["max_cos"] is None and r["argmax"] is None for r in base_rows)
            # Tuned rows.
            rows = sorted(spectra[model, "tuned", name, side], key=lambda r: r["rank"])
            assert [r["rank"] for r in rows] == list(range(p))
            np.testing.assert_allclose([r["sigma"] for r in rows], o["s"], rtol=0, atol=sigma_tol * o["s"][0])
            got_mc = np.array([r["max_cos"] for r in rows])
            # fp32 runs compute with fp16-rounded base vectors (store/svd_cache.compact): |cos| moves by about
            # 2^-11 / sqrt(m) for spread-out vectors (4x that, and m >= p, as margin)
            rounding = 4 * 2.0 ** -11 / np.sqrt(p) if unit == UNIT["fp32"] else 0.0
            tol = C * unit * (o["s"][0] / o["gap"] + o["s0"][0] / o["gap0"].min()) + rounding
            vector_tols.append(tol)
            np.testing.assert_array_less(np.abs(got_mc - o["max_cos"]), tol + 1e-12,
                                         err_msg=f"max_cos of {model} {name} ({side})")
            clear = (o["max_cos"] - o["second"]) > 2 * tol  # argmax only where the maximum is unambiguous
            got_arg = np.array([r["argmax"] for r in rows])
            np.testing.assert_array_equal(got_arg[clear], o["argmax"][clear])
            # Similarity block: min(10, p) x min(10, p), |cos(tuned_j, base_i)|.
            b = min(10, p)
            cells = similarity[model, name, side]
            assert len(cells) == b * b
            block = np.full((b, b), np.nan)
            for cell in cells:
                block[cell["tuned_rank"], cell["base_rank"]] = cell["cos"]
            cell_tol = C * unit * (o["s"][0] / o["gap"][:b, None] + o["s0"][0] / o["gap0"][None, :b]) + rounding
            np.testing.assert_array_less(np.abs(block - o["block"]), cell_tol + 1e-12,
                                         err_msg=f"similarity block of {model} {name} ({side})")
            if index == 0:  # the matrices table counts intruders on the first side
                lo, hi = intruder_bounds(o["max_cos"], tol, k, epsilon)
                assert lo <= row["intruders"] <= hi, f"intruders of {model} {name}"
                if lo == hi:
                    exact_intruders += 1
                    assert row["intruders"] == oracle.intruders(want.w0, want.w, k, epsilon, side)
    if strict_intruders:
        assert exact_intruders == len(expected)
    tols = np.concatenate(vector_tols)
    # Not vacuous: the tolerance is tight (< 1e-3 in fp32) for most vectors.
    assert np.median(tols) < (1e-3 if precision == "fp32" else 1e-10)
    return {"median_tol": float(np.median(tols)), "exact_intruders": exact_intruders}


def safe_epsilon(expected: dict[tuple[str, str], OracleMatrix], *, k: int = K, side: str = "left",
                 lo: float = 0.35, hi: float = 0.65) -> float:
    """An epsilon in [lo, hi] as far as possible from every oracle max_cos of the top-k vectors, so that every
    intruder count of the run is well defined and can be compared exactly."""
    values = np.sort(np.concatenate([m.side(side)["max_cos"][:k] for m in expected.values()]))
    candidates = np.linspace(lo, hi, 601)
    margin = np.min(np.abs(candidates[:, None] - values[None, :]), axis=1)
    best = int(np.argmax(margin))
    assert margin[best] > 2e-3, "fixture: no epsilon with a clear margin"
    return float(candidates[best])


# --- Formats ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_sharded_full_and_lora_match_oracle(llama, tmp_path, dtype):
    base, full, lora = llama.base[dtype], llama.tuned[dtype], llama.lora
    assert len(list(base.glob("model-0000*-of-0000*.safetensors"))) >= 2  # really sharded
    assert (base / "model.safetensors.index.json").is_file()
    tuned = {str(full): Full(full), str(lora.path): Lora(lora)}
    expected = oracle_matrices(base, tuned)
    epsilon = safe_epsilon(expected)
    compare(str(base), list(tuned), tmp_path / "out", epsilon=epsilon, device="cpu")
    stats = check_run(tmp_path / "out", str(base), expected, epsilon=epsilon, strict_intruders=True)
    counts = {u: sum(r["intruders"] for r in read_table(tmp_path / "out", MATRICES) if r["update"] == u)
              for u in ("full", "lora")}
    assert counts["full"] == 0 and counts["lora"] > 0, counts  # the fixture shows the paper's effect
    assert stats["median_tol"] < 1e-3


def test_rslora_and_rank_alpha_patterns_match_oracle(llama, tmp_path):
    rslora, pattern = llama.rslora, llama.pattern
    # peft's own scales, which the oracle uses: alpha/sqrt(r) for rsLoRA, pattern overrides otherwise.
    assert set(rslora.scaling.values()) == {8 / 4 ** 0.5}
    assert pattern.scaling["model.layers.0.self_attn.q_proj"] == pytest.approx(8 / 2)
    assert pattern.scaling["model.layers.0.self_attn.v_proj"] == pytest.approx(3 / 4)
    assert pattern.scaling["model.layers.0.mlp.down_proj"] == pytest.approx(8 / 4)
    assert pattern.scaling["model.layers.1.mlp.down_proj"] == pytest.approx(8 / 6)
    assert pattern.ranks["model.layers.1.mlp.down_proj"] == 6
    base = llama.base["fp32"]
    tuned = {str(rslora.path): Lora(rslora), str(pattern.path): Lora(pattern)}
    expected = oracle_matrices(base, tuned)
    compare(str(base), list(tuned), tmp_path / "out", device="cpu")
    check_run(tmp_path / "out", str(base), expected)


def test_gpt2_conv1d_fan_in_fan_out_matches_oracle_and_peft_merge(gpt2, tmp_path):
    lora = gpt2.lora
    assert lora.fan_in_fan_out
    merged = lora.merged(tmp_path / "merged")
    tuned = {str(lora.path): Lora(lora)}
    expected = oracle_matrices(gpt2.base, tuned)
    # The oracle's merge (transposed for Conv1D) is peft's merge_and_unload.
    peft_merged = checkpoints.load_float64(merged)
    for (_, name), want in expected.items():
        np.testing.assert_allclose(peft_merged[name], want.w, rtol=0, atol=1e-6)
    compare(str(gpt2.base), [str(lora.path), str(merged)], tmp_path / "out", device="cpu")
    check_run(tmp_path / "out", str(gpt2.base),
              {k: v for k, v in expected.items()} | {(str(merged), name): OracleMatrix(
                  m.w0, peft_merged[name], peft_merged[name] - m.w0, "full") for (_, name), m in expected.items()})
    matrices = {r["matrix"]: r for r in read_table(tmp_path / "out", MATRICES) if r["model"] == str(lora.path)}
    assert matrices["transformer.h.0.attn.c_attn.weight"]["rows"] == 64  # stored [in, out]
    assert matrices["transformer.h.0.attn.c_attn.weight"]["cols"] == 192
    assert {r["module"] for r in matrices.values()} == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}


def test_fp64_precision_matches_oracle_tightly(llama, tmp_path):
    base, full, lora = llama.base["bf16"], llama.tuned["bf16"], llama.lora
    tuned = {str(full): Full(full), str(lora.path): Lora(lora)}
    expected = oracle_matrices(base, tuned)
    compare(str(base), list(tuned), tmp_path / "out", precision="fp64", device="cpu")
    check_run(tmp_path / "out", str(base), expected, precision="fp64")
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["precision"] == "fp64"


@pytest.mark.parametrize("side, sides", [("right", ("right",)), ("both", ("left", "right"))])
def test_sides_match_oracle(llama, tmp_path, side, sides):
    base, full, lora = llama.base["fp16"], llama.tuned["fp16"], llama.lora
    tuned = {str(full): Full(full), str(lora.path): Lora(lora)}
    expected = oracle_matrices(base, tuned)
    compare(str(base), list(tuned), tmp_path / "out", side=side, device="cpu")
    check_run(tmp_path / "out", str(base), expected, sides=sides)
    assert {r["side"] for r in read_table(tmp_path / "out", SPECTRA)} == set(sides)
    assert {r["side"] for r in read_table(tmp_path / "out", SIMILARITY)} == set(sides)


def test_on_the_fly_merge_equals_peft_merge_and_unload(llama, tmp_path):
    """The adapter and peft's merge_and_unload() of it, as a full checkpoint, give the same spectra."""
    base, lora = llama.base["fp32"], llama.lora
    merged = lora.merged(tmp_path / "merged", max_shard_size="150KB")
    adapter_ref, merged_ref = str(lora.path), str(merged)
    compare(str(base), [adapter_ref, merged_ref], tmp_path / "out", device="cpu")
    matrices = by_key(read_table(tmp_path / "out", MATRICES), "model", "matrix")
    tuned_rows = [r for r in read_table(tmp_path / "out", SPECTRA) if r["role"] == "tuned"]  # not dW's values
    spectra = by_key(tuned_rows, "model", "matrix")
    names = {m for (model, m) in matrices if model == adapter_ref}
    assert names == {m for (model, m) in matrices if model == merged_ref} and len(names) == 14
    expected = oracle_matrices(base, {adapter_ref: Lora(lora)})
    for name in names:
        a, m = matrices[adapter_ref, name][0], matrices[merged_ref, name][0]
        assert (a["update"], m["update"]) == ("lora", "full")
        assert a["delta_fro"] == pytest.approx(m["delta_fro"], rel=1e-5)
        assert a["delta_effective_rank"] == pytest.approx(m["delta_effective_rank"], rel=1e-3)
        sa = sorted(spectra[adapter_ref, name], key=lambda r: r["rank"])
        sm = sorted(spectra[merged_ref, name], key=lambda r: r["rank"])
        sigma = np.array([r["sigma"] for r in sa])
        np.testing.assert_allclose([r["sigma"] for r in sm], sigma, rtol=0, atol=1e-5 * sigma[0])
        o = expected[adapter_ref, name].side("left")
        tol = 2 * C * UNIT["fp32"] * (o["s"][0] / o["gap"] + o["s0"][0] / o["gap0"].min())
        np.testing.assert_array_less(np.abs(np.array([r["max_cos"] for r in sa])
                                            - np.array([r["max_cos"] for r in sm])), tol + 1e-12)
        lo, hi = intruder_bounds(o["max_cos"], tol, K, 0.5)
        if lo == hi:
            assert a["intruders"] == m["intruders"] == lo


def test_matrices_smaller_than_the_block(tmp_path):
    """p < 10: the similarity block is min(10, p) square, spectra have p rows, intruders count the top min(k, p)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(11)
    base = {"model.layers.0.a.weight": checkpoints.separated(6, 16, gen),
            "model.layers.0.b.weight": checkpoints.separated(16, 4, gen),
            "model.layers.0.c.weight": checkpoints.separated(12, 12, gen)}
    tuned = {n: w + 0.3 * torch.randn(w.shape, generator=gen, dtype=torch.float64) for n, w in base.items()}
    for name, tensors in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        save_file({n: w.float().contiguous() for n, w in tensors.items()}, str(tmp_path / name / "model.safetensors"))
    expected = oracle_matrices(tmp_path / "base", {str(tmp_path / "tuned"): Full(tmp_path / "tuned")})
    compare(str(tmp_path / "base"), [str(tmp_path / "tuned")], tmp_path / "out", side="both", device="cpu")
    check_run(tmp_path / "out", str(tmp_path / "base"), expected, sides=("left", "right"))
    blocks = by_key(read_table(tmp_path / "out", SIMILARITY), "matrix", "side")
    assert len(blocks["model.layers.0.a.weight", "left"]) == 36 and len(blocks["model.layers.0.b.weight", "right"]) == 16
    assert len(blocks["model.layers.0.c.weight", "left"]) == 100


# --- Output contract --------------------------------------------------------------------------------------------


def test_output_contract(llama, tmp_path, monkeypatch):
    """Readable by pyarrow, DuckDB and polars; exact schemas; references verbatim; manifest; selection."""
    monkeypatch.chdir(llama.base["fp32"].parent)
    base_ref, full_ref, lora_ref = "base-bf16", "./tuned-bf16/", str(llama.lora.path)  # as a user types them
    out = tmp_path / "out"
    compare(base_ref, [full_ref, lora_ref], out, device="cpu")

    for table in TABLES:
        dataset = ds.dataset(out / table)  # exactly as a user would open it
        schema = dataset.schema.remove_metadata()
        assert schema.names == SCHEMAS[table].names
        assert [f.type for f in schema] == [f.type for f in SCHEMAS[table]]
        assert [f.nullable for f in schema] == [f.nullable for f in SCHEMAS[table]]
        rows = dataset.count_rows()
        assert rows > 0
        con = duckdb.connect()
        assert con.execute(f"SELECT count(*) FROM read_parquet('{out}/{table}/*.parquet')").fetchone()[0] == rows
        assert pl.scan_parquet(out / table / "*.parquet").select(pl.len()).collect().item() == rows
        assert pl.scan_parquet(out / table / "*.parquet").collect_schema().names() == SCHEMAS[table].names

    matrices = read_table(out, MATRICES)
    spectra = read_table(out, SPECTRA)
    assert {r["model"] for r in matrices} == {full_ref, lora_ref}
    assert {r["model"] for r in spectra if r["role"] == "tuned"} == {full_ref, lora_ref}
    base_rows = [r for r in spectra if r["model"] == base_ref]
    assert base_rows and all(r["role"] == "base" and r["max_cos"] is None and r["argmax"] is None
                             for r in base_rows)
    assert {r["role"] for r in spectra if r["model"] != base_ref} == {"tuned", "delta"}  # delta: dW (issue 25)
    assert {r["model"] for r in read_table(out, SIMILARITY)} == {full_ref, lora_ref}
    # Default selection: the 14 layer matrices, no embeddings or head.
    names = {r["matrix"] for r in matrices}
    assert len(names) == 14 and not any("embed" in n or "lm_head" in n for n in names)
    assert {r["module"] for r in matrices} == set(checkpoints.LLAMA_MODULES)
    assert {r["layer"] for r in matrices} == {0, 1}

    # Intruder counts from a plain SQL query on spectra equal the matrices table's.
    con = duckdb.connect()
    sql = f"""
        SELECT s.model, s.matrix, count(*) FILTER (WHERE s.rank < 10 AND s.max_cos < 0.5) AS n, any_value(m.intruders)
        FROM read_parquet('{out}/spectra/*.parquet') s
        JOIN read_parquet('{out}/matrices/*.parquet') m USING (model, matrix)
        WHERE s.role = 'tuned' AND s.side = 'left' GROUP BY s.model, s.matrix"""
    pairs = con.execute(sql).fetchall()
    assert len(pairs) == len(matrices) and all(n == intruders for _, _, n, intruders in pairs)

    manifest = json.loads((out / MANIFEST).read_text())
    for key in ("lorascale_version", "command", "options", "base", "tuned", "skipped", "device", "precision",
                "started", "finished", "status"):
        assert key in manifest, key
    assert manifest["status"] == "complete"
    assert manifest["lorascale_version"] == __version__
    assert manifest["device"] == "cpu" and manifest["precision"] == "fp32"
    assert manifest["options"]["k"] == 10 and manifest["options"]["epsilon"] == 0.5
    assert manifest["base"]["reference"] == base_ref and manifest["base"]["kind"] == "full"
    assert [t["reference"] for t in manifest["tuned"]] == [full_ref, lora_ref]
    assert [t["kind"] for t in manifest["tuned"]] == ["full", "lora"]
    assert len(manifest["base"]["files"]) == len(list(llama.base["bf16"].glob("model-*.safetensors")))
    skipped = {(s["matrix"], s["model"]): s["reason"] for s in manifest["skipped"]}
    skipped_names = {m for m, _ in skipped}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= skipped_names
    assert not any("norm" in m for m in skipped_names)  # 1-D: not matrices, so not "skipped matrices"
    assert not skipped_names & names


def test_include_and_exclude(llama, tmp_path):
    base, full = str(llama.base["fp32"]), str(llama.tuned["fp32"])
    compare(base, [full], tmp_path / "a", exclude=["*mlp*"], device="cpu")
    names = {r["matrix"] for r in read_table(tmp_path / "a", MATRICES)}
    assert names and not any(".mlp." in n for n in names) and len(names) == 8
    skipped = {s["matrix"] for s in json.loads((tmp_path / "a" / MANIFEST).read_text())["skipped"]}
    assert "model.layers.0.mlp.down_proj.weight" in skipped

    compare(base, [full], tmp_path / "b", include=["*embed_tokens*", "*layers.1.self_attn.q_proj*"], device="cpu")
    names = {r["matrix"] for r in read_table(tmp_path / "b", MATRICES)}
    assert names == {"model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight"}

    compare(base, [full], tmp_path / "c", include=["*q_proj*"], exclude=["*layers.0.*"], device="cpu")
    assert {r["matrix"] for r in read_table(tmp_path / "c", MATRICES)} == {"model.layers.1.self_attn.q_proj.weight"}


# --- Hub path ---------------------------------------------------------------------------------------------------


def test_hub_end_to_end(llama, offline_hub, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from hubcache import make_hub_cache
    from lorascale.cli import main

    base_dir, lora = llama.base["bf16"], llama.lora
    base_commit = make_hub_cache(offline_hub, "org/base", {p.name: p for p in base_dir.iterdir() if p.is_file()})
    adapter_commit = make_hub_cache(offline_hub, "org/adapter",
                                    {p.name: p for p in lora.path.iterdir() if p.is_file()})
    secret = "hf_FAKEtokenNEVERtoBEwritten0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)

    hub_out, local_out = tmp_path / "hub", tmp_path / "local"
    compare("org/base", ["org/adapter@main"], hub_out, device="cpu")
    compare(str(base_dir), [str(lora.path)], local_out, device="cpu")

    manifest = json.loads((hub_out / MANIFEST).read_text())
    assert manifest["status"] == "complete"
    assert manifest["base"]["source"] == "hub" and manifest["base"]["repo_id"] == "org/base"
    assert manifest["base"]["revision"] == base_commit
    (tuned,) = manifest["tuned"]
    assert tuned["reference"] == "org/adapter@main" and tuned["repo_id"] == "org/adapter"
    assert tuned["revision"] == adapter_commit and tuned["kind"] == "lora"
    assert {r["model"] for r in read_table(hub_out, MATRICES)} == {"org/adapter@main"}
    assert {r["model"] for r in read_table(hub_out, SPECTRA) if r["role"] == "base"} == {"org/base"}

    # Same numbers as the local-directory run (same files, same code path).
    def numbers(out: Path, table: str, keys: tuple[str, ...], values: tuple[str, ...]) -> dict:
        rename = {"org/base": "BASE", str(base_dir): "BASE", "org/adapter@main": "T", str(lora.path): "T"}
        return {tuple(rename.get(r[k], r[k]) for k in keys): tuple(r[v] for v in values)
                for r in read_table(out, table)}

    for table, keys, values in ((MATRICES, ("model", "matrix"), ("delta_fro", "delta_effective_rank", "intruders")),
                                (SPECTRA, ("model", "role", "matrix", "side", "rank"), ("sigma", "max_cos", "argmax")),
                                (SIMILARITY, ("model", "matrix", "side", "tuned_rank", "base_rank"), ("cos",))):
        hub_numbers, local_numbers = numbers(hub_out, table, keys, values), numbers(local_out, table, keys, values)
        assert hub_numbers.keys() == local_numbers.keys()
        for key, value in hub_numbers.items():
            want = local_numbers[key]
            assert [v is None for v in value] == [v is None for v in want], (table, key)
            assert [v for v in value if v is not None] == pytest.approx(
                [v for v in want if v is not None], rel=1e-9, abs=1e-12), (table, key)

    # The CLI, too; the token appears nowhere in what lorascale prints or writes.
    result = CliRunner().invoke(main, ["run", "--base", "org/base", "--tuned", "org/adapter@main",
                                       "--out", str(tmp_path / "cli"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for out in (hub_out, tmp_path / "cli"):
        for path in out.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    assert secret not in result.stdout and secret not in result.stderr
    missing = CliRunner().invoke(main, ["run", "--base", "org/base", "--tuned", "org/missing",
                                        "--out", str(tmp_path / "miss")])
    # Not in the offline cache: a bad reference (README "Errors": 2).
    assert missing.exit_code == 2, missing.output
    assert secret not in missing.output + missing.stderr
    assert not (tmp_path / "miss").exists()
