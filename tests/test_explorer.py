"""The direction explorer (issue 7): artifact discovery, the JSON API and its errors, and the page
driven in a real headless Chromium (Selenium).

One tiny pipeline is built per module from real components: an untrained ``style_tiny``
generator (w_avg measured), a fresh encoder, PCA directions estimated from it, an untrained
``small_cnn`` classifier, saved through the project's own checkpoint code; the gallery reads
synthetic Fashion-MNIST IDX files. One server (loopback, free port) serves every test.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import struct
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from natra_ray.checkpoints import save_checkpoint
from natra_ray.config import load_config
from natra_ray.distributed.ray_init import is_loopback
from natra_ray.explorer import ArtifactError, Explorer, find_pipeline, from_cache_names, make_server, with_overrides
from natra_ray.models import create_generator
from natra_ray.stages import bies, directions, robust

K = 3  # directions in the tiny pipeline


# --------------------------------------------------------------------------- the tiny pipeline
def _idx(path: Path, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    path.write_bytes(struct.pack(">I", 0x800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


def _fake_fashion_mnist(d: Path, n: int = 40) -> None:
    """IDX files of blobs on black (a bright square that moves per image), labels 0..9."""
    d.mkdir(parents=True)
    imgs = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        r, c = 4 + (i * 3) % 14, 4 + (i * 5) % 14
        imgs[i, r:r + 10, c:c + 10] = 120 + (i * 13) % 130
    labels = (np.arange(n) % 10).astype(np.uint8)
    for split in ("train", "t10k"):
        _idx(d / f"{split}-images-idx3-ubyte", imgs)
        _idx(d / f"{split}-labels-idx1-ubyte", labels)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A flat pipeline folder: generator_shifted.pt, encoder.pt, directions.pt, classifier.pt."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("explorer")
    _fake_fashion_mnist(root / "fm")
    cfg = load_config("smoke", overrides={
        "data.root": str(root / "fm"), "data.download": False, "data.train_subset": 0, "data.test_subset": 0,
        "directions.estimator": "pca", "directions.num_directions": K, "robust.num_directions": K,
        "encoder.lce_codes": 2, "encoder.lce_steps": 2, "robust.layer_start": 1, "robust.layer_end": -1})
    torch.manual_seed(0)
    G = create_generator("style_tiny").eval().requires_grad_(False)
    with torch.no_grad():
        G.w_avg.copy_(G.mapping(torch.randn(2000, G.z_dim)).mean(0))
    out = root / "pipe"
    save_checkpoint(out / "generator_shifted.pt", G, kind="generator", name="style_tiny",
                    kwargs={"resolution": 32, "img_channels": 1}, config=cfg.to_dict())
    E = bies.build_encoder(cfg, G)
    save_checkpoint(out / "encoder.pt", E, kind="encoder", name=cfg.encoder.encoder,
                    kwargs=bies.encoder_kwargs(cfg, G), config=cfg.to_dict())
    directions.estimate(cfg, G, seed=0).save(out / "directions.pt")
    torch.manual_seed(1)
    robust.save_classifier(out / "classifier.pt", robust.build_classifier(cfg, 10), cfg, 10)
    yield out
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def explorer(pipeline_dir):
    return Explorer(find_pipeline(pipeline_dir), gallery_size=12)


@pytest.fixture(scope="module")
def server(explorer):
    srv = make_server(explorer, "127.0.0.1", 0, max_upload_bytes=200_000)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


# --------------------------------------------------------------------------- HTTP helpers
def call(server, path: str, body=None, ctype: str = "application/json", headers=None):
    """-> (status, parsed JSON). ``body``: dict (sent as JSON) or bytes."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(server.url.rstrip("/") + path, data=data, method="POST" if data is not None else "GET",
                                 headers={**({"Content-Type": ctype} if data is not None else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        assert e.headers.get("Content-Type") == "application/json", raw[:200]
        return e.code, json.loads(raw)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def pixels(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))), dtype=np.float32)


def assert_clear_error(status: int, payload: dict, want_status: int, *words: str) -> None:
    assert status == want_status, payload
    msg = payload["error"]
    assert "Traceback" not in msg and "\n" not in msg
    for w in words:
        assert w in msg, msg


# --------------------------------------------------------------------------- artifacts
def test_finds_flat_storage_root_and_trial_layouts(pipeline_dir, tmp_path):
    flat = find_pipeline(pipeline_dir)
    assert flat.generator.name == "generator_shifted.pt" and not flat.missing()
    # The storage-root layout stages/pipeline.py and the Tune trials write.
    root = _storage_root(pipeline_dir, tmp_path / "store")
    got = find_pipeline(root)
    assert got.encoder == (root / "cache" / "bies-aaa" / "encoder.pt").resolve()
    assert got.directions == (root / "cache" / "directions-bbb" / "directions.pt").resolve()
    assert got.classifier == (root / "trials" / "t1" / "classifier.pt").resolve()
    assert find_pipeline(root / "trials" / "t1").classifier == got.classifier
    assert from_cache_names(root / "cache", ["gan-x", "bies-aaa", "directions-bbb"], got.classifier).encoder.parent.name == "bies-aaa"

    # A second trial: ambiguous at the root, fine when its folder is named.
    (root / "trials" / "t2").mkdir()
    shutil.copy(pipeline_dir / "classifier.pt", root / "trials" / "t2" / "classifier.pt")
    with pytest.raises(ArtifactError, match=r"2 classifiers .*trials/t1"):
        find_pipeline(root)
    # A second BIES entry trained with another encoder config is told apart by the saved configs.
    other = root / "cache" / "bies-ccc"
    shutil.copytree(root / "cache" / "bies-aaa", other)
    ck = torch.load(other / "encoder.pt", weights_only=True)
    ck["config"]["encoder"]["steps"] += 1
    torch.save(ck, other / "encoder.pt")
    assert find_pipeline(root / "trials" / "t2").encoder.parent.name == "bies-aaa"
    shutil.copytree(root / "cache" / "bies-aaa", root / "cache" / "bies-ddd")  # same config: ambiguous
    with pytest.raises(ArtifactError, match=r"several bies cache entries .*bies-aaa, bies-ddd.*--run-id"):
        find_pipeline(root / "trials" / "t2")

    with pytest.raises(ArtifactError, match="does not exist"):
        find_pipeline(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="not a pipeline folder"):
        find_pipeline(tmp_path)
    with pytest.raises(ArtifactError, match="does not exist on this machine"):
        from_cache_names(root / "cache", ["bies-zzz", "directions-bbb"], got.classifier)
    with pytest.raises(ArtifactError, match="missing: --encoder"):
        with_overrides(None, generator="g.pt")
    assert with_overrides(flat, classifier=str(tmp_path / "c.pt")).classifier == (tmp_path / "c.pt").resolve()


def test_explorer_refuses_files_of_different_pipelines(pipeline_dir, tmp_path):
    G = create_generator("style_tiny", resolution=16)  # 6 style inputs instead of 8
    save_checkpoint(tmp_path / "g16.pt", G, kind="generator", name="style_tiny", kwargs={"resolution": 16})
    files = with_overrides(find_pipeline(pipeline_dir), generator=tmp_path / "g16.pt")
    with pytest.raises(ValueError, match="not one pipeline"):
        Explorer(files, gallery_size=0)


# --------------------------------------------------------------------------- API
def test_info_lists_directions_layers_and_classes(server):
    status, info = call(server, "/api/info")
    assert status == 200
    assert [(d["index"], d["estimator"]) for d in info["directions"]] == [(i, "pca") for i in range(K)]
    assert info["generator"]["num_ws"] == 8 and (info["layer_start"], info["layer_end"]) == (1, 7)
    assert info["class_names"][0] == "T-shirt/top" and info["lce"]["codes"] == 2
    status, gal = call(server, "/api/gallery")
    assert status == 200 and len(gal["items"]) == 12 and gal["note"] == "fashion_mnist test split"
    assert all(info["class_names"][it["label"]] == it["name"] for it in gal["items"])
    assert len({it["label"] for it in gal["items"]}) > 1 and len({it["png"] for it in gal["items"]}) == 12


def test_edit_moves_only_with_strength_and_layers_matter(server):
    item = call(server, "/api/gallery")[1]["items"][2]
    status, src = call(server, "/api/source", {"dataset_index": 2})
    assert status == 200 and (src["label"], src["label_name"]) == (item["label"], item["name"])
    assert pixels(src["source"]).tolist() == pixels(item["png"]).tolist()
    recon = pixels(src["recon"])
    edit = lambda s, a, b: call(server, "/api/edit", {"session": src["session"], "strengths": s, "start": a, "end": b})[1]
    zero = edit({}, 0, 7)
    assert np.abs(pixels(zero["image"]) - recon).max() <= 1  # strength 0 = the reconstruction (PNG rounding)
    assert zero["flipped"] is False and 0 <= zero["prediction"]["label"] < 10
    moved = edit({"0": 2.0}, 0, 7)
    assert np.abs(pixels(moved["image"]) - recon).mean() > 1.0 and moved["change"] > 0
    assert edit([2.0, 0.0, 0.0], 0, 7)["image"] == moved["image"]  # list form == object form
    assert edit({"0": 2.0}, 3, 5)["image"] != moved["image"]  # the layer range D(u, a-b) matters
    assert abs(sum(moved["prediction"]["probs"]) - 1) < 1e-3


def test_bad_requests_get_clear_json_errors_and_server_keeps_serving(server):
    status, src = call(server, "/api/source", {"dataset_index": 0})
    assert status == 200
    s = src["session"]
    assert_clear_error(*call(server, "/api/edit", {"session": s, "strengths": {"7": 1.0}, "start": 0, "end": 7}),
                       400, "unknown direction 7", f"{K} directions")
    assert_clear_error(*call(server, "/api/edit", {"session": s, "strengths": {"x": 1.0}, "start": 0, "end": 7}),
                       400, "unknown direction 'x'")
    assert_clear_error(*call(server, "/api/edit", {"session": s, "strengths": {}, "start": 0, "end": 8}),
                       400, "layer range 0..8 is out of range", "8 style inputs")
    assert_clear_error(*call(server, "/api/edit", {"session": s, "strengths": {}, "start": 5, "end": 2}), 400, "5..2")
    assert_clear_error(*call(server, "/api/edit", {"session": s, "strengths": {"0": 50}, "start": 0, "end": 7}),
                       400, "limit")
    assert_clear_error(*call(server, "/api/edit", {"session": s, "strengths": [1.0], "start": 0, "end": 7}),
                       400, f"expected {K} strengths")
    assert_clear_error(*call(server, "/api/edit", {"session": "nope", "strengths": {}, "start": 0, "end": 7}),
                       404, "pick the source image again")
    assert_clear_error(*call(server, "/api/edit", b"{not json"), 400, "not valid JSON")
    assert_clear_error(*call(server, "/api/edit", b"{}", ctype="text/plain"), 415, "application/json")
    assert_clear_error(*call(server, "/api/source", {"dataset_index": 99}), 404, "gallery has images 0..11")
    assert_clear_error(*call(server, "/api/upload", b"this is not an image", ctype="image/png"), 415, "not a readable image")
    assert_clear_error(*call(server, "/api/upload", b"\x89PNG" + bytes(300_000), ctype="image/png"), 413,
                       "300004 bytes", "limit is 200000")
    assert_clear_error(*call(server, "/api/upload", png(np.zeros((3000, 3000), np.uint8))[:0] or b"", ctype="image/png"),
                       400, "empty")
    assert_clear_error(*call(server, "/api/nothing"), 404, "no such page")
    assert_clear_error(*call(server, "/api/edit"), 405, "use POST")
    assert_clear_error(*call(server, "/api/info", headers={"Host": "attacker.example:80"}), 403, "localhost")
    # ...and it still serves: a valid upload (RGB, not square, dark object on white) and an edit.
    img = np.full((40, 60, 3), 255, np.uint8)
    img[10:30, 20:40] = 30
    status, up = call(server, "/api/upload?invert=1", png(img), ctype="image/png")
    assert status == 200 and up["label"] is None
    assert pixels(up["source"]).shape == (32, 32) and pixels(up["source"])[16, 16] > 200  # inverted: bright object
    status, e = call(server, "/api/edit", {"session": up["session"], "strengths": {"1": -1.5}, "start": 0, "end": 7})
    assert status == 200 and e["prediction"]["name"]


def test_loopback_by_default_and_exposing_warns(explorer, caplog):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    with caplog.at_level(logging.WARNING, logger="natra_ray.explorer.server"):
        srv = make_server(explorer, "127.0.0.1", 0)
        srv.server_close()
        assert not caplog.records
        srv = make_server(explorer, "0.0.0.0", 0)
        srv.server_close()
    assert any("0.0.0.0" in r.getMessage() and "no login" in r.getMessage() for r in caplog.records)
    assert not srv.check_host  # an explicitly exposed server is reached by other names


@pytest.fixture(scope="module")
def job():
    import importlib.util

    spec = importlib.util.spec_from_file_location("explore_job", Path(__file__).resolve().parents[1] / "jobs" / "explore.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _storage_root(pipeline_dir: Path, root: Path) -> Path:
    """The layout of ~/natra_ray_results: cache entries + one trial folder."""
    for stage, files in (("bies-aaa", ["encoder.pt", "generator_shifted.pt"]), ("directions-bbb", ["directions.pt"])):
        (root / "cache" / stage).mkdir(parents=True)
        for f in files:
            shutil.copy(pipeline_dir / f, root / "cache" / stage / f)
        (root / "cache" / stage / "_complete.json").write_text("{}")
    (root / "trials" / "t1").mkdir(parents=True)
    shutil.copy(pipeline_dir / "classifier.pt", root / "trials" / "t1" / "classifier.pt")
    return root


def test_job_entry_point_errors_are_one_line(job, tmp_path, capsys):
    with pytest.raises(SystemExit) as ei:
        job.main(["--artifacts", str(tmp_path / "missing")])
    assert ei.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: artifact folder") and "does not exist" in err[0]
    with pytest.raises(SystemExit):
        job.main(["--artifacts", str(tmp_path), "--run-id", "abc"])
    assert "not both" in capsys.readouterr().err


# --------------------------------------------------------------------------- the page in a browser
@pytest.fixture(scope="module")
def browser():
    from natra_ray.explorer.browser import BrowserUnavailable, chrome

    try:
        driver = chrome(1440, 900)
    except BrowserUnavailable as e:
        pytest.skip(f"no headless browser: {e}")
    yield driver
    driver.quit()


def test_page_slider_edits_image_and_shows_prediction(server, browser, tmp_path):
    from natra_ray.explorer.browser import edits_done, move_slider, open_page, page_idle, pick_dataset_image, wait_for

    d = browser
    open_page(d, server.url)
    assert len(d.find_elements("css selector", "input.strength")) == K
    labels = [e.text for e in d.find_elements("css selector", ".direction label")]
    assert labels[0].startswith("pca #0") and labels[2].startswith("pca #2")
    assert d.find_element("id", "layer-start").get_attribute("value") == "1"
    assert len(d.find_elements("css selector", "#layer-end option")) == 8

    pick_dataset_image(d, 4)
    src = lambda i: d.find_element("id", i).get_attribute("src")
    assert src("source-img").startswith("data:image/png") and src("recon-img").startswith("data:image/png")
    before = src("edited-img")
    assert np.abs(pixels(before) - pixels(src("recon-img"))).max() <= 1  # sliders at 0

    move_slider(d, 1, 2.5)
    after = src("edited-img")
    assert after != before and np.abs(pixels(after) - pixels(before)).mean() > 1.0
    pred = d.find_element("id", "prediction-label").text
    assert pred.startswith("classifier on the edited image: ")
    names = json.loads(urllib.request.urlopen(server.url + "api/info").read())["class_names"]
    assert any(n in pred for n in names) and "%" in pred
    assert len(d.find_elements("css selector", "#prediction-bars .bar")) == 10
    assert d.find_element("id", "error").get_attribute("hidden") is not None  # no error shown

    shot = tmp_path / "explorer.png"
    d.save_screenshot(str(shot))
    assert shot.read_bytes()[:4] == b"\x89PNG" and Image.open(shot).size[0] >= 1000

    # An upload that is not an image: the page says so and keeps working.
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    d.find_element("id", "upload").send_keys(str(bad))
    wait_for(lambda: "not a readable image" in d.find_element("id", "error").text, 30, "the upload error")
    move_slider(d, 1, 0.0)
    assert np.abs(pixels(src("edited-img")) - pixels(before)).max() <= 1  # back to the reconstruction
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(300_000))
    d.find_element("id", "upload").send_keys(str(big))
    wait_for(lambda: "the limit is 200000 bytes" in d.find_element("id", "error").text, 30, "the size error")

    # A real upload replaces the source and is edited like a dataset image.
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 9:19] = 220
    good = tmp_path / "shirt.png"
    good.write_bytes(png(img))
    n = edits_done(d)
    d.find_element("id", "upload").send_keys(str(good))
    wait_for(lambda: page_idle(d, n + 1), 60, "the upload to be inverted and rendered")
    assert pixels(src("source-img"))[14, 16] > 200 and pixels(src("source-img"))[1, 1] == 0  # padded 28 -> 32
    assert d.find_element("id", "error").get_attribute("hidden") is not None
    assert d.find_element("id", "source-caption").text.startswith("uploaded")


@pytest.mark.slow
def test_run_id_finds_the_trials_upstream_through_mlflow(job, pipeline_dir, tmp_path, capsys):
    """A trial run as distributed/tune.py logs it: classifier.pt plus previews of each upstream
    cache entry under upstream/<entry>/ - those names locate the generator, encoder, directions."""
    from natra_ray.distributed.tracking import SweepTracker, ensure_experiment

    root = _storage_root(pipeline_dir, tmp_path / "store")
    uri = f"sqlite:///{root}/mlflow.db"
    sweep = SweepTracker(uri, ensure_experiment(uri, "explorer-test", root / "mlartifacts"))
    sweep.start_parent("sweep")
    trial = sweep.trial_tracker("t1")
    trial.start()
    trial.log_artifact(str(root / "trials" / "t1" / "classifier.pt"))
    for entry in ("gan-zzz", "bies-aaa", "directions-bbb"):  # gan-zzz is not on disk: not needed
        (tmp_path / entry).mkdir()
        (tmp_path / entry / "grid.png").write_bytes(png(np.zeros((4, 4), np.uint8)))
        trial.log_artifact(str(tmp_path / entry / "grid.png"), artifact_path=f"upstream/{entry}")
    trial.end("FINISHED")

    args = job.parse_args(["--run-id", trial.run_id, "--tracking-uri", uri])  # storage found from the store
    files = job.files_from_run(args, tmp_path / "dl")
    assert files.encoder == root / "cache" / "bies-aaa" / "encoder.pt"
    assert files.directions == root / "cache" / "directions-bbb" / "directions.pt"
    assert files.classifier.parent == tmp_path / "dl" and files.source == f"MLflow run {trial.run_id}"
    assert len(Explorer(files, gallery_size=0).dirs) == K

    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        job.main(["--run-id", "0" * 32, "--tracking-uri", uri])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: MLflow refused to fetch run") and "0" * 32 in last
