"""How the runners learn what the ranks did: marker lines (job/markers.py) and torchrun's
root-cause error file, never the wording of a log sentence."""

from __future__ import annotations

import collections
import io
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from job.markers import STARTED, is_marker
from launcher import cluster_run
from launcher.run import _user_error


def error_file(tmp_path: Path, message) -> Path:
    path = tmp_path / "error.json"
    path.write_text(json.dumps({"message": message}))
    return path


@pytest.mark.parametrize("kind", ["MlaunchError", "ConfigError"])
def test_a_user_error_is_read_from_torchruns_error_file(tmp_path: Path, kind: str) -> None:
    # The shape torchrun's ErrorHandler.record_exception writes, and its @record main copies.
    path = error_file(tmp_path, {"message": f"{kind}: train.tokenizer.path: /x does not exist\nsecond line",
                                 "extraInfo": {"py_callstack": "Traceback ...", "timestamp": "0"}, "errorCode": 2})
    assert _user_error(path) == "train.tokenizer.path: /x does not exist"


def test_no_user_error_for_a_crash_a_signal_or_no_file(tmp_path: Path) -> None:
    assert _user_error(error_file(tmp_path, {"message": "RuntimeError: boom", "extraInfo": {}})) is None
    assert _user_error(error_file(tmp_path, "Signal 9 (SIGKILL) received by PID 7")) is None
    assert _user_error(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert _user_error(tmp_path / "bad.json") is None


def test_started_marker_is_recorded_and_kept_off_the_terminal(capsys) -> None:
    lines = ["node ready in /w", f"{STARTED}4", "ddp on 4 rank(s) (cpu)"]
    assert [is_marker(x) for x in lines] == [False, True, False]
    log = io.StringIO()
    job = SimpleNamespace(proc=SimpleNamespace(lines=lambda: iter(lines), exit_status=lambda timeout: 0),
                          tail=collections.deque(maxlen=20), log=log, started=False, exit_code=None, dropped=False,
                          last_output=0.0, conn=SimpleNamespace(is_active=True))
    cluster_run._read(job, "n0 | ", threading.Lock(), threading.Event(), threading.Event())
    assert job.started and job.exit_code == 0
    assert list(job.tail) == [lines[0], lines[2]]
    assert log.getvalue().splitlines() == lines  # the log keeps every line
    assert STARTED not in capsys.readouterr().out
