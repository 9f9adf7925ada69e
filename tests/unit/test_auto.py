"""train.auto's pieces on plain torch modules, in-process: which blocks are found, the planner's
view of a generic model, the optimizer rebuilt over new parameters, the distributed loader, and
`prepare` alone (world size 1: nothing wrapped, nothing replaced)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from job.errors import ConfigError
from train.auto import distribute_loader, find_blocks, model_spec, prepare, rebuild_optimizer


class Block(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(h, 3 * h, bias=False), nn.Linear(3 * h, h, bias=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Toy(nn.Module):
    def __init__(self, h: int = 16, vocab: int = 40, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList(Block(h) for _ in range(layers))
        self.extras = nn.ModuleList([nn.Linear(h, h), nn.Linear(h, h)])  # repeated, but smaller
        self.head = nn.Linear(h, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_blocks_from_no_split_modules_else_the_largest_repeated_container() -> None:
    toy = Toy()
    assert find_blocks(toy) == list(toy.layers)
    toy._no_split_modules = ["Linear"]  # transformers' own list wins when it names something present
    assert len(find_blocks(toy)) == 3 * 2 + 2 + 1
    toy._no_split_modules = ["NotHere"]
    assert find_blocks(toy) == list(toy.layers)


def test_model_spec_holds_the_real_parameter_count() -> None:
    toy = Toy(h=32, vocab=100, layers=4)
    spec = model_spec(toy, find_blocks(toy))
    real = sum(p.numel() for p in toy.parameters())
    assert spec.num_hidden_layers == 4 and spec.hidden_size == 32
    assert abs(spec.num_params - real) / real < 0.05, (spec.num_params, real)


def test_optimizer_rebuilt_over_new_parameters_keeps_each_group() -> None:
    old = Toy()
    groups = [{"params": list(old.layers.parameters()), "lr": 1e-3, "weight_decay": 0.1},
              {"params": list(old.embed.parameters()) + list(old.head.parameters()), "lr": 5e-4}]
    opt = torch.optim.AdamW(groups, betas=(0.8, 0.9))
    names = {id(p): n for n, p in old.named_parameters()}
    new = copy.deepcopy(old)  # new tensors under the same names, as fully_shard leaves them
    rebuilt = rebuild_optimizer(opt, names, new)
    assert type(rebuilt) is torch.optim.AdamW and rebuilt.defaults["betas"] == (0.8, 0.9)
    assert [g["lr"] for g in rebuilt.param_groups] == [1e-3, 5e-4]
    assert [g["weight_decay"] for g in rebuilt.param_groups] == [0.1, 0.01]
    assert rebuilt.param_groups[0]["params"][0] is new.layers[0].up.weight
    new_ids = {id(p) for p in new.parameters()}
    assert all(id(p) in new_ids for g in rebuilt.param_groups for p in g["params"])
    old(torch.tensor([[1, 2]])).sum().backward()
    opt.step()
    with pytest.raises(ConfigError, match="after optimizer.step"):
        rebuild_optimizer(opt, names, new)


def test_distributed_loader_keeps_the_loader_and_moves_its_epoch() -> None:
    data = list(range(10))
    collate = lambda rows: torch.tensor(rows) * 10  # noqa: E731
    plain = distribute_loader(DataLoader(data, batch_size=2, collate_fn=collate), num_replicas=2, rank=1)
    assert [b.tolist() for b in plain] == [[10, 30], [50, 70], [90]]
    shuffled = distribute_loader(DataLoader(data, batch_size=5, shuffle=True), num_replicas=2, rank=0)
    first, second = [b.tolist() for b in shuffled], [b.tolist() for b in shuffled]
    assert len(sum(first, [])) == len(sum(second, [])) == 5 and first != second  # a new order each epoch
    assert distribute_loader(plain, num_replicas=1, rank=0) is plain


def test_prepare_alone_wraps_nothing(monkeypatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    toy = Toy()
    opt = torch.optim.AdamW(toy.parameters())
    loader = DataLoader([torch.tensor([1, 2, 3])] * 4, batch_size=2)
    model, opt2, loader2 = prepare(toy, opt, loader, memory_budget_gb=1, verbose=False)
    assert model is toy and opt2 is opt and loader2 is loader
    assert (model.mlaunch_plan.strategy, model.mlaunch_plan.world_size, model.mlaunch_plan.blocks) == ("ddp", 1, 3)
    with pytest.raises(ConfigError, match="one of auto, ddp, fsdp, hsdp"):
        prepare(toy, opt, loader, strategy="zero3")
