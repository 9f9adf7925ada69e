"""Pick a parallel strategy for a Baichuan fine-tune, and say why.

Pure Python (stdlib only, no torch): `mlaunch plan` must stay instant, and every number here is
a formula of the model's shape, the cluster and the batch, so it can be unit-tested and read.
docs/planner.md writes the formulas down with their sources.

The pieces, in the order they are used (each module imports only the ones above it; `explain`
names search's types for annotations only):

* `inputs` — `ClusterSpec`, `Workload` (the model is `job.baichuan.BaichuanConfig`, the same spec
  the torch model is built from, and a candidate's layout is a `job.layout.Layout`, the same type
  the ranks build their mesh from); the strategies and recomputation modes chosen between; the
  units (`GiB`, `gib()`).
* `memory` — `split_layers`, `state_bytes_per_rank`: how the model is cut (pipeline stages, FSDP
  shards; the training code uses the same functions, so the prediction and the run agree), and
  the activation and logits bytes.
* `timing` — pipeline bubble, executed FLOPs per stage (from the spec's one FLOP count), collectives.
* `explain` — each candidate's verdict, the decision's reason, `decision_to_dict` (the JSON form).
* `search` — `plan_parallel`: enumerates candidates (strategy × degrees × recomputation),
  predicts each one's memory per GPU and step time, and chooses the fastest that fits;
  `smallest_cluster` when nothing does.

The CLI's table (`format_decision`, `render_table`) lives in launcher/render.py.
"""

from job.planner.explain import decision_to_dict, leanest
from job.planner.inputs import (
    FAMILIES,
    NF4_BYTES,
    Adapters,
    GB,
    GPU_DEFAULTS,
    RECOMPUTE,
    STRATEGIES,
    TIE_MARGIN,
    ClusterSpec,
    GiB,
    GpuType,
    Workload,
    gib,
)
from job.planner.memory import (
    activation_bytes,
    checkpointed_layers,
    fsdp_unit_params,
    layer_activation_bytes,
    logits_bytes,
    lora_state_bytes,
    split_layers,
    state_bytes_per_rank,
)
from job.planner.search import DEFAULT_MFU, Candidate, Decision, enumerate_candidates, plan_parallel, smallest_cluster
from job.planner.timing import (
    NON_OVERLAPPED,
    bubble_fraction,
    collective_seconds,
    exposed_seconds,
)

__all__ = [
    # inputs
    "GpuType", "GPU_DEFAULTS", "ClusterSpec", "Workload", "Adapters", "NF4_BYTES",
    "STRATEGIES", "FAMILIES", "RECOMPUTE", "TIE_MARGIN", "GiB", "GB", "gib",
    # memory
    "split_layers", "fsdp_unit_params", "state_bytes_per_rank", "lora_state_bytes", "layer_activation_bytes", "checkpointed_layers",
    "activation_bytes", "logits_bytes",
    # timing
    "NON_OVERLAPPED", "bubble_fraction", "collective_seconds",
    "exposed_seconds",
    # search
    "DEFAULT_MFU", "Candidate", "Decision", "enumerate_candidates", "plan_parallel", "smallest_cluster",
    # explain
    "leanest", "decision_to_dict",
]
