"""`lorascale mitigate` on a real model: what lambda trades (the README's before/after table).

    nice -n 10 python benchmarks/mitigation.py                 # seed 0, lambda 1 0.75 0.5 0.25 0
    nice -n 10 python benchmarks/mitigation.py --seeds 0-3 --name mitigation-seeds

For each seed the packaged all-MiniLM-L6-v2 is fine-tuned with the reproduction test's rank-1 LoRA
(tests/minilm_finetune.py), then mitigated at each lambda with the default --rank r+intruders and with
--rank r (peft's choice), k = 10, epsilon = 0.5, on the 36 adapted encoder matrices.  Per result: intruders
before and after (summed), the mean ||dW'|| / ||dW||, the largest error of the written adapter against W',
the held-out task accuracy (the fine-tune's test split, with its trained head), and the mean cosine distance
of sentence embeddings to the base's on sentences unlike the task (minilm_finetune.GENERAL_SENTENCES): the
forgetting the paper's Section 6 says mitigation undoes.  lambda 1 is the adapter as trained.

Results: results/<name>.json and results/<name>.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import command_line, machine, markdown_table, write_results  # noqa: E402
from minilm_seeds import _seeds  # noqa: E402

K, EPSILON = 10, 0.5
LAMBDAS = (1.0, 0.75, 0.5, 0.25, 0.0)
RANKS = ("r+intruders", "r")


def one_seed(seed: int, root: Path, cache_dir: Path, lambdas: tuple[float, ...]) -> dict:
    from minilm_finetune import base_model_dir, embedding_distance, finetune, sentence_embeddings, task_accuracy

    import lorascale

    lora = finetune(root / f"lora-{seed}", "lora", seed=seed)
    base_embeddings = sentence_embeddings(None)
    tuned_distance = embedding_distance(base_embeddings, sentence_embeddings(lora.out_dir))
    rows = []
    for rank in RANKS:
        for lam in lambdas:
            out = root / f"mitigated-{seed}-{rank}-{lam}"
            started = time.perf_counter()
            result = lorascale.mitigate(str(base_model_dir()), str(lora.out_dir), out, k=K, epsilon=EPSILON,
                                        mitigation_lambda=lam, rank=rank, cache_dir=cache_dir,
                                        include=("encoder.layer.*",))
            seconds = time.perf_counter() - started
            summary = result.summary
            rows.append({
                "seed": seed, "rank": rank, "lambda": lam, "seconds": seconds,
                "intruders_before": summary["intruders_before"], "intruders_after": summary["intruders_after"],
                "mitigated": summary["mitigated"], "matrices": summary["matrices"],
                "mean_delta_ratio": summary["mean_delta_ratio"], "max_relative_error": summary["max_relative_error"],
                "accuracy": task_accuracy(result.adapter),
                "embedding_distance": embedding_distance(base_embeddings, sentence_embeddings(result.adapter)),
            })
            print(f"seed {seed} rank {rank} lambda {lam}: {rows[-1]}", flush=True)
    return {"seed": seed, "accuracy_tuned": lora.accuracy, "embedding_distance_tuned": tuned_distance, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0", help="'0-3' or '0,2' (default 0)")
    parser.add_argument("--lambdas", default=",".join(f"{x:g}" for x in LAMBDAS))
    parser.add_argument("--name", default="mitigation", help="results/<name>.json and .md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    lambdas = tuple(float(x) for x in args.lambdas.split(","))
    payload: dict = {"command": command_line(), "machine": machine(), "k": K, "epsilon": EPSILON, "seeds": []}
    with tempfile.TemporaryDirectory(prefix="mitigation-") as scratch:
        for seed in _seeds(args.seeds):
            payload["seeds"].append(one_seed(seed, Path(scratch), Path(scratch) / "svd-cache", lambdas))
            write_results(args.name, payload, _table(payload))
    print(_table(payload))


def _table(payload: dict) -> str:
    header = ["seed", "--rank", "lambda", "intruders before -> after", "mean ‖dW'‖/‖dW‖", "max error vs W'",
              "task accuracy", "embedding distance to base"]
    rows = []
    for seed in payload["seeds"]:
        for r in seed["rows"]:
            error = "" if r["max_relative_error"] is None else f"{r['max_relative_error']:.1e}"
            ratio = "" if r["mean_delta_ratio"] is None else f"{r['mean_delta_ratio']:.3f}"
            rows.append([seed["seed"], r["rank"], f"{r['lambda']:g}", f"{r['intruders_before']} -> {r['intruders_after']}",
                         ratio, error, f"{r['accuracy']:.3f}", f"{r['embedding_distance']:.4f}"])
    tuned = "; ".join(f"seed {s['seed']}: accuracy {s['accuracy_tuned']:.3f}, distance {s['embedding_distance_tuned']:.4f}"
                      for s in payload["seeds"])
    return (f"lorascale mitigate on the MiniLM rank-1 LoRA, k = {payload['k']}, epsilon = {payload['epsilon']}, "
            f"36 adapted matrices; the adapter as trained: {tuned}.  Embedding distance: mean 1 - cos to the base's "
            "sentence embeddings on sentences unlike the task.\n\n" + markdown_table(header, rows))


if __name__ == "__main__":
    main()
