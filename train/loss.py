"""The causal-LM loss every strategy computes, as a sum and a count (not a mean)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from job.baichuan import IGNORE_INDEX


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, z_loss_weight: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss as (sum over real tokens, number of real tokens).

    Returning the sum and the count lets the training loop divide by the token count of
    the whole global batch (across micro-batches and ranks), so every token weighs the
    same however the batch was split. Labels equal to -100 are ignored. The optional
    z-loss (Baichuan2's) adds ``z_loss_weight · Σ logsumexp(logits)²`` over the same tokens.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    real = shift_labels != IGNORE_INDEX
    if z_loss_weight:
        lse = torch.logsumexp(shift_logits, dim=-1)
        loss = loss + z_loss_weight * (lse.pow(2) * real).sum()
    return loss, real.sum()
