"""Bad input through the real entry points: ``jobs/tune_natra.py`` (and ``jobs/run_pipeline.py``).

Each case must end with exit status 2, one ``error: ...`` line naming the problem, no Python
traceback, and nothing written: every check here runs before Ray starts, so the storage folder
is never even created (``run_sweep`` creates it before it starts Ray, so its absence also proves
Ray was never started). One case per kind of input runs the job as a subprocess, exactly as a
user does; the other variants of that kind call the same job's ``main(argv)`` in this process
(a subprocess costs seconds of imports, the in-process call milliseconds). The one check that
needs the cluster (more workers than it has) runs against the shared local Ray cluster.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from natra_ray.checkpoints import FORMAT_VERSION, read_checkpoint, save_checkpoint
from natra_ray.models import create_discriminator, create_generator

REPO = Path(__file__).resolve().parents[1]
TUNE = REPO / "jobs" / "tune_natra.py"
PIPELINE = REPO / "jobs" / "run_pipeline.py"
SMOKE_SPACE = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())
_CLEAN_ENV = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "NATRA_DATA_DIR", "NATRA_STORAGE")


# --------------------------------------------------------------------------- helpers
def run_job(args, storage: Path, job: Path = TUNE, env: dict | None = None, timeout: int = 300):
    """Run a job as a subprocess, as a user would; the storage root is pinned so we can prove
    nothing was written."""
    e = {k: v for k, v in os.environ.items() if k not in _CLEAN_ENV}
    e.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})})
    proc = subprocess.run([sys.executable, str(job), *args, f"tune.storage_path={storage}"], check=False,
                          cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)
    return SimpleNamespace(returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)


def _job_module(job: Path):
    spec = importlib.util.spec_from_file_location(f"_job_{job.stem}", job)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def call_job(args, storage: Path, monkeypatch, job: Path = TUNE, env: dict | None = None):
    """The same job's ``main(argv)`` in this process; exit status and output as a subprocess
    would give them (an exception other than SystemExit escapes and fails the test)."""
    for k in _CLEAN_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    main = _job_module(job).main
    out, err = io.StringIO(), io.StringIO()
    handler = signal.getsignal(signal.SIGTERM)  # the tune job installs its own
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([*args, f"tune.storage_path={storage}"])
            except SystemExit as e:
                code = e.code
    finally:
        signal.signal(signal.SIGTERM, handler)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def error_line(proc) -> str:
    """The single ``error:`` line of a clean failure (after asserting what makes it clean)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def assert_nothing_written(storage: Path, proc) -> None:
    assert not storage.exists(), (sorted(str(p) for p in storage.rglob("*")), proc.stderr[-2000:])
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr  # failed before Ray


def png(path: Path, size=(8, 8), mode="L", seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def image_folder(root: Path, classes=("cat", "dog"), n=3) -> Path:
    for c in classes:
        for i in range(n):
            png(root / c / f"{i}.png", seed=i)
    return root


def run_case(case: str, cases: dict, args, storage: Path, monkeypatch, job: Path = TUNE):
    """The first case of each table runs as a subprocess, the others in this process."""
    if case == next(iter(cases)):
        return run_job(args, storage, job)
    return call_job(args, storage, monkeypatch, job)


def folder_args(root: Path) -> list:
    return ["--profile", "smoke", "data.dataset=image_folder", f"data.root={root}", "data.channels=1"]


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    """A tiny valid dataset: the cases that are not about data use it (reading it costs nothing)."""
    return image_folder(tmp_path_factory.mktemp("good") / "imgs")


def space_file(tmp_path: Path, **params) -> Path:
    """The smoke search space with params replaced (``None`` removes one); dots as ``__``."""
    space = {**SMOKE_SPACE, "params": dict(SMOKE_SPACE["params"])}
    for k, v in params.items():
        key = k.replace("__", ".")
        if v is None:
            space["params"].pop(key, None)
        else:
            space["params"][key] = v
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


# --------------------------------------------------------------------------- data
def _missing_folder(root: Path) -> Path:
    return root / "no_such_folder"


def _corrupt(root: Path) -> Path:
    image_folder(root)
    bad = png(root / "cat" / "9.png", size=(64, 64), seed=9)
    bad.write_bytes(bad.read_bytes()[:300])  # truncated mid pixel data
    return root


def _mixed_sizes(root: Path) -> Path:
    image_folder(root)
    png(root / "dog" / "big.png", size=(10, 12))
    return root


def _mixed_channels(root: Path) -> Path:
    image_folder(root)
    png(root / "dog" / "color.png", mode="RGB")
    return root


def _empty_class(root: Path) -> Path:
    image_folder(root)
    (root / "zebra").mkdir()
    return root


def _one_class(root: Path) -> Path:
    return image_folder(root, classes=("cat",))


DATA_CASES = {
    "missing dataset directory": (_missing_folder, r"^error: image folder .*/no_such_folder does not exist"),
    "corrupt image": (_corrupt, r"^error: cannot decode image .*/cat/9\.png: .*\(corrupt or truncated"),
    "mixed sizes": (_mixed_sizes, r"^error: images have mixed sizes: .* is 8x8 but .*/dog/big\.png is 10x12"),
    "mixed channels": (_mixed_channels, r"^error: images have mixed channel modes: .* is L but .*/dog/color\.png is RGB"),
    "empty class folder": (_empty_class, r"^error: class folder .*/zebra has no images"),
    "a single class": (_one_class, (r"^error: image folder .*/imgs has 1 class \(cat\); a classifier needs at least "
                                    r"two class folders")),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_image_folder(case, tmp_path, monkeypatch):
    make, pattern = DATA_CASES[case]
    root = make(tmp_path / "imgs")
    before = sorted(root.rglob("*")) if root.exists() else None
    storage = tmp_path / "store"
    proc = run_case(case, DATA_CASES, folder_args(root), storage, monkeypatch)
    assert re.search(pattern, error_line(proc)), proc.stderr[-2000:]
    assert_nothing_written(storage, proc)
    assert (sorted(root.rglob("*")) if root.exists() else None) == before  # the data was not touched


def test_missing_fashion_mnist_directory(tmp_path, monkeypatch):
    """The multi-line help of this error keeps the problem (the folder) on the error line."""
    storage = tmp_path / "store"
    missing = tmp_path / "fmnist"
    proc = call_job(["--profile", "smoke", f"data.root={missing}", "data.download=false"], storage, monkeypatch)
    line = error_line(proc)
    assert re.search(rf"^error: Fashion-MNIST not found in {re.escape(str(missing))} \(no such directory\)", line), line
    assert "apt-get install -y dataset-fashion-mnist" in proc.stderr  # and how to fix it follows
    assert_nothing_written(storage, proc)
    assert not missing.exists()


# --------------------------------------------------------------------------- search spaces
SPACE_CASES = {
    "unknown parameter": ({"robust__epss": {"type": "float", "low": 0.1, "high": 0.5}},
                          r"unknown config key 'robust\.epss'; did you mean: robust\.eps"),
    "inverted layer range": ({"robust__layer_start": {"type": "int", "low": 5, "high": 7},
                              "robust__layer_end": {"type": "int", "low": 0, "high": 3}},
                             r"inverted layer range: robust\.layer_start low=5 > robust\.layer_end high=3"),
    "negative eps": ({"robust__eps": {"type": "float", "low": -0.1, "high": 0.5}},
                     r"robust\.eps low=-0\.1 must be >= 0"),
    "rho reaches the truncation cap": ({"robust__rho": {"type": "float", "low": 0.1, "high": 2.0}},
                                       r"robust\.rho high=2\.0 reaches the truncation cap robust\.eps_cap=2\.0"),
    "LCE count 0": ({"encoder__lce_codes": {"type": "categorical", "choices": [0, 1]}},
                    r"encoder\.lce_codes .*0.*must be >= 1"),
    # computed once per sweep from the base config: every trial would silently use the base value
    "an upstream key": ({"gan__steps": {"type": "int", "low": 10, "high": 60}},
                        r"gan\.steps is an upstream key \(it keys the GAN; GAN, BIES and directions are computed "
                        r"once per sweep from the base config, .*\); set it in the config \(gan\.steps=\.\.\.\) "
                        r"and run one sweep per value, or remove it from the space$"),
}


@pytest.mark.parametrize("case", list(SPACE_CASES))
def test_bad_search_space(case, tmp_path, good_folder, monkeypatch):
    params, pattern = SPACE_CASES[case]
    storage = tmp_path / "store"
    proc = run_case(case, SPACE_CASES, [*folder_args(good_folder), f"tune.search_space={space_file(tmp_path, **params)}"],
                    storage, monkeypatch)
    line = error_line(proc)
    assert line.startswith("error: search space 'space': ") and re.search(pattern, line), line
    assert_nothing_written(storage, proc)


# --------------------------------------------------------------------------- config / profile / tracking
def test_unknown_profile(tmp_path):
    storage = tmp_path / "store"
    proc = run_job(["--profile", "papr"], storage)
    assert error_line(proc) == "error: unknown profile 'papr'; known profiles are: cpu, paper, smoke"
    assert_nothing_written(storage, proc)


def test_unknown_config_key(tmp_path, good_folder, monkeypatch):
    storage = tmp_path / "store"
    proc = call_job([*folder_args(good_folder), "robust.epsilon=0.3"], storage, monkeypatch)
    assert re.search(r"^error: unknown config key 'robust\.epsilon'; allowed keys in section 'robust': .*\beps\b",
                     error_line(proc))
    assert_nothing_written(storage, proc)


def test_removed_config_key(tmp_path, good_folder, monkeypatch):
    """data.num_workers was never read and is gone: the job refuses it like any unknown key."""
    storage = tmp_path / "store"
    proc = call_job([*folder_args(good_folder), "data.num_workers=2"], storage, monkeypatch)
    assert re.search(r"^error: unknown config key 'data\.num_workers'; allowed keys in section 'data': ",
                     error_line(proc))
    assert_nothing_written(storage, proc)


def test_tracking_uri_with_unknown_scheme(tmp_path, good_folder):
    storage = tmp_path / "store"
    proc = run_job([*folder_args(good_folder), "tracking.uri=mlflw://tracking.example:5000"], storage)
    assert re.search(r"^error: MLflow tracking URI 'mlflw://tracking\.example:5000' \(from config key "
                     r"tracking\.uri\) has unsupported scheme 'mlflw'; supported schemes: sqlite, ",
                     error_line(proc))
    assert_nothing_written(storage, proc)


# --------------------------------------------------------------------------- generator checkpoints
def _discriminator(tmp: Path) -> Path:
    D = create_discriminator("resnet", resolution=32, img_channels=1, channels=8, max_channels=16)
    return save_checkpoint(tmp / "d.pt", D, kind="discriminator", name="resnet",
                           kwargs={"resolution": 32, "img_channels": 1, "channels": 8, "max_channels": 16})


def _other_resolution(tmp: Path) -> Path:
    G = create_generator("style_tiny", resolution=64)
    return save_checkpoint(tmp / "g64.pt", G, kind="generator", name="style_tiny", kwargs={"resolution": 64})


def _weights_of_another_size(tmp: Path) -> Path:
    G = create_generator("style", resolution=32, z_dim=16, w_dim=16, channels=16, mapping_layers=2)
    path = save_checkpoint(tmp / "g.pt", G, kind="generator", name="style",
                           kwargs={"resolution": 32, "z_dim": 16, "w_dim": 16, "channels": 16, "mapping_layers": 2})
    ckpt = read_checkpoint(path)
    ckpt["kwargs"]["channels"] = 32  # declares a wider generator than its weights are
    torch.save(ckpt, path)
    return path


def _future_version(tmp: Path) -> Path:
    path = save_checkpoint(tmp / "g.pt", create_generator("style_tiny"), kind="generator", name="style_tiny",
                           kwargs={"resolution": 32})
    ckpt = read_checkpoint(path)
    ckpt["format_version"] = FORMAT_VERSION + 1
    torch.save(ckpt, path)
    return path


CKPT_CASES = {
    "a discriminator, not a generator": (_discriminator, r"d\.pt holds a 'discriminator', not a 'generator'"),
    "generator for another image size": (_other_resolution,
                                         (r"^error: gan\.checkpoint: generator .*g64\.pt makes 1x64x64 images but "
                                          r"the data is 1x32x32")),
    "weights of another architecture": (_weights_of_another_size,
                                        r"g\.pt: tensor '.*' has shape \(.*\) but the model expects \(.*\)"),
    "future format version": (_future_version,
                              (rf"g\.pt has checkpoint format version {FORMAT_VERSION + 1}; this natra_ray reads "
                               rf"versions 1\.\.{FORMAT_VERSION}\. Upgrade natra_ray")),
}


@pytest.mark.parametrize("case", list(CKPT_CASES))
def test_bad_generator_checkpoint(case, tmp_path, good_folder, monkeypatch):
    make, pattern = CKPT_CASES[case]
    path = make(tmp_path)
    storage = tmp_path / "store"
    proc = run_case(case, CKPT_CASES, [*folder_args(good_folder), f"gan.checkpoint={path}"], storage, monkeypatch)
    assert re.search(pattern, error_line(proc)), proc.stderr[-2000:]
    assert_nothing_written(storage, proc)


def test_run_pipeline_refuses_bad_input_the_same_way(tmp_path, good_folder, monkeypatch):
    """The single-process job shares the boundary checks."""
    storage = tmp_path / "store"
    proc = run_job([*folder_args(tmp_path / "nope"), "--methods", "none"], storage, job=PIPELINE)
    assert re.search(r"^error: image folder .*/nope does not exist", error_line(proc))
    proc = call_job([*folder_args(good_folder), f"gan.checkpoint={_future_version(tmp_path)}", "--methods", "none"],
                    storage, monkeypatch, job=PIPELINE)
    assert "has checkpoint format version" in error_line(proc)
    assert_nothing_written(storage, proc)


# --------------------------------------------------------------------------- the cluster
@pytest.mark.ray
@pytest.mark.slow
def test_more_workers_than_the_cluster_can_ever_have(ray_cluster, tmp_path, good_folder):
    """Checked against the joined cluster's CPUs before the parent run or any stage exists."""
    storage = tmp_path / "store"
    proc = run_job([*folder_args(good_folder), "tune.train_workers=16"], storage,
                   env={"RAY_ADDRESS": ray_cluster["address"], "RAY_AUTH_MODE": "token"})
    line = error_line(proc)
    assert re.search(r"^error: one trial needs 17 CPUs \(driver 0\.5 \+ 16 Train workers x 1 \+ Data 0\.5\) "
                     r"but the cluster has 2; lower tune\.train_workers", line), line
    # Nothing half-written: no stage cache entry, no Tune experiment, no MLflow run.
    assert not (storage / "cache").exists() and not (storage / "tune").exists()
    db = storage / "mlflow.db"
    if db.exists():
        with sqlite3.connect(db) as con:
            assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 0
