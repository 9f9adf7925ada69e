"""Shared pytest set-up: the sshd "nodes" plugin and small helpers used across test files."""

pytest_plugins = ["tests.sshd"]
