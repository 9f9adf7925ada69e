"""The job configuration: one YAML (cluster · launch · train) loaded once into a typed tree.

Everything downstream (the plan, the SSH runner, `python -m train` on every rank) reads the
`JobConfig` built here and never a raw dict. This module imports no torch: the launcher and the
training entrypoint share it, and `mlaunch plan` must stay instant.

Errors are `ConfigError`s whose message names the file, the line and the field, and how to fix it.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from job.baichuan import VariantName
from job.errors import ConfigError

DEFAULT_DATASET = "bitext/Bitext-customer-support-llm-chatbot-training-dataset"
# The product tutorial's prompt, kept as the default so a plain config reproduces its recipe.
TUTORIAL_TEMPLATE = "[INST] {instruction} \n Category is {category} \n Intent is {intent} [/INST]\n{response}"


class Section(BaseModel):
    """A config section: unknown keys are errors (a silently ignored key is the classic bug)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------- cluster
class NodeSpec(Section):
    host: str = Field(description="SSH host name or address of the node (an alias of ~/.ssh/config works too).")
    port: int | None = Field(None, ge=1, le=65535, description="SSH port; default `cluster.ssh.port`.")
    user: str | None = Field(None, description="SSH user; default `cluster.ssh.user`, then ~/.ssh/config, then the local user.")
    addr: str | None = Field(None, description="Address the other nodes use to reach this node (rendezvous, NCCL/gloo); default: `host` resolved on the launching machine.")
    name: str | None = Field(None, description="Short name used in log prefixes and `<output_dir>/logs/<name>.log`; default `host` (plus `:port` when ports differ).")
    identity_file: str | None = Field(None, description="Private key for this node; default `cluster.ssh.identity_file`.")
    gpus: int | None = Field(None, ge=0, description="GPUs on this node, used when `launch.nproc_per_node: auto` cannot ask the node (plan only).")
    workdir: str | None = Field(None, description="This node's project directory, when it differs from `cluster.workdir`.")
    python: str | None = Field(None, description="This node's interpreter, when it differs from `cluster.python`.")

    @field_validator("host")
    @classmethod
    def _host_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("host must not be empty")
        return v


class SSHSettings(Section):
    user: str | None = Field(None, description="Default SSH user for every node.")
    port: int = Field(22, ge=1, le=65535, description="Default SSH port for every node.")
    identity_file: str | None = Field(None, description="Default private key; else ssh-agent and ~/.ssh/id_* keys.")
    known_hosts: str = Field("~/.ssh/known_hosts", description="known_hosts file that host keys are checked against.")
    host_key_policy: Literal["reject", "accept-new"] = Field("reject", description="`reject`: unknown host keys are refused (fix with ssh-keyscan); `accept-new`: an unknown key is recorded on first use. A changed key is always refused.")
    config_file: str | None = Field("~/.ssh/config", description="OpenSSH client config honoured for HostName, User, Port, IdentityFile, ProxyJump (ignored if missing).")
    proxy_jump: str | None = Field(None, description="Jump host (`user@host:port`) for every node, like `ssh -J`.")
    connect_timeout_s: float = Field(10.0, gt=0, description="Deadline for TCP connect + SSH handshake + auth, per node.")
    keepalive_s: float = Field(5.0, ge=0, description="Liveness: every node's sshd is asked for a reply this often during a run (OpenSSH's ServerAliveInterval); 0 = off.")
    keepalive_count: int = Field(3, ge=1, description="A node that has not answered for keepalive_s × keepalive_count seconds (a frozen or partitioned node) is declared lost, and the run stopped (OpenSSH's ServerAliveCountMax).")
    max_parallel: int = Field(32, ge=1, description="Connections opened at once.")


class GPUSpec(Section):
    type: str = Field("H100", description="GPU model for the `auto` planner's defaults (H100, H200, A100-80GB, A100-40GB, A10, L4, RTX4090, cpu).")
    memory_gb: float | None = Field(None, gt=0, description="Per-GPU memory; default from `type`.")
    peak_tflops: float | None = Field(None, gt=0, description="Dense bf16 peak per GPU; default from `type`.")
    intra_node_gbps: float | None = Field(None, gt=0, description="Per-GPU intra-node bandwidth in GB/s (NVLink); default from `type`.")
    inter_node_gbps: float | None = Field(None, gt=0, description="Per-node inter-node bandwidth in GB/s (InfiniBand/Ethernet); default from `type`.")


DEFAULT_PASSTHROUGH = ["NCCL_*", "GLOO_*", "HF_*", "WANDB_*", "TORCH_*", "PYTORCH_*", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS"]


class SlurmConfig(Section):
    """Nodes allocated by Slurm instead of listed: `mlaunch run` submits one batch job (or, inside an
    allocation, starts one step) that runs torchrun on every node. sbatch's own environment
    (`SLURM_CONF`, `SBATCH_*`) applies as it would to a hand-written script."""
    nodes: int = Field(1, ge=1, description="Nodes to allocate (`#SBATCH --nodes`).")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (`--gpus-per-node`); `launch.nproc_per_node: auto` starts this many ranks per node (1 when 0).")
    partition: str | None = Field(None, description="`--partition`; default: the cluster's default partition.")
    account: str | None = Field(None, description="`--account` charged for the job.")
    qos: str | None = Field(None, description="`--qos`.")
    time: str | None = Field(None, description="`--time` limit (e.g. `2-00:00:00`); default: the partition's.")
    constraint: str | None = Field(None, description="`--constraint` node features (e.g. `h100&ib`).")
    sbatch_args: list[str] = Field(default_factory=list, description="Extra sbatch options, one per `#SBATCH` line (e.g. `--exclusive`, `--mem=0`).")
    signal_s: int = Field(300, ge=0, description="Seconds before the time limit (or on preemption) that the batch shell is warned (`--signal=B:USR1@N`): every rank then checkpoints at its next step and the job requeues itself. 0 = no warning, no requeue.")
    max_requeues: int = Field(3, ge=0, description="How often the job may requeue itself after such a checkpoint (Slurm's own requeues, e.g. `scontrol requeue`, are not counted against it).")
    login: str | None = Field(None, description="`[user@]host[:port]` (or an ~/.ssh/config alias) of a login node: mlaunch runs sbatch/squeue/scancel there over SSH (`cluster.ssh` settings and host-key rules), in `cluster.workdir`, after `cluster.setup`; unset = this machine is the login node.")

    @field_validator("sbatch_args")
    @classmethod
    def _one_option_per_line(cls, v: list[str]) -> list[str]:
        for arg in v:
            if "\n" in arg or not arg.strip().startswith("-"):
                raise ValueError(f"{arg!r}: each entry is one sbatch option starting with `-`, e.g. `--exclusive`")
        return v


class ClusterConfig(Section):
    nodes: list[NodeSpec] = Field(default_factory=list, description="SSH nodes, in node-rank order; the first is the rendezvous master unless `launch.rdzv.endpoint` is set. Or `slurm:` instead.")
    slurm: SlurmConfig | None = Field(None, description="Let Slurm allocate the nodes (sbatch/srun on this machine, the login node) instead of listing them in `nodes`.")
    ssh: SSHSettings = Field(default_factory=SSHSettings, description="SSH connection settings shared by all nodes.")
    workdir: str = Field("~/mlaunch", description="Directory on every node holding the project (shared filesystem, or the target of `sync`); jobs run from here.")
    python: str = Field("python3", description="Python interpreter on the nodes (torchrun is run as `<python> -m torch.distributed.run`).")
    setup: str | None = Field(None, description="Shell prelude run before the job on every node, e.g. `source ~/venv/bin/activate`.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment set for the job on every node (values are quoted, never evaluated by a shell; YAML numbers and booleans are passed as written: `4`, `0`, `false`).")
    env_passthrough: list[str] = Field(default_factory=lambda: list(DEFAULT_PASSTHROUGH), description="Glob patterns of local environment variables passed to every node; nothing else is passed implicitly.")
    sync: bool = Field(False, description="Push the project to each node's `workdir` over SFTP before the run (only changed files).")
    sync_exclude: list[str] = Field(default_factory=list, description="Extra glob patterns not pushed by `sync` (.git, virtualenvs, __pycache__ and run outputs never are).")
    gpu: GPUSpec = Field(default_factory=GPUSpec, description="Hardware facts for the `auto` planner.")

    @field_validator("env", mode="before")
    @classmethod
    def _env_scalars(cls, v: Any) -> Any:
        """`OMP_NUM_THREADS: 4`, `NCCL_IB_DISABLE: 0`, `TOKENIZERS_PARALLELISM: false`: YAML reads
        numbers and booleans, every user writes them so; a shell sees `4`, `0`, `false`."""
        if not isinstance(v, dict):
            return v
        out = {}
        for name, value in v.items():
            if isinstance(value, bool):
                out[name] = "true" if value else "false"
            elif isinstance(value, (int, float, str)):
                out[name] = str(value)
            elif value is None:
                raise ValueError(f"{name} has no value; write `{name}: \"\"` for an empty one")
            else:
                raise ValueError(f"{name}: a {type(value).__name__} is not a value an environment variable can hold; quote it")
        return out

    @model_validator(mode="after")
    def _unique_nodes(self) -> "ClusterConfig":
        if self.slurm is not None and self.nodes:
            raise ValueError("has both `nodes` and `slurm`; keep one: listed SSH nodes, or nodes allocated by Slurm")
        if self.slurm is None and not self.nodes:
            raise ValueError("the node list is empty; add at least one `- host: ...` under `nodes`, or a `slurm:` section")
        seen: dict[tuple[str, int], int] = {}
        for i, node in enumerate(self.nodes):
            key = (node.host, node.port or self.ssh.port)
            if key in seen:
                raise ValueError(f"nodes {seen[key]} and {i} are the same host {key[0]}:{key[1]}; each node must appear once")
            seen[key] = i
        names = [self.node_name(i) for i in range(len(self.nodes))]
        if len(set(names)) != len(names):
            raise ValueError("node names are not unique; set `name:` on the nodes that share a host")
        return self

    @property
    def backend(self) -> Literal["ssh", "slurm"]:
        return "slurm" if self.slurm is not None else "ssh"

    @property
    def num_nodes(self) -> int:
        return self.slurm.nodes if self.slurm is not None else len(self.nodes)

    def node_port(self, i: int) -> int:
        return self.nodes[i].port or self.ssh.port

    def node_workdir(self, i: int) -> str:
        return self.nodes[i].workdir or self.workdir

    def node_python(self, i: int) -> str:
        return self.nodes[i].python or self.python

    def node_name(self, i: int) -> str:
        node = self.nodes[i]
        if node.name:
            return node.name
        hosts = [n.host for n in self.nodes]
        return node.host if hosts.count(node.host) == 1 else f"{node.host}:{self.node_port(i)}"


# ---------------------------------------------------------------------------------------- launch
class RendezvousConfig(Section):
    backend: Literal["c10d", "static"] = Field("c10d", description="`c10d`: torchrun's elastic rendezvous; `static`: `--master-addr/--master-port/--node-rank` (node ranks follow the node list).")
    endpoint: str | None = Field(None, description="`host[:port]` of the rendezvous; default: the first node's `addr` and `port`.")
    port: int = Field(29400, ge=1, le=65535, description="Rendezvous port on the master node (checked free before the start).")
    id: str | None = Field(None, description="Rendezvous id; default: a new unique id per run.")
    join_timeout_s: int = Field(600, ge=1, description="How long nodes wait for each other at rendezvous before failing.")


class LaunchConfig(Section):
    nproc_per_node: int | Literal["auto"] = Field("auto", description="Worker processes per node; `auto` = the node's GPU count (`cluster.nodes[].gpus` in plans), 1 on CPU.")
    nnodes: str | None = Field(None, description="`N` or `MIN:MAX` (elastic); default: the number of nodes.")
    rdzv: RendezvousConfig = Field(default_factory=RendezvousConfig, description="Rendezvous settings.")
    max_restarts: int = Field(0, ge=0, description="torchrun restarts of the worker group after a failure.")
    monitor_interval_s: float = Field(1.0, gt=0, description="torchrun's worker health-check interval.")
    local_ranks_filter: list[int] | None = Field(None, description="Only these local ranks' output is shown (torchrun `--local-ranks-filter`); errors always print.")
    grace_period_s: float = Field(10.0, ge=0, description="On stop: seconds between SIGTERM and SIGKILL.")
    job_restarts: int = Field(0, ge=0, description="After a node's failure, a lost node, a hang or a dropped connection: stop everything, check the nodes, and start the job again from its newest complete checkpoint, up to this many times (each restart said with its cause). With `nnodes: MIN:MAX`, nodes that no longer answer are left out if at least MIN remain. A user error (bad config, diverged loss) and Ctrl-C are not retried. torchrun's in-place `max_restarts` is separate.")
    hang_timeout_s: float | None = Field(None, gt=0, description="A run in which no step completes anywhere for this long (or a rank stops reporting for this long) is hung: the ranks that stopped first are named, every reachable rank's Python stack is saved under `<output_dir>/logs/`, and the job is stopped. Unset: 20 × the slowest step seen, at least 300 s; checkpoints, evaluation and set-up do not count as stalls.")
    silence_warning_s: float = Field(60.0, gt=0, description="Say what the run waits for (e.g. a node that never joins the rendezvous) when no node has printed anything for this long.")
    entrypoint: list[str] | None = Field(None, description="Run your own script on every rank instead of the built-in trainer: `path/to/script.py --arg value` (relative to the node's workdir) or `-m package.module --arg value`, as a string (split like a shell) or a list. Each rank gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...), `cluster.env` and MLAUNCH_RUN_ID, nothing else implicit; `train:` is then optional. `train.auto.prepare` parallelises a plain PyTorch script in one line. On the command line: `mlaunch run CONFIG -- script.py --arg value`.")
    output_dir: str | None = Field(None, description="Where a run without `train:` (an `entrypoint` run) keeps its resolved config and logs; default `runs/<name>`. With `train:` the run's outputs are `train.output_dir`.")

    @field_validator("entrypoint", mode="before")
    @classmethod
    def _entrypoint_words(cls, v: Any) -> Any:
        """A YAML string is split as a shell would (quotes group words); a list is taken as it is."""
        if isinstance(v, str):
            try:
                v = shlex.split(v)
            except ValueError as e:
                raise ValueError(f"cannot split it into words ({e}); check its quotes") from None
        if isinstance(v, list):
            v = [str(w) if isinstance(w, (int, float)) and not isinstance(w, bool) else w for w in v]
        return v

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint_shape(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v or not v[0].strip():
            raise ValueError("is empty; give a script path (`train.py --lr 1e-4`) or `-m module args`")
        if v[0] == "-m" and (len(v) < 2 or v[1].startswith("-")):
            raise ValueError("`-m` needs a module name after it, e.g. `-m mypkg.train --lr 1e-4`")
        if v[0].startswith("-") and v[0] != "-m":
            raise ValueError(f"starts with the option {v[0]!r}; it starts with the script path or `-m module` (torchrun's own options are `launch.*` keys)")
        if Path(v[0]).name.startswith("python") or Path(v[0]).name in ("torchrun", "mlaunch"):
            raise ValueError(f"starts with {v[0]!r}; write the script itself (`train.py ...`): torchrun runs it with `cluster.python`")
        return v

    @field_validator("nproc_per_node")
    @classmethod
    def _positive_nproc(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or `auto`")
        return v

    @field_validator("nnodes")
    @classmethod
    def _nnodes_format(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = str(v)
        m = re.fullmatch(r"(\d+)(?::(\d+))?", v)
        if not m or int(m.group(1)) < 1 or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"`{v}` is not `N` or `MIN:MAX` with 1 <= MIN <= MAX")
        return v


# ----------------------------------------------------------------------------------------- train
#: `auto` reads config.json (or, for `init`, means the baichuan2-7b layout); the names and their
#: layouts are job.baichuan.VARIANTS.
Variant = Literal["auto", VariantName]


class ModelInit(Section):
    """Dimensions of a model built from scratch (tests, the tiny default); weights randomly initialised."""

    hidden_size: int = Field(64, ge=1, description="Hidden size.")
    intermediate_size: int = Field(172, ge=1, description="SwiGLU inner size.")
    num_hidden_layers: int = Field(2, ge=1, description="Decoder layers.")
    num_attention_heads: int = Field(4, ge=1, description="Attention heads (must divide hidden_size).")
    vocab_size: int | None = Field(None, ge=3, description="Vocabulary; default: the tokenizer's size.")
    max_position_embeddings: int = Field(4096, ge=1, description="RoPE table size.")
    initializer_range: float = Field(0.02, gt=0, description="Std of the normal weight init.")

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelInit":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size})")
        return self


class ModelConfig(Section):
    name_or_path: str | None = Field(None, description="Hub name (e.g. `baichuan-inc/Baichuan2-13B-Base`, read through the HF cache) or a local checkpoint folder; unset = build from `init`.")
    init: ModelInit | None = Field(None, description="Build a randomly initialised model of these dimensions instead of loading one.")
    variant: Variant = Field("auto", description="Which Baichuan: `auto` reads config.json; with `init`, `auto` means baichuan2-7b's layout.")
    position: Literal["auto", "rope", "alibi"] = Field("auto", description="Override the position scheme (tiny models carry no tell-tale).")
    norm_head: bool | None = Field(None, description="Override Baichuan2's NormHead (default: from the variant).")
    z_loss_weight: float | None = Field(None, ge=0, description="z-loss weight (default: from config.json, else 0).")
    activation_checkpointing: Literal["none", "selective", "full"] = Field("none", description="Recompute activations in backward: `selective` (every other layer) or `full` (every layer).")

    @model_validator(mode="after")
    def _source(self) -> "ModelConfig":
        if self.name_or_path is None and self.init is None:
            raise ValueError("set `name_or_path` (hub name or local folder) or `init` (dimensions of a new model)")
        if self.name_or_path is not None and self.init is not None:
            raise ValueError("set only one of `name_or_path` and `init`")
        return self


class TokenizerConfig(Section):
    path: str | None = Field(None, description="SentencePiece `tokenizer.model`; default: the one in the model's folder.")
    train_vocab_size: int | None = Field(None, ge=16, description="When no tokenizer exists: train a SentencePiece BPE of this size on the training data (cached in output_dir).")


class ColumnMap(Section):
    instruction: str = Field("instruction", description="Column holding the user's request.")
    response: str = Field("response", description="Column holding the agent's answer.")
    category: str = Field("category", description="Column holding the category.")
    intent: str = Field("intent", description="Column holding the intent.")
    flags: str | None = Field(None, description="Column of language-variation flags (`flags` in the hub schema, `tags` in the older release); not used by the default template.")


class DataConfig(Section):
    path: str = Field(DEFAULT_DATASET, description="Hub dataset name or a local .csv/.json/.jsonl/.parquet file (or folder).")
    split: str = Field("train", description="Split to read.")
    columns: ColumnMap = Field(default_factory=ColumnMap, description="Which columns fill the template.")
    template: str = Field(TUTORIAL_TEMPLATE, description="Prompt template (Python format fields from `columns`); the text up to `{response}` is the prompt.")
    max_length: int = Field(1024, ge=8, description="Tokens per example after truncation (EOS included).")
    loss_on: Literal["all", "response"] = Field("all", description="`all`: loss on every non-pad token (the tutorial's); `response`: only on the answer.")
    batching: Literal["length_grouped", "pad_to_max"] = Field("length_grouped", description="`length_grouped`: batches of similar lengths, padded to the longest (no compute on padding); `pad_to_max`: the tutorial's pad-to-max_length.")
    micro_batch_size: int = Field(8, ge=1, description="Examples per rank per forward pass.")
    eval_fraction: float = Field(0.02, ge=0, lt=1, description="Held-out fraction for eval loss (0 = no eval split).")
    max_rows: int | None = Field(None, ge=1, description="Use only the first N rows (quick runs).")
    bad_rows: Literal["skip", "error"] = Field("skip", description="Rows with missing/empty/non-text fields: `skip` and count them, or `error` naming the row.")
    num_proc: int = Field(1, ge=1, description="Processes for tokenisation (done once per node, cached by datasets' fingerprint).")


class OptimConfig(Section):
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = Field("auto", description="AdamW kernel: `auto` = fused on GPU, foreach on CPU.")


class ScheduleConfig(Section):
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    decay: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup, down to `min_lr_ratio`·lr at the last step.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of the peak.")


class ParallelConfig(Section):
    strategy: Literal["ddp", "fsdp", "hsdp", "pipeline", "auto"] = Field("ddp", description="`ddp`, `fsdp` (FSDP2 fully_shard), `hsdp` (shard in a node, replicate across), `pipeline` (with `pp` stages; × data parallel when world > pp), or `auto` (the planner picks and says why).")
    pp: int = Field(1, ge=1, description="Pipeline stages (strategy `pipeline`); the remaining factor of the world size is data parallel.")
    stage_dp: Literal["ddp", "fsdp"] = Field("ddp", description="With `pipeline`: how each stage is kept across its data-parallel replicas — `ddp` (replicated) or `fsdp` (sharded).")
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = Field("1f1b", description="Pipeline schedule.")
    microbatches: int | None = Field(None, ge=1, description="Pipeline microbatches per step; default 2·pp.")
    stages_per_rank: int = Field(2, ge=1, description="Virtual stages per rank for `interleaved_1f1b`.")
    reshard_after_forward: bool = Field(True, description="FSDP: free gathered parameters after forward (less memory, one more all-gather).")
    cpu_offload: bool = Field(False, description="FSDP: keep parameters and optimizer state in CPU memory.")
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="`auto`: bf16 compute with fp32 reduce/master weights on GPU, fp32 on CPU.")
    memory_budget: float = Field(0.9, gt=0, le=1, description="`auto`: fraction of GPU memory a plan may use.")

    @model_validator(mode="before")
    @classmethod
    def _renamed_dp_shard(cls, data: Any) -> Any:
        """`dp_shard: true|false` (before stage_dp) reused torch's name for a *degree* as a boolean;
        it is still read, with a one-line note."""
        if isinstance(data, dict) and "dp_shard" in data:
            data = dict(data)
            old = data.pop("dp_shard")
            if not isinstance(old, bool):
                raise ValueError("`dp_shard` is now `stage_dp: ddp | fsdp`")
            if "stage_dp" in data:
                raise ValueError("set only `stage_dp` (`dp_shard` is its old name)")
            data["stage_dp"] = "fsdp" if old else "ddp"
            print(f"note: train.parallel.dp_shard is deprecated; write `stage_dp: {data['stage_dp']}`",
                  file=sys.stderr)
        return data


class CheckpointConfig(Section):
    every_steps: int | None = Field(None, ge=1, description="Save a resumable checkpoint every N optimizer steps (and at the end); unset = only at the end.")
    keep: int = Field(2, ge=1, description="Keep the newest K complete checkpoints.")
    resume: str = Field("auto", description="`auto`: continue from the newest complete checkpoint in `dir`; `never`; or a checkpoint path.")
    dir: str | None = Field(None, description="Checkpoint folder; default `<output_dir>/checkpoints`. Multi-node runs need it on a filesystem every node sees (DCP: each rank writes its own shard).")
    export: bool = Field(True, description="At the end, write the fine-tuned model in the hub layout (safetensors + config.json + tokenizer.model) to `<output_dir>/export`.")
    export_dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="dtype of the exported weights: `bfloat16` as Baichuan publishes them (13B: 28 GB instead of 56 GB), or the fp32 master weights.")
    export_format: Literal["baichuan", "llama"] = Field("baichuan", description="`baichuan`: the published layout (W_pack, NormHead), loadable with the published remote code on transformers 4.33–4.40 and by `mlaunch generate`; `llama`: a stock LlamaForCausalLM (q/k/v split, NormHead rows pre-normalised) that today's transformers loads without remote code — RoPE models only (Baichuan-7B, Baichuan2-7B).")


#: Baichuan's linear layers, the default LoRA targets (peft matches them by module-name suffix).
LORA_TARGETS = ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraConfig(Section):
    """Low-rank adapters through `peft` on the frozen base model (Hu et al. 2021): only the adapters
    train, so gradients and AdamW state exist only for them, and checkpoints hold only them."""

    r: int = Field(8, gt=0, description="Adapter rank: each target Linear(in, out) gets A (r × in) and B (out × r).")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator: the adapter's update is (alpha / r) · B·A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input (peft's `lora_dropout`).")
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1, description="Linear layers that get adapters, by name (Baichuan's: W_pack, o_proj, gate_proj, up_proj, down_proj).")
    quantize: Literal["none", "4bit"] = Field("none", description="`4bit`: QLoRA, the frozen decoder-layer linears stored in NF4 through bitsandbytes (CUDA only; ddp).")
    merge: bool = Field(False, description="The export also holds the merged full weights (base + adapters) in the hub layout, under `<output_dir>/export/merged`.")


class TrainConfig(Section):
    model: ModelConfig = Field(description="Which model to fine-tune.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer source.")
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset, prompt and batching.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Learning-rate schedule.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Parallel strategy.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing and resume.")
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters on a frozen base instead of every weight (QLoRA with `quantize: 4bit`); unset = full fine-tuning.")
    epochs: int = Field(1, ge=1, description="Passes over the training data (ignored when `max_steps` is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    clip_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm (unset = no clipping).")
    seed: int = Field(42, description="Seed for init, data order and dropout-free RNG streams.")
    log_every: int = Field(1, ge=1, description="Log (progress bar, metrics.jsonl) every N steps.")
    eval_every: int | None = Field(None, ge=1, description="Eval loss on the held-out split every N steps (and at the end).")
    output_dir: str = Field("runs/default", description="Run outputs: resolved config, logs, metrics.jsonl, checkpoints, export.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: CUDA (NCCL) when available, else CPU (gloo).")
    loss_chunk_tokens: int = Field(2048, ge=0, description="The training loss is computed from the last hidden states this many tokens at a time (head matmul, cross-entropy, z-loss and their gradients in one pass), so the [tokens × vocab] logits never exist whole (Baichuan2's 125,696-word vocabulary: 4 GB of bf16 logits + 8 GB fp32 per 16k tokens). Numerically the same loss and gradients; 0 = the plain path through the full logits.")
    compile: Literal["none", "blocks"] = Field("none", description="`blocks`: `torch.compile` each decoder layer (torchtitan's regional compilation: one small graph reused by every layer, after activation checkpointing, before FSDP wraps it). If the compiler cannot run here (no C compiler, inductor error), a one-line warning says why and training runs eager.")
    dist_timeout_s: float = Field(900.0, gt=0, description="Collective timeout of the process group: a collective that a peer never joins fails after this long instead of waiting forever (gloo's default is 30 min, NCCL's 10). It also bounds the node-local data preparation (local rank 0 tokenizes while the others wait in a barrier). mlaunch's hang detection (`launch.hang_timeout_s`) acts much sooner.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list, description="Where rank 0 also logs the train/eval scalars (loss, lr, tokens/s, …), besides the always-written `<output_dir>/metrics.jsonl`: `tensorboard` (event files in `<output_dir>/tensorboard`) and/or `wandb` (a Weights & Biases run named after the job, with the resolved config; project `$WANDB_PROJECT`, default `mlaunch`; a resume continues the same run; `WANDB_MODE=offline` works without network). The package must be installed on the nodes (`pip install 'mlaunch[metrics]'`).")

    @model_validator(mode="before")
    @classmethod
    def _renamed_tensorboard(cls, data: Any) -> Any:
        """`tensorboard: true` (before report_to) is still read, with a one-line note."""
        if isinstance(data, dict) and "tensorboard" in data:
            data = dict(data)
            old = data.pop("tensorboard")
            if not isinstance(old, bool):
                raise ValueError("`tensorboard` is now `report_to: [tensorboard]`")
            if old:
                data["report_to"] = [*data.get("report_to", []), "tensorboard"]
            print("note: train.tensorboard is deprecated; write `report_to: [tensorboard]`", file=sys.stderr)
        return data

    @model_validator(mode="after")
    def _llama_export_needs_rope(self) -> "TrainConfig":
        if self.checkpoint.export_format == "llama" and _position_of(self.model) == "alibi":
            raise ValueError("checkpoint.export_format llama needs a RoPE model (Baichuan-7B, Baichuan2-7B); this "
                             "model uses ALiBi (the 13B models), which Llama cannot express: use export_format baichuan")
        return self


def _position_of(m: ModelConfig) -> str | None:
    """The position scheme `m` builds, where it can be told without torch (None: not known yet)."""
    from job.baichuan import VARIANTS, by_name

    if m.position != "auto":
        return m.position
    if m.variant != "auto":
        return VARIANTS[m.variant].position
    if m.init is not None:
        return "rope"  # `init` with variant auto is baichuan2-7b's layout
    config_json = Path(os.path.expanduser(m.name_or_path or "")) / "config.json"
    if config_json.is_file():
        try:
            import json

            return "rope" if "max_position_embeddings" in json.loads(config_json.read_text()) else "alibi"
        except (OSError, ValueError):
            return None
    try:
        return by_name(m.name_or_path or "").position
    except ConfigError:
        return None

class JobConfig(Section):
    name: str | None = Field(None, description="Job name (rendezvous id prefix, log headers); default: the YAML file's stem.")
    cluster: ClusterConfig | None = Field(None, description="The nodes (inline, or a path to a cluster YAML); unset = this machine only.")
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="torchrun settings.")
    train: TrainConfig | None = Field(None, description="What every rank runs (the built-in Baichuan trainer); optional when `launch.entrypoint` runs a script of your own.")

    @model_validator(mode="after")
    def _something_to_run(self) -> "JobConfig":
        if self.train is None and self.launch.entrypoint is None:
            raise ValueError(NOTHING_TO_RUN)
        if self.train is not None and self.launch.output_dir is not None:
            raise ValueError("`launch.output_dir` is for runs without `train:`; with `train:` the outputs go to "
                             "`train.output_dir`: set that one instead")
        return self

    @property
    def output_dir(self) -> str:
        """Where this run's resolved config, logs and outputs go: `train.output_dir` for the built-in
        trainer; `launch.output_dir`, else `runs/<name>`, for an entrypoint run without `train:`.
        Every launcher consumer reads it here."""
        if self.train is not None:
            return self.train.output_dir
        return self.launch.output_dir or f"runs/{_safe_name(self.name or 'job')}"

    def with_output_dir(self, path: str) -> "JobConfig":
        """A copy whose outputs go to `path` (train.output_dir, or launch.output_dir without `train:`)."""
        out = self.model_copy(deep=True)
        if out.train is not None:
            out.train.output_dir = path
        else:
            out.launch.output_dir = path
        return out


NOTHING_TO_RUN = ("`train` is required (nothing to run): add a `train:` section for the built-in trainer (see "
                  "configs/tiny.yaml), or run a script of your own with `launch.entrypoint: script.py --args` "
                  "(or `mlaunch run CONFIG -- script.py --args`)")


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "job"


def with_entrypoint(cfg: JobConfig, argv: list[str]) -> JobConfig:
    """`mlaunch run CONFIG -- script.py --arg ...`: a copy of `cfg` whose every rank runs `argv`
    (a script path or `-m module`, then its arguments; it replaces `launch.entrypoint`). A config
    that has neither `train:` nor an entrypoint cannot be loaded first: pass the words to
    `load_config(..., entrypoint=argv)` instead."""
    out = cfg.model_copy(deep=True)
    try:
        out.launch.entrypoint = list(argv)
    except ValidationError as e:
        raise ConfigError(f"`-- {shlex.join(argv)}`: the entrypoint {_first_message(e)}") from None
    return out


def _first_message(e: ValidationError) -> str:
    msg = e.errors()[0]["msg"]
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


# ------------------------------------------------------------------------------------ loading
@dataclass
class SourceMap:
    """Where each key of the merged YAML tree came from, for `file:line` in error messages."""

    lines: dict[tuple, tuple[str, int]] = field(default_factory=dict)

    def locate(self, path: tuple) -> str:
        # Walk up until a located ancestor: a missing key is reported at its parent mapping.
        while path:
            if path in self.lines:
                file, line = self.lines[path]
                return f"{file}:{line}" if line else file
            path = path[:-1]
        return self.lines.get((), ("<config>", 1))[0]


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _compose(text: str, file: str, prefix: tuple, smap: SourceMap) -> Any:
    """YAML text → plain Python data, recording the line of every key and list item."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else file
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}; fix the syntax (indentation, quotes, colons)") from e
    if root is None and not re.sub(r"(?m)^\s*#.*$", "", text).strip():
        raise ConfigError(f"{file}: the file is empty; a job YAML has `train:` (and optionally `cluster:`, `launch:`), "
                          "see configs/tiny.yaml")
    if root is not None and _expanded_size(root, {}) > MAX_YAML_VALUES:
        raise ConfigError(f"{file}: its aliases expand to more than {MAX_YAML_VALUES:,} values (nested anchors, "
                          "a \"billion laughs\" document); write the values out instead of aliasing aliases")
    smap.lines.setdefault(prefix, (file, 1))
    return _to_python(root, file, prefix, smap)


#: A job YAML holds hundreds of values; nested aliases can make a few lines expand exponentially.
MAX_YAML_VALUES = 100_000


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values the node stands for once every alias is expanded (aliases are shared
    nodes in the composed graph: counted once each, multiplied by their uses)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias counts once (the safe constructor refuses it anyway)
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(item, memo) for item in node.value)
    else:
        size = 1
    memo[key] = min(size, MAX_YAML_VALUES + 1)
    return memo[key]


def _to_python(node: yaml.Node | None, file: str, path: tuple, smap: SourceMap) -> Any:
    if node is None:
        return None
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.SafeLoader(" ").construct_object(key_node) if not isinstance(key_node, yaml.ScalarNode) else key_node.value
            if not isinstance(key, str):
                raise ConfigError(f"{file}:{key_node.start_mark.line + 1}: keys must be strings, got {key!r}")
            if key in out:
                raise ConfigError(f"{file}:{key_node.start_mark.line + 1}: duplicate key `{'.'.join(map(str, path + (key,)))}`; keep one")
            smap.lines[path + (key,)] = (file, key_node.start_mark.line + 1)
            out[key] = _to_python(value_node, file, path + (key,), smap)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            smap.lines[path + (i,)] = (file, item.start_mark.line + 1)
            items.append(_to_python(item, file, path + (i,), smap))
        return items
    if node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") and ":" in node.value:
        # YAML 1.1 reads `2:4` as sexagesimal 124; here it always means `MIN:MAX` or `host:port`.
        return node.value
    value = yaml.SafeLoader(" ").construct_object(node)
    if isinstance(value, str) and "$" in value:
        value = _interpolate(value, f"{file}:{node.start_mark.line + 1}", path)
    return value


def _interpolate(value: str, where: str, path: tuple) -> str:
    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: `{_dotted(path)}` uses ${{{name}}} but {name} is not set; export it or write ${{{name}:-default}}")

    return _ENV.sub(sub, value)


def _dotted(path: tuple) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else p for p in path).replace(".[", "[")


def _section_fields(path: tuple) -> list[str]:
    """Field names allowed at `path`, for "did you mean" hints."""
    model: Any = JobConfig
    for part in path:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if info is None:
            return []
        model = section_type(info.annotation)
        if model is None:
            return []
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = section_type(arg)
        if found is not None:
            return found
    return None


def _explain(err: dict, smap: SourceMap) -> str:
    loc = tuple(err["loc"])
    # pydantic puts union/literal branch names into loc (e.g. 'int', "literal['auto']"): drop them.
    names = _all_field_names()
    clean = tuple(p for i, p in enumerate(loc)
                  if isinstance(p, int) or p in names or (i == len(loc) - 1 and err["type"] == "extra_forbidden"))
    where = smap.locate(clean)
    name = _dotted(clean) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        key = clean[-1]
        allowed = _section_fields(clean[:-1])
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hint = f"did you mean `{close[0]}`?" if close else f"allowed keys: {', '.join(allowed)}"
        return f"{where}: unknown key `{name}`; {hint}"
    if kind == "missing":
        return f"{where}: `{name}` is required; add it"
    if not clean and kind == "value_error":  # a whole-job rule (JobConfig's own validator)
        return f"{where}: {err['msg'].removeprefix('Value error, ')}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{where}: `{name}`: {msg}{shown}"


_FIELD_NAMES: set[str] = set()


def _all_field_names() -> set[str]:
    if not _FIELD_NAMES:
        stack: list[type[BaseModel]] = [JobConfig]
        while stack:
            model = stack.pop()
            for fname, info in model.model_fields.items():
                _FIELD_NAMES.add(fname)
                sub = section_type(info.annotation)
                if sub is not None and sub is not model:
                    stack.append(sub)
    return _FIELD_NAMES


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """`a.b.c=value` → (('a','b','c'), typed value). The value is read as YAML (2e-5 → float)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.optim.lr=2e-5")
    key, raw = item.split("=", 1)
    parts = tuple(key.strip().split("."))
    if not all(parts):
        raise ConfigError(f"--set {item!r}: `{key}` is not a dotted key like train.optim.lr")
    try:
        # `1:4` stays text (YAML 1.1 would read it as the sexagesimal number 64).
        value = raw.strip() if re.fullmatch(r"[-+]?\d+(:\d+)+", raw.strip()) else yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the literal text, the schema decides whether a string is fine
    return parts, value


def _apply_override(data: dict, parts: tuple[str, ...], value: Any, item: str, smap: SourceMap) -> None:
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        allowed = _section_fields(parts[:depth])
        if allowed and part not in allowed:
            close = difflib.get_close_matches(part, allowed, n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`?" if close else f"allowed keys: {', '.join(allowed)}"
            raise ConfigError(f"--set {item}: unknown key `{'.'.join(parts[:depth + 1])}`; {hint}")
        if not isinstance(node.get(part), dict):
            if isinstance(node.get(part), list):
                raise ConfigError(f"--set {item}: `{'.'.join(parts[:depth + 1])}` is a list; edit it in the YAML")
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    smap.lines[parts] = (f"--set {item}", 0)


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                entrypoint: list[str] | None = None) -> JobConfig:
    """Read a job YAML (plus `--set` overrides) into a validated `JobConfig`, or raise ConfigError.

    `entrypoint` (the words after `mlaunch run CONFIG --`) replaces `launch.entrypoint` before
    validation, so a YAML with no `train:` section of its own is complete with it."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: config file not found; pass the path of a job YAML such as configs/tiny.yaml")
    data, smap = _read(file)
    if entrypoint is not None:
        if data is None:
            data = {}
        if isinstance(data, dict):
            if not isinstance(data.get("launch"), dict):
                data["launch"] = {} if data.get("launch") is None else data["launch"]
            if isinstance(data["launch"], dict):
                data["launch"]["entrypoint"] = list(entrypoint)
                smap.lines[("launch", "entrypoint")] = (f"`-- {shlex.join(entrypoint)}`", 0)
    return _job(file, data, smap, overrides)


def load_cluster_job(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """For `mlaunch nodes check`: a job YAML that has a `cluster` section, or a bare cluster YAML
    (`nodes:` ...) wrapped in a job with default launch settings. Read and parsed once."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: not found; pass a job or cluster YAML, set $MLAUNCH_CLUSTER, or create ./cluster.yaml")
    data, smap = _read(file)
    if isinstance(data, dict) and ("train" in data or "cluster" in data):
        job = _job(file, data, smap, overrides)
        if job.cluster is None:
            raise ConfigError(f"{file}: has no `cluster` section; nothing to check")
        return job
    if overrides:
        raise ConfigError("--set applies to job YAMLs; edit the cluster YAML instead")
    prefixed = SourceMap({("cluster",) + k: v for k, v in smap.lines.items()})
    return validate({"name": file.stem, "cluster": data, "train": {"model": {"init": {}}}}, prefixed)


def _read(file: Path) -> tuple[Any, SourceMap]:
    smap = SourceMap()
    return _compose(file.read_text(), str(file), (), smap), smap


def _job(file: Path, data: Any, smap: SourceMap, overrides: list[str] | tuple[str, ...]) -> JobConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}:1: a job YAML is a mapping with `cluster`, `launch` and `train` sections")
    if isinstance(data.get("cluster"), str):
        data["cluster"] = _load_cluster_file(file.parent, data["cluster"], smap)
    for item in overrides:
        parts, value = parse_override(item)
        _apply_override(data, parts, value, item, smap)
    data.setdefault("name", file.stem)
    return validate(data, smap)


def _load_cluster_file(base: Path, ref: str, smap: SourceMap) -> Any:
    cfile = Path(os.path.expanduser(ref))
    if not cfile.is_absolute():
        cfile = base / cfile
    if not cfile.is_file():
        where = smap.locate(("cluster",))
        raise ConfigError(f"{where}: `cluster` points to {cfile}, which does not exist; fix the path or inline the section")
    return _compose(cfile.read_text(), str(cfile), ("cluster",), smap)


def validate(data: dict, smap: SourceMap | None = None) -> JobConfig:
    smap = smap or SourceMap()
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        first = _explain(errors[0], smap)
        if errors[0]["type"] == "literal_error" or len({_error_field(x) for x in errors}) == 1 and len(errors) > 1:
            # A union (e.g. int | 'auto') fails once per branch: say what the field accepts instead.
            options = "; or ".join(dict.fromkeys(x["msg"] for x in errors if _error_field(x) == _error_field(errors[0])))
            first = first.split("`: ", 1)[0] + f"`: {options} (got {errors[0].get('input')!r})"
        n_more = len({_error_field(x) for x in errors}) - 1
        more = f" (and {n_more} more error{'s' if n_more > 1 else ''})" if n_more else ""
        raise ConfigError(first + more) from None


def _error_field(err: dict) -> tuple:
    names = _all_field_names()
    return tuple(p for p in err["loc"] if isinstance(p, int) or p in names)


def to_yaml(cfg: JobConfig) -> str:
    """The resolved config as YAML: written next to every run's outputs."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
