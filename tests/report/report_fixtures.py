"""Small but real results directories for report tests.

The tables are computed the way the core computes them (numpy SVDs of a base matrix and tuned
matrices), so intruders, spectra and heatmaps behave like a real run: a dense small full fine-tune keeps
the base's singular vectors, a strong low-rank LoRA update adds new ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lorascale.store.schema import MANIFEST, MATRICES, SCHEMAS, SIMILARITY, SPECTRA

BASE = "meta-llama/Tiny-base"
TOP = 10  # the similarity block size stored by the run


@dataclass(frozen=True)
class Tuned:
    """One tuned model of a fake run: `strength` scales the update (0 = identical to the base)."""

    reference: str
    kind: str  # "full" or "lora"
    strength: float = 1.0
    rank: int = 4  # LoRA rank
    label: str | None = None  # as `--tuned NAME=REF` gives it; None: a run written before labels


def _svd(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return u, s, vt.T


def _effective_rank(s: np.ndarray) -> float | None:
    s = s[s > 1e-12 * max(1.0, s.max(initial=0.0))]
    if s.size == 0:
        return None
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _base_matrix(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    # Decaying spectrum with clear gaps at the top, like trained weights.
    q1, _ = np.linalg.qr(rng.standard_normal((m, m)))
    q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    sigma = 10.0 * np.exp(-np.arange(min(m, n)) / 6.0) + 0.3
    return (q1[:, : len(sigma)] * sigma) @ q2[:, : len(sigma)].T  # (m, r) @ (r, n) -> (m, n)


def _tuned_matrix(rng: np.random.Generator, w0: np.ndarray, model: Tuned) -> np.ndarray:
    m, n = w0.shape
    if model.strength == 0:
        return w0.copy()
    if model.kind == "full":
        # Small dense change: high effective rank, leading directions preserved.
        return w0 + model.strength * 0.01 * rng.standard_normal((m, n))
    b = rng.standard_normal((m, model.rank)) / math.sqrt(m)
    a = rng.standard_normal((model.rank, n)) / math.sqrt(n)
    # Scaled so the update's singular values compete with the base's top ones: new top directions.
    return w0 + model.strength * 12.0 * (b @ a)  # (m, r) @ (r, n) -> (m, n)


def write_run(root: Path, tuned: Sequence[Tuned], *, layers: int = 2,
              modules: Sequence[str] = ("q_proj", "k_proj", "v_proj"), shape: tuple[int, int] = (48, 32),
              side: str = "left", k: int = 10, epsilon: float = 0.5, status: str = "complete",
              extra_matrix: bool = False, seed: int = 0) -> Path:
    """Write manifest.json and the three Parquet tables of a fake run into `root`; return `root`."""
    rng = np.random.default_rng(seed)
    names = [(f"model.layers.{layer}.self_attn.{module}.weight", layer, module)
             for layer in range(layers) for module in modules]
    if extra_matrix:
        names.append(("lm_head.weight", None, "lm_head"))
    sides = ("left", "right") if side == "both" else (side,)
    matrices, spectra, similarity = [], [], []
    for name, layer, module in names:
        w0 = _base_matrix(rng, *shape)
        u0, s0, v0 = _svd(w0)
        for side_name in sides:
            spectra += [dict(model=BASE, role="base", matrix=name, side=side_name, rank=i, sigma=float(s),
                             max_cos=None, argmax=None) for i, s in enumerate(s0)]
        for model in tuned:
            w = _tuned_matrix(rng, w0, model)
            u, s, v = _svd(w)
            intruders: dict[str, int] = {}
            for side_name in sides:
                vectors, base_vectors = (u, u0) if side_name == "left" else (v, v0)
                cos = np.abs(vectors.T @ base_vectors)  # (tuned, base)
                max_cos, argmax = cos.max(axis=1), cos.argmax(axis=1)
                intruders[side_name] = int(np.sum(max_cos[:k] < epsilon))
                spectra += [dict(model=model.reference, role="tuned", matrix=name, side=side_name, rank=j,
                                 sigma=float(s[j]), max_cos=float(max_cos[j]), argmax=int(argmax[j]))
                            for j in range(len(s))]
                top = min(TOP, cos.shape[0])
                similarity += [dict(model=model.reference, matrix=name, side=side_name, tuned_rank=j,
                                    base_rank=i, cos=float(cos[j, i])) for j in range(top) for i in range(top)]
            delta = w - w0
            dim = shape[0]
            matrices.append(dict(
                model=model.reference, matrix=name, layer=layer, module=module, rows=shape[0],
                cols=shape[1], update=model.kind, delta_fro=float(np.linalg.norm(delta)),
                delta_rel=float(np.linalg.norm(delta) / np.linalg.norm(w0)),
                delta_effective_rank=_effective_rank(np.linalg.svd(delta, compute_uv=False)),
                # store/schema.py: `intruders` on the first side, `intruders_right` when the right was computed.
                intruders=intruders[sides[0]], intruders_right=intruders.get("right"), label=model.label,
                null_max_cos=math.sqrt(2 * math.log(2 * dim) / dim), seconds=0.01))
    root.mkdir(parents=True, exist_ok=True)
    for table, rows, parts in ((MATRICES, matrices, 1), (SPECTRA, spectra, 2), (SIMILARITY, similarity, 1)):
        (root / table).mkdir(exist_ok=True)
        # Several part files, like a run that wrote results as it went.
        for part, chunk in enumerate(np.array_split(np.arange(len(rows)), parts)):
            pq.write_table(pa.Table.from_pylist([rows[i] for i in chunk], schema=SCHEMAS[table]),
                           root / table / f"part-{part:06d}.parquet")
    manifest = {
        "lorascale_version": "0.1.0",
        "options": {"k": k, "epsilon": epsilon, "side": side, "precision": "float64", "device": "cpu"},
        "base": {"reference": BASE, "kind": "full", "revision": "abc123"},
        "tuned": [{"reference": t.reference, "kind": t.kind, **({"label": t.label} if t.label else {})}
                  for t in tuned],
        "status": status, "started": "2026-01-01T10:00:00Z", "finished": "2026-01-01T10:05:00Z",
        "some_future_key": {"ignored": True},
    }
    (root / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return root


MIXED = (Tuned("org/full-ft", "full"), Tuned("/scratch/runs/lora-r4/final", "lora"))
