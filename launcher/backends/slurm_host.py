"""Where the Slurm backend's commands and files are: this machine (mlaunch runs on the login
node), or a login node reached over SSH (`cluster.slurm.login`, mlaunch on a laptop). Both give
the same few operations — a Slurm command, a file written, a log followed — so the backend
(slurm.py) reads the same either way.

Paths are relative to the submit directory (the job's working directory): `cluster.workdir` when
set, else the directory mlaunch runs in; on a login node `cluster.workdir` (default ~/mlaunch).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.errors import MlaunchError
from launcher.shell import quote_path

TAIL_S = 0.2
#: After the job ends, a followed remote log gets this long to deliver its last lines.
DRAIN_S = 1.5


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


class SlurmHost(ABC):
    where: str  # for messages: "here", "login node gpu-login1"

    @abstractmethod
    def run(self, argv: list[str], timeout: float) -> Ran:
        """A Slurm client command, from the submit directory."""

    @abstractmethod
    def missing(self, tools: tuple[str, ...]) -> list[str]:
        """The commands of `tools` not on PATH."""

    @abstractmethod
    def write(self, path: str, text: str) -> None:
        """A file under the submit directory, atomically, its folder created."""

    @abstractmethod
    def prepare(self, out: str) -> dict[str, int]:
        """`<out>/logs` and `<out>/slurm` made, stale error files removed; the size of each
        existing node log (by node name): a run follows them from there."""

    @abstractmethod
    def follow(self, path: str, offset: int, over: threading.Event) -> Iterator[str]:
        """The lines appended to `path` from `offset` on, until `over` is set and all is read."""

    @abstractmethod
    def read(self, path: str) -> str | None:
        """A small file's text, None if absent."""

    def error_message(self, path: str) -> str | None:
        """The message of torchrun's error file at `path` (`{"message": {"message": ...}}`)."""
        from launcher.backends.local import message_of

        return message_of(self.read(path))

    def close(self) -> None:
        pass


class LocalHost(SlurmHost):
    where = "here"

    def __init__(self, submit_dir: str | None) -> None:
        self.base = Path(os.path.expanduser(submit_dir)) if submit_dir else Path.cwd()

    def run(self, argv: list[str], timeout: float) -> Ran:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=self.base)
        return Ran(r.returncode, r.stdout, r.stderr)

    def missing(self, tools: tuple[str, ...]) -> list[str]:
        return [t for t in tools if shutil.which(t) is None]

    def path(self, rel: str) -> Path:
        return self.base / os.path.expanduser(rel)

    def write(self, path: str, text: str) -> None:
        from job.files import publish_file

        publish_file(self.path(path), text)

    def prepare(self, out: str) -> dict[str, int]:
        logs = self.path(out) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        (self.path(out) / "slurm").mkdir(exist_ok=True)
        for stale in logs.glob("torchrun-error-*.json"):
            stale.unlink()  # an earlier run's failure is not this one's
        return {p.stem: p.stat().st_size for p in logs.glob("*.log")}

    def follow(self, path: str, offset: int, over: threading.Event) -> Iterator[str]:
        file = self.path(path)
        buf = b""
        f = None
        try:
            while True:
                done = over.is_set()  # read before the last drain: nothing is missed
                if f is None and file.exists():
                    f = open(file, "rb")
                    f.seek(offset)
                chunk = f.read() if f is not None else b""
                if chunk:
                    buf += chunk
                    *complete, buf = buf.split(b"\n")
                    for raw in complete:
                        yield raw.decode(errors="replace")
                    continue
                if done:
                    if buf:
                        yield buf.decode(errors="replace")
                    return
                time.sleep(TAIL_S)
        finally:
            if f is not None:
                f.close()

    def read(self, path: str) -> str | None:
        try:
            return self.path(path).read_text(errors="replace")
        except OSError:
            return None


class LoginHost(SlurmHost):
    """Every command over one SSH connection to the login node, from `cluster.workdir`, after
    `cluster.setup` (where `module load slurm` belongs on many sites)."""

    def __init__(self, conn: Any, name: str, workdir: str, setup: str | None) -> None:
        self.conn, self.where, self.workdir, self.setup = conn, f"login node {name}", workdir, setup

    def _line(self, cmd: str) -> str:
        steps = [f"mkdir -p {quote_path(self.workdir)}", f"cd {quote_path(self.workdir)}"]
        if self.setup and self.setup.strip():
            steps.append(self.setup.strip())
        return " && ".join([*steps, cmd])

    def run(self, argv: list[str], timeout: float) -> Ran:
        res = self.conn.run(self._line(shlex.join(argv)), timeout=timeout)
        return Ran(res.exit_code, res.stdout, res.stderr)

    def missing(self, tools: tuple[str, ...]) -> list[str]:
        res = self.conn.run(self._line(" ".join(f"command -v {t} >/dev/null || echo {t};" for t in tools)), timeout=30)
        if res.exit_code != 0 and not res.stdout.strip():
            raise MlaunchError(f"{self.where}: cannot run commands in {self.workdir} ({(res.stderr.strip().splitlines() or ['?'])[-1]}); "
                               "check cluster.workdir and cluster.setup")
        return res.stdout.split()

    def _abs(self, rel: str) -> str:
        return rel if rel.startswith(("/", "~")) else f"{self.workdir.rstrip('/')}/{rel}"

    def write(self, path: str, text: str) -> None:
        self.conn.put_text(self._abs(path), text, timeout=60)

    def prepare(self, out: str) -> dict[str, int]:
        q = quote_path(out)
        res = self.conn.run(self._line(
            f"mkdir -p {q}/logs {q}/slurm && rm -f {q}/logs/torchrun-error-*.json && "
            f"for f in {q}/logs/*.log; do [ -e \"$f\" ] && stat -c '%s %n' \"$f\"; done; true"), timeout=60)
        if res.exit_code != 0:
            raise MlaunchError(f"{self.where}: cannot create {out}/logs under {self.workdir}: {res.stderr.strip()[:200]}")
        sizes = {}
        for line in res.stdout.splitlines():
            size, _, name = line.partition(" ")
            if size.isdigit():
                sizes[Path(name).stem] = int(size)
        return sizes

    def follow(self, path: str, offset: int, over: threading.Event) -> Iterator[str]:
        # `tail -F` waits for a file that does not exist yet and follows it across requeues.
        proc = self.conn.start(self._line(f"exec tail -c +{offset + 1} -F {quote_path(path)} 2>/dev/null"), pty=False)

        def stop_when_over() -> None:
            over.wait()
            time.sleep(DRAIN_S)
            proc.close()

        threading.Thread(target=stop_when_over, daemon=True, name="mlaunch-tail-stop").start()
        try:
            for line in proc.lines():
                yield line.rstrip("\r")
        except Exception:
            if not over.is_set():
                raise  # the connection died while the job runs: the supervisor reports it
        finally:
            proc.close()

    def read(self, path: str) -> str | None:
        res = self.conn.run(self._line(f"cat {quote_path(path)}"), timeout=30)
        return res.stdout if res.exit_code == 0 else None

    def close(self) -> None:
        self.conn.close()
