"""Human output of `mlaunch plan` (rich). Kept apart from the plan so the plan stays pure data."""

from __future__ import annotations

import shlex
from typing import Any

from job.config import JobConfig
from job.planner import RECOMPUTE, Decision, gib, leanest
from launcher.plan import Plan

TABLE_COLUMNS = ("strategy", "degrees", "recompute", "memory/GPU", "fits", "step (s)", "tokens/s", "verdict")


def print_plan(plan: Plan, cfg: JobConfig, decision: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    import sys

    # Piped output gets a wide console: commands and table cells must not be cut at 80 columns.
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    mode = ("standalone (this machine)" if plan.standalone else
            f"{len(plan.nodes)} node(s) allocated by Slurm" if plan.backend == "slurm" else f"{len(plan.nodes)} node(s) over SSH")
    console.print(f"[bold]{plan.job}[/bold]  run id {plan.run_id}  ·  {mode}  ·  world size {plan.world_size}")
    if plan.rendezvous:
        r = plan.rendezvous
        where = ("first allocated node's NodeAddr, port launch.rdzv.port + job id % 1000" if plan.backend == "slurm" else
                 "launch.rdzv.endpoint" if cfg.launch.rdzv.endpoint else "first node address")
        console.print(f"rendezvous: {r.backend} at {r.endpoint} (id {r.id}, nnodes {r.nnodes}); endpoint = {where}")
    table = Table(title="nodes", title_justify="left")
    for col in ("rank", "node", "ssh", "addr", "nproc", "why"):
        table.add_column(col)
    for n in plan.nodes:
        ssh = "-" if plan.standalone or plan.backend == "slurm" else f"{n.user + '@' if n.user else ''}{n.host}:{n.port}"
        table.add_row(str(n.node_rank), n.name, ssh, n.addr, str(n.nproc_per_node), n.nproc_source)
    console.print(table)
    par = plan.parallel
    if cfg.launch.entrypoint is not None:
        console.print(f"entrypoint (every rank): {shlex.join(cfg.launch.entrypoint)}", markup=False)
    if par.get("decided_by"):  # an entrypoint run: no layout planned here
        console.print(f"parallel: decided by {par['decided_by']}", markup=False)
        par = {}
    line = f"parallel: [bold]{par.get('strategy')}[/bold]"
    extras = {k: v for k, v in par.items() if k not in ("strategy", "reason", "decision", "estimate")}
    if extras:
        line += " (" + ", ".join(f"{k}={v}" for k, v in extras.items()) + ")"
    if par:
        console.print(line)
    if decision is not None:
        print_decision(console, decision)
    elif "estimate" in par:
        est, gib = par["estimate"], 2**30
        line = (f"planner's estimate for {est['layout']}: {est['memory_bytes'] / gib:.1f} GiB per GPU (budget "
                f"{est['budget_bytes'] / gib:.1f} GiB), {est['step_time_s']:.3g} s per step ({est['tokens_per_s']:,.0f} tokens/s)")
        if est["fits"]:
            console.print(line)
        else:
            console.print(f"[bold red]warning:[/bold red] {line}: predicted NOT to fit; "
                          "`train.parallel.strategy: auto` picks a layout that does")
    reads = "resolved config (for the record)" if cfg.launch.entrypoint is not None else "every rank reads"
    console.print(f"{reads}: {plan.config_path}   outputs: {plan.output_dir}/")
    if plan.sbatch is not None:
        # Exactly what `mlaunch run` submits (secret-looking values masked here only).
        console.print(f"[bold]sbatch script[/bold] (written to {plan.output_dir}/slurm/, submitted with `sbatch --parsable`):")
        console.print(plan.sbatch_text(mask=True), markup=False, end="")
        return
    console.print("[bold]commands[/bold] (secret-looking env values masked):")
    for n in plan.nodes:
        console.print(f"[cyan]# {n.name}[/cyan]", markup=True)
        console.print(n.command(mask=True), markup=False)


def format_decision(decision: Decision, all_candidates: bool = False) -> list[tuple[str, ...]]:
    """Rows for TABLE_COLUMNS. By default one row per layout: the chosen recomputation mode, the
    least recomputation that fits, or — when none fits — the leanest mode."""
    rows = []
    seen: set[str] = set()
    for c in decision.candidates:  # already ordered: chosen, fitting by speed, the rest by memory
        if not all_candidates:
            if c.layout in seen:
                continue
            same = [x for x in decision.candidates if x.layout == c.layout]
            fitting = [x for x in same if x.fits]
            c = (next((x for x in same if x is decision.chosen), None)
                 or (min(fitting, key=lambda x: RECOMPUTE.index(x.recompute)) if fitting else leanest(same)))
            seen.add(c.layout)
        rows.append((
            c.strategy,
            " ".join(f"{k}={v}" for k, v in c.degrees.items()),
            c.recompute,
            gib(c.memory["total"]),
            "yes" if c.fits else "no",
            f"{c.step_time_s:.3g}",
            f"{c.tokens_per_s:,.0f}",
            c.verdict,
        ))
    return rows


def render_table(decision: Decision, all_candidates: bool = False):
    """A rich Table of the candidates (rich is imported only when this is called)."""
    from rich.table import Table

    table = Table(title="parallel plan", caption=decision.reason)
    for name in TABLE_COLUMNS:
        table.add_column(name, justify="right" if name in ("memory/GPU", "step (s)", "tokens/s") else "left")
    for row in format_decision(decision, all_candidates):
        style = "bold green" if row[-1].startswith("chosen") else ("dim" if row[4] == "no" else None)
        table.add_row(*row, style=style)
    return table


def print_decision(console: Any, decision: Decision) -> None:
    """The planner's table, then its notes."""
    console.print(render_table(decision))
    for note in decision.notes:
        console.print(f"note: {note}")
