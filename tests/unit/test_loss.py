"""The chunked head + loss (`train.loss.linear_cross_entropy`) against the plain path through full
logits (`causal_lm_loss`), in fp32: loss, count and the gradients of the hidden states and the
head's weight, with z-loss, ignored labels, all-ignored chunks and Baichuan2's NormHead; that the
[tokens × vocab] logits never exist; and the planner's term for it. The regional compile
(`train.compile`) against eager is here too: it changes the same training step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from job.baichuan import BaichuanConfig
from train.loss import causal_lm_loss, linear_cross_entropy
from train.models.baichuan.model import BaichuanForCausalLM, init_weights

REL = 1e-6  # the brief's bar for fp32: relative error of the loss and of each gradient


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(b=3, s=23, h=16, v=97, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.5).requires_grad_()
    labels = torch.randint(0, v, (b, s), generator=g)
    if ignore:
        labels[0, 5:] = -100  # a padded row
        labels[2, :9] = -100  # a masked prompt
    return hidden, weight, labels


def _plain(hidden, weight, labels, z):
    loss, n = causal_lm_loss(hidden @ weight.T, labels, z)
    return (loss.detach(), n, *torch.autograd.grad(loss, (hidden, weight)))


def _chunked(hidden, weight, labels, z, chunk):
    loss, n = linear_cross_entropy(hidden, weight, labels, z, chunk)
    return (loss.detach(), n, *torch.autograd.grad(loss, (hidden, weight)))


@pytest.mark.parametrize("z", [0.0, 1e-3])
@pytest.mark.parametrize("chunk", [1, 7, 16, 69, 4096])  # 69 = every token in one chunk
def test_chunked_loss_and_gradients_equal_the_full_logits_path(z, chunk):
    hidden, weight, labels = _inputs()
    loss, n, gh, gw = _plain(hidden, weight, labels, z)
    c_loss, c_n, c_gh, c_gw = _chunked(hidden, weight, labels, z, chunk)
    assert int(c_n) == int(n) == int((labels[:, 1:] != -100).sum())
    assert abs(float(c_loss) - float(loss)) <= REL * abs(float(loss))
    assert _rel(c_gh, gh) <= REL and _rel(c_gw, gw) <= REL
    # Ignored targets and each row's last position get no gradient at all.
    assert torch.equal(c_gh[0, 5:], torch.zeros_like(c_gh[0, 5:]))
    assert torch.equal(c_gh[:, -1], torch.zeros_like(c_gh[:, -1]))


def test_z_loss_term_is_weighted_squared_logsumexp():
    hidden, weight, labels = _inputs(seed=1)
    with torch.no_grad():
        without, _ = linear_cross_entropy(hidden, weight, labels, 0.0, 8)
        with_z, _ = linear_cross_entropy(hidden, weight, labels, 1e-2, 8)
        real = labels[:, 1:] != -100
        lse = torch.logsumexp(hidden[:, :-1] @ weight.T, -1)
    expected = 1e-2 * lse[real].pow(2).sum()
    assert abs(float(with_z - without) - float(expected)) <= 1e-5 * float(expected)


def test_all_ignored_chunks_and_batches_give_zero_and_finite_gradients():
    hidden, weight, labels = _inputs(b=2, s=16, ignore=False)
    labels[0] = -100  # the first 16 tokens: whole chunks of 8 with nothing to learn
    loss, n, gh, gw = _plain(hidden, weight, labels, 1e-3)
    c_loss, c_n, c_gh, c_gw = _chunked(hidden, weight, labels, 1e-3, 8)
    assert int(c_n) == int(n) == 15
    assert abs(float(c_loss) - float(loss)) <= REL * float(loss)
    assert _rel(c_gh, gh) <= REL and _rel(c_gw, gw) <= REL
    assert torch.equal(c_gh[0], torch.zeros_like(c_gh[0]))

    labels[:] = -100  # nothing at all: 0 loss, 0 tokens, zero (not NaN) gradients
    c_loss, c_n, c_gh, c_gw = _chunked(hidden, weight, labels, 1e-3, 8)
    assert float(c_loss) == 0.0 and int(c_n) == 0
    assert not c_gh.any() and not c_gw.any()


def test_no_grad_and_frozen_head_paths():
    hidden, weight, labels = _inputs(seed=2)
    loss, _, gh, _ = _plain(hidden, weight, labels, 1e-3)
    with torch.no_grad():  # eval: the loss only, no gradient work
        assert abs(float(linear_cross_entropy(hidden, weight, labels, 1e-3, 5)[0]) - float(loss)) <= REL * float(loss)
    frozen = weight.detach()  # LoRA: the head is frozen, only the hidden states need a gradient
    c_loss, _ = linear_cross_entropy(hidden, frozen, labels, 1e-3, 5)
    (c_gh,) = torch.autograd.grad(c_loss, (hidden,))
    assert _rel(c_gh, gh) <= REL


def test_bf16_autocast_matches_the_plain_autocast_path():
    """Under autocast the head's matmuls run in bf16 on both paths (the loss itself in fp32)."""
    hidden, weight, labels = _inputs(seed=3, h=32, v=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, gh, gw = _plain(hidden, weight, labels, 1e-3)
        c_loss, _, c_gh, c_gw = _chunked(hidden, weight, labels, 1e-3, 16)
    assert c_gh.dtype == hidden.dtype and c_gw.dtype == weight.dtype
    assert abs(float(c_loss) - float(loss)) <= 2e-3 * float(loss)
    assert _rel(c_gh, gh) <= 2e-2 and _rel(c_gw, gw) <= 2e-2


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_full_logits_never_exist_during_the_training_step():
    tokens, vocab, chunk = 4 * 64, 512, 32
    cfg = BaichuanConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, position="rope", norm_head=True, z_loss_weight=1e-3)
    model = BaichuanForCausalLM(cfg)
    ids = torch.randint(3, vocab, (4, 64))
    with _LargestTensor() as seen:
        model(ids, labels=ids, z_loss_weight=1e-3, loss_chunk_tokens=chunk).backward()
    assert seen.largest <= chunk * vocab < tokens * vocab
    with _LargestTensor() as plain:
        model(ids, labels=ids, z_loss_weight=1e-3, loss_chunk_tokens=0).backward()
    assert plain.largest >= (tokens - 4) * vocab  # the control: the plain path does make them


@pytest.mark.parametrize("norm_head", [True, False])
def test_model_forward_with_labels_equals_loss_of_its_logits(norm_head):
    """Through the model (NormHead's row normalisation included): every parameter's gradient,
    and the final hidden states' (a hook on the final norm's output)."""
    cfg = BaichuanConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, position="rope", norm_head=norm_head, z_loss_weight=1e-3)
    torch.manual_seed(0)
    model = BaichuanForCausalLM(cfg)
    init_weights(model)
    ids = torch.randint(3, 120, (2, 19))
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def run(chunk):
        model.zero_grad(set_to_none=True)
        seen = {}

        def keep(module, args, out):  # returns None: the output stays as it is
            out.retain_grad()
            seen["h"] = out

        handle = model.model.norm.register_forward_hook(keep)
        if chunk is None:
            loss, _ = causal_lm_loss(model(ids, mask), labels, 1e-3)
        else:
            loss = model(ids, mask, labels=labels, z_loss_weight=1e-3, loss_chunk_tokens=chunk)
        loss.backward()
        handle.remove()
        return loss.detach(), seen["h"].grad, {k: p.grad.clone() for k, p in model.named_parameters()}

    loss, gh, grads = run(None)
    for chunk in (0, 6):
        c_loss, c_gh, c_grads = run(chunk)
        assert abs(float(c_loss) - float(loss)) <= REL * float(loss)
        assert _rel(c_gh, gh) <= REL
        for name, g in grads.items():
            assert _rel(c_grads[name], g) <= 1e-5, name  # through the layers: a few more roundings
        assert _rel(c_grads["lm_head.weight"], grads["lm_head.weight"]) <= REL


# ---------------------------------------------------------------------------------- the planner
def test_planner_logits_term_is_one_chunk_not_the_full_logits():
    from job.baichuan import variant
    from job.planner import ClusterSpec, Workload, enumerate_candidates, logits_bytes

    model = variant("baichuan2-7b", num_hidden_layers=4)
    v, h = model.vocab_size, model.hidden_size
    full = logits_bytes(model, 8, 2048, 2)
    assert full == 8 * 2048 * v * 14  # the 28.8 GB of the recorded H200 run
    chunked = logits_bytes(model, 8, 2048, 2, chunk_tokens=2048)
    assert chunked == 2048 * v * 6 + 8 * 2048 * h * 2 + 4 * v * h
    assert chunked < full / 7
    # fp32 computes the logits without a compute-dtype copy; a chunk never exceeds the tokens.
    assert logits_bytes(model, 1, 100, 4, chunk_tokens=2048) == 100 * v * 4 + 100 * h * 4
    # The planner's breakdown carries it through Workload.loss_chunk_tokens.
    cluster = ClusterSpec.from_gpu_type("H100", nnodes=1, gpus_per_node=1)
    mem = {c: enumerate_candidates(model, cluster, Workload(seq_len=2048, micro_batch=8, loss_chunk_tokens=c),
                                   allowed=["ddp"], recompute=["selective"])[0].memory for c in (0, 2048)}
    assert mem[0]["logits"] == full and mem[2048]["logits"] == chunked
    assert mem[0]["total"] - mem[2048]["total"] == full - chunked


def test_planner_term_bounds_the_chunked_step_largest_buffers():
    """What the term counts against what the step allocates: the largest tensor of a chunked
    step is one chunk's fp32 logits, within the term's per-chunk part."""
    vocab, chunk, h = 512, 32, 16
    cfg = BaichuanConfig(vocab_size=vocab, hidden_size=h, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, position="rope", norm_head=True)
    model = BaichuanForCausalLM(cfg)
    ids = torch.randint(3, vocab, (2, 64))
    with _LargestTensor() as seen:
        model(ids, labels=ids, loss_chunk_tokens=chunk).backward()
    from job.planner import logits_bytes

    term = logits_bytes(cfg, 2, 64, 4, chunk_tokens=chunk)
    assert 4 * seen.largest <= term - 2 * 64 * h * 4


# ---------------------------------------------------------------------------------- compile
def test_compiled_blocks_train_like_eager(monkeypatch):
    """`train.compile: blocks` through the project's step (parallelize → forward_backward → AdamW):
    the same losses as eager for a few steps, and the published state-dict keys. The backend is
    aot_eager (MLAUNCH_COMPILE_BACKEND): the same graph capture and autograd as inductor, without
    its C++ builds, which take over a minute for this model on this machine's CPUs."""
    from job.config import TrainConfig
    from job.layout import Layout
    from train.compile import BACKEND_ENV, compile_blocks, is_compiled
    from train.loop import build_optimizer
    from train.models.baichuan.model import set_activation_checkpointing
    from train.models.baichuan.parallelize import BAICHUAN
    from train.parallel.base import parallelize, target_tokens

    monkeypatch.setenv(BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    cfg = TrainConfig.model_validate({"model": {"init": {}}, "device": "cpu", "loss_chunk_tokens": 8,
                                      "optim": {"lr": 1e-2}})
    mcfg = BaichuanConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, position="rope", norm_head=True, z_loss_weight=1e-3)
    torch.manual_seed(0)
    eager = BaichuanForCausalLM(mcfg)
    init_weights(eager)
    set_activation_checkpointing(eager, "selective")  # one layer checkpointed, one not
    compiled = copy.deepcopy(eager)
    line = compile_blocks(compiled.model.layers.values(), torch.device("cpu"))
    assert line.startswith("compile: 2 decoder layers") and all(map(is_compiled, compiled.model.layers.values()))
    assert list(compiled.state_dict()) == list(eager.state_dict())

    g = torch.Generator().manual_seed(1)
    batches = []
    for seq in (12, 12, 9):  # a new length: a recompile with dynamic shapes
        ids = torch.randint(3, 64, (2, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})

    def losses(model):
        par = parallelize(model, layout=Layout(), mesh=None, cfg=cfg, device=torch.device("cpu"),
                          z_loss_weight=mcfg.z_loss_weight, arch=BAICHUAN)
        opt = build_optimizer(par, cfg, torch.device("cpu"))
        out = []
        for b in batches:
            n = target_tokens(b)
            loss, _ = par.forward_backward(b, 1.0 / n, sync=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(float(loss) / n)
        return out

    ref, got = losses(eager), losses(compiled)
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, ref)), (got, ref)
    torch._dynamo.reset()


def test_compile_falls_back_to_eager_with_one_line_when_the_backend_fails():
    from train.compile import compile_blocks, is_compiled

    layers = [torch.nn.Linear(4, 4)]
    line = compile_blocks(layers, torch.device("cpu"), backend="no_such_backend")
    assert line.startswith("warning: train.compile: blocks:") and "training eager" in line
    assert "\n" not in line and not is_compiled(layers[0])
