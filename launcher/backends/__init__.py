"""The ways to run a plan, one interface (base.py): `local` (torchrun --standalone here), `ssh`
(listed nodes over SSH), `slurm` (nodes allocated by Slurm). `backend_for` picks one from the
config; each imports its own heavy dependencies (paramiko) only when used."""

from __future__ import annotations

from job.config import JobConfig
from launcher.backends.base import Backend


def backend_for(cfg: JobConfig, *, standalone: bool = False) -> Backend:
    if standalone or cfg.cluster is None:
        from launcher.backends.local import LocalBackend

        return LocalBackend(cfg)
    if cfg.cluster.backend == "slurm":
        from launcher.backends.slurm import SlurmBackend

        return SlurmBackend(cfg)
    from launcher.backends.ssh import SSHBackend

    return SSHBackend(cfg)
