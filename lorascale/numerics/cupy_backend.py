"""The "cupy" backend: cupy.linalg.svd (cuSOLVER gesvd) on CUDA tensors, shared through DLPack (no copy).

cupy is optional and imported only when this backend is used; execute/routes.resolve checks that it is
installed (importlib, without importing it) before a run starts.  cupy runs on torch's current stream, so
no extra synchronisation is needed between the two libraries.
"""

from __future__ import annotations

import torch

from lorascale.errors import NumericalError, OptionError, option
from lorascale.numerics.decomposition import Decomposition


def _cupy():
    try:
        import cupy
        import cupyx
    except ImportError as exc:
        raise OptionError(f"{option('backend', 'cupy')} requested but cupy cannot be imported",
                          fix=f"pip install 'lorascale[cupy]', or use {option('backend', 'torch')}") from exc
    return cupy, cupyx


def _run(matrix: torch.Tensor, compute_uv: bool):
    if not matrix.is_cuda:
        raise OptionError("the cupy backend needs a CUDA tensor",
                          fix=f"use {option('device', 'cuda')}, or {option('backend', 'torch')}")
    cupy, cupyx = _cupy()
    import numpy as np

    with cupy.cuda.Device(matrix.device.index or 0), \
            cupy.cuda.ExternalStream(torch.cuda.current_stream(matrix.device).cuda_stream), \
            cupyx.errstate(linalg="raise"):  # cupy ignores cuSOLVER's info unless asked
        array = cupy.from_dlpack(matrix.contiguous())
        try:
            result = cupy.linalg.svd(array, full_matrices=False, compute_uv=compute_uv)
        except np.linalg.LinAlgError as exc:
            raise NumericalError(f"cupy SVD of a {tuple(matrix.shape)} matrix failed: {exc}") from exc
    if compute_uv:
        return tuple(torch.from_dlpack(part) for part in result)
    return torch.from_dlpack(result)


def svd(matrix: torch.Tensor, *, driver: str | None = None) -> Decomposition:
    """(U (m, p), S (p,), Vh (p, n)) of a CUDA tensor, as torch tensors on the same device.

    `driver` is accepted for the common backend signature and unused: cupy always calls cuSOLVER gesvd."""
    return Decomposition(*_run(matrix, compute_uv=True))


def svdvals(matrix: torch.Tensor, *, driver: str | None = None) -> torch.Tensor:
    """Singular values (p,) of a CUDA tensor, descending; `driver` unused (see svd)."""
    return _run(matrix, compute_uv=False)


def left_svd(matrix: torch.Tensor, *, driver: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """U (m, p) and S (p,) of a CUDA tensor: svd() without V (cuSOLVER computes it anyway)."""
    u, s, _ = svd(matrix, driver=driver)
    return u, s
