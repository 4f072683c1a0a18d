"""MLflow tracking against a real SQLite store (no mocks). One store and one sweep per module:
importing mlflow and creating the schema cost seconds, so the tests share them."""
from __future__ import annotations

import pickle
import socket
import time

import numpy as np
import pytest
import torch

from natra_ray.config import Config
from natra_ray.distributed import tracking as tr
from natra_ray.distributed.tracking import (
    SweepTracker, TrackingError, TrialTracker, check_tracking, ensure_experiment, load_classifier,
    open_ui_command, register_best, resolve_tracking_uri,
)


# --------------------------------------------------------------------------- URIs (no mlflow import)
@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("NATRA_STORAGE", raising=False)
    return monkeypatch


def test_default_uri_is_absolute_sqlite_under_storage_root(clean_env, tmp_path):
    storage = tmp_path / "store"
    cfg = Config().replace(**{"tune.storage_path": str(storage)})
    uri = resolve_tracking_uri(cfg)
    assert uri == f"sqlite:///{storage.resolve()}/mlflow.db"
    assert uri.startswith("sqlite:////")
    assert storage.is_dir()  # the folder is created so SQLite can make the file


def test_env_var_then_config_key_win(clean_env, tmp_path):
    cfg = Config().replace(**{"tune.storage_path": str(tmp_path)})
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(cfg) == "http://127.0.0.1:5999"
    cfg2 = cfg.replace(**{"tracking.uri": f"sqlite:///{tmp_path}/other.db"})
    assert resolve_tracking_uri(cfg2) == f"sqlite:///{tmp_path}/other.db"


@pytest.mark.parametrize("uri, words", [
    ("sqlite:///mlflow.db", ["absolute", "ray job submit", "sqlite:///mlflow.db"]),
    ("sqlite://", ["in-memory"]),
    ("ftp://host/x", ["unsupported scheme 'ftp'", "supported schemes: sqlite", "ftp://host/x"]),
    ("./mlruns", ["plain-folder", "sqlite:////abs/path/mlflow.db"]),
    ("file:///tmp/mlruns", ["plain-folder"]),
])
def test_bad_uris_are_refused_in_one_line(clean_env, tmp_path, uri, words):
    clean_env.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = Config().replace(**{"tune.storage_path": str(tmp_path)})
    with pytest.raises(TrackingError) as e:
        resolve_tracking_uri(cfg)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg and "$MLFLOW_TRACKING_URI" in msg
    for w in words:
        assert w in msg


def test_unreachable_server_fails_fast(clean_env):
    with socket.socket() as s:  # a free loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=r"at http://127\.0\.0\.1:\d+ is unreachable: .*mlflow server"):
        check_tracking(f"http://127.0.0.1:{port}", timeout_s=2)
    assert time.monotonic() - t0 < 5


def test_check_sqlite_opens_the_database(tmp_path):
    uri = f"sqlite:///{tmp_path}/sub/m.db"
    check_tracking(uri)
    assert (tmp_path / "sub" / "m.db").exists()
    (tmp_path / "junk.db").write_bytes(b"this is not a database, just 64 bytes of text" + b"." * 40)
    with pytest.raises(TrackingError, match="cannot open database"):
        check_tracking(f"sqlite:///{tmp_path}/junk.db")


def test_open_ui_command_binds_loopback():
    cmd = open_ui_command("sqlite:////data/runs/mlflow.db")
    assert cmd == "mlflow ui --backend-store-uri sqlite:////data/runs/mlflow.db --host 127.0.0.1 --port 5000"
    assert open_ui_command("http://head:5000") == "http://head:5000"


def test_sanitize_key():
    assert tr.sanitize_key("robust.eps") == "robust.eps"
    assert tr.sanitize_key("a b/c-d:e") == "a b/c-d_e"
    assert tr.sanitize_key("bad key!") == "bad key_"
    assert tr.sanitize_key("/abs//x") == "_abs__x"
    assert tr.sanitize_key("../up") == "_.._up"
    assert len(tr.sanitize_key("k" * 400)) == 250


def test_retry_recovers_from_transient_errors_and_is_loud_otherwise():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("database is locked")
        return "ok"

    assert tr._retry(flaky, "do a thing", attempts=4, base_delay=0.001) == "ok" and len(calls) == 3

    def always():
        raise OSError("down")

    with pytest.raises(TrackingError, match="do a thing after 2 attempts: OSError: down"):
        tr._retry(always, "do a thing", attempts=2, base_delay=0.001)


# --------------------------------------------------------------------------- a shared sweep
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    check_tracking(uri)
    eid = ensure_experiment(uri, "natra-test", root / "mlartifacts")
    assert ensure_experiment(uri, "natra-test", root / "mlartifacts") == eid  # idempotent
    st = SweepTracker(uri, eid)
    params = {"robust.eps": 0.5, "robust.method": "natra", "eval.severities": [1, 3, 5],
              "bad key!": 1, "long": "x" * 7000}
    parent = st.start_parent("sweep-1", params, tags={"natra.profile": "cpu"})

    t1 = st.trial_tracker("trial_00001", {"robust.eps": 0.25, "robust.lr": 0.05})
    t1.start()
    for step in range(3):
        t1.log_metrics({"val_acc": 0.5 + 0.1 * step, "loss": np.float32(1.0 / (step + 1)),
                        "lr": torch.tensor(0.05), "done": False, "note": "text", "cfg": {"a": 1}},
                       step=step)
    t1.end("FINISHED")

    t2 = TrialTracker.from_spec(st.trial_spec(), "trial_00002", {"robust.eps": 0.75})
    t2.start()
    t2.log_metrics({"val_acc": 0.1}, step=0)
    t2.end("FAILED", "RuntimeError: CUDA out of memory")
    st.log_metrics({"best_val_acc": 0.7})
    st.finish("FINISHED")
    return {"uri": uri, "eid": eid, "root": root, "st": st, "parent": parent, "t1": t1, "t2": t2}


@pytest.fixture
def use_store(sweep, monkeypatch):
    """Point MLflow's fluent API (mlflow.search_runs, mlflow.pytorch.load_model) at the store."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sweep["uri"])
    assert mlflow.get_tracking_uri() == sweep["uri"]
    return sweep


def _children(sweep):
    import mlflow

    return mlflow.search_runs(experiment_ids=[sweep["eid"]],
                              filter_string=f"tags.`mlflow.parentRunId` = '{sweep['parent']}'")


def test_children_are_nested_under_the_parent(use_store):
    s = use_store
    df = _children(s)
    assert len(df) == 2
    assert set(df["tags.mlflow.parentRunId"]) == {s["parent"]}
    assert set(df["tags.natra.trial_id"]) == {"trial_00001", "trial_00002"}
    assert set(df["run_id"]) == {s["t1"].run_id, s["t2"].run_id}
    assert s["parent"] not in set(df["run_id"])
    exp = tr._client(s["uri"]).get_experiment(s["eid"])
    assert exp.artifact_location == (s["root"] / "mlartifacts").resolve().as_uri()


def test_params_and_per_step_metrics_read_back(sweep):
    c = tr._client(sweep["uri"])
    parent = c.get_run(sweep["parent"])
    assert parent.data.params["robust.eps"] == "0.5"
    assert parent.data.params["eval.severities"] == "[1, 3, 5]"
    assert parent.data.params["bad key_"] == "1"  # sanitized key
    assert parent.data.params["long"] == "x" * 6000  # MLflow's limit
    assert parent.data.tags["natra.role"] == "sweep" and parent.data.tags["natra.profile"] == "cpu"
    assert parent.data.metrics["best_val_acc"] == pytest.approx(0.7)

    run = c.get_run(sweep["t1"].run_id)
    assert run.data.params == {"robust.eps": "0.25", "robust.lr": "0.05"}
    assert run.info.status == "FINISHED"
    hist = sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, "val_acc"))
    assert [h[0] for h in hist] == [0, 1, 2]
    assert [h[1] for h in hist] == pytest.approx([0.5, 0.6, 0.7])
    assert [m.value for m in c.get_metric_history(run.info.run_id, "loss")] == pytest.approx([1, 0.5, 1 / 3])
    assert run.data.metrics["lr"] == pytest.approx(0.05) and run.data.metrics["done"] == 0.0
    assert "note" not in run.data.metrics and "cfg" not in run.data.metrics


def test_failed_trial_has_status_and_reason(sweep):
    run = tr._client(sweep["uri"]).get_run(sweep["t2"].run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["natra.failure_reason"] == "RuntimeError: CUDA out of memory"


def test_resumed_trial_reuses_its_run(use_store):
    s = use_store
    again = pickle.loads(pickle.dumps(TrialTracker(s["uri"], s["eid"], s["parent"], "trial_00002",
                                                   {"robust.eps": 0.75})))
    assert again.start() == s["t2"].run_id  # no duplicate child run
    again.log_metrics({"val_acc": 0.2}, step=1)
    again.end("FINISHED")
    assert len(_children(s)) == 2
    run = tr._client(s["uri"]).get_run(s["t2"].run_id)
    assert run.info.status == "FINISHED" and run.data.tags["natra.attempt"] == "2"
    assert "natra.failure_reason" not in run.data.tags  # the retry succeeded
    with pytest.raises(TrackingError, match=r"different values for 1 param\(s\) \(robust.eps: logged '0.75'"):
        TrialTracker(s["uri"], s["eid"], s["parent"], "trial_00002", {"robust.eps": 0.9}).start()


def test_parent_resume_and_context_manager_failure(sweep):
    s = sweep
    st = SweepTracker(s["uri"], s["eid"])
    assert st.start_parent("sweep-1", {"robust.eps": 0.5}, parent_run_id=s["parent"]) == s["parent"]
    c = tr._client(s["uri"])
    assert c.get_run(s["parent"]).info.status == "RUNNING"
    st.finish("FINISHED")
    other = SweepTracker(s["uri"], s["eid"])
    other.start_parent("sweep-2")
    with pytest.raises(RuntimeError):
        with other.trial_tracker("trial_x") as t:
            raise RuntimeError("boom")
    run = c.get_run(t.run_id)
    assert run.info.status == "FAILED" and run.data.tags["natra.failure_reason"] == "RuntimeError: boom"
    other.finish("FAILED", "a trial failed")
    assert c.get_run(other.run_id).data.tags["natra.failure_reason"] == "a trial failed"


def test_context_manager_ends_like_the_jobs_and_never_masks_the_exception(sweep):
    """An interrupt ends the run KILLED, anything else FAILED (console.end_status), the reason at
    most 5000 characters; a store that cannot record the end does not hide the trial's error."""
    c = tr._client(sweep["uri"])
    st = SweepTracker(sweep["uri"], sweep["eid"])
    st.start_parent("interrupted")
    with pytest.raises(KeyboardInterrupt):
        with st.trial_tracker("trial_int") as t:
            raise KeyboardInterrupt
    run = c.get_run(t.run_id)
    assert run.info.status == "KILLED" and run.data.tags["natra.failure_reason"].startswith("KeyboardInterrupt")
    with pytest.raises(RuntimeError):
        with st.trial_tracker("trial_long") as t:
            raise RuntimeError("x" * 6000)
    run = c.get_run(t.run_id)
    assert run.info.status == "FAILED" and len(run.data.tags["natra.failure_reason"]) == 5000
    with pytest.raises(ValueError, match="the trial's own error"):
        with st.trial_tracker("trial_gone") as t:
            c.delete_run(t.run_id)  # recording the end now fails
            raise ValueError("the trial's own error")
    st.finish()


def test_trial_tracker_is_the_mlflow_recorder():
    """TrialTracker has every Recorder method with the protocol's parameters (extra ones optional)."""
    import inspect

    from natra_ray.workflow.recorder import Recorder

    for name in ("log_params", "set_tags", "log_metrics", "log_dataset", "log_artifact", "log_classifier"):
        want = list(inspect.signature(getattr(Recorder, name)).parameters.values())
        got = list(inspect.signature(getattr(TrialTracker, name)).parameters.values())
        assert [(p.name, p.kind, p.default) for p in got[:len(want)]] == \
            [(p.name, p.kind, p.default) for p in want], name
        assert all(p.default is not inspect.Parameter.empty for p in got[len(want):]), name
    assert isinstance(TrialTracker("sqlite:////tmp/unused.db", "1", "parent", "trial"), Recorder)


def test_metrics_on_a_deleted_run_fail_loudly(sweep):
    st = SweepTracker(sweep["uri"], sweep["eid"])
    st.start_parent("doomed")
    tr._client(sweep["uri"]).delete_run(st.run_id)
    with pytest.raises(TrackingError, match="log 1 metric"):
        st.log_metrics({"acc": 0.5}, step=0)


def test_artifacts(sweep, tmp_path):
    f = tmp_path / "report.txt"
    f.write_text("hello")
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "grid.txt").write_text("grid")
    st = SweepTracker(sweep["uri"], sweep["eid"])
    st.start_parent("with-artifacts")
    st.log_artifact(f)
    st.log_artifact(tmp_path / "figs" / "grid.txt", "figures")
    names = {a.path for a in tr._client(sweep["uri"]).list_artifacts(st.run_id)}
    assert names == {"report.txt", "figures"}
    with pytest.raises(FileNotFoundError):
        st.log_artifact(tmp_path / "missing.txt")
    st.finish()


def test_classifier_roundtrip_and_registry(use_store):
    import mlflow.pytorch

    s = use_store
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 3))
    t = TrialTracker(s["uri"], s["eid"], s["parent"], "trial_00001")
    t.start()
    example = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    model_uri = t.log_classifier(model, example)
    t.end()
    assert model_uri.startswith("models:/")
    assert model.training  # the caller's model is untouched (a CPU eval copy is logged)

    x = torch.rand(5, 1, 8, 8)  # another batch size than the example
    loaded = mlflow.pytorch.load_model(f"runs:/{t.run_id}/classifier")
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
        assert torch.equal(load_classifier(model_uri, uri=s["uri"])(x), model(x))
    info = mlflow.models.get_model_info(model_uri)
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 1, 8, 8)
    assert tuple(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 3)

    assert register_best(s["uri"], t.run_id, "natra_test_classifier") == 1
    with torch.no_grad():
        assert torch.equal(load_classifier("models:/natra_test_classifier@best", uri=s["uri"])(x), model(x))
    with pytest.raises(TrackingError, match="no logged classifier"):
        register_best(s["uri"], s["t2"].run_id, "natra_test_classifier")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        t.log_classifier(model, example * 255)
