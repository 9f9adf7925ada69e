"""launcher/ssh/ against real OpenSSH sshd nodes on loopback (tests/sshd.py); no mocks.

The "remote" nodes run on this machine, so a test can check remote files and processes
directly (psutil, the filesystem) as well as through the connection. The checks that need no
sshd (command lines, config resolution, a silent port) are in tests/unit/test_ssh.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from launcher import shell, ssh
from job.errors import ConfigError, MlaunchError
from tests.helpers import ECHO_BACK, NASTY, wait_until


def _run_id() -> str:
    return "test-" + uuid.uuid4().hex[:12]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_connect_all_in_parallel(ssh_nodes):
    results = ssh.connect_all({n.name: n.target() for n in ssh_nodes})
    try:
        conns = ssh.check_connected(results)
        assert list(conns) == [n.name for n in ssh_nodes]
        for node in ssh_nodes:
            res = conns[node.name].run("echo $SSH_CONNECTION", timeout=10)
            assert res.ok, res.stderr
            assert res.stdout.split()[2:] == [node.host, str(node.port)]
    finally:
        ssh.close_all(results)


def test_unknown_host_key_is_refused_and_nothing_written(ssh_cluster, tmp_path):
    (node,) = ssh_cluster(1)
    kh = tmp_path / "known_hosts"
    kh.write_text("# mine\n")
    with pytest.raises(MlaunchError) as info:
        ssh.connect(node.target(known_hosts=str(kh)))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"node {node.name}: host key not in {kh}")
    assert f"ssh-keyscan -p {node.port} {node.host} >> {kh}" in msg
    assert "host_key_policy: accept-new" in msg
    assert kh.read_text() == "# mine\n"


def test_accept_new_records_key_then_reconnects(ssh_cluster, tmp_path):
    (node,) = ssh_cluster(1)
    kh = tmp_path / "fresh" / "known_hosts"  # neither file nor directory exists yet
    with ssh.connect(node.target(known_hosts=str(kh), host_key_policy="accept-new")) as c:
        assert c.run("true", timeout=10).ok
    assert kh.read_text() == node.known_hosts_line + "\n"
    with ssh.connect(node.target(known_hosts=str(kh))) as c:  # "reject" now finds the key
        assert c.run("true", timeout=10).ok
    assert kh.read_text() == node.known_hosts_line + "\n"


def test_changed_host_key_is_refused_even_with_accept_new(ssh_cluster, tmp_path):
    node = ssh_cluster.spawn()
    kh = tmp_path / "known_hosts"
    old_line = node.known_hosts_line + "\n"
    kh.write_text(old_line)
    node.regenerate_host_key()
    with pytest.raises(MlaunchError) as info:
        ssh.connect(node.target(known_hosts=str(kh), host_key_policy="accept-new"))
    msg = str(info.value)
    assert "\n" not in msg
    assert "CHANGED" in msg
    assert f"ssh-keygen -f {kh} -R '[{node.host}]:{node.port}'" in msg
    assert kh.read_text() == old_line  # still only the old key
    node.stop()


def test_connect_all_reports_each_failed_node(ssh_cluster):
    a, b = ssh_cluster(2)
    down = ssh_cluster.spawn()
    down.stop()
    bad_key = b.target(name="badkey", identity_file=str(Path(a.dir.parent) / "known_hosts"))
    results = ssh.connect_all([a.target(), b.target(), down.target(), bad_key])
    try:
        assert isinstance(results[a.name], ssh.Connection)
        assert isinstance(results[b.name], ssh.Connection)
        err = results[down.name]
        assert isinstance(err, MlaunchError)
        assert str(err).startswith(
            f"node {down.name}: connection refused on {down.host}:{down.port}"
        )
        assert "is not a private key" in str(results["badkey"])
        with pytest.raises(MlaunchError) as info:
            ssh.check_connected(results)
        lines = str(info.value).splitlines()
        assert lines[0] == "cannot connect to 2 of 4 nodes:"
        assert len(lines) == 3
        assert not results[a.name].is_active  # check_connected closed the good ones
    finally:
        ssh.close_all(results)


def test_auth_failure_names_node_and_fix(ssh_cluster, tmp_path):
    (node,) = ssh_cluster(1)
    key = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with pytest.raises(MlaunchError) as info:
        ssh.connect(node.target(identity_file=str(key)))
    msg = str(info.value)
    assert msg.startswith(f"node {node.name}: authentication failed for user {node.user}")
    assert f"ssh-copy-id -i {key}.pub -p {node.port} {node.user}@{node.host}" in msg
    with pytest.raises(ConfigError, match="does not exist"):
        ssh.connect(node.target(identity_file=str(tmp_path / "missing")))


def test_run_drains_large_stdout_and_stderr(ssh_cluster):
    (node,) = ssh_cluster(1)
    # Interleaved, 6 MiB each: well past the 2 MiB channel window on both streams.
    prog = (
        "import sys\n"
        "for i in range(96):\n"
        "    sys.stdout.write('o' * 65535 + '\\n'); sys.stderr.write('e' * 65535 + '\\n')\n"
        "sys.exit(3)\n"
    )
    with ssh.connect(node.target()) as c:
        t0 = time.monotonic()
        res = c.run(shell.shell_command(["python3", "-c", prog], {}), timeout=30)
        assert time.monotonic() - t0 < 20
        assert res.exit_code == 3
        assert len(res.stdout) == len(res.stderr) == 96 * 65536
        with pytest.raises(ssh.RemoteTimeout, match="did not finish within 0.5s"):
            c.run("sleep 5", timeout=0.5)
        with pytest.raises(MlaunchError, match="exited with 7: boom"):
            c.run("echo boom >&2; exit 7", timeout=10, check=True)


def test_put_text_replaces_files_whole_and_ping_times_a_round_trip(ssh_cluster, tmp_path):
    (node,) = ssh_cluster(1)
    dest = tmp_path / "dir with 'quote' and $(x)" / "sub" / "config.yaml"
    # ~640 KB: well past one channel window, and bytes a shell would expand if it saw them.
    text = "".join(f"line {i}: ünïcødé $HOME `x` \\ ;\n" for i in range(20000))
    with ssh.connect(node.target()) as c:
        rtt = c.ping(timeout=10)
        assert 0 < rtt < 10
        c.put_text(str(dest), text)
        assert dest.read_text() == text
        c.put_text(str(dest), "second\n")  # renamed over the first
        assert dest.read_text() == "second\n"
        assert [p.name for p in dest.parent.iterdir()] == ["config.yaml"]  # no temporary left
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        with pytest.raises(MlaunchError) as info:
            c.put_text(str(blocker / "x.yaml"), "x")
        msg = str(info.value)
        assert msg.startswith(f"node {node.name}: cannot write {blocker / 'x.yaml'} (exit 1: ")
        assert "\n" not in msg
    with pytest.raises(MlaunchError, match="the SSH connection is closed"):
        c.ping()


def test_env_and_args_arrive_verbatim(ssh_cluster):
    (node,) = ssh_cluster(1)
    env = {f"V{i}": v for i, v in enumerate(NASTY)}
    cwd = Path(node.workdir) / "a dir $(x) `y`"
    cwd.mkdir(exist_ok=True)
    line = shell.shell_command(["python3", "-c", ECHO_BACK, *NASTY], env, cwd=str(cwd))
    with ssh.connect(node.target()) as c:
        res = c.run(line, timeout=10)
    assert res.ok, res.stderr
    got = json.loads(res.stdout)
    assert got["argv"] == NASTY
    assert {k: got["env"][k] for k in env} == env
    assert got["cwd"] == str(cwd)
    assert res.stderr == ""  # nothing was executed by accident


def test_put_tree_sends_only_changes_and_honours_excludes(ssh_cluster, tmp_path):
    (node,) = ssh_cluster(1)
    src = tmp_path / "proj"
    files = {
        "train.py": "print('hi')\n",
        "pkg/__init__.py": "",
        "pkg/deep/model.py": "x = 1\n" * 1000,
        "run.sh": "#!/bin/sh\necho run\n",
    }
    skipped = {
        ".git/config": "[core]\n",
        ".venv/bin/python": "",
        "venv/lib/x.py": "",
        "myenv/pyvenv.cfg": "home = /usr\n",
        "myenv/lib/site.py": "",
        "pkg/__pycache__/model.cpython-311.pyc": "",
        "runs/2024/metrics.jsonl": "{}\n",
        "notes.log": "x\n",
    }
    for rel, text in {**files, **skipped}.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    os.chmod(src / "run.sh", 0o755)
    remote = Path(node.workdir) / "sync dest"
    seen: list[tuple[str, int]] = []
    with ssh.connect(node.target()) as c:
        st = c.put_tree(src, str(remote), exclude_globs=["runs", "*.log"],
                        progress_cb=lambda rel, n: seen.append((rel, n)))
        assert sorted(st.sent) == sorted(files)
        assert sorted(r for r, _ in seen) == sorted(files)
        assert st.files_sent == 4 and st.files_unchanged == 0
        assert str(st).startswith("4 files sent")
        for rel, text in files.items():
            assert (remote / rel).read_text() == text
            assert int((remote / rel).stat().st_mtime) == int((src / rel).stat().st_mtime)
        assert os.access(remote / "run.sh", os.X_OK)
        for rel in skipped:
            assert not (remote / rel).exists(), rel
        assert not (remote / ".git").exists() and not (remote / "myenv").exists()

        st = c.put_tree(src, str(remote), exclude_globs=["runs", "*.log"])
        assert (st.files_sent, st.files_unchanged) == (0, 4)

        (src / "pkg/deep/model.py").write_text("x = 2\n" * 1000)  # same size: mtime tells
        past = time.time() - 100
        os.utime(src / "pkg/deep/model.py", (past, past))
        (src / "pkg/new.py").write_text("new\n")
        st = c.put_tree(src, str(remote), exclude_globs=["runs", "*.log"])
        assert sorted(st.sent) == ["pkg/deep/model.py", "pkg/new.py"]
        assert (remote / "pkg/deep/model.py").read_text() == "x = 2\n" * 1000


def test_closing_pty_channel_ends_remote_job(ssh_cluster):
    (node,) = ssh_cluster(1)
    run_id = _run_id()
    loop = ["sh", "-c", "while :; do echo tick; sleep 0.1; done"]
    with ssh.connect(node.target()) as c:
        job = c.start(shell.job_command(loop, {"X": "1"}, run_id))
        pid = job.wait_pid(10)
        assert next(iter(job)) == "tick"  # no trailing \r from the pty
        assert pid in ssh.list_run_processes(c, run_id)
        assert job.poll() is None
        job.close()
        assert wait_until(lambda: not ssh.list_run_processes(c, run_id), 5), "job survived hangup"
    assert not _alive(pid)


def test_start_streams_lines_pid_and_exit_code(ssh_cluster):
    (node,) = ssh_cluster(1)
    argv = ["sh", "-c", "echo one; echo 'two  words'; echo $$; printf 'no newline'; exit 5"]
    with ssh.connect(node.target()) as c:
        job = c.start(shell.job_command(argv, {}, _run_id(), cwd=node.workdir))
        lines = list(job)
        assert job.exit_status(timeout=10) == 5
        assert job.poll() == 5
    # `sh -c` was exec'd by the wrapper shell, so $$ inside it is the recorded pid.
    assert lines == ["one", "two  words", str(job.pid), "no newline"]


def test_kill_run_ends_exactly_the_runs_processes(ssh_cluster):
    (node,) = ssh_cluster(1)
    run_id, other_id = _run_id(), _run_id()
    # A stand-in for torchrun: workers in their own sessions (out of its process group); on
    # SIGTERM it stops one worker and exits, leaving a second one that ignores SIGTERM.
    fake_torchrun = (
        "import signal, subprocess, sys, time\n"
        "w1 = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "w2 = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(300)'],"
        " start_new_session=True, stdout=subprocess.PIPE)\n"
        "w2.stdout.readline()\n"
        "def stop(*_):\n"
        "    w1.terminate(); w1.wait(); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', w1.pid, w2.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    with ssh.connect(node.target()) as c:
        # Bystanders on the same node: no run id at all, and another run's id.
        bystander = "setsid sleep 301 </dev/null >/dev/null 2>&1 & echo $!"
        plain = int(c.run(bystander, timeout=10).stdout)
        other = int(
            c.run(
                shell.shell_command(
                    ["sh", "-c", "setsid python3 -c 'import time; time.sleep(302)' "
                     "</dev/null >/dev/null 2>&1 & echo $!"],
                    {shell.RUN_ID_VAR: other_id},
                ),
                timeout=10,
            ).stdout
        )
        try:
            job = c.start(shell.job_command(["python3", "-c", fake_torchrun], {}, run_id))
            torchrun = job.wait_pid(10)
            ready = next(line for line in job if line.startswith("ready"))
            w1, w2 = (int(x) for x in ready.split()[1:])
            assert sorted(ssh.list_run_processes(c, run_id)) == sorted([torchrun, w1, w2])

            report = ssh.kill_run(c, run_id, [torchrun], grace_s=1.0)
            assert report.remaining == []
            assert set(report.killed) == {torchrun, w1, w2}
            assert report.sigkill == [w2]  # only the one that ignored SIGTERM
            assert ssh.list_run_processes(c, run_id) == []
            for pid in (torchrun, w1, w2):
                assert not _alive(pid)
            assert _alive(plain) and _alive(other)
            assert ssh.list_run_processes(c, other_id) == [other]
            job.close()
        finally:
            ssh.kill_run(c, other_id, [], grace_s=1.0)
            c.run(f"kill {plain}", timeout=10)
    assert not _alive(other)


def test_ssh_config_alias(ssh_cluster, tmp_path):
    (node,) = ssh_cluster(1)
    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        f"Host gpu-a\n"
        f"  HostName {node.host}\n"
        f"  Port {node.port}\n"
        f"  User {node.user}\n"
        f"  IdentityFile {node.identity_file}\n"
    )
    target = ssh.SSHTarget("gpu-a", ssh_config=str(cfg), known_hosts=node.known_hosts)
    with ssh.connect(target) as c:
        assert c.label == "gpu-a"
        assert c.run("echo $SSH_CONNECTION", timeout=10).stdout.split()[2:] == [
            node.host,
            str(node.port),
        ]


def test_proxy_jump_goes_through_the_jump_node(ssh_cluster, tmp_path):
    jump, dest = ssh_cluster(2)

    def check(conn):
        client_port = int(conn.run("echo $SSH_CONNECTION", timeout=10).stdout.split()[1])
        # The TCP connection into dest was opened by the jump node's sshd, not by us.
        opened_by_jump = {
            conn_.laddr.port
            for p in jump.sshd_children()
            for conn_ in p.net_connections(kind="tcp")
            if conn_.raddr and conn_.raddr.port == dest.port
        }
        assert client_port in opened_by_jump

    explicit = dest.target(proxy_jump=f"{jump.user}@{jump.host}:{jump.port}")
    with ssh.connect(explicit) as c:
        check(c)

    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        f"Host bastion\n  HostName {jump.host}\n  Port {jump.port}\n"
        f"Host inner\n  HostName {dest.host}\n  Port {dest.port}\n  ProxyJump bastion\n"
        f"Host *\n  IdentityFile {dest.identity_file}\n"
    )
    inner = ssh.SSHTarget("inner", ssh_config=str(cfg), known_hosts=dest.known_hosts)
    with ssh.connect(inner) as c:
        check(c)

    down = ssh_cluster.spawn()
    down.stop()
    with pytest.raises(MlaunchError) as info:
        ssh.connect(dest.target(proxy_jump=f"{down.host}:{down.port}"))
    assert f"node {dest.name} (via ProxyJump" in str(info.value)
    assert "connection refused" in str(info.value)


def test_put_tree_from_several_nodes_into_one_shared_directory(ssh_cluster, tmp_path):
    """`sync: true` with a workdir on a shared filesystem: every node pushes into the same
    directory at once. Lost mkdir races are fine and files are renamed into place whole."""
    import threading

    nodes = ssh_cluster(3)
    src = tmp_path / "proj"
    for i in range(20):
        p = src / f"d{i % 4}" / f"sub{i % 3}" / f"f{i}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"x = {i}\n" * (200 + i))
    shared = tmp_path / "shared workdir"
    errors: list[BaseException] = []

    def push(node) -> None:
        try:
            with ssh.connect(node.target()) as c:
                c.put_tree(src, str(shared))
        except BaseException as e:  # collected: the assertion below names them
            errors.append(e)

    threads = [threading.Thread(target=push, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    for p in src.rglob("*.py"):
        assert (shared / p.relative_to(src)).read_text() == p.read_text()
    assert not list(shared.rglob("*.tmp")), "no temporary file left behind"
