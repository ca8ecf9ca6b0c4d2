"""Multi-positive loss, forward + backward: synrep's vectorised function vs a naive per-anchor reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common import report, timed
from synrep.training.losses import multi_positive_contrastive


def naive(z: torch.Tensor, ids: torch.Tensor, tau: float) -> torch.Tensor:
    """The formula anchor by anchor (how a first implementation usually looks)."""
    n = len(z)
    total = z.new_zeros(())
    for i in range(n):
        keep = torch.arange(n) != i
        logits = z[i] @ z[keep].t() / tau
        pos = (ids[keep] == ids[i]).float()
        total = total - (pos * F.log_softmax(logits, 0)).sum() / pos.sum()
    return total / n


def main() -> dict:
    rows = []
    ratios = {}
    for batch in (1024, 4096):
        torch.manual_seed(0)
        raw = torch.randn(batch, 128, requires_grad=True)
        ids = torch.arange(batch // 4).repeat_interleave(4)

        def ours():
            multi_positive_contrastive(F.normalize(raw, dim=1), ids, temperature=0.1).backward()

        def ref():
            naive(F.normalize(raw, dim=1), ids, 0.1).backward()

        t_ours, t_ref = timed(ours, 3), timed(ref, 1)
        rows.append({"batch": batch, "synrep_ms": 1000 * t_ours, "naive_ms": 1000 * t_ref})
        ratios[f"speed-up at {batch}"] = t_ref / t_ours
    return report("loss", rows, ratios)


if __name__ == "__main__":
    main()
