"""`train.compile: blocks`: `torch.compile` per decoder layer (torchtitan's regional compilation).

Each layer's `forward` is replaced, on the instance, by its compiled version. Every layer has the
same code and shapes, so the graphs are shared (one per distinct activation-checkpointing flag and
shape regime), compilation stays short, and nothing changes around the layers:

* parameter and state-dict names stay the published ones (no `_orig_mod.` wrapper module);
* activation checkpointing, set before, runs inside the compiled region (the layer's forward
  calls `torch.utils.checkpoint` itself);
* FSDP, applied after, puts its hooks on the layer module, outside the compiled region (its
  `__call__` runs them, then the compiled forward), as with torchtitan's wrapped blocks.

Whether the compiler can run at all (a C compiler for inductor on CPU, Triton on GPU) is checked
first on a tiny function, so a broken toolchain costs a one-line warning and an eager run, not a
traceback at the first step. `MLAUNCH_COMPILE_BACKEND` picks another backend (tests use
`aot_eager`: the same graph capture and autograd, without inductor's minutes of C++ builds).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

BACKEND_ENV = "MLAUNCH_COMPILE_BACKEND"
DEFAULT_BACKEND = "inductor"


def compile_backend() -> str:
    return os.environ.get(BACKEND_ENV) or DEFAULT_BACKEND


def probe_compiler(device: torch.device, backend: str) -> str | None:
    """None when `backend` compiles and runs a tiny function on `device`, else why not (one line)."""

    def tiny(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x) * x + 1

    try:
        x = torch.linspace(-1, 1, 8, device=device)
        out = torch.compile(tiny, backend=backend, fullgraph=True)(x)
        if not torch.allclose(out, tiny(x)):
            return f"the {backend} backend computed a wrong result on a probe"
    except Exception as e:  # any compiler failure means: run eager
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        return f"{type(e).__name__}: {lines[0][:200] if lines else 'no message'}"
    finally:
        torch._dynamo.reset()  # the probe's cache entry is of no use later
    return None


def compile_blocks(layers: Iterable[nn.Module], device: torch.device, backend: str | None = None) -> str:
    """Compile each of `layers` in place (their `forward`); returns the line to log. Apply after
    activation checkpointing and before any parallel wrapping (FSDP's hooks then stay outside the
    compiled code). If the compiler cannot run here, the layers stay eager and the line says why."""
    backend = backend or compile_backend()
    layers = list(layers)
    why = probe_compiler(device, backend)
    if why is not None:
        return f"warning: train.compile: blocks: torch.compile ({backend}) cannot run here, training eager ({why})"
    for layer in layers:
        layer.forward = torch.compile(layer.forward, backend=backend)
    return f"compile: {len(layers)} decoder layers compiled with torch.compile ({backend}), graphs shared across layers"


def is_compiled(layer: nn.Module) -> bool:
    """Whether `compile_blocks` compiled this layer."""
    return "forward" in vars(layer)
