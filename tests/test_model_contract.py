"""The classifier as MLflow stores it: it takes the dataset's own images (Fashion-MNIST at 28 px)
and pads them itself, refuses other sizes, and loads where natra_ray is not installed. Also the
dataset input and the experiment kind each run and experiment carry. Real Fashion-MNIST, a real
SQLite store, a real clean subprocess."""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from natra_ray.config import Config
from natra_ray.data.datasets import InputSpec, dataset_card, input_spec, load_dataset, preprocess
from natra_ray.export import InputShapeError, NativeInputClassifier, export_classifier
from natra_ray.models.registries import CLASSIFIERS
from natra_ray.stages import robust

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian package dataset-fashion-mnist not installed")


def _cfg(**kw) -> Config:
    return Config().replace(**{"data.root": str(DEBIAN), "data.download": False, "data.train_subset": 200,
                               "data.test_subset": 64, "robust.classifier_width": 8, **kw})


# --------------------------------------------------------------------------- the rule, once
@needs_fmnist
def test_native_images_preprocessed_are_what_the_loader_gives():
    cfg = _cfg()
    spec = input_spec(cfg.data)
    assert spec == InputSpec(1, 28, 28, 32, 1, True)
    native = load_dataset(cfg.data, "test", native=True)
    loaded = load_dataset(cfg.data, "test")
    assert native.images.shape == (64, 1, 28, 28) and torch.equal(native.labels, loaded.labels)
    assert torch.equal(preprocess(native.images, spec), loaded.images)
    # three channels: the gray image repeated, by the same rule
    rgb = _cfg(**{"data.channels": 3})
    assert torch.equal(preprocess(native.images, input_spec(rgb.data)), load_dataset(rgb.data, "test").images)


def test_an_image_folder_is_taken_at_the_size_its_reader_delivers(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    cfg = Config().replace(**{"data.dataset": "image_folder", "data.root": str(tmp_path)})
    spec = input_spec(cfg.data)
    assert spec.shape == spec.model_shape == (1, 32, 32) and not spec.pad_28_to_32
    native = load_dataset(cfg.data, "train", native=True).images
    assert torch.equal(preprocess(native, spec), load_dataset(cfg.data, "train").images)


# --------------------------------------------------------------------------- every architecture exports
@pytest.mark.parametrize("name", CLASSIFIERS.names())
def test_every_registered_classifier_exports_with_the_padding_inside(name):
    spec = InputSpec(1, 28, 28, 32, 1, True)
    clf = CLASSIFIERS.create(name, in_channels=1, num_classes=10, image_size=32, width=8, depth=10).eval()
    served = NativeInputClassifier(clf, spec).eval()
    program = export_classifier(served, torch.rand(3, 1, 28, 28)).module()
    x = torch.rand(5, 1, 28, 28)  # another batch size than the example
    with torch.no_grad():
        assert torch.allclose(program(x), clf(torch.nn.functional.pad(x, (2, 2, 2, 2))), atol=1e-5)
        assert program(x[:1]).shape == (1, 10)
    with pytest.raises(InputShapeError, match=r"shape \(N, 1, 28, 28\).*pads them to 32x32.*got shape \(2, 1, 32, 32\)"):
        served(torch.rand(2, 1, 32, 32))
    with pytest.raises(AssertionError, match=r"images\.size\(\)\[2\] == 28"):  # the exported graph's own check
        program(torch.rand(2, 1, 32, 32))


# --------------------------------------------------------------------------- the registered model
_CLEAN_LOAD = textwrap.dedent("""
    import importlib.util, json, sys
    sys.path.append({purelib!r})  # the venv's packages, without running its .pth files (the editable natra_ray)
    assert importlib.util.find_spec("natra_ray") is None, "natra_ray is importable: " + repr(sys.path)
    import numpy as np, torch, mlflow, mlflow.pyfunc, mlflow.pytorch
    torch.set_num_threads(1)
    mlflow.set_tracking_uri({uri!r}); mlflow.set_registry_uri({uri!r})
    x = np.load({images!r})
    np.save({out_pyfunc!r}, np.asarray(mlflow.pyfunc.load_model({model!r}).predict(x)))
    module = mlflow.pytorch.load_model({model!r})
    with torch.no_grad():
        np.save({out_torch!r}, module(torch.from_numpy(x)).numpy())
    errors = {{}}
    try:
        module(torch.zeros(2, 1, 32, 32))
    except Exception as e:
        errors["pytorch"] = f"{{type(e).__name__}}: {{e}}"
    try:
        mlflow.pyfunc.load_model({model!r}).predict(np.zeros((2, 1, 32, 32), np.float32))
    except Exception as e:
        errors["pyfunc"] = f"{{type(e).__name__}}: {{e}}"
    print(json.dumps({{"natra_modules": sorted(m for m in sys.modules if m.startswith("natra_ray")), "errors": errors}}))
""")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from natra_ray.distributed.tracking import SweepTracker, ensure_experiment

    root = tmp_path_factory.mktemp("contract_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    eid = ensure_experiment(uri, "contract")
    sweep = SweepTracker(uri, eid)
    sweep.start_parent("sweep-contract")
    yield {"uri": uri, "eid": eid, "parent": sweep.run_id, "root": root}
    sweep.finish()


@needs_fmnist
def test_registered_model_takes_28px_fashion_mnist_and_loads_without_natra_ray(store, tmp_path, monkeypatch):
    import mlflow

    from natra_ray.distributed.tracking import TrialTracker, load_classifier, register_best

    cfg = _cfg()
    native = load_dataset(cfg.data, "test", native=True).images  # what a user holds: 28 px
    pipeline_view = load_dataset(cfg.data, "test").images  # what the classifier trained on: padded to 32
    model = robust.build_classifier(cfg, 10)
    with torch.no_grad():  # a few BN statistics, so eval mode is not the identity init
        model.train()(pipeline_view)
    model.eval()
    with torch.no_grad():
        expected = model(pipeline_view).numpy()

    t = TrialTracker(store["uri"], store["eid"], store["parent"], "trial_contract")
    t.start()
    model_uri = t.log_classifier(model, native[:4].numpy(), input_spec(cfg.data))
    t.end()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])  # for mlflow.models.get_model_info
    info = mlflow.models.get_model_info(model_uri)
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 1, 28, 28)
    assert info.metadata["natra.input_shape"] == [1, 28, 28]
    assert register_best(store["uri"], t.run_id, "contract_classifier") == 1

    # the logged files: an exported program, the example at 28 px, no requirement on natra_ray
    local = Path(mlflow.artifacts.download_artifacts(model_uri, tracking_uri=store["uri"], dst_path=str(tmp_path / "m")))
    assert (local / "data" / "model.pt2").is_file() and not (local / "data" / "model.pth").exists()
    reqs = (local / "requirements.txt").read_text()
    assert "torch" in reqs and "natra" not in reqs
    example = json.loads((local / "serving_input_example.json").read_text())
    assert np.asarray(example["inputs"]).shape[1:] == (1, 28, 28)

    in_process = load_classifier("models:/contract_classifier@best", uri=store["uri"])
    with torch.no_grad():
        got = in_process(native).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert (got.argmax(1) == expected.argmax(1)).all()

    np.save(tmp_path / "x.npy", native.numpy())
    code = _CLEAN_LOAD.format(purelib=sysconfig.get_paths()["purelib"], uri=store["uri"], images=str(tmp_path / "x.npy"),
                              model="models:/contract_classifier@best", out_pyfunc=str(tmp_path / "pyfunc.npy"),
                              out_torch=str(tmp_path / "torch.npy"))
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["natra_modules"] == []
    for name in ("pyfunc.npy", "torch.npy"):
        clean = np.load(tmp_path / name)
        np.testing.assert_allclose(clean, got, rtol=0, atol=1e-5)
        assert (clean.argmax(1) == expected.argmax(1)).all()
    # the padded size is refused, by the program itself and by MLflow's schema check
    assert "images.size()[2] == 28" in report["errors"]["pytorch"]
    assert "(-1, 1, 28, 28)" in report["errors"]["pyfunc"]


def test_log_classifier_refuses_an_example_of_another_size(store):
    from natra_ray.distributed.tracking import TrialTracker

    t = TrialTracker(store["uri"], store["eid"], store["parent"], "trial_wrong_example")
    t.start()
    clf = CLASSIFIERS.create("small_cnn", in_channels=1, num_classes=10, image_size=32, width=8)
    with pytest.raises(ValueError, match=r"shape \(N, 1, 28, 28\).*got shape \(2, 1, 32, 32\)"):
        t.log_classifier(clf, np.zeros((2, 1, 32, 32), np.float32), InputSpec(1, 28, 28, 32, 1, True))
    t.end()


# --------------------------------------------------------------------------- MLflow as people use it
@needs_fmnist
def test_each_run_logs_its_dataset_once(store):
    from natra_ray.distributed.tracking import TrialTracker, _client

    cfg = _cfg()
    splits = {k: load_dataset(cfg.data, k) for k in ("train", "val", "test")}
    card = dataset_card(cfg.data, splits)
    assert card["name"] == "fashion_mnist" and card["source"] == str(DEBIAN.resolve())
    assert card["split_sizes"] == {"train": 180, "val": 20, "test": 64} and card["input_shape"] == [1, 28, 28]
    assert dataset_card(cfg.data, {k: load_dataset(cfg.data, k) for k in splits})["digest"] == card["digest"]
    other = {**splits, "train": splits["train"].subset(slice(0, 100))}
    assert dataset_card(cfg.data, other)["digest"] != card["digest"]

    t = TrialTracker(store["uri"], store["eid"], store["parent"], "trial_dataset")
    t.start()
    t.log_dataset(card)
    t.log_dataset(card)  # a resumed trial logs it again
    t.end()
    inputs = _client(store["uri"]).get_run(t.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert (ds.name, ds.digest, ds.source_type) == ("fashion_mnist", card["digest"], "local")
    assert json.loads(ds.source) == {"uri": str(DEBIAN.resolve())}
    profile = json.loads(ds.profile)
    assert (profile["train_rows"], profile["val_rows"], profile["test_rows"], profile["num_rows"]) == (180, 20, 64, 264)
    schema = json.loads(ds.schema)["mlflow_tensorspec"]
    assert json.loads(schema["features"])[0]["tensor-spec"]["shape"] == [-1, 1, 28, 28]
    assert {(tag.key, tag.value) for tag in inputs[0].tags} == {("mlflow.data.context", "training")}


def test_trials_logging_the_same_dataset_at_once_all_get_it(store):
    """MLflow's SQL store inserts a dataset row it did not find without a lock: trials starting
    together used to lose the race with a UNIQUE-constraint error and fail before training."""
    import threading

    from natra_ray.distributed.tracking import TrialTracker, _client

    card = {"name": "fashion_mnist", "source": str(DEBIAN), "digest": "race0123456789ab",
            "split_sizes": {"train": 3}, "input_shape": [1, 28, 28], "classes": ["a"]}
    trials = [TrialTracker(store["uri"], store["eid"], store["parent"], f"trial_race_{i}") for i in range(6)]
    for t in trials:
        t.start()
    start, errors = threading.Barrier(len(trials)), []

    def log(t):
        start.wait()
        try:
            t.log_dataset(card)
        except Exception as e:  # noqa: BLE001 -- collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=log, args=(t,)) for t in trials]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    client = _client(store["uri"])
    for t in trials:
        t.end()
        assert [d.dataset.digest for d in client.get_run(t.run_id).inputs.dataset_inputs] == [card["digest"]]


def test_experiments_open_on_training_runs(store):
    from natra_ray.distributed.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, _client, ensure_experiment

    client = _client(store["uri"])
    assert EXPERIMENT_KIND == "custom_model_development"
    assert client.get_experiment(store["eid"]).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # an experiment made before (no kind) or whose kind the UI guessed gets it too
    old = client.create_experiment("made-elsewhere", artifact_location=(store["root"] / "a").as_uri())
    client.set_experiment_tag(old, EXPERIMENT_KIND_TAG, "genai_development_inferred")
    assert ensure_experiment(store["uri"], "made-elsewhere") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_the_printed_page_opens_the_training_runs(store):
    from natra_ray.distributed.tracking import runs_page_url

    assert runs_page_url(store["uri"], store["parent"]) == \
        f"http://127.0.0.1:5000/#/experiments/{store['eid']}/runs?workflowType=machine_learning"
    assert runs_page_url("databricks", "r") is None


def test_screenshot_script_shows_the_children_and_their_dataset(store, tmp_path):
    import importlib.util

    from natra_ray.distributed.tracking import SweepTracker, TrialTracker, ensure_experiment
    from natra_ray.explorer.browser import BrowserUnavailable, find_browser

    try:
        find_browser()
    except BrowserUnavailable as e:
        pytest.skip(f"no headless browser: {e}")
    spec = importlib.util.spec_from_file_location("mlflow_screenshot", Path(__file__).parents[1] / "bench" / "mlflow_screenshot.py")
    shot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shot)

    eid = ensure_experiment(store["uri"], "screenshot")
    sweep = SweepTracker(store["uri"], eid)
    sweep.start_parent("sweep-shot")
    card = {"name": "fashion_mnist", "source": str(DEBIAN), "digest": "0123456789abcdef",
            "split_sizes": {"train": 3, "val": 1, "test": 2}, "input_shape": [1, 28, 28], "classes": ["a", "b"]}
    for i in range(2):
        t = TrialTracker(store["uri"], eid, sweep.run_id, f"trial_{i}", run_name=f"trial-{i}")
        t.start()
        t.log_dataset(card)
        t.log_metrics({"val_natural_acc": 0.5 + i / 10}, step=1)
        t.end()
    sweep.finish()
    shown = shot.screenshot(store["uri"], tmp_path / "runs.png", "screenshot")
    assert (tmp_path / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shown["expanded"] == 1
    assert sorted(shown["runs"]) == ["sweep-shot", "trial-0", "trial-1"]  # the children are shown
    assert sum("fashion_mnist (0123456789abcdef)" in d for d in shown["datasets"]) == 2
    assert shown["metrics"] == ["val_natural_acc"]  # of the default columns, the one these runs have
