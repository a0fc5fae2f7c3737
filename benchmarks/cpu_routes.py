"""The CPU routes of "auto", timed alone: LAPACK against the float64 Gram routes at Llama shapes.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_routes.py [--shapes 4096x4096,11008x4096,4096x11008]

Per shape, fp32 input with a planted spectrum (route_probe.planted's decay, 1 to 1e-4): seconds (wall and
CPU) of `torch.linalg.svd` (what the base and tuned SVDs cost on LAPACK) against `gram.left_svd` (U and S
only, what a left-side run needs), and of `torch.linalg.svdvals` against `gram.svdvals` (tuned values in
topk mode, dW's spectrum); the Gram routes' sigma error (of sigma_1) and top-10 vector error (sin of the
angle) against the planted truth.  Plus a small one-thread probe (route_probe.py, what lorascale's "auto"
timed at run time before its routes became a fixed table), to compare its ratios with those at full size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import command_line, cpu_seconds, machine, markdown_table, write_results  # noqa: E402


def _planted(m: int, n: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    p = min(m, n)
    u = torch.linalg.qr(torch.randn(m, p, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, p, generator=generator, dtype=torch.float64)).Q
    s = torch.logspace(0, -4, p, dtype=torch.float64)
    return ((u * s) @ v.T).float(), u, s  # (m, p) * (p,) @ (p, n)


def _timed(call):
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = call()
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def _table(payload: dict) -> str:
    """Seconds and ratios per shape, CPU seconds first (robust on a shared machine), and the probe's row."""
    rows = []
    for record in payload["records"]:
        svd, left = record["lapack_svd"], record["gram_left"]
        values, gram_values = record["lapack_svdvals"], record["gram_svdvals"]
        rows.append([record["shape"], f"{svd['cpu_s']:.3g} ({svd['wall_s']:.3g})",
                     f"{left['cpu_s']:.3g} ({left['wall_s']:.3g})",
                     f"{left['cpu_s'] / svd['cpu_s']:.2f} ({left['wall_s'] / svd['wall_s']:.2f})",
                     f"{values['cpu_s']:.3g} ({values['wall_s']:.3g})",
                     f"{gram_values['cpu_s']:.3g} ({gram_values['wall_s']:.3g})",
                     f"{gram_values['cpu_s'] / values['cpu_s']:.2f} ({gram_values['wall_s'] / values['wall_s']:.2f})",
                     record["gram_sigma_error"], record["gram_vector_error"]])
    p = payload["probe"]
    rows.append([f"probe {p['size']}x{p['size']} (1 thread)", p["lapack_svd_s"], p["gram_left_s"],
                 f"{p['gram_left_s'] / p['lapack_svd_s']:.2f}", p["lapack_svdvals_s"], p["gram_values_s"],
                 f"{p['gram_values_s'] / p['lapack_svdvals_s']:.2f}", p["gram_sigma_error"], p["gram_vector_error"]])
    return (f"fp32 input, {payload['blas']}; CPU seconds (wall in brackets), one run each; ratio = Gram / LAPACK."
            "\n\n" + markdown_table(["shape", "LAPACK svd", "Gram left_svd", "ratio", "LAPACK svdvals",
                                      "Gram svdvals", "ratio", "Gram sigma error", "Gram top-10 vector error"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    parser.add_argument("--name", default="cpu_routes")
    parser.add_argument("--render", action="store_true", help="rewrite results/<name>.md from its .json")
    args = parser.parse_args()
    if args.render:
        payload = json.loads((HERE / "results" / f"{args.name}.json").read_text())
        print(write_results(args.name, payload, _table(payload)).read_text())
        return
    import torch

    from lorascale.numerics import gram
    from lorascale.execute.routes import blas_info
    from route_probe import sin_angles, probe

    probe_result = probe().as_dict()
    records = []
    for shape in args.shapes.split(","):
        m, n = (int(x) for x in shape.split("x"))
        a, u_true, s_true = _planted(m, n)
        record = {"shape": shape}
        for label, call in (("lapack_svd", lambda: torch.linalg.svd(a, full_matrices=False)),
                            ("gram_left", lambda: gram.left_svd(a)),
                            ("lapack_svdvals", lambda: torch.linalg.svdvals(a)),
                            ("gram_svdvals", lambda: gram.svdvals(a))):
            wall, cpu, result = _timed(call)
            record[label] = {"wall_s": wall, "cpu_s": cpu}
            if label == "gram_left":
                record["gram_vector_error"] = float(sin_angles(result[0][:, :10], u_true[:, :10]).max())
            if label == "gram_svdvals":
                record["gram_sigma_error"] = float((result.double() - s_true).abs().max() / s_true[0])
            print(shape, label, f"{wall:.2f} s wall, {cpu:.2f} CPU-s", file=sys.stderr, flush=True)
        records.append(record)
    payload = {"machine": machine(), "command": command_line(), "blas": blas_info(), "probe": probe_result,
               "records": records}
    path = write_results(args.name, payload, _table(payload))
    print(path.read_text())


if __name__ == "__main__":
    main()
