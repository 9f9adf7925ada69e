"""job/files.py: atomic publication of a file or a folder, on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from job.files import publish_dir, publish_file


class Boom(Exception):
    pass


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------- publish_file
def test_publish_file_writes_text_and_bytes_and_makes_the_folder(tmp_path):
    assert publish_file(tmp_path / "a" / "b.yaml", "é: 1\n") == tmp_path / "a" / "b.yaml"
    assert (tmp_path / "a" / "b.yaml").read_text(encoding="utf-8") == "é: 1\n"
    publish_file(tmp_path / "c.bin", b"\x00\xff", fsync=True)
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\xff"
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "a") == []


def test_publish_file_replaces_an_existing_file(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old")
    publish_file(target, "new")
    assert target.read_text() == "new" and leftovers(tmp_path) == []


def test_publish_file_gets_umask_modes(tmp_path):
    umask = os.umask(0o022)
    try:
        publish_file(tmp_path / "f", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


def test_a_failed_file_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "tok.model"
    target.write_bytes(b"old")

    def fail(*a, **k):
        raise Boom

    monkeypatch.setattr(os, "replace", fail)  # the write is done; the rename fails
    with pytest.raises(Boom):
        publish_file(target, b"new")
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_a_failure_while_writing_a_file_leaves_no_partial_target(tmp_path, monkeypatch):
    def fail(fd):  # the bytes are in the temp file, the flush to disk fails
        raise OSError("I/O error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="I/O error"):
        publish_file(tmp_path / "t", b"x" * 100_000, fsync=True)
    with pytest.raises(TypeError):
        publish_file(tmp_path / "t", object())  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------- publish_dir
def write_two(tmp: Path) -> None:
    (tmp / "a.txt").write_text("a")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "b.txt").write_text("b")


@pytest.mark.parametrize("replace_existing", [False, True])
@pytest.mark.parametrize("fsync", [False, True])
def test_publish_dir_publishes_the_whole_folder(tmp_path, replace_existing, fsync):
    final = tmp_path / "parent" / "data-abc"
    assert publish_dir(final, write_two, replace_existing=replace_existing, fsync=fsync) is True
    assert (final / "a.txt").read_text() == "a" and (final / "sub" / "b.txt").read_text() == "b"
    assert leftovers(final.parent) == []


def test_write_gets_an_empty_private_folder_beside_the_target(tmp_path):
    seen = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        assert tmp.is_dir() and list(tmp.iterdir()) == [] and tmp.parent == tmp_path
        assert tmp.name.startswith(".out.") and not (tmp_path / "out").exists()

    publish_dir(tmp_path / "out", write, replace_existing=False)
    assert not seen[0].exists() and (tmp_path / "out").is_dir()


def test_the_folder_gets_umask_modes(tmp_path):
    umask = os.umask(0o027)
    try:
        publish_dir(tmp_path / "out", write_two, replace_existing=True)
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750


def test_first_publisher_wins_without_replace(tmp_path):
    final = tmp_path / "data-abc"

    def other_node_wins(tmp: Path) -> None:  # another node publishes the same folder meanwhile
        (tmp / "mine.txt").write_text("mine")
        final.mkdir()
        (final / "theirs.txt").write_text("theirs")

    assert publish_dir(final, other_node_wins, replace_existing=False) is False
    assert [p.name for p in final.iterdir()] == ["theirs.txt"] and leftovers(tmp_path) == []


def test_without_replace_a_rename_error_is_raised_when_nothing_is_there(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise PermissionError("read-only")

    monkeypatch.setattr(os, "rename", fail)
    with pytest.raises(PermissionError):
        publish_dir(tmp_path / "out", write_two, replace_existing=False)
    assert list(tmp_path.iterdir()) == []


def test_replace_swaps_out_an_old_folder_or_file(tmp_path):
    final = tmp_path / "export"
    final.mkdir()
    (final / "stale.bin").write_text("old")
    assert publish_dir(final, write_two, replace_existing=True) is True
    assert sorted(p.name for p in final.iterdir()) == ["a.txt", "sub"] and leftovers(tmp_path) == []
    final2 = tmp_path / "was-a-file"
    final2.write_text("old")
    publish_dir(final2, write_two, replace_existing=True)
    assert (final2 / "a.txt").is_file() and leftovers(tmp_path) == []


@pytest.mark.parametrize("replace_existing", [False, True])
def test_a_failure_while_writing_leaves_no_partial_target(tmp_path, replace_existing):
    final = tmp_path / "out"

    def half(tmp: Path) -> None:
        (tmp / "a.txt").write_text("a")
        raise Boom("disk full")

    with pytest.raises(Boom, match="disk full"):
        publish_dir(final, half, replace_existing=replace_existing)
    assert list(tmp_path.iterdir()) == []  # no target, no temp folder


def test_a_failure_while_writing_keeps_the_old_export(tmp_path):
    final = tmp_path / "export"
    final.mkdir()
    (final / "model.safetensors").write_text("old weights")

    def half(tmp: Path) -> None:
        (tmp / "model.safetensors").write_text("half")
        raise KeyboardInterrupt  # also BaseException: Ctrl-C mid-export

    with pytest.raises(KeyboardInterrupt):
        publish_dir(final, half, replace_existing=True)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert (final / "model.safetensors").read_text() == "old weights"
