"""Peak resident memory of a lorascale run against model depth: it must not grow with the layer count.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/memory.py                               # 2 vs 8 layers, 7B shapes
    OMP_WAIT_POLICY=PASSIVE python benchmarks/memory.py --scale 0.25 --with-reference # quick, with the contrast
    OMP_WAIT_POLICY=PASSIVE python benchmarks/memory.py --layers 1 --modules mlp.gate_proj --tuned full-a,lora-r64

One synthetic checkpoint (make_synthetic_llama.py) with max(--layers) layers; each run analyses the first
N layers (--include model.layers.<i>.*) in its own process, whose peak RSS is the kernel's high-water mark
(getrusage).  lorascale holds one job's matrices (plus the one tensor read ahead), so its peak is set by
the largest matrix, not by the depth; --with-reference also runs benchmarks/reference.py, which holds whole
state dicts and grows with depth.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import command_line, machine, markdown_table, peak_rss_mb, run_measured, write_results  # noqa: E402
from make_synthetic_llama import MODULES, build  # noqa: E402


def child(args: argparse.Namespace) -> dict:
    from lorascale.api import compare  # the keyword API (request.build_request), as a notebook calls it

    include = [f"model.layers.{i}.{module}.weight" for i in range(args.run_layers) for module in args.modules]
    started = time.perf_counter()
    result = compare(str(args.data / "base"), [str(args.data / t) for t in args.tuned], args.out, mode=args.mode,
                     device="cpu", include=include, use_cache=False, overwrite=True)
    return {"seconds": time.perf_counter() - started, "matrices": result.planned, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2,8", help="comma-separated layer counts to compare")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every dimension (1 = real 7B shapes)")
    parser.add_argument("--modules", default=",".join(MODULES), help="comma-separated, e.g. mlp.gate_proj")
    parser.add_argument("--tuned", default="full-a,full-b,lora-r16,lora-r64")
    parser.add_argument("--mode", default="exact", choices=["exact", "topk"])
    parser.add_argument("--data", type=Path, default=None, help="an existing make_synthetic_llama.py output")
    parser.add_argument("--with-reference", action="store_true", help="also measure benchmarks/reference.py")
    parser.add_argument("--name", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-layers", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.modules = args.modules.split(",")
    args.tuned = args.tuned.split(",")
    if args.child:
        print(json.dumps(child(args)))
        return
    counts = [int(x) for x in args.layers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="lorascale-memory-"))
    data = args.data or work / "data"
    if not (data / "base").exists():
        build(data, layers=max(counts), scale=args.scale)
    config = json.loads((data / "base" / "config.json").read_text())
    rows, results = [], {}
    for layers in counts:
        print(f"lorascale, {layers} layer(s) ...", file=sys.stderr, flush=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--child", "--data", str(data), "--run-layers",
                   str(layers), "--modules", ",".join(args.modules), "--tuned", ",".join(args.tuned), "--mode",
                   args.mode, "--out", str(work / f"out-{layers}")]
        result = run_measured(command)
        results[f"lorascale-{layers}"] = result
        rows.append(["lorascale " + args.mode, layers, result["matrices"], result["peak_rss_mb"], result["seconds"]])
        if args.with_reference:
            print(f"reference, {layers} layer(s) ...", file=sys.stderr, flush=True)
            subset = work / f"subset-{layers}"
            _subset_links(data, subset, layers, args)
            ref = run_measured([sys.executable, str(HERE / "reference.py"), "--base", str(subset / "base"),
                                *[a for t in args.tuned for a in ("--tuned", str(subset / t))]])
            results[f"reference-{layers}"] = ref
            rows.append(["reference", layers, len(ref["counts"]) // len(args.tuned), ref["peak_rss_mb"], ref["seconds"]])
    lorascale_peaks = [results[f"lorascale-{n}"]["peak_rss_mb"] for n in counts]
    growth = max(lorascale_peaks) / min(lorascale_peaks) - 1
    shapes = f"hidden {config['hidden_size']}, intermediate {config['intermediate_size']}"
    table = (f"Peak RSS against depth ({shapes}; modules {', '.join(args.modules)}; 1 base x {len(args.tuned)} "
             f"fine-tunes: {', '.join(args.tuned)}).\n\n"
             + markdown_table(["method", "layers", "matrices", "peak RSS MB", "wall s"], rows)
             + f"\n\nlorascale peak RSS, largest vs smallest depth: {100 * growth:+.1f}%")
    payload = {"machine": machine(), "command": command_line(), "results": results, "growth": growth,
               "hidden": config["hidden_size"], "intermediate": config["intermediate_size"]}
    path = write_results(args.name or f"memory-h{config['hidden_size']}", payload, table)
    print(path.read_text())


def _subset_links(data: Path, subset: Path, layers: int, args: argparse.Namespace) -> None:
    """The reference reads whole state dicts: give it checkpoints holding only the first `layers` layers."""
    import torch
    from safetensors.torch import load_file, save_file

    keep = tuple(f"model.layers.{i}." for i in range(layers))
    for name in ("base", *args.tuned):
        target = subset / name
        target.mkdir(parents=True, exist_ok=True)
        source = data / name
        if (source / "adapter_config.json").exists():
            tensors = load_file(source / "adapter_model.safetensors")
            kept = {k: v for k, v in tensors.items() if k.removeprefix("base_model.model.").startswith(keep)
                    and any(f".{m}." in k for m in args.modules)}
            save_file(kept, target / "adapter_model.safetensors")
            (target / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
            continue
        kept: dict[str, torch.Tensor] = {}
        for shard in sorted(source.glob("*.safetensors")):
            tensors = load_file(shard)
            kept.update({k: v for k, v in tensors.items() if k.startswith(keep)
                         and any(f".{m}.weight" in k for m in args.modules)})
            del tensors
        save_file(kept, target / "model.safetensors")


if __name__ == "__main__":
    main()
