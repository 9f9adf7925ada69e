"""The time model: pipeline bubble, FLOPs per token, and how long collectives take."""

from __future__ import annotations

from dataclasses import dataclass

from job.baichuan import BaichuanConfig
from job.planner.inputs import ClusterSpec
from job.planner.memory import checkpointed_layers


# --------------------------------------------------------------------------------------
# Assumptions (explained in docs/planner.md)
# --------------------------------------------------------------------------------------
NON_OVERLAPPED = 0.2
"""Share of the communication that stays on the critical path even when compute could hide it
(the first all-gather, the last bucket's all-reduce, NCCL kernels slowing the matmuls)."""


# --------------------------------------------------------------------------------------
# Time model
# --------------------------------------------------------------------------------------
def bubble_fraction(pp: int, microbatches: int) -> float:
    """Idle share of a GPipe/1F1B step: (p − 1) / (m + p − 1) (Huang et al. 2019; Narayanan et
    al. 2021)."""
    return (pp - 1) / (microbatches + pp - 1)


def stage_flops_per_token(model: BaichuanConfig, layers: range, last: bool, seq_len: int,
                          recompute: str) -> float:
    """Executed FLOPs per token on a stage: recomputed layers run their forward (1/3) twice."""
    per_layer = model.layer_flops_per_token(seq_len)
    flops = len(layers) * per_layer + checkpointed_layers(layers, recompute) * per_layer / 3
    return flops + (model.head_flops_per_token if last else 0)


def _ring_factor(kind: str, n: int) -> float:
    """Bytes each rank moves per byte of the full tensor: all-reduce 2(n−1)/n, all-gather and
    reduce-scatter (n−1)/n (ring algorithms, as NCCL's bus bandwidth is defined); a
    point-to-point send moves the tensor once."""
    if kind == "p2p":
        return 1.0
    return (2 if kind == "all_reduce" else 1) * (n - 1) / n


@dataclass(frozen=True)
class GroupSet:
    """Process groups that communicate at the same time, reduced to what costs time."""

    size: int  # ranks per group
    crossing: int  # the most groups that leave any one node (they share its NICs)


def group_set(groups: list[list[int]], cluster: ClusterSpec) -> GroupSet:
    per_node = [0] * cluster.nnodes
    for group in groups:
        nodes = {cluster.node_of(r) for r in group}
        if len(nodes) > 1:
            for node in nodes:
                per_node[node] += 1
    return GroupSet(size=len(groups[0]), crossing=max(per_node))


def group_seconds(kind: str, nbytes: float, gs: GroupSet, cluster: ClusterSpec) -> float:
    if gs.size == 1:
        return 0.0
    traffic = _ring_factor(kind, gs.size) * nbytes
    seconds = traffic / cluster.intra_bw_bytes_s
    if gs.crossing:
        seconds = max(seconds, traffic * gs.crossing / cluster.inter_bw_bytes_s)
    return seconds


def collective_seconds(kind: str, nbytes: float, groups: list[list[int]],
                       cluster: ClusterSpec) -> float:
    """Time of one collective ("all_reduce", "all_gather", "reduce_scatter", "p2p") on a tensor
    of `nbytes`, run by all `groups` at once. Within a node each rank drives its own NVLink/PCIe
    share; a group that spans nodes passes its ring traffic through each node's NICs once,
    shared with the other groups crossing the same node."""
    return group_seconds(kind, nbytes, group_set(groups, cluster), cluster)


def exposed_seconds(comm: float, window: float) -> float:
    """Communication left on the critical path when it can hide behind `window` seconds of
    compute: what does not fit in the window, plus NON_OVERLAPPED of what does."""
    hidden = min(comm, window)
    return comm - hidden + NON_OVERLAPPED * hidden

