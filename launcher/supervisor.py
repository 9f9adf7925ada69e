"""The supervisor: one for every backend. It streams each node's output (prefixed on the terminal,
verbatim in `<output_dir>/logs/<node>.log`), writes run.json and the run's registry entry
(launcher/registry.py: state, nodes, rank 0's progress), says what a silent run waits for, stops
everything on the first failure, Ctrl-C or SIGTERM, and turns the end into one report, a summary,
`<output_dir>/loss.png` and one exit code. Backends (launcher/backends/) only start, poll and stop
their nodes.

On a terminal the nodes' lines scroll above one progress line (launcher/live.py), drawn from rank
0's `MLAUNCH_EVENT=` lines (job/events.py), never from its human sentences.
"""

from __future__ import annotations

import collections
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.config import JobConfig
from job.files import publish_file
from job.events import parse_event
from job.markers import BEAT, EVENT, STARTED, beat_interval, is_marker
from launcher.backends.base import Job, NodeOutcome, Worker
from launcher.console import say
from launcher.live import View
from launcher.plan import Plan
from launcher.progress import Progress
from launcher.registry import PROGRESS_EVERY_S, Entry
from launcher.stopping import Stop

#: Other nodes are stopped within this many seconds of a node's failure.
STOP_DEADLINE_S = 15.0
#: The exit code of a run stopped as hung (as timeout(1) reports a command it stopped).
EXIT_HUNG = 124
#: Without launch.hang_timeout_s: this many times the slowest step seen, and at least the floor.
HANG_STEPS, HANG_FLOOR_S = 20, 300.0
#: Phases in which a rank may legitimately go long without completing a step.
LONG_PHASES = {"setup", "eval", "checkpoint", "export", "done"}
TAIL_LINES = 20
TICK_S = 0.5
#: After asking the ranks for their stacks: time for the answers to be written.
STACK_WAIT_S = 2.0
_COLOURS = ["36", "33", "35", "32", "34", "31", "96", "93", "95", "92", "94", "91"]


@dataclass
class Verdict:
    """How a run ended, for launch.job_restarts: the exit code, and whether starting again from
    the newest checkpoint could help (a node failed, was lost or hung — not a user error, not a
    Ctrl-C)."""

    code: int
    retry: bool = False
    cause: str = ""
    #: For the registry: `done`, `failed`, `stopped`, `hung` (empty: from the code).
    state: str = ""

    @property
    def final_state(self) -> str:
        return self.state or ("done" if self.code == 0 else "failed")


@dataclass
class _Node:
    worker: Worker
    prefix: str
    log: Any = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    last_output: float = field(default_factory=time.monotonic)
    reader: threading.Thread | None = None


class Supervisor:
    def __init__(self, cfg: JobConfig, plan: Plan, job: Job, *, prefixed: bool = True,
                 entry: Entry | None = None, echo: bool = True, restarts_left: int = 0) -> None:
        self.cfg, self.plan, self.job = cfg, plan, job
        # The registry entry (None: not registered, e.g. a test driving a Supervisor directly);
        # `echo=False`: a detached supervisor, whose nodes' lines are in their logs only.
        self.entry, self.echo = entry, echo
        self.view = View(Progress(started_at=entry.started if entry else time.time()), live=None if echo else False)
        self._entry_saved = 0.0
        self.restarts_left = restarts_left
        self.out = Path(plan.output_dir)
        self.logs = self.out / "logs"
        self.prefixed = prefixed
        self.nodes: dict[str, _Node] = {}
        self.outcomes: dict[str, NodeOutcome] = {}
        self.started = False  # a rank printed STARTED: the rendezvous is complete
        self.quiet = threading.Event()  # set once we stop the run: shutdown noise goes to the logs only
        self.changed = threading.Event()
        self.colour = sys.stdout.isatty()
        # Slurm's node names are known once the job runs (_adopt widens the column then).
        self.width = 0 if plan.backend == "slurm" else max(len(n.name) for n in plan.nodes)
        self.silence_reported = time.monotonic()
        self.beats = _Beats(cfg.launch.hang_timeout_s)
        self.verdict = Verdict(0)

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        with self.view:
            code = self._run()
        self._finish(code)
        return code

    def _run(self) -> int:
        with Stop() as stop:
            self._adopt()
            self._write_record()
            self._save_entry("pending" if self.job.waiting() else "running")
            failed: _Node | None = None
            hang: str | None = None
            while not stop.event.is_set():
                for name, outcome in self.job.poll().items():
                    outcome.at = outcome.at or time.time()
                    self.outcomes.setdefault(name, outcome)
                if self._adopt():
                    self._write_record()
                failed = self._first_failure()
                if failed is not None:
                    break
                if self.job.finished(self.outcomes) and self._readers_done():
                    break
                self.changed.wait(TICK_S)
                self.changed.clear()
                self._check_silence()
                self._save_entry("pending" if self.job.waiting() else "running", every=PROGRESS_EVERY_S)
                hang = self.beats.check()
                if hang is not None:
                    break

            if stop.signum is not None:
                return self._stopped(stop)
            if hang is not None:
                return self._hung(hang)

            if failed is not None:
                return self._failed(failed)
            code, why = self.job.final()
            self._close_logs()
            if code != 0:
                say(f"run {self.plan.run_id} failed: {why or f'exit code {code}'}; logs: {self.logs}/")
                self.verdict = Verdict(code, cause=why or f"exit code {code}")
                return code
            for problem in self.job.stop(grace_s=3.0):  # after a clean end: anything left is ended, and said
                say(problem)
            say(f"run {self.plan.run_id} finished on all {len(self.plan.nodes)} node(s); outputs in {self.out}/")
            return 0

    # ------------------------------------------------------------------ the registry, the end
    def _node_states(self) -> dict[str, dict[str, Any]]:
        states = {}
        for name in self.nodes:
            if name == "batch":  # Slurm's batch shell: not a node
                continue
            o = self.outcomes.get(name)
            if o is None:
                states[name] = {"state": "running"}
            elif o.lost:
                states[name] = {"state": "lost", "why": o.lost}
            else:
                states[name] = {"state": "exited" if o.code == 0 else "failed", "exit_code": o.code}
        return states

    def _save_entry(self, state: str, every: float = 0.0) -> None:
        """The run's registry entry now: at once on a change of state, else at most every `every` s."""
        entry = self.entry
        if entry is None:
            return
        now = time.monotonic()
        if state == entry.state and now - self._entry_saved < every:
            return
        self._entry_saved = now
        entry.state = state
        entry.nodes = [n for n in self.nodes if n != "batch"] or entry.nodes
        entry.node_states = self._node_states()
        entry.progress = self.view.progress.snapshot()
        rec = self.job.record()
        if "slurm" in rec:
            entry.slurm = {**entry.slurm, **rec["slurm"], "state": getattr(self.job, "state", None)}
        try:
            entry.save()
        except OSError as e:  # the registry is a convenience: it must never stop a run
            say(f"could not update the run registry ({e}); the run goes on")

    def _finish(self, code: int) -> None:
        """After the run (or this attempt of it): the registry entry; at the very end also the
        summary and `<output_dir>/loss.png`."""
        final = not (self.verdict.retry and self.restarts_left > 0) or code == 0
        lines: list[str] = []
        if final:
            lines = self._summary(say_it=code == 0)
        if self.entry is not None:
            self.entry.exit_code, self.entry.cause = code, self.verdict.cause or None
            if lines:
                self.entry.summary = lines
            self._save_entry(self.verdict.final_state if final else "restarting")
            if final:
                self.entry.ended = time.time()
                self.entry.save()

    def _summary(self, say_it: bool) -> list[str]:
        """How the run went, said (`say_it`: after a failure its one line stays the last one; the
        summary is in the registry then, `mlaunch status RUN`), and its loss curve drawn."""
        try:
            from launcher.plot import load_records, plot_loss
            from launcher.summary import summary_lines

            records = load_records(self.out)
            if self.cfg.train is None and not records and self.view.progress.end is None:
                return []  # a script of the user's own: it reports in its own way
            lines = summary_lines(self.view.progress.end, records, output_dir=self.out)
        except Exception as e:  # a report must not turn a finished run into a failed one
            say(f"no summary: the run's metrics could not be read ({type(e).__name__}: {e})")
            return []
        if any("loss" in r for r in records):
            try:
                png = plot_loss(records, self.out / "loss.png", title=self.plan.job)
                lines.append(f"loss curve: {png}")
            except Exception as e:
                lines.append(f"no loss curve ({type(e).__name__}: {e})")
        for line in lines if say_it else ():
            say(line)
        return lines

    def _stopped(self, stop: Stop) -> int:
        say(f"stopping run {self.plan.run_id} on every node (signal {stop.signum}); grace {self.cfg.launch.grace_period_s:g}s")
        self.quiet.set()
        for problem in self.job.stop(self.cfg.launch.grace_period_s):
            say(problem)
        self._close_logs()
        say(f"stopped run {self.plan.run_id}: {self.job.stopped_note()}; shutdown output is in {self.logs}/")
        self.verdict = Verdict(stop.exit_code, cause=f"stopped by signal {stop.signum}", state="stopped")
        return stop.exit_code

    def _failed(self, node: _Node) -> int:
        outcome = self.outcomes[node.worker.name]
        why = (outcome.lost if outcome.lost else "was killed by a signal" if outcome.code == -1
               else f"exited with code {outcome.code}")
        others = len(self.nodes) > 1
        if others:
            say(f"node {node.worker.name} {why}; stopping the other nodes")
        self.quiet.set()
        t0 = time.monotonic()
        # A lost node's peers wait in a collective that will never complete: SIGTERM cannot reach them.
        for problem in self.job.stop(min(self.cfg.launch.grace_period_s, STOP_DEADLINE_S - 3), force=bool(outcome.lost)):
            say(problem)
        if others:
            say(f"all nodes stopped in {time.monotonic() - t0:.1f}s")
        self._close_logs()
        cause = self.job.failure_cause(node.worker)
        if node.tail and not cause and self.plan.backend != "local":  # local output was all shown
            tail = "\n".join(f"    {line}" for line in node.tail)
            say(f"last lines of {node.worker.name}:\n{tail}")
        code = outcome.code if (outcome.code not in (None, 0, -1) and not outcome.lost) else 255
        if code == 1:  # torchrun's own code for "a worker failed": the worker's is the one to return
            code = rank_exit_code(node.tail) or code
        where = f"on node {node.worker.name} " if others or self.plan.backend != "local" else ""
        say(f"run failed {where}({why}){f': {cause}' if cause else ''}; logs: {self.logs}/")
        # A rank's own user error (bad config, diverged loss) would fail again: not retried. On
        # Slurm the batch script has requeued the job already as long as restarts were left.
        self.verdict = Verdict(code, retry=cause is None and self.plan.backend != "slurm",
                               cause=f"node {node.worker.name} {why}" + (f": {cause}" if cause else ""))
        return code

    def _hung(self, why: str) -> int:
        """Name who stopped, keep every reachable rank's stack, stop the job."""
        say(f"run {self.plan.run_id} is hung: {why}")
        self.quiet.set()
        stacks = Path(self.plan.output_dir) / "logs" / "stacks"
        try:
            self.job.dump_stacks()
            time.sleep(STACK_WAIT_S)  # faulthandler writes from the signal handler: at once, if the rank runs at all
            saved = self.job.collect_stacks(stacks)
            say(f"Python stacks of {saved} rank(s) that could answer are in {stacks}/" if saved else
                "no rank could answer for its stack (stopped or gone)")
        except Exception as e:  # the report must not keep the job from being stopped
            say(f"could not collect the ranks' stacks: {e}")
        for problem in self.job.stop(min(self.cfg.launch.grace_period_s, STOP_DEADLINE_S - 3), force=True):
            say(problem)
        self._close_logs()
        say(f"run failed: hung ({why.split(' (')[0]}); logs: {self.logs}/")
        # On Slurm too: the job was cancelled, a restart submits it again.
        self.verdict = Verdict(EXIT_HUNG, retry=True, cause=f"hung: {why.split(' (')[0]}", state="hung")
        return EXIT_HUNG

    def _first_failure(self) -> _Node | None:
        bad = [(self.job.secondary(self.nodes[n].worker), o.at, n) for n, o in self.outcomes.items()
               if o.lost or o.code not in (None, 0)]
        return self.nodes[min(bad)[2]] if bad else None

    # ------------------------------------------------------------------ streaming
    def _adopt(self) -> bool:
        """Start a reader for every worker not yet followed (Slurm's appear once the job runs)."""
        new = [w for w in self.job.workers() if w.name not in self.nodes]
        for w in new:
            self.width = max(self.width, len(w.name))
        for w in new:
            i = len(self.nodes)
            if not self.prefixed:
                prefix = ""
            elif self.colour:
                prefix = f"\x1b[{_COLOURS[i % len(_COLOURS)]}m{w.name:<{self.width}}\x1b[0m | "
            else:
                prefix = f"{w.name:<{self.width}} | "
            node = _Node(w, prefix)
            if w.log_path is not None:
                w.log_path.parent.mkdir(parents=True, exist_ok=True)
                node.log = open(w.log_path, "a", encoding="utf-8")
            self.nodes[w.name] = node
            node.reader = threading.Thread(target=self._read, args=(node,), daemon=True, name=f"mlaunch-log-{w.name}")
            node.reader.start()
        return bool(new)

    def _read(self, node: _Node) -> None:
        """Drain one node's output: prefixed to our stdout, verbatim to its log file."""
        try:
            for raw in node.worker.lines():
                # A carriage-return redraw (a progress bar that slipped through): keep its final state.
                line = raw.rstrip("\r\n").rsplit("\r", 1)[-1]
                if line.startswith(BEAT):  # many, and only for us: not even the log keeps them
                    self.beats.heard(node.worker.name, line)
                    continue
                node.last_output = time.monotonic()
                if node.log is not None:
                    node.log.write(line + "\n")
                    node.log.flush()
                if is_marker(line):  # for us, not for the terminal or the failure report's tail
                    self.started = self.started or line.startswith(STARTED)
                    if line.startswith(EVENT):
                        event = parse_event(line)
                        if event is not None:
                            self.view.event(event)
                    continue
                node.tail.append(line)
                if self.echo and not self.quiet.is_set():
                    self.view.line(node.prefix + line)
            outcome = node.worker.outcome()
        except Exception as e:  # the transport died under us
            outcome = NodeOutcome(lost=f"lost its connection ({type(e).__name__})")
        outcome.at = outcome.at or time.time()
        self.outcomes[node.worker.name] = outcome
        self.changed.set()

    def _readers_done(self) -> bool:
        return all(n.reader is not None and not n.reader.is_alive() for n in self.nodes.values())

    def _close_logs(self) -> None:
        """Let every reader drain (bounded), then close the logs it wrote."""
        for node in self.nodes.values():
            if node.reader is not None:
                node.reader.join(timeout=5)
            if node.log is not None and not node.log.closed:
                node.log.close()

    def _write_record(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        publish_file(self.logs / "run.json", json.dumps(
            {"run_id": self.plan.run_id, "backend": self.plan.backend, **self.job.record()}, indent=2))

    # ------------------------------------------------------------------ silence
    def _check_silence(self) -> None:
        """At most every `launch.silence_warning_s`, say what a silent run waits for: a rendezvous
        that cannot complete (a node that cannot reach the master, a firewall) would otherwise
        wait out its join timeout without a word."""
        after = self.cfg.launch.silence_warning_s
        if not self.nodes or self.job.waiting():
            self.silence_reported = time.monotonic()  # the clock starts once the job runs
            return
        now = time.monotonic()
        last = max(n.last_output for n in self.nodes.values())
        if now - last < after or now - self.silence_reported < after:
            return
        self.silence_reported = now
        r = self.plan.rendezvous
        if not self.started and r is not None:
            say(f"no output from any node for {now - last:.0f}s: still waiting for all {r.nnodes} node(s) to join the "
                f"rendezvous at {r.endpoint} (gives up after launch.rdzv.join_timeout_s="
                f"{self.cfg.launch.rdzv.join_timeout_s}s); `mlaunch nodes check` tests that every node reaches it")
        else:
            quietest = min(self.nodes.values(), key=lambda n: n.last_output)
            say(f"no output from any node for {now - last:.0f}s (quietest: {quietest.worker.name}, last line: "
                f"{(quietest.tail[-1] if quietest.tail else '-')[:120]!r}); Ctrl-C stops the run on every node")


class _Beats:
    """Every rank's last heartbeat (train/heartbeat.py) and the progress of the job as a whole:
    the hang detector. A hang is a stretch of `timeout` with no step completed anywhere (outside
    set-up, evaluation and checkpoints), or a rank that stopped beating for that long."""

    def __init__(self, timeout_s: float | None) -> None:
        self.fixed = timeout_s
        self.ranks: dict[int, tuple[str, int, str, float]] = {}  # rank -> (node, step, phase, heard at)
        self.max_step = -1
        self.progress_at: float | None = None
        self.slowest = 0.0  # the longest stretch between two completed steps, for the adaptive timeout
        self.lock = threading.Lock()

    @property
    def timeout(self) -> float:
        return self.fixed if self.fixed is not None else max(HANG_FLOOR_S, HANG_STEPS * self.slowest)

    def heard(self, node: str, line: str) -> None:
        try:
            rank_s, step_s, phase = line[len(BEAT):].split()[:3]
            rank, step = int(rank_s), int(step_s)
        except ValueError:
            return
        now = time.monotonic()
        with self.lock:
            self.ranks[rank] = (node, step, phase, now)
            if step > self.max_step:
                if self.progress_at is not None and self.max_step >= 1:
                    self.slowest = max(self.slowest, (now - self.progress_at) / (step - self.max_step))
                self.max_step, self.progress_at = step, now

    def check(self) -> str | None:
        """None, or why the job is hung and who stopped first."""
        with self.lock:
            if not self.ranks or self.progress_at is None:
                return None
            now, timeout = time.monotonic(), self.timeout
            if any(phase in LONG_PHASES for _, _, phase, heard in self.ranks.values() if now - heard < timeout):
                self.progress_at = now  # the clock pauses while a rank is legitimately busy
            silent = {r: v for r, v in self.ranks.items() if now - v[3] >= timeout}
            if not silent and now - self.progress_at < timeout:
                return None
            gap = beat_interval(self.fixed)  # what the ranks use
            stale = {r: v for r, v in self.ranks.items() if now - v[3] > 3 * gap}
            if stale:
                first = min(v[3] for v in stale.values())
                who = {r: v for r, v in stale.items() if v[3] - first < gap * 1.5}
                what = "stopped reporting first"
            else:
                low = min(v[1] for v in self.ranks.values())
                who = {r: v for r, v in self.ranks.items() if v[1] == low}
                what = "are all waiting" if len(who) == len(self.ranks) else "are behind the others"
            limit = f"launch.hang_timeout_s={timeout:g}{'' if self.fixed is not None else ', adaptive'}"
            if silent and now - self.progress_at < timeout:
                return f"a rank stopped reporting for {timeout:g} s ({limit}); {_describe(who, now)} {what}"
            return f"no step completed for {now - self.progress_at:.0f} s ({limit}); {_describe(who, now)} {what}"


_ROOT_EXIT = re.compile(r"exitcode\s*:\s*(\d+)")


def rank_exit_code(lines: Any) -> int | None:
    """The failed worker's own exit code from torchrun's report ("Root Cause … exitcode : 7"), so a
    script's `sys.exit(7)` is mlaunch's exit 7, not torchrun's 1. None when not reported."""
    text = "\n".join(lines)
    at = text.rfind("Root Cause")
    m = _ROOT_EXIT.search(text, at if at >= 0 else 0)
    return int(m.group(1)) if m and int(m.group(1)) > 0 else None


def _describe(ranks: dict[int, tuple[str, int, str, float]], now: float) -> str:
    """`rank 2, 3 on node 127.0.0.3 (last heard 21 s ago, step 14, phase forward_backward)`."""
    by_node: dict[str, list[int]] = {}
    for r, (node, *_rest) in sorted(ranks.items()):
        by_node.setdefault(node, []).append(r)
    parts = []
    for node, rs in by_node.items():
        _, step, phase, heard = ranks[rs[0]]
        label = "rank" if len(rs) == 1 else "ranks"
        parts.append(f"{label} {', '.join(map(str, rs))} on node {node} (last heard {now - heard:.0f} s ago, "
                     f"step {step}, phase {phase})")
    return "; ".join(parts)
