"""What a real pod slice brings that one CPU process does not: gs:// workdirs and storage that
refuses directory renames (gcsfuse), several hosts grading with wall-clock timeouts, packaging.
(SIGTERM on one host of two: tests/e2e/test_multiprocess.py.)"""
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest
from conftest import xla_flags

from tests import fake_gcs

ROOT = pathlib.Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- gs:// and gcsfuse

def _fake_gcs_run(tiny_run, root, workdir, steps, *extra):
    """launch/train.py in tests/fake_gcs.py: gs://bucket/run served from root/bucket/run, and no
    directory renames anywhere."""
    cmd = tiny_run.command(fake_gcs.to_local(str(root), workdir), steps, *extra)
    cmd = [cmd[0], str(ROOT / "tests" / "fake_gcs.py"), str(root), "--", *cmd[1:]]
    cmd = [a.replace(f"--workdir={fake_gcs.to_local(str(root), workdir)}", f"--workdir={workdir}") for a in cmd]
    done = subprocess.run(cmd, cwd=ROOT, env=tiny_run.env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


@pytest.mark.slow
def test_gs_workdir_without_directory_renames_checkpoints_resumes_and_sets_aside_damage(tiny_run, tmp_path):
    workdir = "gs://bucket/run"
    local = pathlib.Path(fake_gcs.to_local(str(tmp_path), workdir))
    t0 = time.time()
    err = _fake_gcs_run(tiny_run, tmp_path, workdir, 3)
    print(f"3 steps on gs://: {time.time() - t0:.0f}s")
    assert sorted(tiny_run.metrics(local)) == [1, 2, 3]
    assert (local / "spec.json").is_file() and list((local / "tensorboard").glob("events.out.tfevents.*"))
    steps = sorted(int(p.name) for p in (local / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1, 2, 3]
    assert all((local / "checkpoints" / str(s) / "commit_success.txt").is_file() for s in steps)
    assert "Finalizing" not in err  # Orbax's INFO lines stay off the console

    # Damage the newest checkpoint: the rerun sets it aside (copy + delete, no rename), resumes
    # from step 2 and appends to the remote metrics.jsonl.
    data = sorted((local / "checkpoints" / "3" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)[-1]
    data.write_bytes(data.read_bytes()[:100])
    t0 = time.time()
    err = _fake_gcs_run(tiny_run, tmp_path, workdir, 4)
    print(f"resumed to step 4 on gs://: {time.time() - t0:.0f}s")
    assert "cannot be restored" in err and "resumed from step 2" in err
    assert sorted(tiny_run.metrics(local)) == [1, 2, 3, 4]
    assert (local / "checkpoints" / "damaged-3" / "state").is_dir()
    steps = sorted(int(p.name) for p in (local / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 4
    refused = (tmp_path / fake_gcs.REFUSED_LOG).read_text().splitlines()
    assert len(refused) == 2, refused  # only each run's own probe: nothing else tried a folder rename


def test_files_helpers_on_a_mocked_bucket(tmp_path):
    from hbpo_jax import files

    with fake_gcs.mock_gcs(str(tmp_path / "gcs")):
        files.write_json("gs://b/run/spec.json", {"a": np.float32(1.5)})
        assert files.read_json("gs://b/run/spec.json") == {"a": 1.5}
        (tmp_path / "src" / "x").mkdir(parents=True)
        (tmp_path / "src" / "x" / "f.bin").write_bytes(b"1" * 10)
        (tmp_path / "src" / "g.txt").write_text("g")
        assert sorted(files.copytree(tmp_path / "src", "gs://b/run/copy")) == ["g.txt", "x/f.bin"]
        with files.staged_dir("gs://b/run/export") as local:
            assert files.is_local(local)
            pathlib.Path(local, "model.txt").write_text("m")
        local = files.local_dir("gs://b/run/export")
        assert pathlib.Path(local, "model.txt").read_text() == "m"
        files.rmtree("gs://b/run/copy")
        assert not files.exists("gs://b/run/copy")
    assert (tmp_path / "gcs" / "b" / "run" / "export" / "model.txt").read_text() == "m"
    assert files.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"


def test_set_aside_copies_and_deletes_without_renaming(tmp_path):
    from hbpo_jax import checkpoint

    step = tmp_path / "checkpoints" / "7" / "state"
    step.mkdir(parents=True)
    (step / "data").write_bytes(b"x" * 100)
    with fake_gcs.refuse_directory_renames():
        dst = checkpoint.set_aside(str(tmp_path / "checkpoints"), 7)
    assert not (tmp_path / "checkpoints" / "7").exists()
    assert pathlib.Path(dst, "state", "data").read_bytes() == b"x" * 100


def test_orbax_info_logs_are_filtered_but_warnings_pass():
    from hbpo_jax import checkpoint

    checkpoint.quiet_orbax_logs()
    checkpoint.quiet_orbax_logs()  # idempotent
    absl_logger = logging.getLogger("absl")
    assert sum(type(f).__name__ == "_BelowWarningFromOrbax" for f in absl_logger.filters) == 1
    orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "checkpoint_manager.py")

    def record(level, pathname):
        return logging.LogRecord("absl", level, pathname, 1, "msg", None, None)

    assert not absl_logger.filter(record(logging.INFO, orbax_file))
    assert absl_logger.filter(record(logging.WARNING, orbax_file))
    assert absl_logger.filter(record(logging.INFO, os.path.join("hbpo_jax", "loop.py")))


# ----------------------------------------------------------------------------- grading on 2 hosts

_GRADING_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    from hbpo_jax.grading import answers as grading
    from hbpo_jax.grading import hosts
    graded = []
    real = grading.symbolic_with_alarm

    def symbolic(pred, truth, timeout_s):
        graded.append(pred)
        if pid == 1 and pred == "(x+1)^2":  # this host's grader times out on this item only
            return False, "timeout"
        return real(pred, truth, timeout_s)

    grading.symbolic_with_alarm = symbolic
    # 8 items; item 6 (in process 1's share, items 4-7) needs the symbolic step.
    responses = [f"<think>t</think> \\\\boxed{{{a}}}" for a in ("1", "2", "x", "4", "5", "6", "(x+1)^2", "8")]
    truths = ["1", "3", "x", "4", "5", "6", "x^2+2x+1", "9"]
    grades = hosts.grade_batch(responses, truths, workers=0, timeout_s=5.0)
    json.dump({"grades": [[g.format_ok, g.correct, g.extracted, g.status] for g in grades],
               "graded": graded, "timeouts": hosts.count_status(grades, "timeout")}, open(out, "w"))
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_hosts_grade_disjoint_shares_and_agree_when_one_times_out(tmp_path):
    script, port = tmp_path / "grade.py", _free_port()
    script.write_text(_GRADING_SCRIPT)
    env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), str(tmp_path / f"{i}.json")],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    print(f"2 grading processes: {time.time() - t0:.0f}s")
    out = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    assert out[0]["grades"] == out[1]["grades"]  # identical everywhere
    assert [g[1] for g in out[0]["grades"]] == [True, False, True, True, True, True, False, False]
    assert out[0]["grades"][6] == [True, False, "(x+1)^2", "timeout"]
    assert out[0]["timeouts"] == out[1]["timeouts"] == 1
    # Each host graded only its share: the symbolic item is process 1's alone.
    assert out[0]["graded"] == [] and out[1]["graded"] == ["(x+1)^2"]


def test_grading_shares_are_disjoint_and_cover_everything():
    from hbpo_jax.grading import hosts

    for n in (0, 1, 7, 8, 9, 64):
        for count in (1, 2, 3, 4):
            shares = [list(hosts.share(n, p, count)) for p in range(count)]
            assert sum(shares, []) == list(range(n))
            assert max(map(len, shares)) == -(-n // count) if n else True


# ----------------------------------------------------------------------------- packaging

def test_configs_are_found_from_anywhere_and_ship_in_the_wheel(tmp_path, monkeypatch):
    from hbpo_jax import cli

    monkeypatch.chdir(tmp_path)
    for name in ("configs/tiny.py", "tiny.py", "configs/qwen1_5b.py:pod"):
        found = cli.find_config(name)
        assert os.path.isfile(found.partition(":")[0]), (name, found)
    assert cli.find_config("configs/qwen1_5b.py:pod").endswith("qwen1_5b.py:pod")


@pytest.mark.slow
def test_the_wheel_carries_configs_license_and_entry_points(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("hbpo_jax-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "hbpo_jax/configs/tiny.py" in names and "hbpo_jax/configs/qwen1_5b.py" in names
    assert any(n.endswith("LICENSE") for n in names)
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "hbpo-train = hbpo_jax.scripts.train:run" in entry


def test_the_fake_bucket_maps_gs_paths_and_refuses_directory_renames(tmp_path):
    """The stand-in storage the gs:// loop test runs on does what it claims."""
    from etils import epath

    root = str(tmp_path)
    assert fake_gcs.to_local(root, "gs://b/run/x") == os.path.join(root, "b/run/x")
    assert fake_gcs.to_remote(root, os.path.join(root, "b/run/x")) == "gs://b/run/x"
    assert fake_gcs.to_local(root, "/local/x") == "/local/x"
    with fake_gcs.mock_gcs(root):
        epath.Path("gs://b/run/a.txt").write_text("hi")  # no parent folder needed, as on GCS
        assert epath.Path("gs://b/run/a.txt").read_text() == "hi"
    assert (tmp_path / "b" / "run" / "a.txt").read_text() == "hi"
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    log = tmp_path / "refused.txt"
    with fake_gcs.refuse_directory_renames(str(log)):
        with pytest.raises(OSError):
            os.rename(tmp_path / "d", tmp_path / "d2")
        with pytest.raises(OSError):
            (tmp_path / "d").replace(tmp_path / "d3")
        os.replace(tmp_path / "f", tmp_path / "g")  # files still move
    assert (tmp_path / "d").is_dir() and (tmp_path / "g").exists() and len(log.read_text().splitlines()) == 2
    os.rename(tmp_path / "d", tmp_path / "d2")  # restored afterwards
