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
    add_completion=False,
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
    standalone: bool = typer.Option(False, "--standalone", help="Run on this machine only (torchrun --standalone), ignoring `cluster`."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Launch the job: torchrun on every node (or here with --standalone), logs streamed, clean teardown."""
    from job.config import load_config

    from launcher.launch import launch

    cfg = load_config(config, set_ or [])
    raise typer.Exit(launch(cfg, standalone=standalone))


@app.command()
def plan(
    config: Path = typer.Argument(..., help="Job YAML."),
    standalone: bool = typer.Option(False, "--standalone", help="Show the standalone plan."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Show exactly what would run on every node, and why. Runs nothing, touches no network."""
    from job.config import load_config
    from launcher.planning import build_plan

    cfg = load_config(config, set_ or [])
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


def main() -> None:
    """Console entry point: user errors become one line and an exit code, never a traceback."""
    debug = os.environ.get("MLAUNCH_DEBUG") == "1"
    try:
        # standalone_mode=False hands typer.Exit codes back as the return value.
        code = app(standalone_mode=False)
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
