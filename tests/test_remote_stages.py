"""The trial's heavy stages as Ray tasks (distributed/remote_stages.py) give the in-process
numbers: LCE encoding sharded over a split's images, the evaluation suite in parallel parts.
Real tiny parts (an untrained style_tiny generator and encoder, scikit-learn's digits) on the
session's local Ray cluster."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from natra_ray.config import load_config
from natra_ray.data import ImageDataset
from natra_ray.workflow.trial import TrialInputs, in_process_score
from natra_ray.workflow.upstream import Upstream, encode_in_process

pytestmark = pytest.mark.ray


def _digits(n):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.nn.functional.interpolate(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16, size=32)
    return x[:n], torch.tensor(d.target)[:n]


def _upstream(tmp: Path, cfg) -> Upstream:
    from natra_ray.checkpoints import save_checkpoint
    from natra_ray.models import create_generator
    from natra_ray.models.latent import Directions
    from natra_ray.stages import bies

    torch.manual_seed(0)
    G = create_generator("style_tiny", resolution=32, img_channels=1)
    gpath = save_checkpoint(tmp / "g.pt", G, kind="generator", name="style_tiny",
                            kwargs={"resolution": 32, "img_channels": 1})
    E = bies.build_encoder(cfg, G)
    epath = save_checkpoint(tmp / "e.pt", E, kind="encoder", name=cfg.encoder.encoder,
                            kwargs=bies.encoder_kwargs(cfg, G))
    k = cfg.directions.num_directions
    q, _ = torch.linalg.qr(torch.randn(G.w_dim, k))
    Directions(q.t().contiguous(), torch.ones(k), "test").save(tmp / "dirs.pt")
    return Upstream(Path(gpath), Path(epath), tmp / "dirs.pt", {}, {})


def _as_a_tune_trial(ray, fn):
    """``fn()`` in a task that holds half a CPU in a placement group capturing its child tasks:
    where a Tune trial driver calls the remote stages from."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"CPU": 0.5}])
    ray.get(pg.ready(), timeout=120)
    try:
        driver = ray.remote(num_cpus=0.5)(lambda: fn()).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True))
        return ray.get(driver.remote(), timeout=600)
    finally:
        remove_placement_group(pg)


def test_lce_sharded_over_ray_tasks_gives_the_in_process_codes(ray_session, tmp_path):
    from natra_ray.distributed.remote_stages import ray_encode

    cfg = load_config("smoke", overrides={"encoder.lce_codes": 2, "encoder.lce_steps": 2, "encoder.lce_layer": 1,
                                          "encoder.gamma2": 0.0, "device": "cpu"})
    up = _upstream(tmp_path, cfg)
    x, _ = _digits(600)  # two shards: [0, 512) and [512, 600), the second starting at batch 2
    here = encode_in_process(cfg, up, x, 2, "here")
    there = _as_a_tune_trial(ray_session, lambda: ray_encode(shards=2)(cfg, up, x, 2, "there"))
    assert there.meta["shards"] == 2 and there.ws.shape == here.ws.shape == (600, 2, *here.ws.shape[2:])
    assert torch.allclose(there.ws, here.ws, atol=1e-5) and torch.allclose(there.alpha, here.alpha, atol=1e-5)
    assert there.meta["recon_mse"] == pytest.approx(here.meta["recon_mse"], rel=1e-5)
    # the extra codes differ from the first (their init noise is seeded per batch, in both)
    assert not torch.allclose(here.ws[:, 0], here.ws[:, 1])


def test_the_evaluation_suite_as_parallel_ray_tasks_gives_the_in_process_numbers(ray_session, tmp_path):
    from natra_ray.distributed.remote_stages import ray_score
    from natra_ray.models import create_generator
    from natra_ray.stages import robust
    from natra_ray.stages.lce import LatentCodes

    cfg = load_config("smoke", overrides={"robust.num_directions": 4, "eval.max_examples": 48,
                                          "eval.deepfool_steps": 3, "device": "cpu"})
    up = _upstream(tmp_path, cfg)
    x, y = _digits(400)
    names = [str(i) for i in range(10)]
    test = ImageDataset(x[:64], y[:64], names)
    torch.manual_seed(0)
    G = create_generator("style_tiny", resolution=32, img_channels=1)
    with torch.no_grad():
        ws = G.broadcast(G.mapping(G.sample_z(len(test))))[:, None]
    codes = LatentCodes(ws, torch.ones(len(test), 1, G.layer_shape(0)[0]), 0).save(tmp_path / "codes-test.pt")
    inputs = TrialInputs({"train": ImageDataset(x[64:], y[64:], names), "test": test}, up, {"test": codes}, {})
    # a briefly trained classifier: some examples right, some fooled, so every metric means something
    state = robust.train(cfg.replace(**{"robust.method": "none", "robust.epochs": 1, "robust.batch_size": 32}),
                         inputs.splits["train"], test).bare.state_dict()
    (tmp_path / "here").mkdir()
    (tmp_path / "there").mkdir()
    here = in_process_score(cfg, inputs, state, tmp_path / "here")
    there = _as_a_tune_trial(ray_session, lambda: ray_score()(cfg, inputs, state, tmp_path / "there"))
    assert set(here) == set(there)
    for k in here:
        if k != "test_eval_seconds":
            assert there[k] == pytest.approx(here[k], rel=1e-5, abs=1e-6), k
    assert 0 < here["test_clean_acc"] < 1 and here["test_natural_acc"] <= here["test_clean_acc"] + 1e-9
    assert (tmp_path / "here" / "escaped_examples.png").exists() == (tmp_path / "there" / "escaped_examples.png").exists()
