"""Load one tensor at a time, straight from its byte range, in the dtype it is stored in.

Reading the byte range ourselves (rather than mmap-ing the whole shard) keeps resident memory at one
matrix, whatever the shard size, and keeps 16-bit tensors 16-bit until they reach the compute device.
Pickled torch.save weights (.bin) come here the same way: io/torch_bin.py turns them into byte ranges, so
reading their data never involves an unpickler.
"""

from __future__ import annotations

import torch

from lorascale.errors import CheckpointFormatError, NumericalError, option
from lorascale.records import TensorEntry

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}


def load_tensor(entry: TensorEntry) -> torch.Tensor:
    """Read `entry` from disk as a CPU tensor of its stored dtype and shape."""
    dtype = TORCH_DTYPES.get(entry.dtype)
    if dtype is None:
        raise CheckpointFormatError(f"dtype {entry.dtype} is not a floating type lorascale can analyse",
                                    path=entry.location, tensor=entry.name)
    nbytes = entry.data_end - entry.data_start
    raw = torch.empty(nbytes, dtype=torch.uint8)
    try:
        with entry.file.open("rb") as handle:
            handle.seek(entry.data_start)
            got = handle.readinto(memoryview(raw.numpy()))
    except OSError as exc:
        raise CheckpointFormatError(f"cannot read tensor data: {exc.strerror or exc}",
                                    path=entry.location, tensor=entry.name) from exc
    if got != nbytes:
        raise CheckpointFormatError(f"file ended after {got} of {nbytes} bytes of this tensor",
                                    path=entry.location, tensor=entry.name,
                                    fix="the file is truncated; re-download or re-save it")
    # safetensors data is little-endian, and torch_bin refuses big-endian .bin files; so is every platform
    # torch ships for.
    if entry.strides is None:
        return raw.view(dtype).reshape(entry.shape)
    # A non-contiguous view from a torch.save file: the range spans it; copy it out contiguous.
    return torch.as_strided(raw.view(dtype), entry.shape, entry.strides).contiguous()


def to_compute(tensor: torch.Tensor, entry: TensorEntry, *, dtype: torch.dtype,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Move a stored tensor to the device first, then upcast there (16-bit on the wire), checking finiteness."""
    out = tensor.to(device=device, non_blocking=True).to(dtype)
    if not bool(torch.isfinite(out).all()):
        raise NumericalError("tensor holds NaN or Inf values", path=entry.location, tensor=entry.name,
                             fix=f"the checkpoint is corrupt or diverged; leave this matrix out with {option('exclude')}")
    return out
