"""Frozen records that cross module boundaries.

Data flows one way: a reference string -> ResolvedCheckpoint (io/resolve.py) -> Checkpoint with a tensor
index (io/) -> MatrixJob list (plan.py) -> MatrixResult (execute/, numerics/) -> Parquet (store/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Kind = Literal["full", "lora"]
# How a tuned W was obtained: read whole ("full"), W0 + s*B@A ("lora"), or DoRA's rescaled merge ("dora").
Update = Literal["full", "lora", "dora"]
Side = Literal["left", "right"]


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where a checkpoint reference lives on local disk, before any header is read."""

    reference: str  # exactly as the user gave it
    source: Literal["local-dir", "local-file", "hub"]
    kind: Kind
    root: Path  # directory holding the files (hub: the snapshot directory)
    weight_files: tuple[Path, ...]  # safetensors files to index, shards in index order
    index_file: Path | None = None  # model.safetensors.index.json when sharded
    adapter_config: Path | None = None  # adapter_config.json for PEFT adapters
    config: Path | None = None  # config.json when present
    repo_id: str | None = None  # hub only
    revision: str | None = None  # hub only: the resolved commit hash
    file_hashes: dict[str, str] = field(default_factory=dict, compare=False)  # file name -> sha256 when known
    headers_only: bool = False  # hub: weight files not fetched; headers come by HTTP range (inspect)

    @property
    def weight_format(self) -> Literal["safetensors", "pytorch"]:
        """"pytorch" for pickled torch.save weights (.bin, indexed by io/torch_bin.py), else "safetensors"."""
        return "pytorch" if any(p.suffix == ".bin" for p in self.weight_files) else "safetensors"


@dataclass(frozen=True)
class HubFile:
    """A file of a Hub commit: what another machine needs to find the same bytes in its own hub cache."""

    repo_id: str
    revision: str  # the commit hash
    filename: str  # path inside the repo, "/"-separated


@dataclass(frozen=True)
class RemoteFile:
    """A Hub weight file known from its header alone (hub streaming): what identifies its bytes before they
    are downloaded, and after a --scratch-dir copy has been deleted."""

    size: int
    header_sha256: str  # sha256 of the safetensors header JSON
    sha256: str | None = None  # the sha256 the Hub publishes (LFS files); None for files stored in git


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as described by a safetensors header or a torch.save zip; no data is read to build it."""

    name: str  # the name stored in the file
    file: Path
    dtype: str  # safetensors dtype code: F32, F16, BF16, F64, ...
    shape: tuple[int, ...]
    data_start: int  # absolute byte offsets of the data in `file`
    data_end: int
    hub: HubFile | None = None  # set when `file` is in a hub cache (io/resolve.hub_file finds it elsewhere)
    # Set on one expert's slice of a fused [num_experts, d1, d2] tensor `name` (plan.expert_slice): then
    # shape is the slice's (d1, d2) and data_start/data_end its contiguous byte range inside the 3-D tensor.
    expert: int | None = None
    # Element strides of a non-contiguous view saved by torch.save (data_start..data_end spans the view);
    # None: contiguous row-major, as every safetensors tensor is.
    strides: tuple[int, ...] | None = None

    @property
    def location(self) -> Path | str:
        """How messages name this tensor's file: its path, or for a Hub file the repo id the user asked for and
        the file's path in the repo, then the local copy (a cache path alone does not say which model it is)."""
        return self.file if self.hub is None else hub_location(self.hub.repo_id, self.hub.filename, self.file)


def hub_location(repo: str, filename: str, local: Path) -> str:
    """`org/name: path/in/repo (local copy)`: how a message names a file of a Hub checkpoint."""
    return f"{repo}: {filename} ({local})"


@dataclass(frozen=True)
class AdapterSettings:
    """The parts of a PEFT LoraConfig that change how W is rebuilt."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    use_dora: bool = False  # DoRA: W = m * (W0 + s*B@A) / row norms (numerics/merge.py)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: tuple[str, ...] | str | None = None
    target_parameters: tuple[str, ...] = ()  # parameter paths (peft's ParamWrapper, e.g. mlp.experts.gate_up_proj)
    base_model_name_or_path: str | None = None


@dataclass(frozen=True)
class LoraFactors:
    """Where to find A [r, in] and B [out, r] of one adapted matrix, and its scale s."""

    a: TensorEntry
    b: TensorEntry
    rank: int
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    fan_in_fan_out: bool  # W0 stored [in, out] (GPT-2 Conv1D, [E, in, out] experts): add (B @ A)^T
    # peft's ParamWrapper on a fused [E, d1, d2] expert parameter: A is [r*E, in] and B [out, r*E]; expert e
    # uses rows e*r..(e+1)*r of A and columns e, e+E, ... of B (peft reshapes B to (out, r, E)).
    expert: int | None = None
    num_experts: int = 1
    # Rows [start, stop) of the (expert's) update this matrix takes: one part (w1 or w3) of a fused
    # gate_up_proj that the base stores per expert (moe_layouts.py); rows of B, since W = W0 + s*B[rows]@A.
    out_rows: tuple[int, int] | None = None
    magnitude: TensorEntry | None = None  # DoRA's lora_magnitude_vector m [out]; None for plain LoRA


@dataclass(frozen=True)
class TunedSource:
    """How to obtain W for one tuned model: a full tensor, W0 + s * B @ A, or DoRA's merge of it."""

    model: str  # the tuned reference exactly as given
    update: Update
    full: TensorEntry | None = None
    lora: LoraFactors | None = None
    label: str | None = None  # display label (`NAME=REF`, or the default short name); None: not given


@dataclass(frozen=True)
class MatrixJob:
    """The unit of work: one base matrix and every tuned model's version of it."""

    matrix: str  # tensor name in the base's naming
    layer: int | None
    module: str
    rows: int
    cols: int
    base: TensorEntry
    tuned: tuple[TunedSource, ...]
    base_model: str  # the base reference exactly as given: labels the base rows, as TunedSource.model does
    expert: int | None = None  # expert index for MoE expert matrices (per-expert tensors or fused slices)
    base_rows: bool = True  # write the base's spectrum rows (False: a grown run, whose rows hold them already)

    @property
    def cost(self) -> float:
        """Relative SVD cost, for largest-first scheduling: ~ m * n * min(m, n) per SVD."""
        m, n = self.rows, self.cols
        return float(m) * n * min(m, n) * (1 + len(self.tuned))


@dataclass(frozen=True)
class Skipped:
    """A matrix that was not analysed, and why (goes to the manifest)."""

    matrix: str
    reason: str
    model: str | None = None  # None: skipped for every model


@dataclass(frozen=True)
class MatrixResult:
    """Everything the tables need about one matrix, for the base and every tuned model.

    Columns are plain lists/arrays keyed by the column names of store/schema.py, so the result is small
    and cheap to ship from a worker to the driver.
    """

    matrix: str
    matrices: dict[str, list]
    spectra: dict[str, object]
    similarity: dict[str, object]
    # `lorascale mitigate` only: the row of the mitigation table, and the adapter tensors that replace the
    # input's (stored name -> CPU tensor in the adapter's dtype); None in an analysis run.
    mitigation: dict[str, list] | None = None
    factors: dict[str, object] | None = None
    pairs: dict[str, list] | None = None  # rows of the pairs table (two or more tuned models), else None


@dataclass(frozen=True)
class NamedReference:
    """A checkpoint reference and the label that names it in tables, legends and the summary."""

    reference: str  # exactly as the user gave it, without any `NAME=` prefix
    label: str
    explicit: bool = False  # the label was given (NAME=REF, or a dict key), not the default short name
