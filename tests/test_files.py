"""The one atomic file writer: a reader sees the old file or the new one, never a part of one."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from p2v_runtime.files import atomic_write, atomic_write_text, replacing


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path, failure):
    target = tmp_path / "report.json"
    target.write_text("old contents")

    def write_half(file):
        file.write(b"new cont")
        raise failure("stopped half-way")

    with pytest.raises(failure):
        atomic_write(target, write_half)
    assert target.read_text() == "old contents"
    assert os.listdir(tmp_path) == ["report.json"]


def test_a_failing_writer_creates_no_target(tmp_path):
    def fail(file):
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "frame.png", fail)
    assert os.listdir(tmp_path) == []


def test_writes_replace_the_target_and_create_its_folder(tmp_path):
    target = tmp_path / "a" / "b" / "notes.md"
    assert atomic_write_text(target, "one\ntwo\n") == target
    assert target.read_bytes() == b"one\ntwo\n"  # UTF-8, newlines as given on every OS
    atomic_write(target, lambda file: file.write(b"\x00binary"))
    assert target.read_bytes() == b"\x00binary"
    assert os.listdir(target.parent) == ["notes.md"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_written_files_get_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "shared.txt", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "shared.txt").stat().st_mode) == 0o644  # not tempfile's 0o600


def test_replacing_hands_a_hidden_path_to_writers_that_need_one(tmp_path):
    target = tmp_path / "preview.mp4"
    with replacing(target, suffix=".tmp.mp4") as temp:
        assert temp.parent == tmp_path and temp.name.startswith(".") and temp.name.endswith(".tmp.mp4")
        temp.write_bytes(b"video")
        assert not target.exists()
    assert target.read_bytes() == b"video"
    assert os.listdir(tmp_path) == ["preview.mp4"]


# --- a user of it: the inversion cache --------------------------------------------------------


def test_inversion_cache_round_trip_leaves_only_the_entry(tmp_path):
    from p2v_runtime.inversion import InversionCache

    cache = InversionCache(tmp_path / "cache")
    latent = np.arange(64, dtype=np.float32).reshape(1, 4, 4, 4)
    cache.store("ab" * 32, latent)
    np.testing.assert_array_equal(cache.load("ab" * 32), latent)
    assert os.listdir(tmp_path / "cache") == ["ab" * 32 + ".npy"]


def test_inversion_cache_that_cannot_be_written_warns_once_and_goes_on(tmp_path):
    from p2v_runtime.inversion import InversionCache

    (tmp_path / "a-file").write_text("")
    warnings = []
    cache = InversionCache(tmp_path / "a-file" / "cache", warn=warnings.append)
    for key in ("ab" * 32, "cd" * 32):
        cache.store(key, np.zeros((1, 4, 8, 8), np.float32))
    assert len(warnings) == 1 and "not writable" in warnings[0], warnings
    assert cache.load("ab" * 32) is None
