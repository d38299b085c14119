"""The preprocessing cache: built once, reopened without decoding, keyed by files and options."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import chestxray.data.cache as cache
from chestxray.data.cache import build_cache, fingerprint
from chestxray.data.decode import Preprocessing, preprocess
from chestxray.data.sources import load_samples


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(Preprocessing, "load", fail)


@pytest.fixture
def folder_samples(make_folder):
    return load_samples(make_folder({"a": 3, "b": 2}))


@pytest.fixture
def medmnist_samples(tmp_path, xray):
    images = np.stack([xray(28, 28, seed=i) for i in range(4)])
    np.savez(tmp_path / "m.npz", train_images=images, train_labels=np.array([[0], [1], [0], [1]]))
    return load_samples(tmp_path / "m.npz")


@pytest.mark.parametrize("source", ["folder_samples", "medmnist_samples"])
@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_cold_build_then_warm_load_without_decoding(request, tmp_path, cache_dir, monkeypatch, source, mode):
    samples = request.getfixturevalue(source)  # its files are under tmp_path
    before = snapshot(tmp_path)
    cold = build_cache(samples, Preprocessing(16, mode), progress=False)  # cache folder from $CHESTXRAY_CACHE
    assert cold.path.parent == cache_dir and cold.failed == {} and cold.ok.all()
    assert cold.images.dtype == np.uint8 and cold.images.shape == (len(samples), 16, 16)
    for row, path in enumerate(samples.frame["path"]):
        np.testing.assert_array_equal(cold.images[row], preprocess(path, 16, mode))
    assert snapshot(tmp_path) == before  # nothing written next to the data

    forbid_decoding(monkeypatch)
    warm = build_cache(samples, Preprocessing(16, mode), progress=False)
    assert isinstance(warm.images, np.memmap)
    assert (warm.path, warm.fingerprint) == (cold.path, cold.fingerprint)
    np.testing.assert_array_equal(warm.images, cold.images)


def test_fingerprint_follows_options_and_files(folder_samples):
    paths = folder_samples.frame["path"].tolist()
    default = Preprocessing(16)
    key = fingerprint(paths, default)
    assert fingerprint(list(paths), Preprocessing(16, "pad", "none")) == key
    changed = [fingerprint(paths, Preprocessing(32)), fingerprint(paths, Preprocessing(16, "crop")),
               fingerprint(paths, Preprocessing(16, "pad", "clahe")), fingerprint(paths[:-1], default),
               fingerprint(paths[::-1], default)]
    first = Path(paths[0])
    stat = first.stat()
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    changed.append(fingerprint(paths, default))
    assert len({key, *changed}) == len(changed) + 1


def test_a_changed_file_builds_a_new_cache(folder_samples, make_image, xray, tmp_path):
    old = build_cache(folder_samples, 16, progress=False)
    first = Path(folder_samples.frame["path"][0])
    make_image(str(first.relative_to(tmp_path)), 255 - xray(24, 32))
    new = build_cache(folder_samples, 16, progress=False)
    assert new.fingerprint != old.fingerprint and new.path != old.path
    np.testing.assert_array_equal(new.images[0], preprocess(first, 16))
    assert not np.array_equal(new.images[0], old.images[0])


def test_failures_are_recorded_and_the_rest_cached(make_folder, monkeypatch):
    root = make_folder({"a": 2, "b": 2})
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "b" / "notes.png").write_text("not an image")
    samples = load_samples(root)
    built = build_cache(samples, 16, progress=False)
    bad = {Path(samples.frame["path"][row]).name: reason for row, reason in built.failed.items()}
    assert set(bad) == {"empty.png", "notes.png"}
    assert "empty" in bad["empty.png"] and "not a readable image" in bad["notes.png"]
    assert built.ok.sum() == 4
    for row in np.flatnonzero(built.ok):
        np.testing.assert_array_equal(built.images[row], preprocess(samples.frame["path"][row], 16))
    forbid_decoding(monkeypatch)
    assert build_cache(samples, 16, progress=False).failed == built.failed


def test_worker_processes_give_the_same_images(folder_samples, monkeypatch, tmp_path):
    inline = build_cache(folder_samples, 16, cache_dir=tmp_path / "inline", workers=1, progress=False)
    monkeypatch.setattr(cache, "_INLINE_BELOW", 0)
    pooled = build_cache(folder_samples, 16, cache_dir=tmp_path / "pooled", workers=2, progress=False)
    assert pooled.path.parent == tmp_path / "pooled"
    np.testing.assert_array_equal(pooled.images, inline.images)


def test_an_interrupted_build_leaves_nothing_behind(folder_samples, cache_dir, monkeypatch):
    class Interrupted(BaseException):
        pass

    def interrupt(*args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(Preprocessing, "load", interrupt)
    with pytest.raises(Interrupted):
        build_cache(folder_samples, 16, progress=False)
    assert list(cache_dir.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncated array", "array of another shape", "broken json"])
def test_a_damaged_cache_is_rebuilt(folder_samples, tmp_path, damage):
    built = build_cache(folder_samples, 16, cache_dir=tmp_path, workers=1, progress=False)
    expected = np.array(built.images)
    meta_path = built.path.with_suffix(".json")
    if damage == "truncated array":
        built.path.write_bytes(built.path.read_bytes()[:200])
    elif damage == "array of another shape":
        np.save(built.path, np.zeros((2, 8, 8), np.uint8))
    else:
        meta_path.write_text("{not json")
    rebuilt = build_cache(folder_samples, 16, cache_dir=tmp_path, workers=1, progress=False)
    np.testing.assert_array_equal(rebuilt.images, expected)
    assert build_cache(folder_samples, 16, cache_dir=tmp_path, workers=1, progress=False).path == rebuilt.path


# ------------------------------------------------------------------ faults (issue 17)

def test_a_cache_zeroed_at_the_same_size_is_rebuilt(folder_samples, cache_dir):
    """Before: the pixels were trusted, so a zeroed file trained on black images."""
    built = build_cache(folder_samples, 32, cache_dir=cache_dir)
    expected = np.array(built.images)
    path = built.path
    header = len(path.read_bytes()) - expected.nbytes
    del built
    with open(path, "r+b") as handle:
        handle.seek(header)
        handle.write(b"\0" * expected.nbytes)
    rebuilt = build_cache(folder_samples, 32, cache_dir=cache_dir)
    np.testing.assert_array_equal(rebuilt.images, expected)
    assert np.asarray(rebuilt.images).any()


def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_nothing(folder_samples, cache_dir, monkeypatch):
    """Before: SIGBUS (exit 135) while writing the memory map of a sparse file, a .tmp.npy and a lock left."""
    import errno

    from chestxray.errors import ChestXrayError

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ChestXrayError) as err:
        build_cache(folder_samples, 32, cache_dir=cache_dir)
    message = str(err.value)
    assert str(cache_dir) in message and "disk is full" in message and "\n" not in message
    assert list(cache_dir.iterdir()) == []


def _small_tmpfs(path: Path, size: str) -> bool:
    import subprocess

    path.mkdir()
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                                capture_output=True).returncode == 0


def test_a_real_full_disk_gives_an_error_not_a_sigbus(make_folder, tmp_path):
    """On a 1 MiB tmpfs (root only, else skipped): a cache of 4 MiB must fail with one line."""
    import subprocess
    import sys

    mount = tmp_path / "small"
    if not _small_tmpfs(mount, "1m"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        data = make_folder({"a": 40, "b": 40})
        code = ("import sys; from chestxray.cache import build_cache; from chestxray.sources import load_samples\n"
                "from chestxray.errors import ChestXrayError\n"
                "try:\n    build_cache(load_samples(sys.argv[1]), 160, cache_dir=sys.argv[2], progress=False)\n"
                "except ChestXrayError as err:\n    print(err); sys.exit(2)\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        run = subprocess.run([sys.executable, "-c", code, str(data), str(mount / "cache")], capture_output=True,
                             text=True, env=env, timeout=300)
        assert run.returncode == 2, (run.returncode, run.stderr[-2000:])  # -7 would be the SIGBUS
        assert "disk is full" in run.stdout and str(mount / "cache") in run.stdout
        assert list((mount / "cache").iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
