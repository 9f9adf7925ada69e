"""How the runners learn what the ranks did: marker lines (job/markers.py) and torchrun's
root-cause error file, never the wording of a log sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from job.markers import EXIT, STARTED, is_marker
from launcher.backends.local import user_error as _user_error
from tests.unit.test_supervisor import ListJob, supervise


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


def test_markers_are_recorded_and_kept_off_the_terminal(tmp_path: Path, capsys) -> None:
    lines = ["node ready in /w", f"{STARTED}4", "ddp on 4 rank(s) (cpu)", f"{EXIT}0 1700000000.0"]
    assert [is_marker(x) for x in lines] == [False, True, False, True]
    job = ListJob(tmp_path, {"n0": (lines, 0)})
    sup, code = supervise(tmp_path, job)
    assert code == 0 and sup.started
    assert list(sup.nodes["n0"].tail) == [lines[0], lines[2]]
    assert (tmp_path / "logs" / "n0.log").read_text().splitlines() == lines  # the log keeps every line
    out = capsys.readouterr().out
    assert STARTED not in out and EXIT not in out and "n0 | ddp on 4 rank(s)" in out


def test_the_run_id_variable_is_one_name_on_both_sides() -> None:
    # launcher/procs.py is shipped to nodes as standalone source, so it keeps its own copy.
    from job.markers import RUN_ID_VAR
    from launcher import procs

    assert procs.RUN_ID_VAR == RUN_ID_VAR


def test_the_probe_runs_the_script_with_a_short_join_timeout() -> None:
    from launcher.nodes import probe_argv

    argv = ["py", "-m", "torch.distributed.run", "--rdzv-conf", "join_timeout=900,is_host=1", "-m", "train", "c.yaml"]
    assert probe_argv(argv, "/tmp/p.py") == ["py", "-m", "torch.distributed.run", "--rdzv-conf",
                                             "join_timeout=60,is_host=1", "/tmp/p.py"]
    static = ["py", "-m", "torch.distributed.run", "--node-rank", "0", "-m", "train", "c.yaml"]
    assert probe_argv(static, "p.py") == ["py", "-m", "torch.distributed.run", "--node-rank", "0", "p.py"]
