"""A resumed sweep or benchmark pointed at another MLflow store than the one it started in.

Its results on disk belong to a parent run in the first store; reopening that run in the second
store cannot work. The job must say so in one line (which store holds the earlier runs, what to
do), exit 2 before Ray starts or anything is written to the new store, and leave the first store
and the finished results as they were.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from natra_ray.distributed.tracking import (PARENT_RECORD, SweepTracker, TrackingError, _client, ensure_experiment,
                                            recorded_parent_run, save_parent_run)
from test_bad_input import call_job, error_line, folder_args, image_folder, run_job

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "jobs" / "benchmark.py"
TUNE = REPO / "jobs" / "tune_natra.py"


def _parent_in(uri: str, name: str = "s") -> str:
    """A real parent run in the store ``uri``, made as a sweep makes its own."""
    tracker = SweepTracker(uri, ensure_experiment(uri, "exp"))
    return tracker.start_parent(f"sweep-{name}", params={"a": 1})


def test_the_record_names_its_store(tmp_path):
    a, b = f"sqlite:///{tmp_path / 'A.db'}", f"sqlite:///{tmp_path / 'B.db'}"
    folder = tmp_path / "sweeps" / "s"
    assert recorded_parent_run(folder, a, "sweep 's'", "x") is None  # nothing recorded yet
    pid = _parent_in(a)
    save_parent_run(folder, a, pid)
    assert json.loads((folder / PARENT_RECORD).read_text()) == {"tracking_uri": a, "parent_run_id": pid}
    assert recorded_parent_run(folder, a, "sweep 's'", "x") == pid
    # the same file spelled another way is the same store
    assert recorded_parent_run(folder, f"sqlite:///{tmp_path / 'sweeps' / '..' / 'A.db'}", "sweep 's'", "x") == pid
    with pytest.raises(TrackingError) as e:
        recorded_parent_run(folder, b, "sweep 's'", "drop --resume")
    assert str(e.value) == (f"the sweep 's' was started with MLflow store {a} (parent run {pid}); this run uses {b}. "
                            f"Use the same tracking URI to resume, or drop --resume")
    assert not (tmp_path / "B.db").exists()  # decided from the record alone: the new store is not touched


def test_an_older_record_without_its_store(tmp_path):
    """A folder from before the record named its store holds the run id alone: the current store
    is asked for the run, and a store without it gets the same kind of message."""
    a, b = f"sqlite:///{tmp_path / 'A.db'}", f"sqlite:///{tmp_path / 'B.db'}"
    pid = _parent_in(a)
    folder = tmp_path / "benchmarks" / "x"
    folder.mkdir(parents=True)
    (folder / "mlflow_parent_run_id").write_text(pid + "\n")
    with pytest.raises(TrackingError, match=rf"^the benchmark 'x' was started with another MLflow store: its parent "
                                            rf"run {pid} is not in {re.escape(b)}\. Use the tracking URI it was "
                                            rf"started with to resume, or pass --fresh$"):
        recorded_parent_run(folder, b, "benchmark 'x'", "pass --fresh")
    assert recorded_parent_run(folder, a, "benchmark 'x'", "pass --fresh") == pid
    save_parent_run(folder, a, pid)  # the next save upgrades it
    assert not (folder / "mlflow_parent_run_id").exists() and (folder / PARENT_RECORD).is_file()


def test_sweep_resume_in_another_store_fails_before_ray(tmp_path, monkeypatch):
    """`jobs/tune_natra.py --resume` with another MLFLOW_TRACKING_URI than the sweep's first run."""
    data = image_folder(tmp_path / "imgs")
    storage = tmp_path / "store"
    a, b = f"sqlite:///{tmp_path / 'A.db'}", f"sqlite:///{tmp_path / 'B.db'}"
    sweep_dir = storage / "sweeps" / "s"
    pid = _parent_in(a)
    save_parent_run(sweep_dir, a, pid)
    before = sorted(p.relative_to(storage) for p in storage.rglob("*"))
    proc = run_job(["--resume", *folder_args(data), "tune.name=s"], storage, job=TUNE, env={"MLFLOW_TRACKING_URI": b})
    assert error_line(proc) == (f"error: the sweep 's' was started with MLflow store {a} (parent run {pid}); this run "
                                f"uses {b}. Use the same tracking URI to resume, or start over in the new store "
                                f"without --resume, or with another tune.name")
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert sorted(p.relative_to(storage) for p in storage.rglob("*")) == before
    assert not (tmp_path / "B.db").exists()
    assert _client(a).get_run(pid).info.status == "RUNNING"  # untouched (start_parent leaves it open)

    # the older record (run id only): the new store is asked, and says it has no such run
    (sweep_dir / PARENT_RECORD).unlink()
    (sweep_dir / "mlflow_parent_run_id").write_text(pid)
    proc = call_job(["--resume", *folder_args(data), "tune.name=s"], storage, monkeypatch, job=TUNE,
                    env={"MLFLOW_TRACKING_URI": b})
    assert error_line(proc) == (f"error: the sweep 's' was started with another MLflow store: its parent run {pid} "
                                f"is not in {b}. Use the tracking URI it was started with to resume, or start over "
                                f"in the new store without --resume, or with another tune.name")
    assert (sweep_dir / "mlflow_parent_run_id").read_text() == pid


@pytest.mark.ray
@pytest.mark.slow
def test_benchmark_resumed_in_another_store(ray_session, smoke_storage, tmp_path, monkeypatch):
    """`jobs/benchmark.py --profile smoke` with MLFLOW_TRACKING_URI=A, then again with B on the
    same storage: the second run is refused in one line before Ray and before B exists; A's
    runs and the finished result are intact, and the same command with A resumes them."""
    from natra_ray.config import load_config
    from natra_ray.distributed.benchmark import run_benchmark

    a, b = f"sqlite:///{tmp_path / 'A.db'}", f"sqlite:///{tmp_path / 'B.db'}"
    # one tiny run on the smoke upstream (shared with the session's smoke sweeps via smoke_storage)
    over = ["--profile", "smoke", "--methods", "none", "--seeds", "0", "--name", "store-switch", "benchmark.epochs=1",
            "benchmark.train_examples=64", "benchmark.val_examples=32", "benchmark.eval_examples=16"]
    first = call_job(over, smoke_storage, monkeypatch, job=BENCH, env={"MLFLOW_TRACKING_URI": a})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    bench = smoke_storage / "benchmarks" / "store-switch"
    result = (bench / "results" / "none-s0.json").read_text()
    client = _client(a)
    exp = client.get_experiment_by_name("natra-benchmark")
    runs_a = {r.info.run_id: (r.info.status, r.data.metrics) for r in client.search_runs([exp.experiment_id])}
    pid = json.loads((bench / PARENT_RECORD).read_text())["parent_run_id"]
    assert len(runs_a) == 2 and runs_a[pid][0] == "FINISHED"

    proc = run_job(over, smoke_storage, job=BENCH, env={"MLFLOW_TRACKING_URI": b})
    assert error_line(proc) == (f"error: the benchmark 'store-switch' was started with MLflow store {a} (parent run "
                                f"{pid}); this run uses {b}. Use the same tracking URI to resume, or start over in "
                                f"the new store with another --name, or with --fresh (which deletes the finished "
                                f"results in {bench})")
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "B.db").exists()
    assert (bench / "results" / "none-s0.json").read_text() == result
    assert {r.info.run_id: (r.info.status, r.data.metrics) for r in client.search_runs([exp.experiment_id])} == runs_a

    # back on store A it resumes: nothing to rerun, the same parent run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", a)
    cfg = load_config("smoke", overrides=[f"tune.storage_path={smoke_storage}", "benchmark.name=store-switch",
                                          *over[over.index("benchmark.epochs=1"):]])
    again = run_benchmark(cfg, methods=["none"], seeds=[0])
    assert again.skipped == ["none-s0"] and again.parent_run_id == pid
