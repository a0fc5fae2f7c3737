"""A tuned matrix W as the top-K method uses it: products W X and W^T Y, without forming W when it is an
adapter's merge.  Pure: tensors in, tensors out.

- `Dense(w)`: a full fine-tune's (or a DoRA merge's) W itself.
- `LowRankUpdate(w0, a, b, scale)`: W = W0 + s * B @ A, as peft merges a LoRA adapter; `transposed` for a
  W0 stored [in, out] (GPT-2 Conv1D, fan_in_fan_out), where W = W0 + s * (B @ A)^T.  A product costs the
  one with W0 plus O((m + n) r) per column; W (m x n) is formed only by `dense()` (the exact SVD, the
  fallback of a failed guard).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorascale.numerics.merge import lora_merge


@dataclass(frozen=True)
class Dense:
    """W given whole."""

    w: torch.Tensor  # (m, n)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return self.w.dtype

    @property
    def device(self) -> torch.device:
        return self.w.device

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.w @ x  # (m, n) @ (n, b) -> (m, b)

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        return self.w.T @ y  # (n, m) @ (m, b) -> (n, b)

    def dense(self) -> torch.Tensor:
        return self.w


@dataclass(frozen=True)
class LowRankUpdate:
    """W = W0 + s * B @ A (W0 (m, n), B (m, r), A (r, n)), or W0 + s * (B @ A)^T when `transposed` (W0 (m, n)
    stored [in, out]: then A is (r, m) and B (n, r))."""

    w0: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transposed: bool = False
    _merged: list = field(default_factory=list, repr=False, compare=False)  # dense(), formed once

    def __post_init__(self) -> None:
        _check_products_finite(self)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w0.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return self.w0.dtype

    @property
    def device(self) -> torch.device:
        return self.w0.device

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:  # W = W0 + s A^T B^T: (m, n) @ (n, b) + s (m, r) @ ((r, n) @ (n, b))
            return self.w0 @ x + self.scale * (self.a.T @ (self.b.T @ x))
        return self.w0 @ x + self.scale * (self.b @ (self.a @ x))  # (m, r) @ ((r, n) @ (n, b))

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        if self.transposed:  # W^T = W0^T + s B A: (n, m) @ (m, b) + s (n, r) @ ((r, m) @ (m, b))
            return self.w0.T @ y + self.scale * (self.b @ (self.a @ y))
        return self.w0.T @ y + self.scale * (self.a.T @ (self.b.T @ y))  # (n, r) @ ((r, m) @ (m, b))

    def dense(self) -> torch.Tensor:
        """W itself (m, n), merged as peft merges it (numerics/merge.lora_merge), once."""
        if not self._merged:
            self._merged.append(lora_merge(self.w0, self.a, self.b, self.scale, fan_in_fan_out=self.transposed))
        return self._merged[0]


Operator = Dense | LowRankUpdate


def _check_products_finite(update: LowRankUpdate) -> None:
    """Refuse an update whose merge would overflow, as forming W0 + s*B@A would (lora_merge's error), without
    forming it: every entry of s*B@A is at most |s| * max_i ||B_i,:|| * max_j ||A_:,j|| (Cauchy-Schwarz), so
    the merge is only formed to check when that bound comes near the dtype's range."""
    limit = torch.finfo(update.w0.dtype).max
    bound = (abs(update.scale) * float(torch.linalg.vector_norm(update.b.double(), dim=1).max())
             * float(torch.linalg.vector_norm(update.a.double(), dim=0).max()))
    peak = float(update.w0.abs().max()) if update.w0.numel() else 0.0
    if not (bound == bound) or bound + peak >= limit / 4:  # NaN, or near the range: check the real merge
        update.dense()  # lora_merge raises NumericalError("merging the adapter overflowed ...") if it does
