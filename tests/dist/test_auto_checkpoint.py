"""`prepare(strategy="fsdp")` on 2 gloo ranks with a plain torch model: the optimizer rebuilt over
FSDP's DTensor parameters trains, and `save_checkpoint` / `load_checkpoint` (DCP) bring a fresh
prepared model and optimizer back to the same state: the next losses match."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _worker(out: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    from torch import nn
    from torch.distributed.tensor import DTensor
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from tests.helpers import torchrun_worker
    from train.auto import load_checkpoint, prepare, save_checkpoint

    class Block(nn.Module):
        def __init__(self, h: int) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(h, 2 * h), nn.Linear(2 * h, h)

        def forward(self, x):
            return x + self.down(torch.tanh(self.up(x)))

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(40, 16)
            self.layers = nn.ModuleList(Block(16) for _ in range(3))
            self.head = nn.Linear(16, 40)

        def forward(self, ids):
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

    def built(seed: int, loader=None):
        torch.manual_seed(seed)
        model = Toy()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        return prepare(model, opt, loader, strategy="fsdp", verbose=False)

    def loss_of(model, batch):
        return F.cross_entropy(model(batch).flatten(0, 1), batch.flatten())

    def body(env) -> None:
        gen = torch.Generator().manual_seed(0)
        data = [torch.randint(0, 40, (6,), generator=gen) for _ in range(16)]
        model, opt, loader = built(0, DataLoader(data, batch_size=2))
        assert model.mlaunch_plan.strategy == "fsdp", model.mlaunch_plan
        params = list(model.parameters())
        assert all(isinstance(p, DTensor) for p in params)
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params}
        batches = list(loader)
        losses = []
        for batch in batches[:2]:
            loss = loss_of(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        save_checkpoint(out + "/ckpt", model, opt, step=2)
        after = []
        for batch in batches[2:4]:  # the loaded copy must continue exactly so (weights + AdamW moments)
            loss = loss_of(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            after.append(loss.item())
        fresh, fresh_opt, _ = built(1)
        step = load_checkpoint(out + "/ckpt", fresh, fresh_opt)
        resumed = []
        for batch in batches[2:4]:
            loss = loss_of(fresh, batch)
            loss.backward()
            fresh_opt.step()
            fresh_opt.zero_grad()
            resumed.append(loss.item())
        Path(out, f"rank{env.rank}.json").write_text(json.dumps(
            {"step": step, "losses": losses, "after": after, "resumed": resumed, "lr": fresh_opt.param_groups[0]["lr"],
             "local_shard": params[0].to_local().shape[0], "full": params[0].shape[0]}))

    torchrun_worker(body)


def test_fsdp_prepare_trains_and_its_checkpoint_resumes(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          __file__, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["step"] == 2 and got["lr"] == 1e-2
        assert got["local_shard"] == got["full"] // 2, "each rank holds half of every parameter"
        assert got["losses"][1] < got["losses"][0] or got["after"][0] < got["losses"][0]
        assert max(abs(a - b) for a, b in zip(got["after"], got["resumed"])) < 1e-6, got


if __name__ == "__main__":
    _worker(sys.argv[1])
