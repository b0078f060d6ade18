"""Atomic writes: a failure leaves the old version and no temporary behind."""

from __future__ import annotations

import os

import pytest

from qdpo.files import atomic_dir, short_error, write_atomically, write_text_atomically


def test_write_atomically_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "sub" / "a.json"
    write_text_atomically(target, "one")
    with pytest.raises(RuntimeError):
        with write_atomically(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "one"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]
    write_text_atomically(target, "two")
    assert target.read_text() == "two"


def test_atomic_dir_replaces_a_complete_directory_only(tmp_path):
    out = tmp_path / "export"
    with atomic_dir(out) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    with pytest.raises(OSError):
        with atomic_dir(out) as tmp:
            (tmp / "w.bin").write_bytes(b"2")
            raise OSError(28, "No space left on device")
    assert (out / "w.bin").read_bytes() == b"1"
    with atomic_dir(out) as tmp:
        (tmp / "v.bin").write_bytes(b"3")
    assert [p.name for p in out.iterdir()] == ["v.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_short_error_keeps_the_type_and_first_line():
    assert short_error(ValueError("bad value\nmore detail")) == "ValueError: bad value"
    assert short_error(KeyError()) == "KeyError"


def test_written_files_get_the_umask_mode_whatever_the_writer(tmp_path):
    import os

    from qdpo.files import FILE_MODE

    with atomic_dir(tmp_path / "d") as tmp:
        f = tmp / "w.bin"
        f.write_bytes(b"1")
        os.chmod(f, 0o600)  # what safetensors' writer leaves
    with write_atomically(tmp_path / "one.bin") as tmp:
        tmp.write_bytes(b"2")
        os.chmod(tmp, 0o600)
    for path in (tmp_path / "d" / "w.bin", tmp_path / "one.bin"):
        assert path.stat().st_mode & 0o777 == FILE_MODE


def test_a_write_removes_what_a_killed_writer_of_the_same_path_left(tmp_path):
    """A merge or export killed half-way leaves `.NAME.tmp-PID` (gigabytes on a real model):
    the next write of that path removes it when its process is gone, never a live one's."""
    from qdpo.files import _alive, atomic_dir, write_text_atomically

    dead = 4_000_000  # above any pid_max: no such process
    assert not _alive(dead)
    stale = tmp_path / f".merged.tmp-{dead}"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".merged.tmp-{os.getppid()}"  # another process, still running
    live.mkdir()
    other = tmp_path / f".notes.txt.tmp-{dead}"  # someone else's path: not ours to sweep here
    other.write_text("x")
    with atomic_dir(tmp_path / "merged") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "merged" / "config.json").exists()
    write_text_atomically(tmp_path / "notes.txt", "mine")
    assert not other.exists()
