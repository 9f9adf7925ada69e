"""Human output of `mlaunch plan` (rich). Kept apart from the plan so the plan stays pure data."""

from __future__ import annotations

from typing import Any

from job.config import JobConfig
from launcher.plan import Plan


def print_plan(plan: Plan, cfg: JobConfig, decision: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    import sys

    # Piped output gets a wide console: commands and table cells must not be cut at 80 columns.
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    mode = "standalone (this machine)" if plan.standalone else f"{len(plan.nodes)} node(s) over SSH"
    console.print(f"[bold]{plan.job}[/bold]  run id {plan.run_id}  ·  {mode}  ·  world size {plan.world_size}")
    if plan.rendezvous:
        r = plan.rendezvous
        console.print(f"rendezvous: {r.backend} at {r.endpoint} (id {r.id}, nnodes {r.nnodes}); "
                      f"endpoint = {'launch.rdzv.endpoint' if cfg.launch.rdzv.endpoint else 'first node address'}")
    table = Table(title="nodes", title_justify="left")
    for col in ("rank", "node", "ssh", "addr", "nproc", "why"):
        table.add_column(col)
    for n in plan.nodes:
        ssh = "-" if plan.standalone else f"{n.user + '@' if n.user else ''}{n.host}:{n.port}"
        table.add_row(str(n.node_rank), n.name, ssh, n.addr, str(n.nproc_per_node), n.nproc_source)
    console.print(table)
    par = plan.parallel
    line = f"parallel: [bold]{par.get('strategy')}[/bold]"
    extras = {k: v for k, v in par.items() if k not in ("strategy", "reason", "decision", "estimate")}
    if extras:
        line += " (" + ", ".join(f"{k}={v}" for k, v in extras.items()) + ")"
    console.print(line)
    if decision is not None:
        from job import autoplan

        autoplan.print_decision(console, decision)
    elif "estimate" in par:
        est, gib = par["estimate"], 2**30
        line = (f"planner's estimate for {est['layout']}: {est['memory_bytes'] / gib:.1f} GiB per GPU (budget "
                f"{est['budget_bytes'] / gib:.1f} GiB), {est['step_time_s']:.3g} s per step ({est['tokens_per_s']:,.0f} tokens/s)")
        if est["fits"]:
            console.print(line)
        else:
            console.print(f"[bold red]warning:[/bold red] {line}: predicted NOT to fit; "
                          "`train.parallel.strategy: auto` picks a layout that does")
    console.print(f"every rank reads: {plan.config_path}   outputs: {plan.output_dir}/")
    console.print("[bold]commands[/bold] (secret-looking env values masked):")
    for n in plan.nodes:
        console.print(f"[cyan]# {n.name}[/cyan]", markup=True)
        console.print(n.command(mask=True), markup=False)
