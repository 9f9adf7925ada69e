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


# --------------------------------------------------------------------------------------
# The head and the loss together, a chunk of tokens at a time
# --------------------------------------------------------------------------------------
def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t's target (label t+1) at position t, -100 at each row's last position: the
    shift `causal_lm_loss` makes, without cutting the hidden states (so they stay a view)."""
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    z_loss_weight: float = 0.0,
    chunk_tokens: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_lm_loss(hidden @ weight.T, labels, z_loss_weight)` without the [tokens × vocab]
    logits: the head's matmul and the loss run `chunk_tokens` tokens at a time, and the
    gradients of `hidden` and `weight` are computed in the same pass (`_ChunkedLinearCE`), so at
    most one chunk's logits (fp32, plus their compute-dtype copy under bf16) exists at once and
    backward costs no second head matmul. Same (sum, count) contract as `causal_lm_loss`.

    hidden [B, S, h] are the final (normed) hidden states, weight [V, h] the head's (already
    row-normalised for Baichuan2's NormHead: autograd takes the gradient through the
    normalisation). Under autocast the matmuls run in its dtype, as `F.linear` would; the weight
    enters in its own dtype (fp32 master weights) and gets its gradient in it, accumulated in fp32
    over the chunks, so that buffer is the gradient autograd hands on, not an extra copy."""
    assert chunk_tokens > 0, chunk_tokens
    targets = shifted_labels(labels).reshape(-1).to(hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    if torch.is_autocast_enabled(h.device.type):
        h = h.to(torch.get_autocast_dtype(h.device.type))
    elif weight.dtype != h.dtype:
        h = h.to(weight.dtype)
    loss = _ChunkedLinearCE.apply(h, weight, targets, float(z_loss_weight), int(chunk_tokens))
    return loss, (targets != IGNORE_INDEX).sum()


class _ChunkedLinearCE(torch.autograd.Function):
    """Loss sum of the flattened tokens and, when gradients are wanted, d loss / d hidden and
    d loss / d weight, all chunk by chunk in forward; backward only scales them by the incoming
    gradient (the loss is a scalar). Per token, with lse = logsumexp(logits):

        loss  = lse − logit[target] + z · lse²
        dloss/dlogits = softmax · (1 + 2·z·lse) − onehot(target)     (0 for ignored tokens)
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                z_loss_weight: float, chunk_tokens: int) -> torch.Tensor:
        # `h` already has the compute dtype (the caller applied autocast's choice); inside, every
        # op runs exactly as written.
        with torch.autocast(h.device.type, enabled=False):
            want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            ctx.weight_dtype = weight.dtype
            weight = weight.to(h.dtype)  # autocast's cast; needed during this forward only
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if want_h else None
            # fp32 accumulator for the weight's gradient across chunks (a bf16 running sum would
            # round at every chunk); with fp32 weights it is the gradient itself.
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
            for start in range(0, h.shape[0], chunk_tokens):
                hc = h[start:start + chunk_tokens]
                y = targets[start:start + chunk_tokens]
                real = y != IGNORE_INDEX
                if not (want_h or want_w) and not bool(real.any()):
                    continue  # nothing to add (with gradients wanted the chunk still writes zeros)
                logits = hc @ weight.T
                if logits.dtype != torch.float32:
                    logits = logits.float()  # the compute-dtype copy is freed right here
                safe_y = torch.where(real, y, 0)[:, None]
                target_logit = logits.gather(1, safe_y).squeeze(1)
                # logsumexp by hand, in place: no second [chunk × vocab] buffer.
                row_max = logits.amax(dim=1, keepdim=True)
                probs = logits.sub_(row_max).exp_()
                row_sum = probs.sum(dim=1, keepdim=True)
                lse = (row_sum.log() + row_max).squeeze(1)
                per_token = lse - target_logit
                if z_loss_weight:
                    per_token = per_token + z_loss_weight * lse.pow(2)
                loss += torch.where(real, per_token, 0.0).sum()
                if not (want_h or want_w):
                    continue
                scale = torch.where(real, 1.0 + 2.0 * z_loss_weight * lse, 0.0)[:, None]
                grad_logits = probs.mul_(scale / row_sum)  # softmax · (1 + 2·z·lse), 0 if ignored
                grad_logits.scatter_add_(1, safe_y, -real.to(grad_logits.dtype)[:, None])
                g = grad_logits.to(h.dtype)
                del probs, grad_logits, logits
                if want_h:
                    torch.matmul(g, weight, out=grad_h[start:start + chunk_tokens])
                if want_w:
                    if g.dtype == torch.float32:
                        grad_w.addmm_(g.T, hc)
                    else:
                        grad_w.add_(g.T @ hc)  # promoted in place: no fp32 copy of the partial
            ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        # Scaled in place: no second copy of either gradient. Training runs backward once per
        # forward; a second backward through the same graph (retain_graph) would scale twice.
        gh = grad_h.mul_(grad_loss.to(grad_h.dtype)) if grad_h is not None else None
        gw = grad_w.mul_(grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None
