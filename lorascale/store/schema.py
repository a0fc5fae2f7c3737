"""The output contract: table names and their exact Arrow schemas.

Users and later features (report, resume) query these tables, so names and types change only with a
major version.  Each table is a Parquet dataset directory `results/<table>/part-*.parquet`.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

MATRICES = "matrices"
SPECTRA = "spectra"
SIMILARITY = "similarity"
TABLES = (MATRICES, SPECTRA, SIMILARITY)
MANIFEST = "manifest.json"
REPORT_DIR = "report"  # default place of `lorascale report` inside a results directory
# The generator meta tag of a report's index.html: marks a directory as a lorascale report, which a
# rebuild or `run --overwrite` may replace (and nothing else).
REPORT_GENERATOR = "lorascale report"

# Values of matrices.method: how the tuned singular vectors behind max_cos and `intruders` were computed.
METHOD_EXACT = "exact"  # --mode exact: the full SVD of W
METHOD_TOPK = "topk"  # --mode topk: top-K triplets by block Krylov iteration, and its guard passed
METHOD_TOPK_FALLBACK = "topk->exact"  # --mode topk, the guard failed (flat spectrum): the full SVD was used
METHODS = (METHOD_EXACT, METHOD_TOPK, METHOD_TOPK_FALLBACK)

# The expert of a mixture-of-experts matrix (per-expert tensor `experts.N.*`, or slice N of a fused 3-D expert
# tensor, whose `matrix` is then `name[N]`); null for every other matrix.  Added after the first release: last
# and nullable in every table, so older readers keep working and runs written before it read as null.
EXPERT_FIELD = pa.field("expert", pa.int32())

# The spectral measures of an update (issue 25, numerics/spectral.py; docs/METHOD.md "The other standard
# questions about an update"), appended to the matrices table: null where undefined (dW = 0) or not computed.
UPDATE_FIELDS = (
    pa.field("delta_rank_90", pa.int32()),  # energy rank of dW at 90%: 0 for dW = 0
    pa.field("delta_rank_99", pa.int32()),  # ... at 99%
    pa.field("base_rank_90", pa.int32()),  # energy rank of W0 at 90%
    pa.field("delta_stable_rank", pa.float64()),  # ||dW||_F^2 / s_1(dW)^2; null for dW = 0
    pa.field("tuned_stable_rank", pa.float64()),  # ||W||_F^2 / s_1(W)^2
    pa.field("amplification", pa.float64()),  # Hu et al. 7.3: ||dW||_F / ||U_r^T W0 V_r||_F; null for dW = 0
    pa.field("amplification_rank", pa.int32()),  # the r used: the adapter's rank, or the run's amplification_rank
    pa.field("subspace_overlap", pa.float64()),  # phi(top-k left vectors of W, of W0); null without the left side
    pa.field("subspace_overlap_right", pa.float64()),  # the same on the right side, where the run computed it
)

# One row per (tuned model, matrix).
MATRICES_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),  # tuned reference exactly as given
        pa.field("matrix", pa.string(), nullable=False),  # tensor name in the base's naming
        pa.field("layer", pa.int32()),  # null when the name has no layer index
        pa.field("module", pa.string(), nullable=False),  # e.g. q_proj
        pa.field("rows", pa.int64(), nullable=False),
        pa.field("cols", pa.int64(), nullable=False),
        pa.field("update", pa.string(), nullable=False),  # "full", "lora" or "dora" (DoRA adapters, added later)
        pa.field("delta_fro", pa.float64(), nullable=False),  # ||W - W0||_F
        pa.field("delta_rel", pa.float64(), nullable=False),  # ||W - W0||_F / ||W0||_F
        pa.field("delta_effective_rank", pa.float64()),  # null when W == W0
        # At the run's k and epsilon, on the left side (the paper's), or on the right for a --side right run.
        pa.field("intruders", pa.int32(), nullable=False),
        pa.field("null_max_cos", pa.float64(), nullable=False),  # E[max |cos|] of a random unit vector
        pa.field("seconds", pa.float64(), nullable=False),  # compute time for this (model, matrix)
        # One of METHODS.  Added after the first release, last and nullable so that older readers keep working
        # and runs written before it read as null.
        pa.field("method", pa.string()),
        # Added later, last and nullable like `method` (runs written before them read as null):
        # the tuned model's display label (`--tuned NAME=REF`, else its short name; `model` keeps the reference),
        pa.field("label", pa.string()),
        # and the right side's intruder count when the run computed that side (--side right or both).  With
        # --side both, `intruders` counts the left side (the paper's); with --side right both columns count it.
        pa.field("intruders_right", pa.int32()),
        # and the expert of a mixture-of-experts matrix (null otherwise).
        EXPERT_FIELD,
        # Added with issue 25, last and nullable (older runs read as null); docs/REFERENCE.md, "Columns".
        *UPDATE_FIELDS,
    ]
)

# One row per singular value.  Base rows: model = base reference, role = "base", max_cos/argmax null.
SPECTRA_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("role", pa.string(), nullable=False),  # "base" or "tuned"
        pa.field("matrix", pa.string(), nullable=False),
        pa.field("side", pa.string(), nullable=False),  # "left" or "right"
        pa.field("rank", pa.int32(), nullable=False),  # 0-based, descending sigma
        pa.field("sigma", pa.float64(), nullable=False),
        pa.field("max_cos", pa.float64()),  # max_i |cos(tuned_j, base_i)| over ALL base vectors
        pa.field("argmax", pa.int32()),  # the base rank i reaching it
        EXPERT_FIELD,
        # Added with issue 25, last and nullable (older runs read as null).  Role "delta" rows (dW's singular
        # values, one block per side like the base's) came with them.
        pa.field("sigma_ratio", pa.float64()),  # tuned rows: s_j(W) / s_argmax(W0) (rescale vs rotate)
        # tuned rows of a topk run whose guard passed: the Wedin bound on sin(angle) of vector j to the true one
        # (<= 1e-4 for the counted top k; |max_cos_j - exact| <= it); null where the exact SVD gave the vectors.
        pa.field("angle_bound", pa.float64()),
    ]
)

# The top-10 x top-10 block of |U^T U0| (or |V^T V0| for side = right).
SIMILARITY_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("matrix", pa.string(), nullable=False),
        pa.field("side", pa.string(), nullable=False),
        pa.field("tuned_rank", pa.int32(), nullable=False),
        pa.field("base_rank", pa.int32(), nullable=False),
        pa.field("cos", pa.float64(), nullable=False),
        EXPERT_FIELD,
    ]
)

# Issue 25: with two or more tuned models, one row per ordered pair of distinct models, matrix and side computed.
PAIRS = "pairs"
PAIRS_SCHEMA = pa.schema(
    [
        pa.field("model_a", pa.string(), nullable=False),  # tuned references exactly as given
        pa.field("model_b", pa.string(), nullable=False),
        pa.field("matrix", pa.string(), nullable=False),
        pa.field("side", pa.string(), nullable=False),
        pa.field("agreement", pa.float64()),  # mean over j < k of max_{j' < k} |cos(u_j^A, u_j'^B)|
        pa.field("subspace_overlap", pa.float64()),  # phi of A's and B's top-k subspaces (symmetric)
        EXPERT_FIELD,
    ]
)

# `lorascale mitigate` only: one row per (adapter, matrix) it analysed, and what it did to the matrix.
MITIGATION = "mitigation"
# Values of mitigation.status.
MITIGATED, UNCHANGED = "mitigated", "unchanged: no intruders"  # else "not mitigated: <why>"
MITIGATION_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),  # the adapter reference exactly as given
        pa.field("matrix", pa.string(), nullable=False),  # tensor name in the base's naming
        pa.field("module", pa.string(), nullable=False),  # the adapter's module path (its rank_pattern key)
        pa.field("rows", pa.int64(), nullable=False),
        pa.field("cols", pa.int64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("rank_before", pa.int32(), nullable=False),
        pa.field("rank_after", pa.int32(), nullable=False),
        pa.field("intruders_before", pa.int32(), nullable=False),  # at the run's k and epsilon
        pa.field("intruders_after", pa.int32()),  # of the written adapter; null when not mitigated
        pa.field("mitigation_lambda", pa.float64(), nullable=False),
        pa.field("relative_error", pa.float64()),  # ||W0 + written dW' - W'||_F / ||W'||_F; null if unchanged
        pa.field("delta_ratio", pa.float64()),  # ||written dW'||_F / ||dW||_F
        pa.field("seconds", pa.float64(), nullable=False),
        EXPERT_FIELD,
    ]
)
FACTORS_DIR = "factors"  # mitigate: the new lora_A / lora_B of each part, as safetensors, until the adapter is whole
ADAPTER_DIR = "adapter"  # mitigate: the mitigated PEFT adapter, written once every matrix is done
# Tables written only by runs that have rows for them (older readers never see them).
OPTIONAL_TABLES = (MITIGATION, PAIRS)

SCHEMAS: dict[str, pa.Schema] = {
    MATRICES: MATRICES_SCHEMA,
    SPECTRA: SPECTRA_SCHEMA,
    SIMILARITY: SIMILARITY_SCHEMA,
    MITIGATION: MITIGATION_SCHEMA,
    PAIRS: PAIRS_SCHEMA,
}


def is_report_directory(path: Path) -> bool:
    """True when `path` holds a report lorascale wrote (its index.html carries the generator tag)."""
    index = path / "index.html"
    if not index.is_file() or index.is_symlink():
        return False
    with index.open(encoding="utf-8", errors="replace") as handle:
        head = handle.read(4096)
    return f'<meta name="generator" content="{REPORT_GENERATOR}">' in head


# The file lorascale writes into a mitigated adapter directory (beside peft's files): marks it as lorascale's,
# so a rerun or `--overwrite` may replace it (and nothing else), and says what was done to it.
MITIGATED_MARKER = "lorascale-mitigation.json"


def is_mitigated_adapter(path: Path) -> bool:
    """True when `path` is an adapter directory `lorascale mitigate` wrote."""
    marker = path / MITIGATED_MARKER
    return marker.is_file() and not marker.is_symlink()
