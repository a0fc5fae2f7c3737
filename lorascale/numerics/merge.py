"""Rebuild a tuned matrix from an adapter (LoRA, DoRA), as peft's merge does.  Pure: tensors in, tensor out."""

from __future__ import annotations

import torch

from lorascale.errors import NumericalError


def lora_merge(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, *,
               fan_in_fan_out: bool = False) -> torch.Tensor:
    """W = W0 + s * B @ A, as peft's merge_and_unload does it; (B @ A)^T added to a W0 stored [in, out]
    (`fan_in_fan_out`, GPT-2 Conv1D).  Computed in the inputs' dtype (the run's precision).

    Shapes: w0 (out, in) or (in, out), a (r, in), b (out, r).  Raises NumericalError (no file context; the
    caller adds it) when the merge overflows although its inputs are finite.
    """
    update = scale * (b @ a)  # (out, r) @ (r, in) -> (out, in)
    w = w0 + (update.T if fan_in_fan_out else update)
    del update
    if not bool(torch.isfinite(w).all()):
        raise NumericalError(
            f"merging the adapter overflowed: W0 + s*B@A (s = {scale:g}) has Inf/NaN values in "
            f"{str(w.dtype).removeprefix('torch.')}")
    return w


def dora_merge(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor, *,
               fan_in_fan_out: bool = False) -> torch.Tensor:
    """DoRA (Liu et al. 2024) merged the way peft's DoraLinearVariant.merge does it:

        V  = W0 + s * B @ A                  (out, in); W0 transposed first when stored [in, out]
        W' = diag(m / ||V||_row) @ V         ||V||_row: the L2 norm of each output row (peft's
                                             get_weight_norm, torch.linalg.norm(V, dim=1))

    returned in W0's stored layout ([in, out] with `fan_in_fan_out`, GPT-2 Conv1D).  peft computes the norm
    detached from the graph; here nothing has a graph, so the values are the same.  W' - W0 has full rank in
    general (the row scaling touches all of W0), so its spectrum must come from an SVD, not the r x r core.

    Shapes: w0 (out, in) or (in, out), a (r, in), b (out, r), magnitude (out,).  Computed in the inputs'
    dtype (the run's precision).  Raises NumericalError (no file context; the caller adds it) when V
    overflows or has a zero row, where peft's division would produce Inf/NaN.
    """
    update = scale * (b @ a)  # (out, r) @ (r, in) -> (out, in)
    v = (w0.T if fan_in_fan_out else w0) + update  # (out, in)
    del update
    norm = torch.linalg.vector_norm(v, dim=1)  # (out,)
    if not (bool(torch.isfinite(v).all()) and bool(torch.isfinite(norm).all())):
        raise NumericalError(f"merging the DoRA adapter overflowed: W0 + s*B@A (s = {scale:g}) or its row norms "
                             f"have Inf/NaN values in {str(v.dtype).removeprefix('torch.')}")
    zero = torch.nonzero(norm == 0).flatten()
    if zero.numel():
        dtype = str(v.dtype).removeprefix("torch.")
        if bool((v[zero] != 0).any(dim=1).all()):  # tiny rows whose squares underflow, none really zero
            raise NumericalError(f"the row norms of W0 + s*B@A underflow to 0 in {dtype} (first: output "
                                 f"{int(zero[0])}); DoRA divides each output row by its norm")
        raise NumericalError(f"{zero.numel()} row(s) of W0 + s*B@A are all zero or underflow (first: output "
                             f"{int(zero[0])}); DoRA divides each output row by its norm, so the merge is undefined "
                             "(peft gives NaN)")
    merged = v.mul_((magnitude / norm).unsqueeze(1))  # (out, in) * (out, 1), in place: v is our own temporary
    if not bool(torch.isfinite(merged).all()):
        raise NumericalError("merging the DoRA adapter overflowed: m * V / ||V|| has Inf/NaN values in "
                             f"{str(v.dtype).removeprefix('torch.')}")
    return merged.T.contiguous() if fan_in_fan_out else merged
