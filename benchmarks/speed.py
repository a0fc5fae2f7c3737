"""Speed at real Llama-2-7B shapes: lorascale per mode against the reference loop, and the floor per quantity.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/speed.py [--repeats 2] [--work /tmp/lorascale-speed]
    python benchmarks/speed.py --render            # rewrite results/speed.md from results/speed.json
    python benchmarks/speed.py --scale 0.125 --repeats 1 --name speed-quick   # a small smoke run

Data: one synthetic Llama-2-7B layer (benchmarks/make_synthetic_llama.py: fp16 base, full fine-tune full-a,
LoRA r16 adapter lora-r16; weight-like spectra).  Three matrices are measured, one per shape: q_proj
(4096 x 4096), gate_proj (11008 x 4096), down_proj (4096 x 11008); a layer is 4 q-shaped + 2 gate-shaped +
1 down-shaped matrices, so per-layer figures are 4 t(q) + 2 t(gate) + t(down).  Side by side in one run,
`--repeats` times each (the table shows the mean; the JSON every run):

- the reference loop (reference.py's method, per matrix): read both matrices, merge an adapter, two
  torch.linalg.svd (base and tuned), |U^T U0| over all base vectors, the count among the top k;
- lorascale through `lorascale.compare` (reading, planning, the Parquet tables and the manifest included)
  in its default mode (topk) and with `mode="exact"`, warm (the base-SVD cache filled by an earlier,
  untimed run) and cold (`use_cache=False`: the base SVD computed);
- the floor: each quantity a run needs, timed alone on the same matrices (the base SVD on both routes,
  the top-K block Krylov from the base's vectors, dW's singular values on both routes, max_cos of the top K,
  the cached base read), summed per case.

Every run is its own process: CPU seconds (user + system, all threads: steadier than wall time on a shared
machine) and wall seconds are measured inside it around the work, peak RSS is its own.  Intruder counts are
compared with the reference's for every matrix.  Writes results/<name>.json and results/<name>.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import (command_line, cpu_seconds, machine, markdown_table, peak_rss_mb, run_measured,  # noqa: E402
                    write_results)

SHAPES = {"q_proj": ("self_attn.q_proj", 4), "gate_proj": ("mlp.gate_proj", 2), "down_proj": ("mlp.down_proj", 1)}
TUNED = {"lora": "lora-r16", "full": "full-a"}
# (case label, tuned kind, warm base cache?, lorascale modes measured)
CASES = [("LoRA r16, warm base cache", "lora", True, ("topk", "exact")),
         ("full fine-tune, warm base cache", "full", True, ("topk", "exact")),
         ("full fine-tune, cold", "full", False, ("topk", "exact"))]


def _matrix(module: str) -> str:
    return f"model.layers.0.{module}.weight"


# --- children: one measurement each, printed as one JSON line -------------------------------------------------


def child_lorascale(args: argparse.Namespace) -> dict:
    import pyarrow.dataset as ds
    import torch

    import lorascale
    import lorascale.api
    import lorascale.pipeline  # noqa: F401  (imports are not what is measured)

    torch.set_num_threads(args.threads)
    options = {"mode": args.mode, "device": "cpu", "overwrite": True, "include": [_matrix(args.module)]}
    options.update({"cache_dir": str(args.cache)} if args.cache else {"use_cache": False})
    started, cpu = time.perf_counter(), cpu_seconds()
    result = lorascale.compare(str(args.base), str(args.tuned), args.out, **options)
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    rows = ds.dataset(args.out / "matrices", format="parquet").to_table().to_pylist()
    return {"wall": wall, "cpu": cpu, "rss_mb": peak_rss_mb(), "intruders": rows[0]["intruders"],
            "method": rows[0]["method"], "routes": result.manifest.routes}


def child_reference(args: argparse.Namespace) -> dict:
    import torch

    from reference import intruders

    torch.set_num_threads(args.threads)
    started, cpu = time.perf_counter(), cpu_seconds()
    w0, w = _read_pair(args.base, args.tuned, _matrix(args.module))
    count, _ = intruders(w0, w, 10, 0.5)
    return {"wall": time.perf_counter() - started, "cpu": cpu_seconds() - cpu, "rss_mb": peak_rss_mb(),
            "intruders": count}


def _read_pair(base: Path, tuned: Path, name: str):
    """W0 and W of one matrix, read from the files as the reference reads them (an adapter merged)."""
    from safetensors import safe_open

    def tensor(directory: Path, key: str):
        index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(str(directory / index[key]), framework="pt") as f:
            return f.get_tensor(key)

    w0 = tensor(base, name)
    if not (tuned / "adapter_config.json").exists():
        return w0, tensor(tuned, name)
    config = json.loads((tuned / "adapter_config.json").read_text())
    module = f"base_model.model.{name.removesuffix('.weight')}"
    with safe_open(str(tuned / "adapter_model.safetensors"), framework="pt") as f:
        a, b = f.get_tensor(f"{module}.lora_A.weight").float(), f.get_tensor(f"{module}.lora_B.weight").float()
    return w0, w0.float() + config["lora_alpha"] / config["r"] * (b @ a)


def child_quantities(args: argparse.Namespace) -> dict:
    """Each quantity alone on this matrix: CPU and wall seconds of one call each."""
    import torch
    from safetensors.torch import load_file, save_file

    from lorascale.numerics import gram
    from lorascale.numerics.operators import Dense, LowRankUpdate
    from lorascale.numerics.topk import DEFAULT_OVERSAMPLE, top_singular

    torch.set_num_threads(args.threads)
    name = _matrix(args.module)
    w0, w_full = (t.float() for t in _read_pair(args.base, args.data / TUNED["full"], name))
    adapter = args.data / TUNED["lora"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    module = f"base_model.model.{name.removesuffix('.weight')}"
    factors = load_file(adapter / "adapter_model.safetensors")
    a, b = factors[f"{module}.lora_A.weight"].float(), factors[f"{module}.lora_B.weight"].float()
    scale = config["lora_alpha"] / config["r"]
    times: dict[str, dict] = {}

    def timed(label: str, call):
        started, cpu = time.perf_counter(), cpu_seconds()
        value = call()
        times[label] = {"wall": time.perf_counter() - started, "cpu": cpu_seconds() - cpu}
        return value

    timed("base SVD, LAPACK (U, S, V)", lambda: torch.linalg.svd(w0, full_matrices=False))
    u0, _ = timed("base SVD, Gram route (U, S)", lambda: gram.left_svd(w0))
    path = args.work / "u0.safetensors"
    save_file({"u0": u0.contiguous()}, str(path))
    timed("cached base read (U0)", lambda: load_file(str(path))["u0"])
    width = 64 + DEFAULT_OVERSAMPLE
    lora = LowRankUpdate(w0, a, b, scale)
    warm_lora = torch.cat([b, u0[:, :width]], dim=1)[:, :width]
    top = timed("top-64 block Krylov, LoRA (W0 and factors)", lambda: top_singular(lora, 64, counted=10, warm=warm_lora))
    times["top-64 block Krylov, LoRA (W0 and factors)"]["blocks"] = top.check.iterations
    top = timed("top-64 block Krylov, full fine-tune", lambda: top_singular(Dense(w_full), 64, counted=10,
                                                                            warm=u0[:, :width]))
    times["top-64 block Krylov, full fine-tune"]["blocks"] = top.check.iterations
    timed("max_cos of the top 64", lambda: (top.u.T @ u0).abs().max(dim=1))
    delta = w_full - w0
    timed("dW singular values, LAPACK", lambda: torch.linalg.svdvals(delta))
    timed("dW singular values, Gram route", lambda: gram.svdvals(delta))
    u, _ = timed("tuned SVD, Gram route (exact mode)", lambda: gram.left_svd(w_full))
    timed("max_cos of every tuned vector (exact mode)", lambda: (u.T @ u0).abs().max(dim=1))
    return {"quantities": times}


CHILDREN = {"lorascale": child_lorascale, "reference": child_reference, "quantities": child_quantities}


# --- the parent: data, runs side by side, the table ---------------------------------------------------------


def _run_child(kind: str, args: argparse.Namespace, **extra: object) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--work", str(args.work),
               "--threads", str(args.threads)]
    for key, value in extra.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    return run_measured(command)


def measure(args: argparse.Namespace) -> dict:
    from make_synthetic_llama import build

    data = args.work / "data"
    if not (data / "base" / "model.safetensors.index.json").is_file():
        print(f"writing one synthetic layer at scale {args.scale} to {data}", file=sys.stderr, flush=True)
        build(data, layers=1, scale=args.scale, only=tuple(TUNED.values()))
    records: list[dict] = []

    def record(**fields: object) -> None:
        records.append(fields)
        print(json.dumps(fields)[:300], file=sys.stderr, flush=True)

    for shape, (module, _) in SHAPES.items():  # fill the base-SVD cache once per matrix: the warm runs' state
        _run_child("lorascale", args, module=module, base=data / "base", tuned=data / TUNED["lora"],
                   out=args.work / "out", mode="topk", cache=args.work / "cache")
    for repeat in range(args.repeats):
        for shape, (module, _) in SHAPES.items():
            for kind, tuned in TUNED.items():
                result = _run_child("reference", args, module=module, base=data / "base", tuned=data / tuned)
                record(repeat=repeat, shape=shape, runner="reference", tuned=kind, **result)
            for label, kind, warm, modes in CASES:
                for mode in modes:
                    cache = {"cache": args.work / "cache"} if warm else {}
                    result = _run_child("lorascale", args, module=module, base=data / "base",
                                        tuned=data / TUNED[kind], out=args.work / "out", mode=mode, **cache)
                    record(repeat=repeat, shape=shape, runner="lorascale", case=label, mode=mode, **result)
            result = _run_child("quantities", args, module=module, base=data / "base", data=data)
            record(repeat=repeat, shape=shape, runner="quantities", **result)
    return {"machine": machine(), "command": command_line(), "scale": args.scale, "repeats": args.repeats,
            "threads": args.threads, "records": records}


def _per_layer(values: dict[str, float]) -> float:
    """Seconds per layer from seconds per shape: 4 q + 2 gate + 1 down."""
    return sum(values[shape] * weight for shape, (_, weight) in SHAPES.items())


def _mean_per_shape(records: list[dict], key: str, **match: object) -> dict[str, float]:
    chosen = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    return {shape: statistics.mean(r[key] for r in chosen if r["shape"] == shape) for shape in SHAPES}


def _floor_quantities(case: str, mode: str) -> list[str]:
    """The quantities a case's run needs (the floor sums their fastest routes)."""
    base = [] if "warm" in case else ["base SVD, Gram route (U, S)"]
    read = ["cached base read (U0)"] if "warm" in case else []
    if "LoRA" in case:
        tuned = ["top-64 block Krylov, LoRA (W0 and factors)", "max_cos of the top 64"] if mode == "topk" else \
            ["tuned SVD, Gram route (exact mode)", "max_cos of every tuned vector (exact mode)"]
        return base + read + tuned
    tuned = ["top-64 block Krylov, full fine-tune", "max_cos of the top 64"] if mode == "topk" else \
        ["tuned SVD, Gram route (exact mode)", "max_cos of every tuned vector (exact mode)"]
    return base + read + tuned + ["dW singular values, Gram route"]


def table(payload: dict) -> str:
    records = payload["records"]
    quantity_rows = [r for r in records if r["runner"] == "quantities"]
    names = list(quantity_rows[0]["quantities"])
    per_quantity = {name: {shape: statistics.mean(r["quantities"][name]["cpu"] for r in quantity_rows
                                                  if r["shape"] == shape) for shape in SHAPES} for name in names}
    rows = []
    for label, kind, _, modes in CASES:
        reference = {key: _per_layer(_mean_per_shape(records, key, runner="reference", tuned=kind))
                     for key in ("cpu", "wall")}
        for mode in modes:
            ours = {key: _per_layer(_mean_per_shape(records, key, runner="lorascale", case=label, mode=mode))
                    for key in ("cpu", "wall")}
            runs = [r for r in records if r["runner"] == "lorascale" and r.get("case") == label and r["mode"] == mode]
            references = {(r["shape"], r["repeat"]): r["intruders"] for r in records
                          if r["runner"] == "reference" and r["tuned"] == kind}
            equal = sum(r["intruders"] == references[(r["shape"], r["repeat"])] for r in runs)
            floor = sum(_per_layer(per_quantity[q]) for q in _floor_quantities(label, mode))
            methods = sorted({r["method"] for r in runs})
            rows.append([f"{label}, {mode}{' (default)' if mode == 'topk' else ''}", ours["cpu"], ours["wall"],
                         reference["cpu"], reference["wall"], f"{reference['cpu'] / ours['cpu']:.1f}x",
                         f"{reference['wall'] / ours['wall']:.1f}x", floor, f"{equal} of {len(runs)}",
                         ", ".join(methods), max(r["rss_mb"] for r in runs)])
    main = markdown_table(["case", "lorascale CPU-s", "wall s", "reference CPU-s", "wall s", "speed-up CPU",
                           "wall", "floor CPU-s", "intruders = reference", "method", "peak RSS MB"], rows)
    detail = markdown_table(["quantity (CPU-s per call)", *SHAPES, "per layer"],
                            [[name, *(per_quantity[name][s] for s in SHAPES), _per_layer(per_quantity[name])]
                             for name in names])
    blocks = {name: sorted({r["quantities"][name]["blocks"] for r in quantity_rows})
              for name in names if "blocks" in quantity_rows[0]["quantities"][name]}
    return (f"Per layer of Llama-2-7B shapes (4 x q_proj + 2 x gate_proj + down_proj, scale {payload['scale']}), "
            f"mean of {payload['repeats']} run(s), {payload['threads']} threads; speed-up = reference / lorascale.\n\n"
            f"{main}\n\nThe floor, per quantity (CPU seconds, one call each; Krylov blocks after the start block: "
            f"{blocks}):\n\n{detail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="speed")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lorascale-speed"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every dimension (1: real 7B shapes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render", action="store_true", help="rewrite results/<name>.md from its .json")
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    for option in ("module", "mode"):
        parser.add_argument(f"--{option}", help=argparse.SUPPRESS)
    for option in ("base", "tuned", "out", "cache", "data"):
        parser.add_argument(f"--{option}", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return
    if args.render:
        payload = json.loads((HERE / "results" / f"{args.name}.json").read_text())
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        payload = measure(args)
    print(write_results(args.name, payload, table(payload)).read_text())


if __name__ == "__main__":
    main()
