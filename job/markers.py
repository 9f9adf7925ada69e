"""Marker lines: what a rank prints for the launcher to read, each a fixed prefix at the start
of a line of its own.

The launcher learns how a run goes from these lines, torchrun's error files and exit codes,
never from the wording of the ranks' log sentences (free to change). Torch-free, so the launcher
and the ranks share it; the node shell's `MLAUNCH_PID=` line is launcher/shell.py's.
"""

from __future__ import annotations

#: `MLAUNCH_STARTED=<world size>`: rank 0, once the process group is up. Every node has then
#: joined the rendezvous; before it, a silent run is still waiting for one.
STARTED = "MLAUNCH_STARTED="

#: `MLAUNCH_EXIT=<code> <unix time>`: a Slurm task's last line, once its torchrun has ended — which
#: node failed first, when `--kill-on-bad-exit` then ends the others.
EXIT = "MLAUNCH_EXIT="

#: `MLAUNCH_BEAT=<rank> <completed steps> <phase> <unix time>`: every rank, every few seconds
#: (train/heartbeat.py), for the supervisor's hang detection. Kept off the terminal and the logs.
BEAT = "MLAUNCH_BEAT="
BEAT_INTERVAL_S = 2.0


def beat_interval(hang_timeout_s: float | None) -> float:
    """How often ranks beat: every 2 s, or 5 times per hang timeout when that is shorter."""
    return min(BEAT_INTERVAL_S, hang_timeout_s / 5) if hang_timeout_s else BEAT_INTERVAL_S

#: `MLAUNCH_EVENT=<json>`: rank 0's progress, for the launcher's progress line, registry and summary
#: (job/events.py reads them). Kept in the logs (so `mlaunch attach` and `plot` can replay them),
#: off the terminal. Printed by rank 0 only, on stdout, one compact JSON object per line, only
#: under mlaunch (`RUN_ID_VAR` set; a plain `python -m train` stays readable); non-finite floats
#: are null. Key `event` names the kind (train/metrics.py writes them, train/loop.py calls it):
#:
#: * `start` — once the model and data are ready, before the first step: total_steps, start_step
#:   (> 0 on a resume; a later attempt's records for steps after it replace the earlier ones),
#:   epochs, steps_per_epoch, world_size, strategy, device (`cpu`/`cuda`), model (name_or_path,
#:   or `init (<variant>)`), params, lora (bool), train_examples, eval_examples, tokens_per_epoch
#:   (real tokens of the train split), tokens_per_step (their mean per step), resumed_from
#:   (checkpoint path or null).
#: * `train` — every logged step: exactly metrics.jsonl's record — step, epoch, loss, lr,
#:   tokens_per_s, padded_tokens_per_s, real_token_fraction, grad_norm, elapsed_s (training time,
#:   across resumes), tokens (real tokens trained on so far, across resumes), mfu (GPU only) —
#:   plus total_steps.
#: * `eval` — every evaluation: step, eval_loss.
#: * `end` — when training ends without an error: outcome (`completed`; `stopped` by a signal;
#:   `requeued` after a checkpoint asked for by the scheduler), steps, total_steps, loss (last
#:   train loss), eval_loss (last), best_eval_loss, tokens, wall_s (this attempt, from set-up to
#:   the end), tokens_per_s (mean over the steps, across resumes), and absolute paths: output_dir,
#:   export (null when not exported), checkpoints (null when none is complete), metrics.
#:
#: Values may be null when unknown (no eval split: eval_loss and best_eval_loss). A run that fails
#: has no `end`.
EVENT = "MLAUNCH_EVENT="

#: The environment variable that carries the run id into every process of a run (launcher/procs.py).
RUN_ID_VAR = "MLAUNCH_RUN_ID"

#: Every marker, for the runners to keep them in the logs and off the terminal.
ALL = (STARTED, EXIT, BEAT, EVENT)

#: The other direction, launcher → ranks: an environment variable naming a file whose appearance
#: asks every rank to checkpoint at its next step and stop with exit 0 (the Slurm batch shell
#: creates it on its warning signal, because a signal sent into the step kills torchrun itself);
#: rank 0 then writes `<file>.done` holding the step.
CHECKPOINT_REQUEST_VAR = "MLAUNCH_CHECKPOINT_REQUEST"


def is_marker(line: str) -> bool:
    return line.startswith(ALL)

#: Phrases of a rank's error that mean a *peer* failed first (gloo / NCCL lost the connection):
#: that node's failure is an effect, and the node where it began is the one to name.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "communicator was aborted")

#: torchrun's report of a worker ended by a signal (`exitcode  : -9 (pid: …)`, `failed (exitcode: -9)`):
#: where a rank was killed, the failure began — even if a sibling's peer error is torchrun's root cause.
SIGNAL_DEATH = r"exitcode *: *-[0-9]"
