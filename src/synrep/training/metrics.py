"""Training metrics accumulated on the device and read back only at log or checkpoint steps.

Reading a loss with ``.item()`` every step makes the host wait for the GPU each step; here each step only
adds to tensors on the device, and :meth:`MetricWindow.read` all-reduces the window's means across ranks
once and copies them to the host once. A non-finite loss is remembered (its first step and value) and
reported by ``read``; since every rank sees the all-reduced means, every rank stops at the same step.
"""

from __future__ import annotations

import math

import torch

from ..distributed import all_reduce_mean_


class MetricWindow:
    """Running sums of ``loss``, ``grad_norm`` and each loss term since the last :meth:`read`."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self._reset()

    def _reset(self) -> None:
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None
        self.count = 0
        self.first_bad_step: torch.Tensor = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.first_bad_value: torch.Tensor = torch.zeros((), dtype=torch.float64, device=self.device)
        self.latest: dict[str, float | torch.Tensor] = {}

    def add(self, step: int, loss: torch.Tensor, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor,
            latest: dict[str, float | torch.Tensor] | None = None) -> None:
        """Add one step (no host sync). ``latest`` holds values logged as they are at the last step (e.g. EMA momentum)."""
        loss = loss.detach()
        values = torch.stack([loss.double(), grad_norm.detach().double(), *(t.detach().double() for t in terms.values())])
        self.names = ["loss", "grad_norm", *terms]
        self.sums = values if self.sums is None else self.sums + values
        self.count += 1
        newly = ~torch.isfinite(loss) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(newly, torch.full_like(self.first_bad_step, step), self.first_bad_step)
        self.first_bad_value = torch.where(newly, loss.double(), self.first_bad_value)
        self.latest.update(latest or {})

    def read(self) -> tuple[dict[str, float], tuple[int, float] | None]:
        """Window means across ranks, and ``(step, value)`` of this rank's first non-finite loss (or None when all finite)."""
        means = all_reduce_mean_(self.sums / self.count)
        packed = torch.cat([means, self.first_bad_step.double()[None], self.first_bad_value[None]]).tolist()  # one copy to host
        out = dict(zip(self.names, packed[: len(self.names)]))
        out.update({k: float(v) for k, v in self.latest.items()})
        bad_step, bad_value = int(packed[-2]), packed[-1]
        finite = all(math.isfinite(v) for v in packed[: len(self.names)])
        self._reset()
        if finite:
            return out, None
        return out, (bad_step, bad_value)
