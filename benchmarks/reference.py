"""The reference method, as the paper's analysis is usually run: what lorascale is measured against.

For each fine-tune, on its own (one comparison per run):
- load the whole base state dict and the whole fine-tuned state dict into memory (safetensors load_file of
  every shard); for a LoRA adapter, merge it into a copy of the base state dict first (W0 + s B A, as
  peft's merge_and_unload does);
- for every linear matrix, two torch.linalg.svd calls (base and tuned, float32), |U^T U0|, max over all
  base vectors, and the intruder count among the top k at epsilon.

No cache, no sharing of the base SVD between fine-tunes, no top-K shortcut: the straightforward way.

    python benchmarks/reference.py --base DIR --tuned DIR [--tuned DIR ...] [--k 10] [--epsilon 0.5]

prints one JSON line: {"counts": {"<tuned>|<matrix>": n}, "seconds": ..., "svd_seconds": ..., "cpu_seconds": ...,
"peak_rss_mb": ...}
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_seconds, peak_rss_mb  # noqa: E402

LINEAR = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def merged_state_dict(base: dict[str, torch.Tensor], adapter_dir: Path) -> dict[str, torch.Tensor]:
    """A copy of `base` with W0 + (alpha / r) B @ A in every adapted module."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    factors = load_file(adapter_dir / "adapter_model.safetensors")
    merged = dict(base)
    for key, a in factors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        b = factors[key.replace(".lora_A.", ".lora_B.")]
        name = f"{module}.weight"
        w0 = base[name]
        merged[name] = (w0.float() + scale * (b.float() @ a.float())).to(w0.dtype)
    return merged


def intruders(w0: torch.Tensor, w: torch.Tensor, k: int, epsilon: float) -> tuple[int, float]:
    started = time.perf_counter()
    u0, _, _ = torch.linalg.svd(w0.float(), full_matrices=False)
    u, _, _ = torch.linalg.svd(w.float(), full_matrices=False)
    seconds = time.perf_counter() - started
    max_cos = (u.T @ u0).abs().max(dim=1).values  # over ALL base vectors
    return int((max_cos[:k] < epsilon).sum()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--tuned", type=Path, action="append", required=True)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--epsilon", type=float, default=0.5)
    args = parser.parse_args()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    counts, svd_seconds = {}, 0.0
    for tuned in args.tuned:
        base = load_state_dict(args.base)
        if (tuned / "adapter_config.json").exists():
            state = merged_state_dict(base, tuned)
        else:
            state = load_state_dict(tuned)
        for name in sorted(n for n in base if LINEAR.search(n)):
            count, seconds = intruders(base[name], state[name], args.k, args.epsilon)
            counts[f"{tuned}|{name}"] = count
            svd_seconds += seconds
        del base, state
    print(json.dumps({"counts": counts, "seconds": time.perf_counter() - started, "svd_seconds": svd_seconds,
                      "cpu_seconds": cpu_seconds() - cpu_started,
                      "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
