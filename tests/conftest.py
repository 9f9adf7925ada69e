"""Shared pytest set-up: the sshd "nodes" and Slurm cluster plugins, and each test's tier marked from its folder.

    tests/unit/  pure, seconds long: `pytest tests/unit` is the inner loop
    tests/dist/  real torchrun/gloo workers; `python -m train`, `mlaunch run --standalone` end to end -> slow
    tests/ssh/   real OpenSSH sshd "nodes" on loopback (tests/sshd.py)                    -> ssh, slow
    tests/slurm/ a real Slurm cluster (munged + slurmctld + slurmd per node) on this machine (tests/slurmd.py) -> slurm, slow
    tests/gpu/   needs a CUDA GPU; deselected by default (`addopts = -m 'not gpu'`)       -> gpu

Files do not mark their own tier: the folder is the tier. Shared helpers live in tests/helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["tests.sshd", "tests.slurmd"]

TESTS = Path(__file__).resolve().parent

#: Marks each tier folder gives its tests.
TIER_MARKS: dict[str, tuple[str, ...]] = {
    "unit": (),
    "dist": ("slow",),
    "ssh": ("ssh", "slow"),
    "slurm": ("slurm", "slow"),
    "gpu": ("gpu",),
}


def tier_of(path: Path) -> str | None:
    """The tier folder a test file lives in (`unit`, `dist`, ...); None for files outside tests/."""
    try:
        parts = Path(path).resolve().relative_to(TESTS).parts
    except ValueError:
        return None
    if len(parts) < 2 or parts[0] not in TIER_MARKS:
        raise pytest.UsageError(f"{path}: a test file belongs in one of tests/{{{','.join(TIER_MARKS)}}}/")
    return parts[0]


def pytest_itemcollected(item: pytest.Item) -> None:
    # One Slurm cluster per session: under pytest-xdist (`--dist loadgroup`) one worker runs them
    # all. Marked as each item is collected, before xdist names the groups in its modifyitems.
    if tier_of(item.path) == "slurm":
        item.add_marker(pytest.mark.xdist_group("slurm"))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item.path)
        for mark in TIER_MARKS.get(tier, ()):
            item.add_marker(mark)



@pytest.fixture(autouse=True, scope="session")
def _own_run_registry(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every run a test starts registers itself (launcher/registry.py): in a registry of the test
    session's own, never the user's ~/.mlaunch. Subprocesses inherit it through the environment."""
    import os

    os.environ["MLAUNCH_HOME"] = str(tmp_path_factory.mktemp("mlaunch-home"))
