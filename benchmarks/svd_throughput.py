"""Seconds per matrix, matrices/s, effective GFLOP/s and error against float64, per backend/driver/shape/precision.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/svd_throughput.py                    # the four Llama shapes
    OMP_WAIT_POLICY=PASSIVE python benchmarks/svd_throughput.py --quick            # every dimension / 4
    OMP_WAIT_POLICY=PASSIVE python benchmarks/svd_throughput.py --shapes 4096x4096,1024x8192
    python benchmarks/svd_throughput.py --device cuda --drivers gesvd,gesvdj,gesvda  # on a GPU machine

Matrices: fp16-rounded synthetic weights with a trained-like spectrum (make_synthetic_llama.base_weight),
upcast to the precision measured.  Reference: numpy's float64 SVD of the same matrix.

Effective GFLOP/s = nominal flops / seconds, with the Golub-Reinsch counts of Golub & Van Loan (4th ed.,
Fig. 8.6.1) for A (m x n), M = max(m, n), N = min(m, n):
- svd (S, thin U of M x N, V):  14 M N^2 + 8 N^3   (22 n^3 for a square n x n matrix)
- svdvals (S only):             4 M N^2 - 4 N^3 / 3
These are a fixed yardstick, not what each routine executes (gesdd, Jacobi and the Gram route differ), so
a faster algorithm shows as a higher "effective" rate.

Errors against float64, relative to sigma_1: max |sigma_j - sigma_ref_j| / sigma_ref_1; the top-10 left
singular vectors' max (1 - |cos(u_j, u_ref_j)|); ||A - U S V^T||_F / ||A||_F; max |U^T U - I|.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import command_line, machine, markdown_table, write_results  # noqa: E402
from make_synthetic_llama import base_weight  # noqa: E402

from lorascale.numerics.backends import cupy_available  # noqa: E402
from lorascale.numerics.svd import svd, svdvals  # noqa: E402

SHAPES = "4096x4096,11008x4096,8192x8192,1024x8192"
QUICK = "1024x1024,2752x1024,2048x2048,256x2048"
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def flops(op: str, m: int, n: int) -> float:
    big, small = max(m, n), min(m, n)
    if op == "svd":
        return 14.0 * big * small**2 + 8.0 * small**3
    return 4.0 * big * small**2 - 4.0 * small**3 / 3


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(matrix: torch.Tensor, op: str, backend: str, driver: str | None, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        _sync(str(matrix.device))
        started = time.perf_counter()
        result = (svd if op == "svd" else svdvals)(matrix, backend=backend, driver=driver)
        _sync(str(matrix.device))
        best = min(best, time.perf_counter() - started)
    return best, result


def errors(a64: np.ndarray, reference: tuple | None, op: str, result) -> dict:
    if reference is None:
        return {}
    u_ref, s_ref, _ = reference
    if op == "svdvals":
        s = result.double().cpu().numpy()
        return {"sigma_err": float(np.abs(s - s_ref).max() / s_ref[0])}
    u, s, vh = (x.double().cpu().numpy() for x in result)
    top = min(10, u.shape[1])
    return {
        "sigma_err": float(np.abs(s - s_ref).max() / s_ref[0]),
        "top10_vec_err": float((1 - np.abs(np.sum(u[:, :top] * u_ref[:, :top], axis=0))).max()),
        "recon_err": float(np.linalg.norm(a64 - (u * s) @ vh) / np.linalg.norm(a64)),
        "orth_err": float(np.abs(u.T @ u - np.eye(u.shape[1])).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=None, help=f"comma-separated MxN (default {SHAPES})")
    parser.add_argument("--quick", action="store_true", help=f"shapes {QUICK}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default=None, help="comma-separated (default: torch,gram[,cupy on CUDA])")
    parser.add_argument("--drivers", default="gesvd", help="cuSOLVER drivers to compare on CUDA")
    parser.add_argument("--precisions", default="fp32,fp64")
    parser.add_argument("--ops", default="svd,svdvals")
    parser.add_argument("--repeats", type=int, default=1, help="best of N calls")
    parser.add_argument("--no-reference", action="store_true", help="skip the float64 reference (no errors)")
    parser.add_argument("--name", default=None, help="results file name (default svd_throughput[-quick])")
    args = parser.parse_args()

    shapes = [tuple(int(x) for x in s.split("x")) for s in (QUICK if args.quick else (args.shapes or SHAPES)).split(",")]
    cuda = args.device.startswith("cuda")
    backends = (args.backends.split(",") if args.backends
                else ["torch", "gram"] + (["cupy"] if cuda and cupy_available() else []))
    drivers = args.drivers.split(",") if cuda else [None]
    svd(torch.randn(64, 64, device=args.device), backend="torch")  # load the libraries before timing
    rows, records = [], []
    for m, n in shapes:
        a = base_weight(m, n, torch.Generator().manual_seed(m * 7 + n)).to(torch.float16)
        a64 = a.double().numpy()
        reference, ref_seconds = None, None
        if not args.no_reference:
            print(f"{m}x{n}: float64 reference ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            reference = np.linalg.svd(a64, full_matrices=False)
            ref_seconds = time.perf_counter() - started
        for precision in args.precisions.split(","):
            matrix = a.to(device=args.device, dtype=DTYPES[precision])
            for backend in backends:
                for driver in (drivers if backend == "torch" else [None]):
                    for op in args.ops.split(","):
                        print(f"{m}x{n} {precision} {backend} {driver or ''} {op} ...", file=sys.stderr, flush=True)
                        seconds, result = measure(matrix, op, backend, driver, args.repeats)
                        record = {"shape": f"{m}x{n}", "precision": precision, "backend": backend,
                                  "driver": driver or ("LAPACK gesdd" if backend == "torch" else ""),
                                  "op": op, "seconds": seconds, "matrices_per_s": 1 / seconds,
                                  "gflops": flops(op, m, n) / seconds / 1e9, "reference_seconds": ref_seconds,
                                  **errors(a64, reference, op, result)}
                        records.append(record)
                        rows.append([record["shape"], precision, backend, record["driver"], op, seconds,
                                     record["matrices_per_s"], record["gflops"], record.get("sigma_err", ""),
                                     record.get("top10_vec_err", ""), record.get("recon_err", ""),
                                     record.get("orth_err", "")])
                        del result
    table = markdown_table(["shape", "precision", "backend", "driver", "op", "s / matrix", "matrices/s",
                            "eff. GFLOP/s", "sigma err", "top-10 vec err", "recon err", "orth err"], rows)
    payload = {"machine": machine(), "command": command_line(), "device": args.device, "records": records}
    path = write_results(args.name or ("svd_throughput-quick" if args.quick else "svd_throughput"), payload, table)
    print(path.read_text())


if __name__ == "__main__":
    main()
