"""One per-node fan-out for every per-node operation: run a function on every node at once and get
every node's outcome back (a value or the exception it raised), like fabric's `GroupResult`.
A bad node never hides the others: the caller reports all of them, or raises one line naming each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from job.errors import MlaunchError

K = TypeVar("K")
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class GroupResult(Generic[R]):
    """Per node name, in the order given: what the operation returned, or what it raised."""

    results: dict[str, R | BaseException]

    @property
    def ok(self) -> dict[str, R]:
        return {n: r for n, r in self.results.items() if not isinstance(r, BaseException)}

    @property
    def failed(self) -> dict[str, BaseException]:
        return {n: r for n, r in self.results.items() if isinstance(r, BaseException)}

    def values(self, what: str) -> dict[str, R]:
        """Every node's value, or one MlaunchError naming every node where `what` failed."""
        failed = self.failed
        if not failed:
            return self.ok
        if len(self.results) == 1:
            only = next(iter(failed.values()))
            if isinstance(only, MlaunchError):
                raise only
        lines = "; ".join(_one_line(n, e) for n, e in failed.items())
        raise MlaunchError(f"{what} failed on {len(failed)} of {len(self.results)} node(s), nothing started: {lines}")


def fan_out(fn: Callable[[str, T], R], items: Mapping[str, T], max_parallel: int = 32) -> GroupResult[R]:
    """`fn(name, item)` for every node in parallel (at most `max_parallel` at once)."""
    results: dict[str, R | BaseException] = {}
    if not items:
        return GroupResult(results)
    with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(items))), thread_name_prefix="mlaunch-node") as pool:
        futures = {name: pool.submit(fn, name, item) for name, item in items.items()}
        for name, fut in futures.items():
            try:
                results[name] = fut.result()
            except Exception as e:  # one node's failure must not hide the others'
                results[name] = e
    return GroupResult(results)


def _one_line(name: str, e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # The SSH layer's messages already start with "node <name>: ".
    return text if name in text else f"{name}: {text}"
