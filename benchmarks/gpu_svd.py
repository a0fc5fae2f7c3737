"""Stage 2 of gpu_check.py: seconds and accuracy of every SVD route, shape and precision.

    python benchmarks/gpu_svd.py --out OUT --device cuda --deadline EPOCH_SECONDS   (gpu_check.py runs it)

A route is one way lorascale can decompose a matrix: a backend and, for torch on CUDA, a cuSOLVER driver
(torch-gesvd is lorascale's default there; gram is the float64 Gram matrix + eigh/syevd route).

The float64 oracle is analytic, so no float64 SVD of a 28672 x 8192 matrix has to be computed: each test
matrix is A = U diag(s) V^T with U, V from Householder QR in float64 (orthonormal to ~1e-15) and a chosen
trained-like spectrum s (a power-law top part over a bulk, top 10 separated by >= 1%).  Its singular
values and vectors are known exactly; a route's fp32 run also sees the rounding of A to fp32 (a
relative perturbation ~6e-8, inside every tolerance).  A second matrix W = A + three planted rank-1
updates (2.0, 1.6, 1.3 x sigma_1, along random directions) has exactly 3 intruders among its top 10
vectors at epsilon = 0.5 (max_cos ~0.05 for the planted ones, ~1 for the rest), so every route must
count 3.

Per (shape, precision, route) one record: seconds of svd(A) and svd(W) (the faster is "seconds"), of
svdvals(A); sigma error max|s - s_true| / s_1 (both calls); top-10 vector error = max over the top 10
left and right vectors of sin(angle to the true vector); the intruder count of W against A.  Items run
by priority (TIERS: every fp32 route at the smaller shapes first, then the default and Gram routes at the
large ones, then fp64), and an item predicted (by flop scaling from the same route's last measurement) not to fit the time left
or --max-item-seconds is recorded as skipped, not run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import gpu_api  # noqa: E402
from gpu_records import Deadline, append_record, wait_for_go  # noqa: E402

ROUTES = {  # name -> (lorascale backend, cuSOLVER driver)
    "cuda": {"torch-gesvd": ("torch", "gesvd"), "torch-gesvdj": ("torch", "gesvdj"),
             "torch-gesvda": ("torch", "gesvda"), "cupy": ("cupy", None), "gram": ("gram", None)},
    "cpu": {"torch": ("torch", None), "gram": ("gram", None)},
}
DEFAULT_ROUTE = {"cuda": "torch-gesvd", "cpu": "torch"}
# Priority tiers, (precision, routes, shapes): what the decision needs most comes first.  "small" are the
# shapes up to the second-largest but one (the 7B shapes and 1024x8192 by default), "large" the two largest.
TIERS = {
    "cuda": [("fp32", ("torch-gesvd", "gram", "torch-gesvdj", "cupy", "torch-gesvda"), "small"),
             ("fp32", ("torch-gesvd", "gram"), "large"),
             ("fp64", ("gram", "torch-gesvd"), "small"),
             ("fp32", ("torch-gesvdj", "cupy", "torch-gesvda"), "large"),
             ("fp64", ("gram", "torch-gesvd"), "large"),
             ("fp64", ("torch-gesvdj", "cupy", "torch-gesvda"), "all")],
    "cpu": [("fp32", ("torch", "gram"), "all"), ("fp64", ("torch", "gram"), "all")],
}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
PLANTED = (2.0, 1.6, 1.3)  # strengths of the planted intruders, in units of sigma_1
TOP = 10
EPSILON = 0.5
# An item costs 2 SVDs + 1 svdvals + the error checks: about this many single-SVD times.
ITEM_SVDS = 3.0


def flops(m: int, n: int) -> float:
    """Golub-Reinsch count of a thin SVD with vectors (benchmarks/svd_throughput.py): a fixed yardstick."""
    big, small = max(m, n), min(m, n)
    return 14.0 * big * small**2 + 8.0 * small**3


def spectrum(m: int, n: int) -> torch.Tensor:
    """Trained-like singular values, descending: power law (i+1)^-0.7 on top, a sqrt-shaped bulk below."""
    p = min(m, n)
    edge = 0.02 * (math.sqrt(m) + math.sqrt(n))  # Gaussian bulk edge at Llama's entry scale
    i = torch.arange(p, dtype=torch.float64)
    top = torch.where(i < 256, 4.0 * (i + 1) ** -0.7, torch.zeros_like(i))
    bulk = torch.sqrt(1.0 - i / p)
    return edge * (top + bulk)


class TestMatrix:
    """A = U diag(s) V^T with known factors, and W = A + planted intruders; float64 on the device."""

    def __init__(self, m: int, n: int, device: str, seed: int) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        p = min(m, n)
        u = torch.linalg.qr(torch.randn(m, p, generator=gen, device=device, dtype=torch.float64)).Q  # (m, p)
        v = torch.linalg.qr(torch.randn(n, p, generator=gen, device=device, dtype=torch.float64)).Q  # (n, p)
        self.s = spectrum(m, n).to(device)
        self.a = (u * self.s) @ v.T  # (m, p) @ (p, n) -> (m, n)
        self.u_top, self.v_top = u[:, :TOP].clone(), v[:, :TOP].clone()
        del u, v
        x = torch.linalg.qr(torch.randn(m, len(PLANTED), generator=gen, device=device, dtype=torch.float64)).Q
        y = torch.linalg.qr(torch.randn(n, len(PLANTED), generator=gen, device=device, dtype=torch.float64)).Q
        strengths = torch.tensor(PLANTED, dtype=torch.float64, device=device) * self.s[0]
        self.w = self.a + (x * strengths) @ y.T  # (m, 3) @ (3, n)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Callable[[], object]) -> tuple[float, object]:
    _sync(device)
    started = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - started, result


def sigma_error(s: torch.Tensor, s_true: torch.Tensor) -> float:
    return float((s.to(torch.float64) - s_true).abs().max() / s_true[0])


def vector_error(vectors: torch.Tensor, true_vectors: torch.Tensor) -> float:
    """max over the top columns of sin(angle) = ||x - (x.t) t|| (accurate where 1 - |cos| would round to 0)."""
    x = vectors[:, :TOP].to(torch.float64)
    cos = (x * true_vectors).sum(dim=0)  # (TOP,), signs are arbitrary and cancel in the residual
    return float((x - true_vectors * cos).norm(dim=0).max())


def intruders(u: torch.Tensor, u0: torch.Tensor) -> tuple[int, float]:
    """Intruders among the top 10 of `u` against ALL of `u0` (docs/METHOD.md), and the closest max_cos to epsilon."""
    max_cos = (u[:, :TOP].T @ u0).abs().max(dim=1).values  # (TOP, d) @ (d, p) -> (TOP, p) -> (TOP,)
    return int((max_cos < EPSILON).sum()), float((max_cos - EPSILON).abs().min())


def measure(matrix: TestMatrix, precision: str, route: str, device: str) -> dict:
    backend, driver = ROUTES[device.split(":")[0]][route]
    dtype = DTYPES[precision]
    a, w = matrix.a.to(dtype), matrix.w.to(dtype)
    seconds_a, (u0, s0, vh0) = timed(device, lambda: gpu_api.svd(a, backend=backend, driver=driver))
    record = {"sigma_err": sigma_error(s0, matrix.s),
              "vec_err": max(vector_error(u0, matrix.u_top), vector_error(vh0.T, matrix.v_top))}
    del vh0
    seconds_w, (u, _, _) = timed(device, lambda: gpu_api.svd(w, backend=backend, driver=driver))
    record["intruders"], record["intruder_margin"] = intruders(u, u0)
    del u, u0
    seconds_values, values = timed(device, lambda: gpu_api.svdvals(a, backend=backend, driver=driver))
    record["sigma_err_svdvals"] = sigma_error(values, matrix.s)
    return {"seconds": min(seconds_a, seconds_w), "seconds_svd": [seconds_a, seconds_w],
            "seconds_svdvals": seconds_values, "expected_intruders": len(PLANTED), **record}


def concurrency(matrix: TestMatrix, route: str, device: str, copies: int = 4) -> dict:
    """`copies` fp32 SVDs one after another, then on `copies` threads with a CUDA stream each."""
    backend, driver = ROUTES["cuda"][route]
    mats = [matrix.a.float().clone() for _ in range(copies)]
    sequential, _ = timed(device, lambda: [gpu_api.svd(x, backend=backend, driver=driver) for x in mats])
    streams = [torch.cuda.Stream() for _ in mats]

    def work(i: int) -> None:
        with torch.cuda.stream(streams[i]):
            gpu_api.svd(mats[i], backend=backend, driver=driver)
        streams[i].synchronize()

    with ThreadPoolExecutor(copies) as pool:
        concurrent, _ = timed(device, lambda: list(pool.map(work, range(copies))))
    return {"copies": copies, "sequential_seconds": sequential, "concurrent_seconds": concurrent,
            "speedup": sequential / concurrent}


def plan(device: str, shapes: list[tuple[int, int]], precisions: list[str]) -> list[tuple[tuple[int, int], str, str]]:
    """Every (shape, precision, route) item in the order it is run: tier by tier, small shapes first."""
    ordered = sorted(shapes, key=lambda s: flops(*s))
    split = max(1, len(ordered) - 2)
    groups = {"small": ordered[:split], "large": ordered[split:], "all": ordered}
    items = []
    for precision, routes, group in TIERS[device.split(":")[0]]:
        if precision in precisions:
            items += [(shape, precision, route) for shape in groups[group] for route in routes]
    return items


def predict(history: dict[tuple[str, str], tuple[tuple[int, int], float]], shape: tuple[int, int],
            precision: str, route: str) -> float | None:
    """Seconds this item will take, scaled by flops from the same route's last measurement; None if unknown."""
    last = history.get((precision, route))
    if last is None:
        return None
    (m, n), seconds = last
    return ITEM_SVDS * seconds * flops(*shape) / flops(m, n)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", required=True, help="comma-separated MxN")
    parser.add_argument("--precisions", default="fp32,fp64")
    parser.add_argument("--deadline", type=float, default=None, help="epoch seconds: stop starting items after")
    parser.add_argument("--go", type=Path, default=None,
                        help="wait for this JSON file ({'deadline': ...}) before starting (gpu_check.py)")
    parser.add_argument("--max-item-seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", action="store_true", help="also time 4 SVDs on 4 CUDA streams")
    args = parser.parse_args(argv)
    if args.go is not None:
        args.deadline = wait_for_go(args.go)["deadline"]
    if args.deadline is None:
        parser.error("give --deadline or --go")
    deadline = Deadline(args.deadline)
    kind = args.device.split(":")[0]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    from common import machine

    append_record(args.out, {"stage": "svd", "kind": "machine", **machine(),
                             "cupy_available": gpu_api.cupy_available(), "torch_cuda": torch.version.cuda})
    routes = {route for _, tier_routes, _ in TIERS[kind] for route in tier_routes}
    if "cupy" in routes and not gpu_api.cupy_available():
        append_record(args.out, {"stage": "svd", "kind": "skipped", "route": "cupy", "reason": "cupy not installed"})
        routes.discard("cupy")
    for precision in args.precisions.split(","):  # load every library before anything is timed
        for route in sorted(routes):
            backend, driver = ROUTES[kind][route]
            try:
                gpu_api.svd(torch.randn(64, 48, device=args.device, dtype=DTYPES[precision]),
                            backend=backend, driver=driver)
            except Exception as exc:  # noqa: BLE001  (a broken route is a finding, not the end of the stage)
                append_record(args.out, {"stage": "svd", "kind": "error", "route": route, "precision": precision,
                                         "shape": "64x48", "error": f"{type(exc).__name__}: {exc}"[:500]})
    matrices: dict[tuple[int, int], TestMatrix] = {}
    history: dict[tuple[str, str], tuple[tuple[int, int], float]] = {}
    status = "done"
    for shape, precision, route in plan(args.device, shapes, args.precisions.split(",")):
        if route not in routes:
            continue
        item = {"stage": "svd", "shape": f"{shape[0]}x{shape[1]}", "precision": precision, "route": route}
        if deadline.passed():
            status = "timed out"
            append_record(args.out, {**item, "kind": "skipped", "cause": "time", "reason": "stage time box reached"})
            continue
        predicted = predict(history, shape, precision, route)
        if predicted is not None and predicted > min(deadline.left(), args.max_item_seconds):
            slow = predicted > args.max_item_seconds  # too slow to be the answer, not merely out of time
            append_record(args.out, {**item, "kind": "skipped", "predicted_seconds": round(predicted, 1),
                                     "cause": "slow" if slow else "time",
                                     "reason": f"predicted {predicted:.0f} s > "
                                               f"min({deadline.left():.0f} s left, {args.max_item_seconds:.0f} s)"})
            status = "timed out" if predicted > deadline.left() else status
            continue
        print(f"svd {item['shape']} {precision} {route} ...", file=sys.stderr, flush=True)
        try:
            if shape not in matrices:
                matrices[shape] = TestMatrix(*shape, args.device, seed=shape[0] * 7 + shape[1])
            result = measure(matrices[shape], precision, route, args.device)
        except Exception as exc:  # noqa: BLE001  (out of memory, no convergence: record it and go on)
            append_record(args.out, {**item, "kind": "error", "error": f"{type(exc).__name__}: {exc}"[:500]})
            if kind == "cuda":
                torch.cuda.empty_cache()
            continue
        history[precision, route] = (shape, result["seconds"])
        append_record(args.out, {**item, "kind": "svd", "backend": ROUTES[kind][route][0],
                                 "driver": ROUTES[kind][route][1], **result})
    if args.concurrency and kind == "cuda" and shapes and not deadline.passed():
        shape = min(shapes, key=lambda s: abs(flops(*s) - flops(4096, 4096)))
        for route in ("torch-gesvd", "gram"):
            if deadline.left() < 4 * ITEM_SVDS * history.get(("fp32", route), (shape, 10.0))[1]:
                append_record(args.out, {"stage": "svd", "kind": "skipped", "route": route,
                                         "reason": "concurrency: not enough time left"})
                continue
            try:
                result = concurrency(matrices.get(shape) or TestMatrix(*shape, args.device, seed=1), route,
                                     args.device)
            except Exception as exc:  # noqa: BLE001
                append_record(args.out, {"stage": "svd", "kind": "error", "route": route,
                                         "error": f"concurrency: {type(exc).__name__}: {exc}"[:500]})
                continue
            append_record(args.out, {"stage": "svd", "kind": "concurrency", "route": route,
                                     "shape": f"{shape[0]}x{shape[1]}", **result})
    append_record(args.out, {"stage": "svd", "kind": "stage_end", "status": status})


if __name__ == "__main__":
    sys.modules.setdefault("ray", None)  # as on the GPU image, which has no Ray: nothing here may need it
    main()
