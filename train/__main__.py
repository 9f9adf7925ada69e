"""`python -m train CONFIG [--set dotted.key=value ...]`: alone (world size 1) or under torchrun.

Thin on purpose: load the config, check the parallel layout, start the process group, run the
loop, and always leave through `distributed.shutdown` (see the gloo pitfall there).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from job.config import load_config
from job.errors import MlaunchError
from job.markers import RUN_ID_VAR, STARTED, beat_interval
from train import distributed as D

#: How long a rank other than 0 waits, after a user error found before the process group, for
#: rank 0 to report it (torchrun stops every worker once the first one exits).
PEER_REPORT_GRACE_S = 3.0


def _heartbeat(job, env: D.DistEnv):
    """Under mlaunch (its run id in the environment), every rank beats for the hang detection."""
    if RUN_ID_VAR not in os.environ:
        return None
    from pathlib import Path

    from train.heartbeat import Heartbeat

    beat = Heartbeat(env.rank, interval_s=beat_interval(job.launch.hang_timeout_s))
    beat.dump_stacks_on(Path(job.train.output_dir) / "logs")
    return beat.start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="job YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    env = D.DistEnv.from_env()
    stop = D.StopFlag().install()
    code, clean = 1, False
    try:
        job = load_config(args.config, args.overrides)
        from job.autoplan import resolve_auto
        from job.layout import Layout

        # Before the rendezvous: a bad layout is one line, not a hang or a NCCL error.
        device = D.select_device(job.train.device, env.local_rank)
        job, why = resolve_auto(job, env.world_size, env.local_world_size, device.type == "cuda")
        if why and env.is_rank0:
            print(why, file=sys.stderr, flush=True)
        layout = Layout.from_config(job.train.parallel, env.world_size, env.local_world_size)
        D.set_cpu_threads(env, device)
        D.init_process_group(env, device, job.train.dist_timeout_s)
        if env.is_rank0:  # the launcher's sign that every node joined the rendezvous
            print(f"{STARTED}{env.world_size}", flush=True)
        beat = _heartbeat(job, env)
        from train.loop import train

        code = train(job, env, layout, device, stop, beat)
        if beat is not None:
            beat.stop()
        clean = True  # every rank got here together: the shutdown barrier is safe
    except MlaunchError as e:  # a user-fixable failure (bad config, diverged loss): one line
        code = e.exit_code
        if env.is_rank0:
            print(f"error: {e}", file=sys.stderr)
            _record_for_torchrun(e)
            if os.environ.get("MLAUNCH_DEBUG"):
                traceback.print_exc()
        elif not D.is_initialized():
            # Before the process group every rank finds the same config error on its own, and only
            # rank 0 says it. torchrun SIGTERMs the others as soon as one worker exits: a peer that
            # got here first must not take rank 0 down while it is still importing torch (before
            # its signal handler exists), or the one line is lost.
            time.sleep(PEER_REPORT_GRACE_S)
    except BaseException as e:
        traceback.print_exc()
        _record_for_torchrun(e)
        code = 1
    finally:
        D.shutdown(code, clean=clean)


def _record_for_torchrun(e: BaseException) -> None:
    """Write torchrun's per-worker error file: its failure summary prints it even for ranks that
    `--local-ranks-filter` keeps quiet, so errors always reach the user."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)
    except Exception:  # reporting must never mask the original failure
        pass


if __name__ == "__main__":
    main()
