"""The one atomic writer, publishing with the COMPLETE marker, and one-line errors for bad files."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from megamoe.checkpoint import files, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def publish_step(root, step, payload=b"x" * 1000):
    tmp = files.begin(os.path.join(root, resolve.step_name(step)))
    with open(os.path.join(tmp, "model.pt"), "wb") as f:
        f.write(payload)
    return files.publish(root, tmp, resolve.step_name(step), step)


def test_atomic_dir_publishes_whole_or_nothing(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with files.atomic_dir(str(dst)) as tmp:
            open(os.path.join(tmp, "half"), "w").close()
            raise RuntimeError("writer failed")
    assert os.listdir(tmp_path) == []                       # no temp left, nothing published
    with files.atomic_dir(str(dst)) as tmp:
        open(os.path.join(tmp, "a"), "w").close()
    assert os.listdir(dst) == ["a"] and oct(os.stat(dst).st_mode & 0o777) != "0o700"
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        with files.atomic_dir(str(dst)):
            pass
    with files.atomic_dir(str(dst), overwrite=True) as tmp:
        open(os.path.join(tmp, "b"), "w").close()
    assert os.listdir(dst) == ["b"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_marker_lists_every_file_size_and_verify_checks_them(tmp_path):
    root = str(tmp_path)
    path = publish_step(root, 3)
    marker = json.load(open(os.path.join(path, files.MARKER)))
    assert marker == {"step": 3, "files": {"model.pt": 1000}}
    assert open(os.path.join(root, files.LATEST)).read() == "step_00000003"
    files.verify(path)
    os.truncate(os.path.join(path, "model.pt"), 10)
    with pytest.raises(files.CheckpointError, match=r"model.pt is truncated or was modified: 10 bytes, 1000 when"):
        files.verify(path)


def test_newest_complete_checkpoint_ignores_a_lagging_latest_pointer(tmp_path):
    out = str(tmp_path)
    root = resolve.checkpoints_root(out)
    for step in (2, 4, 10):
        publish_step(root, step)
    os.makedirs(os.path.join(root, "step_00000012"))          # no marker: never complete
    with open(os.path.join(root, files.LATEST), "w") as f:    # killed before latest was rewritten
        f.write("step_00000002")
    assert resolve.newest_checkpoint(out) == os.path.join(root, "step_00000010")
    assert resolve.previous_checkpoint(os.path.join(root, "step_00000010")) == os.path.join(root, "step_00000004")
    assert resolve.find_checkpoint(out) == os.path.join(root, "step_00000010")
    assert resolve.find_checkpoint(os.path.join(root, "step_00000002")) == os.path.join(root, "step_00000002")


@pytest.mark.parametrize("bad, message", [("missing", "does not exist"),
                                          ("empty", "neither a megamoe checkpoint directory nor an out_dir")])
def test_the_one_resolver_errors_in_one_line(tmp_path, bad, message):
    path = tmp_path / bad
    if bad == "empty":
        path.mkdir()
    with pytest.raises(ValueError, match=message) as err:
        resolve.find_checkpoint(str(path))
    assert "\n" not in str(err.value)


KILL_DURING_REMOVAL = textwrap.dedent("""
    import os, shutil, signal, sys
    sys.path.insert(0, {root!r})
    from megamoe.checkpoint import files
    real_rmtree = shutil.rmtree
    def rmtree(path, *args, **kwargs):   # kill -9 in the middle of removing the old copy
        if ".old-" in os.path.basename(path):
            victims = sorted(os.listdir(path))
            os.remove(os.path.join(path, victims[0]))
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rmtree(path, *args, **kwargs)
    shutil.rmtree = rmtree
    root = sys.argv[1]
    tmp = files.begin(os.path.join(root, "step_00000004"))
    for name in ("model.pt", "optimizer.pt"):
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(b"new" * 100)
    files.publish(root, tmp, "step_00000004", 4)
""")


def test_kill_during_publish_over_an_existing_checkpoint_leaves_valid_names_valid(tmp_path):
    """Re-saving a step (after a resume) replaces its directory; a kill -9 while the old copy is
    being removed must leave step_00000004 complete (the new copy) and only a hidden leftover,
    which the next save removes."""
    out = str(tmp_path)
    root = resolve.checkpoints_root(out)
    os.makedirs(root)
    publish_step(root, 4, b"old" * 100)
    publish_step(root, 4, b"old" * 100)   # an ordinary replace leaves no leftovers
    assert sorted(os.listdir(root)) == ["latest", "step_00000004"]
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_REMOVAL.format(root=ROOT), root])
    assert proc.returncode == -signal.SIGKILL
    final = os.path.join(root, "step_00000004")
    assert resolve.newest_checkpoint(out) == final
    files.verify(final)
    assert open(os.path.join(final, "model.pt"), "rb").read() == b"new" * 100
    leftovers = [d for d in os.listdir(root) if d.startswith(".")]
    assert leftovers and all(".old-" in d for d in leftovers)
    files.remove_stale_temps(root)
    assert sorted(os.listdir(root)) == ["latest", "step_00000004"]


def test_corrupt_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    torch.save({"w": torch.zeros(1000)}, path / "model.pt")
    data = (path / "model.pt").read_bytes()
    (path / "model.pt").write_bytes(data[: len(data) // 2])   # no marker: torch.load finds out
    with pytest.raises(files.CheckpointError) as err:
        files.load_file(str(path), "model.pt")
    assert "\n" not in str(err.value) and str(path / "model.pt") in str(err.value)
    assert "corrupt or truncated" in str(err.value)
