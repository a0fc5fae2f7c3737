"""On-disk cache of base SVDs, so comparing a base with fine-tune after fine-tune never recomputes them.

An entry is keyed by what determines its content: the sha256 of the base tensor's stored bytes (hashing
~90 MB takes a fraction of a second, against tens of seconds for its SVD), its stored dtype and shape, the
compute precision, the sides kept and the method family ("svd" for torch/cupy, "gram").  The device and
cuSOLVER driver are not in the key: every exact backend agrees to rounding, so a base decomposed on one
machine serves another.  A run over the same base with other fine-tunes, another --out, or a resumed run
therefore hits.

Each entry is one safetensors file (never pickle) holding S (p,) in the compute precision and the singular
vectors each side needs, U0 (m, p) and/or V0 (n, p), with the null level and ||W0||_F as metadata.  It is
written to a temporary name and renamed, so readers only ever see whole files, and concurrent writers of
the same key (Ray actors on one node) just replace identical content.  A file that cannot be read as an
entry of this format is a miss and is rewritten.

The vectors of an fp32 run are stored in fp16 (`compact`): half the bytes of fp32 (32 MB for a 4096 x 4096
matrix, about 11 GB for the left side of every Llama-2-7B matrix instead of 22 GB).  Rounding an orthonormal
column to fp16 moves each entry by at most 2^-11 of itself, so a |cos| against it moves by about
eps_fp16 / sqrt(m) (~1e-5 at m = 4096, measured in docs/CACHE.md), far below any epsilon a user thresholds
at.  A run that uses the cache computes with the compacted vectors whether it wrote the entry or read it, so a
cold run and a warm run give identical numbers; `--no-cache` computes with the unrounded vectors.  fp64 runs
keep their vectors in fp64: they asked for the precision.  Entries of the earlier fp32 format
("lorascale-base-svd/1") have other keys, so they are never read as this format; they are misses.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lorascale.errors import CheckpointFormatError, OutputError
from lorascale.io.safetensors_header import read_header
from lorascale.numerics.backends import BACKENDS
from lorascale.numerics.compare import BaseSpectrum
from lorascale.records import TensorEntry
from lorascale.request import Analysis
from lorascale.store.atomic import write_atomic

FORMAT = "lorascale-base-svd/2"
# How the vectors of each compute precision are stored (see the module docstring).
STORED_VECTOR_DTYPES = {torch.float32: torch.float16, torch.float64: torch.float64}
_LOG = logging.getLogger(__name__)


def content_digest(raw: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (before any upcast)."""
    data = raw.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def compact(base: BaseSpectrum) -> BaseSpectrum:
    """`base` as a cache entry holds it: the vectors rounded to their stored dtype and back, so that a run
    computes with the same numbers whether its entry was just written or read back."""
    vectors = {side: v.to(STORED_VECTOR_DTYPES[v.dtype]).to(v.dtype) for side, v in base.vectors.items()}
    return BaseSpectrum(s=base.s, vectors=vectors, fro=base.fro, null_max_cos=base.null_max_cos)


def method_family(backend: str) -> str:
    """The family of a resolved backend name: backends of one family give the same base SVD to rounding."""
    return BACKENDS[backend].family


class BaseSpectrumCache:
    """Get and put BaseSpectrum entries under `directory` (created on first write)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        self._write_failed = False

    def key(self, raw: torch.Tensor, entry: TensorEntry, analysis: Analysis, backend: str) -> str:
        """The cache key of base tensor `raw` (stored dtype, as read from `entry`) under `analysis` (precision,
        sides) with the base SVD on `backend` (its method family)."""
        parts = {"format": FORMAT, "content": content_digest(raw), "dtype": entry.dtype,
                 "shape": list(raw.shape), "precision": analysis.precision, "sides": sorted(analysis.sides),
                 "method": method_family(backend)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / "base-svd" / key[:2] / f"{key}.safetensors"

    def load(self, key: str, device: str) -> BaseSpectrum | None:
        """The cached spectrum for `key` on `device`, or None (absent, or not a whole entry of this format)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(path, device="cpu")
            _, metadata = read_header(path)
            if metadata.get("format") != FORMAT or metadata.get("key") != key:
                raise ValueError("entry of another format or key")
            null_levels = json.loads(metadata["null_max_cos"])
            if not isinstance(null_levels, dict):
                raise ValueError("null_max_cos is not a JSON object")
            dtype = tensors["s"].dtype  # the compute precision (part of the key)
            if dtype not in STORED_VECTOR_DTYPES or any(tensors[side].dtype != STORED_VECTOR_DTYPES[dtype]
                                                        for side in null_levels):
                raise ValueError("vectors not in the stored dtype of this format")
            vectors = {side: tensors[side].to(device=device, dtype=dtype) for side in null_levels}
            return BaseSpectrum(s=tensors["s"].to(device), vectors=vectors, fro=float(metadata["fro"]),
                                null_max_cos={side: float(v) for side, v in null_levels.items()})
        except (OSError, ValueError, KeyError, TypeError, SafetensorError, CheckpointFormatError) as exc:
            _LOG.warning("ignoring unreadable base-SVD cache entry %s (%s); recomputing", path, exc)
            return None

    def store(self, key: str, base: BaseSpectrum) -> None:
        """Write `base` under `key` atomically.  A cache that cannot be written warns once and is skipped:
        it must never fail the analysis."""
        path = self.path(key)
        tensors = {"s": base.s.detach().cpu().contiguous()}
        tensors.update({side: v.detach().to(STORED_VECTOR_DTYPES[v.dtype]).cpu().contiguous()
                        for side, v in base.vectors.items()})
        metadata = {"format": FORMAT, "key": key, "fro": repr(base.fro),
                    "null_max_cos": json.dumps(base.null_max_cos)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, save(tensors, metadata=metadata))
        except (OSError, OutputError) as exc:  # write_atomic removed its temporary file already
            if not self._write_failed:
                _LOG.warning("cannot write the base-SVD cache under %s (%s); continuing without it",
                             self.directory, exc)
                self._write_failed = True
