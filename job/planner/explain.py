"""Why: each candidate's verdict, the sentences of the decision's reason, and the JSON form of a
decision (`mlaunch plan --json`, job.autoplan.summary)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from job.planner.inputs import COMPLEXITY, RECOMPUTE, STRATEGIES, TIE_MARGIN, gib

if TYPE_CHECKING:
    from job.planner.search import Candidate, Decision


def leanest(candidates: list[Candidate]) -> Candidate:
    return min(candidates, key=lambda c: c.memory["total"])


def with_verdicts(candidates: list[Candidate], chosen: Candidate | None,
                  budget: int) -> list[Candidate]:
    out = []
    for c in candidates:
        if c is chosen:
            fastest = min(x.step_time_s for x in candidates if x.fits)
            why = ("fastest that fits" if c.step_time_s <= fastest
                   else f"simplest within {TIE_MARGIN:.0%} of the fastest")
            verdict = f"chosen: {why}"
        elif not c.fits:
            verdict = f"does not fit: needs {gib(c.memory['total'], budget)} > {gib(budget)} budget"
        elif c.step_time_s >= chosen.step_time_s * 1.005:
            verdict = f"fits; slower than {chosen.label} by {c.step_time_s / chosen.step_time_s:.2f}×"
        else:
            verdict = "fits; " + _tie_note(c, chosen)
        out.append(replace(c, verdict=verdict))
    return sorted(out, key=lambda c: (not c.verdict.startswith("chosen"), not c.fits,
                                      c.step_time_s if c.fits else c.memory["total"]))


def _tie_note(c: Candidate, chosen: Candidate) -> str:
    speed = ("as fast as" if c.step_time_s >= chosen.step_time_s
             else f"{chosen.step_time_s / c.step_time_s - 1:.0%} faster than")
    if COMPLEXITY[c.strategy] > COMPLEXITY[chosen.strategy]:
        why = f"the simpler {chosen.strategy} wins"
    elif RECOMPUTE.index(c.recompute) > RECOMPUTE.index(chosen.recompute):
        why = "less recomputation wins"
    else:
        why = "the faster one wins"
    return f"predicted {speed} the chosen one, within the {TIE_MARGIN:.0%} tie margin where {why}"


def choice_reason(candidates: list[Candidate], chosen: Candidate, budget: int) -> str:
    """Why the chosen one, and for each other strategy why its best candidate lost."""
    n_fit = sum(c.fits for c in candidates)
    parts = [
        f"{chosen.label}: fits ({gib(chosen.memory['total'])} of {gib(budget)} per GPU), "
        f"predicted {chosen.step_time_s:.3g} s per step ({chosen.tokens_per_s:,.0f} tokens/s): "
        f"the {chosen.verdict.removeprefix('chosen: ')} ({n_fit} of {len(candidates)} candidates "
        "fit)."
    ]
    lighter = [c for c in candidates if c.layout == chosen.layout and not c.fits
               and RECOMPUTE.index(c.recompute) < RECOMPUTE.index(chosen.recompute)]
    if lighter:
        c = max(lighter, key=lambda x: RECOMPUTE.index(x.recompute))
        parts.append(f"With {c.recompute} recompute it would need "
                     f"{gib(c.memory['total'], budget)} > {gib(budget)}.")
    for strategy in STRATEGIES:
        mine = [c for c in candidates if c.strategy == strategy]
        if strategy == chosen.strategy or not mine:
            continue
        fitting = [c for c in mine if c.fits]
        if fitting:
            best = min(fitting, key=lambda c: c.step_time_s)
            parts.append(f"{best.label}: {best.verdict.removeprefix('fits; ')}.")
        else:
            best = leanest(mine)
            parts.append(f"{strategy}: does not fit even as {best.label} — {_why_too_big(best, budget)}.")
    return " ".join(parts)


def _why_too_big(c: Candidate, budget: int) -> str:
    state = c.memory["params"] + c.memory["grads"] + c.memory["optimizer"]
    if state > budget:
        return (f"parameters, gradients and AdamW state alone take {gib(state)} per GPU "
                f"> {gib(budget)}")
    rest = c.memory["total"] - state
    return (f"needs {gib(c.memory['total'])} > {gib(budget)} ({gib(state)} model state + "
            f"{gib(rest)} activations, logits, gathered parameters and overhead)")


def decision_to_dict(decision: Decision) -> dict:
    """JSON-ready form for `mlaunch plan --json`."""
    def cand(c: Candidate) -> dict:
        return {
            "strategy": c.strategy, "degrees": c.degrees, "recompute": c.recompute,
            "memory_bytes": c.memory, "step_time_s": c.step_time, "fits": c.fits,
            "tokens_per_s": c.tokens_per_s, "verdict": c.verdict,
            "microbatches": c.microbatches,
            "stages": [[r.start, r.stop] for r in c.stages], "worst_stage": c.worst_stage,
        }
    return {
        "strategy": decision.chosen.strategy if decision.chosen else None,
        "chosen": cand(decision.chosen) if decision.chosen else None,
        "reason": decision.reason,
        "budget_bytes": decision.budget_bytes,
        "smallest_cluster_hint": decision.smallest_cluster_hint,
        "notes": decision.notes,
        "candidates": [cand(c) for c in decision.candidates],
    }
