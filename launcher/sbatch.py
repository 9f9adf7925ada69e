"""The sbatch script of a Slurm run: pure text from the plan, so `mlaunch plan` shows exactly what
`mlaunch run` submits (and a user can submit it by hand).

What runs, in order. The batch shell (on the first node of the allocation) finds the nodes and
their real addresses (`scontrol show node`'s NodeAddr: `hostname --ip-address` is 127.0.0.1 on
many hosts), derives the rendezvous port from the job id (a fixed port collides between jobs
sharing a node), and starts one `srun` task per node, `--kill-on-bad-exit` so that one node's
failure ends the step at once. Each task appends its output to `<output_dir>/logs/<node>.log`
(on the shared filesystem: the launcher follows those files) and ends with an exit marker.

Preemption and time limits: Slurm warns the *batch shell* (`--signal=B:USR1@N`; a signal sent
into the step kills torchrun itself). The shell then creates the checkpoint request file, every
rank checkpoints at its next step and stops, and the shell requeues the job, which resumes from
that checkpoint (`resume: auto`).
"""

from __future__ import annotations

import re
import shlex
from typing import Mapping, Sequence

from job.config import SlurmConfig
from job.markers import EXIT, PEER_LOST, SIGNAL_DEATH
from launcher.shell import check_env_names, quote_path, threads_line

#: Shell variables the plan's argv refers to; the batch shell and each task set them.
RDZV_ADDR = "${MLAUNCH_RDZV_ADDR}"
RDZV_PORT = "${MLAUNCH_RDZV_PORT}"
NODE_ADDR = "${MLAUNCH_NODE_ADDR}"
IS_HOST = "${MLAUNCH_IS_HOST}"
JOB_ID = "${SLURM_JOB_ID}"
_VAR = re.compile(r"\$\{(MLAUNCH_[A-Z_]+|SLURM_JOB_ID)\}")

#: Relative to the output directory: the batch shell's own log, and the request file.
BATCH_LOG = "slurm/slurm-%j.out"
CHECKPOINT_REQUEST = "slurm/checkpoint-request"


def expand_word(word: str) -> str:
    """One argv word for the shell: quoted, except the plan's `${MLAUNCH_…}` references, which expand."""
    if not _VAR.search(word):
        return shlex.quote(word)
    escaped = re.sub(r'([\\"`$])', r"\\\1", word)
    return '"' + re.sub(r"\\\$\{(MLAUNCH_[A-Z_]+|SLURM_JOB_ID)\}", r"${\1}", escaped) + '"'


def task_command(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """`env K=V ... python -m torch.distributed.run ...` with the plan's variables left to expand."""
    check_env_names(env)
    words = ["env", *(f"{k}={shlex.quote(str(v))}" for k, v in env.items())] if env else []
    return " ".join([*words, quote_path(str(argv[0])), *(expand_word(str(a)) for a in argv[1:])])


def script(
    slurm: SlurmConfig,
    *,
    job_name: str,
    run_id: str,
    nodes: int,
    output_dir: str,
    workdir: str | None,
    argv: Sequence[str],
    env: Mapping[str, str],
    setup: str | None,
    rdzv_port_base: int,
    job_restarts: int = 0,
    processes: int | None = None,
) -> str:
    """The batch script. It is submitted from `workdir` (None: the directory mlaunch runs in), so
    the job runs there: no `--chdir`, which would not expand `~`."""
    out = output_dir.rstrip("/")
    sb = [
        f"--job-name={job_name}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        *([f"--gpus-per-node={slurm.gpus_per_node}"] if slurm.gpus_per_node else []),
        *([f"--partition={slurm.partition}"] if slurm.partition else []),
        *([f"--account={slurm.account}"] if slurm.account else []),
        *([f"--qos={slurm.qos}"] if slurm.qos else []),
        *([f"--time={slurm.time}"] if slurm.time else []),
        *([f"--constraint={slurm.constraint}"] if slurm.constraint else []),
        f"--output={out}/{BATCH_LOG}",
        "--open-mode=append",  # a requeued job appends: one log across its restarts
        *(["--requeue", f"--signal=B:USR1@{slurm.signal_s}"] if slurm.signal_s else ["--no-requeue"]),
        *(a.strip() for a in slurm.sbatch_args),
    ]
    q_out = quote_path(out)
    request = f'"$MLAUNCH_OUT"/{CHECKPOINT_REQUEST}'
    marker = f'echo "{EXIT}$code $(date +%s.%N) ${{SLURM_RESTART_COUNT:-0}}"'
    setup_line = (f"  {setup.strip()} || {{ local code=$?; echo \"mlaunch: cluster.setup failed\"; {marker}; return $code; }}\n"
                  if setup and setup.strip() else "")
    lines = [
        "#!/bin/bash",
        f"# mlaunch run {run_id} ({job_name}): written by `mlaunch run`, shown by `mlaunch plan`;",
        f"# submitted from {workdir or 'the directory mlaunch runs in'}, where the job runs.",
        *(f"#SBATCH {a}" for a in sb),
        "set -u",
        f"export MLAUNCH_OUT={q_out}",
        f"request={request}",
        'restarts=${SLURM_RESTART_COUNT:-0}',
        'echo "mlaunch: slurm job $SLURM_JOB_ID (restart $restarts) on $SLURM_JOB_NODELIST"',
        'rm -f "$request" "$request.done"',
        "",
        "# The nodes' real addresses, in SLURM_NODEID order; the rendezvous runs on the first node.",
        'mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        "addrs=()",
        'for n in "${nodes[@]}"; do',
        '  addrs+=("$(scontrol show node "$n" | sed -n \'s/.*NodeAddr=\\([^ ]*\\).*/\\1/p\' | head -n 1)")',
        "done",
        "export MLAUNCH_RDZV_ADDR=${addrs[0]}",
        f"export MLAUNCH_RDZV_PORT=$(( {rdzv_port_base} + SLURM_JOB_ID % 1000 ))  # from the job id: jobs sharing a node differ",
        'export MLAUNCH_NODE_ADDRS="${addrs[*]}"',
        "",
        "# One task per node: its output to <output_dir>/logs/<node>.log, then its exit marker.",
        "mlaunch_node() {",
        "  local name=${SLURMD_NODENAME:-$(hostname -s)}",
        '  local log="$MLAUNCH_OUT/logs/$name.log"',
        '  local start=$(stat -c %s "$log" 2>/dev/null || echo 0)',
        '  exec >>"$log" 2>&1',
        '  export TORCHELASTIC_ERROR_FILE="$MLAUNCH_OUT/logs/torchrun-error-$name.json"  # the rank\'s own error',
        '  rm -f "$TORCHELASTIC_ERROR_FILE"  # an earlier attempt\'s failure is not this one\'s',
        "  local addrs=($MLAUNCH_NODE_ADDRS)",
        "  export MLAUNCH_NODE_ADDR=${addrs[$SLURM_NODEID]}",
        '  export MLAUNCH_IS_HOST=$(( SLURM_NODEID == 0 ))  # c10d orders nodes its own way: say who hosts',
        # The launcher's request for the ranks' stacks (scancel --signal=USR1) reaches this task; it
        # passes it on to torchrun's children, the ranks (faulthandler answers). torchrun itself,
        # which has no USR1 handler and would die of it, ignores it (inherited through exec).
        *([f"  {threads_line(processes)}"] if processes and "OMP_NUM_THREADS" not in env else []),
        setup_line + f"  ( trap '' USR1; exec {task_command(argv, env)} ) &",
        "  local pid=$! code",
        '  trap \'for c in $(pgrep -P "$pid"); do kill -USR1 "$c"; done\' USR1',
        '  while :; do wait "$pid"; code=$?; kill -0 "$pid" 2>/dev/null || break; done',
        "  # Ranks that lost a peer fail too: wait, so that the node where it began ends the step first.",
        f'  if [ $code != 0 ] && grep -qs {" ".join("-e " + shlex.quote(p) for p in PEER_LOST)} "$TORCHELASTIC_ERROR_FILE" \\',
        f"     && ! tail -c +$((start + 1)) \"$log\" | grep -q -e {shlex.quote(SIGNAL_DEATH)}; then sleep 3; fi",
        f"  {marker}",
        "  return $code",
        "}",
        "export -f mlaunch_node",
        "",
        "# The warning signal comes to this shell (B:), not into the step: ask the ranks to checkpoint.",
        'trap \'echo "mlaunch: warning signal: every rank checkpoints at its next step"; touch "$request"\' USR1',
        "srun --kill-on-bad-exit=1 --nodes=\"$SLURM_JOB_NUM_NODES\" --ntasks-per-node=1 bash -c mlaunch_node &",
        "step=$!",
        'while :; do wait "$step"; code=$?; kill -0 "$step" 2>/dev/null || break; done  # a trap interrupts wait',
        'if [ -e "$request.done" ]; then',
        f'  if [ "$restarts" -lt {slurm.max_requeues} ]; then',
        '    echo "mlaunch: checkpoint at step $(cat "$request.done") saved; requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"; exit 0',
        "  fi",
        f'  echo "mlaunch: checkpoint saved, but the job has restarted $restarts times (cluster.slurm.max_requeues={slurm.max_requeues}); not requeued"',
        "  exit 75",
        "fi",
        'echo "mlaunch: step ended with exit code $code"',
        *([f'if [ "$code" != 0 ] && [ "$restarts" -lt {job_restarts} ]; then  # launch.job_restarts',
           '  echo "mlaunch: requeueing job $SLURM_JOB_ID after the failure; it resumes from the newest complete checkpoint"',
           '  scontrol requeue "$SLURM_JOB_ID"; exit 0',
           "fi"] if job_restarts else []),
        "exit $code",
    ]
    return "\n".join(lines) + "\n"
