"""launcher/ssh/ and launcher/shell without sshd: command lines that survive `sh -c`, ssh_config
resolution, a port that never speaks SSH, policy checks (the real-sshd tests are in
tests/ssh/test_ssh.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from launcher import shell, ssh
from job.errors import ConfigError, MlaunchError
from tests.helpers import ECHO_BACK, NASTY


def test_shell_command_survives_sh(tmp_path):
    env = {f"V{i}": v for i, v in enumerate(NASTY)}
    cwd = tmp_path / "dir with 'quote' and $(x)"
    cwd.mkdir()
    line = shell.shell_command([sys.executable, "-c", ECHO_BACK, *NASTY], env, cwd=str(cwd))
    assert "\n" not in line.replace("line1\nline2", "")  # only inside quotes
    out = subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=True).stdout
    got = json.loads(out)
    assert got["argv"] == NASTY
    assert {k: got["env"][k] for k in env} == env
    assert got["cwd"] == str(cwd)


def test_shell_command_rejects_bad_env_name():
    with pytest.raises(ConfigError, match="not valid"):
        shell.shell_command(["true"], {"A-B": "1"})


def test_resolve_applies_ssh_config_and_explicit_values_win(tmp_path):
    cfg = tmp_path / "config"
    cfg.write_text(
        "Host trainer\n"
        "  HostName 10.1.2.3\n"
        "  Port 2200\n"
        "  User alice\n"
        "  IdentityFile ~/keys/trainer\n"
        "  ProxyJump bob@bastion:2022\n"
    )
    t = ssh.resolve(ssh.SSHTarget("trainer", ssh_config=str(cfg), known_hosts="/kh"))
    assert (t.host, t.port, t.user) == ("10.1.2.3", 2200, "alice")
    assert t.identity_files == (os.path.expanduser("~/keys/trainer"),)
    assert t.proxy_jump == "bob@bastion:2022"
    assert t.label == "trainer"
    t = ssh.resolve(
        ssh.SSHTarget("trainer", port=22, user="root", identity_file="/k", ssh_config=str(cfg))
    )
    assert (t.port, t.user, t.identity_files) == (22, "root", ("/k",))
    assert t.known_hosts == os.path.expanduser("~/.ssh/known_hosts")


def test_silent_port_times_out_with_one_line(tmp_path):
    # Accepts TCP (the kernel completes the handshake) but never speaks SSH: a hung node.
    empty = tmp_path / "ssh_config"
    empty.write_text("")
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        port = srv.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(MlaunchError) as info:
            ssh.connect(ssh.SSHTarget("127.0.0.1", port=port, connect_timeout=0.5,
                                      ssh_config=str(empty), known_hosts=str(tmp_path / "kh")))
        assert time.monotonic() - t0 < 5
    assert str(info.value) == (
        f"node 127.0.0.1:{port}: 127.0.0.1:{port} accepted the connection but completed no SSH "
        f"handshake within 0.5s; is an SSH server listening there, and is it not overloaded "
        f"(MaxStartups)?"
    )


def test_bad_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="host_key_policy"):
        ssh.SSHTarget("h", host_key_policy="yes")
