"""`mlaunch`: the command line. Thin: parse arguments, call the plan or a runner, map errors to exit codes.

Heavy imports (paramiko, torch) happen inside the commands that need them, so `mlaunch --help`
and `mlaunch plan` stay instant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from job.errors import MlaunchError

app = typer.Typer(
    add_completion=True,  # --install-completion / --show-completion (typer's)
    no_args_is_help=True,
    help="One YAML → torchrun on every node: Baichuan fine-tuning with DDP, FSDP or pipeline parallelism.",
    pretty_exceptions_enable=False,
)
nodes_app = typer.Typer(no_args_is_help=True, help="Inspect the cluster's nodes before a job is wasted.")
app.add_typer(nodes_app, name="nodes")

SetOpt = typer.Option(None, "--set", help="Override a config field: --set train.optim.lr=2e-5 (repeatable).", metavar="KEY=VALUE")


@app.command()
def run(
    config: Path = typer.Argument(..., help="Job YAML (cluster · launch · train)."),
    script: Optional[list[str]] = typer.Argument(None, help="After `--`: a script of your own (or `-m module`) and its arguments, run on every rank instead of the built-in trainer (replaces `launch.entrypoint`).", metavar="[-- SCRIPT ARGS...]", show_default=False),
    standalone: bool = typer.Option(False, "--standalone", help="Run on this machine only (torchrun --standalone), ignoring `cluster`."),
    detach: bool = typer.Option(False, "--detach", "-d", help="Return once every node has started (or the Slurm job is queued); the run goes on without this terminal. Then: mlaunch status / logs / attach / stop."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Launch the job: torchrun on every node (or here with --standalone), logs streamed, clean teardown."""
    if detach:
        from launcher.detach import detach as run_detached

        raise typer.Exit(run_detached(config, set_ or [], standalone=standalone, entrypoint=script or None))
    from job.config import load_config

    from launcher.launch import launch

    cfg = load_config(config, set_ or [], entrypoint=script or None)
    raise typer.Exit(launch(cfg, standalone=standalone))


RunArg = typer.Argument(..., help="Run id, or a unique prefix of it (`mlaunch status` lists them).", metavar="RUN")


@app.command()
def status(
    run: Optional[str] = typer.Argument(None, help="A run id (or unique prefix): its nodes in detail.", metavar="[RUN]"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """The runs of this machine (id, name, backend, nodes, state, step, loss, ETA, output dir), or one run per node."""
    from launcher import runs

    raise typer.Exit(runs.status(run, as_json))


@app.command()
def logs(
    run: str = RunArg,
    node: Optional[str] = typer.Option(None, "--node", "-n", help="Only this node's log."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until the run ends."),
) -> None:
    """Every node's log of a run, node-prefixed: live with -f, or after the end."""
    from launcher import runs

    raise typer.Exit(runs.logs(run, node, follow))


@app.command()
def stop(run: str = RunArg) -> None:
    """Stop a run on every node (its supervisor does it, in order) and wait until it has."""
    from launcher import runs

    raise typer.Exit(runs.stop(run))


@app.command()
def attach(run: str = RunArg) -> None:
    """Back to a run's live view (its lines and progress line); Ctrl-C leaves it running."""
    from launcher import runs

    raise typer.Exit(runs.attach(run))


@app.command()
def plot(
    target: str = typer.Argument(..., help="A run id (or prefix), or a run's output directory.", metavar="RUN|DIR"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the PNG; default <output_dir>/loss.png."),
) -> None:
    """Draw the loss curve (train and eval loss against step, learning rate on a second axis), also during a run."""
    from launcher import runs

    raise typer.Exit(runs.plot(target, out))


@app.command()
def plan(
    config: Path = typer.Argument(..., help="Job YAML."),
    script: Optional[list[str]] = typer.Argument(None, help="After `--`: the script (and arguments) `mlaunch run CONFIG -- …` would run.", metavar="[-- SCRIPT ARGS...]", show_default=False),
    standalone: bool = typer.Option(False, "--standalone", help="Show the standalone plan."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Show exactly what would run on every node, and why. Runs nothing, touches no network."""
    from job.config import load_config
    from launcher.planning import build_plan

    cfg = load_config(config, set_ or [], entrypoint=script or None)
    the_plan, decision = build_plan(cfg, standalone=standalone, probe=False)
    if as_json:
        typer.echo(json.dumps(the_plan.to_json(mask=True), indent=2))
        return
    from launcher.render import print_plan

    print_plan(the_plan, cfg, decision)


@nodes_app.command("check")
def nodes_check(
    config: Optional[Path] = typer.Argument(None, help="Job or cluster YAML; default $MLAUNCH_CLUSTER, else ./cluster.yaml."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    collective: bool = typer.Option(False, "--collective", help="Also run a tiny all-reduce across all nodes through torchrun."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Per node, in parallel: SSH, python, torch, GPUs, NCCL, disk, clock, rendezvous port. Exit 1 if any fails."""
    from launcher import nodes

    path = config or Path(os.environ.get("MLAUNCH_CLUSTER", "cluster.yaml"))
    code = nodes.check(path, overrides=set_ or [], as_json=as_json, collective=collective)
    raise typer.Exit(code)


from launcher import infer  # noqa: E402  (torch-free: each command runs the torch side as a child)

app.command("generate")(infer.generate)
app.command("eval")(infer.evaluate)


def main() -> None:
    """Console entry point: user errors become one line and an exit code, never a traceback."""
    debug = os.environ.get("MLAUNCH_DEBUG") == "1"
    try:
        # standalone_mode=False hands typer.Exit codes back as the return value.
        code = app(standalone_mode=False, prog_name="mlaunch")
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except MlaunchError as e:
        if debug:
            raise
        print(f"mlaunch: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("mlaunch: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # usage errors and aborts from click (which typer may vendor as typer._click)
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            if debug:
                raise
            print(f"mlaunch: error: {e.format_message()} (see `mlaunch --help`)", file=sys.stderr)
            sys.exit(2)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
