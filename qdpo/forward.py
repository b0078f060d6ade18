"""One micro-batch through the model: reference and policy log-probs, then the objective.

Shared by the training step, evaluation and `qdpo bench`, so they cannot compute the loss two
ways. The attention mask is built once here and used by both passes.
"""

from __future__ import annotations

from typing import Any

import torch

from qdpo import distributed
from qdpo.batching import PackedBatch
from qdpo.logps import SequenceLogps, batch_mask, sequence_logps
from qdpo.losses import LossOutput, Objective, PreferenceBatch
from qdpo.model import reference_mode


def forward_pair_batch(model: Any, batch: PackedBatch, objective: Objective,
                       reference: SequenceLogps | None = None,
                       ) -> tuple[SequenceLogps, SequenceLogps | None, LossOutput]:
    """Policy log-probs, reference log-probs (computed online unless given), the loss output."""
    mask = batch_mask(model, batch)
    need_ref = objective.needs_reference
    if need_ref and reference is None:
        with reference_mode(model):
            reference = sequence_logps(model, batch, mask)
    pol = sequence_logps(model, batch, mask)
    ref = reference if need_ref else None
    pb = PreferenceBatch(
        policy_chosen_logps=pol.chosen, policy_rejected_logps=pol.rejected,
        chosen_lengths=batch.chosen_lengths, rejected_lengths=batch.rejected_lengths,
        reference_chosen_logps=ref.chosen if ref else None,
        reference_rejected_logps=ref.rejected if ref else None,
        weights=batch.weights,
        policy_chosen_public_logps=pol.chosen_public,
        policy_rejected_public_logps=pol.rejected_public,
        reference_chosen_public_logps=ref.chosen_public if ref else None,
        reference_rejected_public_logps=ref.rejected_public if ref else None)
    return pol, ref, objective(pb)


class MetricAccumulator:
    """Sums per-pair values over a step (or an eval pass) and reports the field's names."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}  # device tensors: no GPU sync per micro-batch
        self.n = 0
        self.counts: dict[str, float] = {}  # reported as totals, not per pair (tokens)

    def count(self, **amounts: float) -> None:
        for k, v in amounts.items():
            self.counts[k] = self.counts.get(k, 0) + v

    def add(self, pol: SequenceLogps, ref: SequenceLogps | None, out: LossOutput) -> None:
        self.n += pol.chosen.shape[0]
        vals = {
            "loss": out.losses.detach().float().sum(),
            "rewards/chosen": out.chosen_rewards.float().sum(),
            "rewards/rejected": out.rejected_rewards.float().sum(),
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().sum(),
            "rewards/margins": (out.chosen_rewards - out.rejected_rewards).float().sum(),
            "logps/chosen": pol.chosen.detach().float().sum(),
            "logps/rejected": pol.rejected.detach().float().sum(),
        }
        if ref is not None:
            vals["logps/ref_chosen"] = ref.chosen.float().sum()
            vals["logps/ref_rejected"] = ref.rejected.float().sum()
        for k, v in out.metrics.items():
            vals[k] = v.detach().float().sum()
        for k, v in vals.items():
            v = v.detach()
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def totals(self) -> tuple[dict[str, float], int, dict[str, float]]:
        """The sums over this process's pairs, their count and the counts, summed over the
        ranks of a distributed job (distributed.py): every rank gets the same figures."""
        # one device-to-host copy for all metrics instead of one sync per metric
        values = torch.stack([v.float() for v in self.sums.values()]).tolist() \
            if self.sums else []
        mine = (dict(zip(self.sums, values)), self.n, dict(self.counts))
        if not distributed.ranks().active:
            return mine
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        n = 0
        for part, pairs, part_counts in distributed.gather(mine):
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + v
            for k, v in part_counts.items():
                counts[k] = counts.get(k, 0) + v
            n += pairs
        return sums, n, counts

    def result(self, prefix: str = "") -> dict[str, float]:
        """Means per pair (with `prefix`), then the counts as totals."""
        sums, n, counts = self.totals()
        return {**{prefix + k: v / max(1, n) for k, v in sums.items()}, **counts}
