"""The Ray layer on a real local cluster: a 2-worker TorchTrainer matches the single-process
stage, and resources are budgeted so nested Tune -> Train -> Data cannot deadlock. The sweep
submitted with `ray job submit`: tests/test_job_submit.py."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from natra_ray.config import ConfigError, load_config
from natra_ray.distributed.tune import ResourceError, max_concurrent, trial_cpus


def test_resource_budget_counts_every_level():
    cfg = load_config("smoke")
    assert cfg.tune.inline and trial_cpus(cfg) == 1  # one worker: the trial's own process trains
    assert max_concurrent(cfg, 2) == 2
    cfg = cfg.replace(**{"tune.trainer": "train"})  # driver + Train worker + Data actor
    assert not cfg.tune.inline and trial_cpus(cfg) == pytest.approx(0.5 + 1 + 0.5)
    assert max_concurrent(cfg, 2) == 1 and max_concurrent(cfg, 8) == 4
    with pytest.raises(ConfigError, match="tune.trainer=inline .* tune.train_workers=2"):
        load_config("smoke", overrides={"tune.trainer": "inline", "tune.train_workers": 2})
    big = cfg.replace(**{"tune.train_workers": 4})
    with pytest.raises(ResourceError, match="one trial needs 5 CPUs .* but the cluster has 2"):
        max_concurrent(big, 2)
    assert isinstance(ResourceError("x"), ConfigError)


def tiny_job(cfg, tmp: Path, splits, run_name: str):
    """A classifier job on a tiny generator, random directions and codes: a real upstream in
    milliseconds."""
    from natra_ray.distributed.train import RobustJob, diverged_file
    from natra_ray.checkpoints import save_checkpoint
    from natra_ray.models import create_generator
    from natra_ray.models.latent import Directions
    from natra_ray.stages.lce import LatentCodes

    G = create_generator("style_tiny", resolution=32)
    gpath = save_checkpoint(tmp / "g.pt", G, kind="generator", name="style_tiny", kwargs={"resolution": 32})
    q, _ = torch.linalg.qr(torch.randn(G.w_dim, 4))
    Directions(q.t().contiguous(), torch.ones(4), "test").save(tmp / "dirs.pt")
    codes = {}
    for k, ds in splits.items():
        with torch.no_grad():
            ws = G.broadcast(G.mapping(G.sample_z(len(ds))))[:, None]
        codes[k] = Path(LatentCodes(ws, torch.ones(len(ds), 1, G.layer_shape(0)[0]), 0).save(tmp / f"codes-{k}.pt"))
    return RobustJob(cfg, Path(gpath), tmp / "dirs.pt", codes, {}, stream=False,
                     diverged_file=diverged_file(tmp / "ray", run_name), title=run_name)


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_trainer_matches_single_process(ray_session, tmp_path):
    """Same seed, same data, same global batch: DDP over 2 workers ~ one process."""
    from natra_ray.distributed.train import fit_robust, load_result_state
    from natra_ray.stages import robust
    from natra_ray.workflow.upstream import load_splits

    over = {"robust.method": "none", "robust.num_directions": 4, "robust.epochs": 2, "robust.batch_size": 64, "robust.classifier_width": 8,
            "robust.lr": 0.05, "data.train_subset": 1200, "data.test_subset": 200, "tune.data_stream": False}
    cfg1 = load_config("smoke", overrides=over)
    splits = load_splits(cfg1)
    single = robust.run(cfg1, splits["train"], splits["val"], tmp_path / "single")
    cfg2 = cfg1.replace(**{"tune.train_workers": 2})
    scratch = set(Path(tempfile.gettempdir()).glob("natra-ckpt-*"))
    result = fit_robust(tiny_job(cfg2, tmp_path, splits, "two-workers"), "two-workers", tmp_path / "ray")
    assert result.error is None
    # each epoch's checkpoint went to the run's storage; none stayed behind in the workers' /tmp
    assert set(Path(tempfile.gettempdir()).glob("natra-ckpt-*")) == scratch
    assert len(list((tmp_path / "ray" / "two-workers").glob("checkpoint_*"))) >= 1
    state = load_result_state(result)
    two = state["history"][-1]["val_acc"]
    one = single.history[-1]["val_acc"]
    assert one > 0.5 and abs(two - one) <= 0.08, (one, two)


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_bies_matches_single_process(ray_session, tmp_path):
    """BIES in a 2-worker TorchTrainer (each worker half of every batch, gradients averaged)
    computes the same encoder and shifted generator as the in-process stage."""

    from natra_ray.distributed.upstream import bies_fit
    from natra_ray.models import create_generator
    from natra_ray.stages import bies
    from natra_ray.workflow.upstream import load_splits

    cfg = load_config("smoke", overrides={"gan.generator": "style_tiny", "encoder.steps": 6, "encoder.shift_steps": 4,
                                          "data.train_subset": 256, "data.test_subset": 64,
                                          "tune.upstream_workers": 2, "tune.upstream_cpus_per_worker": 1})
    train = load_splits(cfg)["train"]
    torch.manual_seed(0)
    G = create_generator("style_tiny", resolution=32)
    E1, Gs1, _ = bies.fit_in_process(cfg)(G, train)
    E2, Gs2, times = bies_fit(tmp_path / "ray")(cfg)(G, train)
    assert set(times) == {"bies_encoder_seconds", "bies_shift_seconds"}
    # Compare what the models compute, not raw weights: Adam's first steps move a weight whose
    # gradient is ~0 by +-lr on float noise alone, so weights may differ where outputs do not.
    x = train.images[:16]
    with torch.no_grad():
        w1, w2 = E1(x), E2(x)
        img0, img1, img2 = G.synthesis(w1), Gs1.synthesis(w1), Gs2.synthesis(w1)
    trained = (w1 - G.w_avg).abs().mean()  # how far the encoder moved from its start (w_avg)
    assert (w1 - w2).abs().mean() <= 0.02 * trained, ((w1 - w2).abs().mean(), trained)
    shift = (img1 - img0).abs().mean()  # how much the shift changed the images: not vacuous
    assert shift > 1e-4 and (img1 - img2).abs().mean() <= 0.1 * shift, ((img1 - img2).abs().mean(), shift)


def test_pareto_front_keeps_exactly_the_non_dominated_trials(tmp_path):
    from natra_ray.distributed.results import pareto_front, pareto_png

    rows = [{"id": "a", "clean": 0.90, "nat": 0.30}, {"id": "b", "clean": 0.85, "nat": 0.50},
            {"id": "c", "clean": 0.80, "nat": 0.45},  # dominated by b
            {"id": "d", "clean": 0.70, "nat": 0.60}, {"id": "e", "clean": 0.90, "nat": 0.20},  # e dominated by a
            {"id": "f", "clean": None, "nat": 0.99}]  # no metric (failed trial): ignored
    front = pareto_front(rows, ["clean", "nat"], ["max", "max"])
    assert sorted(r["id"] for r in front) == ["a", "b", "d"]
    # with the second objective minimised the front changes accordingly
    assert sorted(r["id"] for r in pareto_front(rows, ["clean", "nat"], ["max", "min"])) == ["e"]
    png = pareto_png([r for r in rows if r["clean"] is not None], front, ["clean", "nat"], tmp_path / "p.png")
    assert png.stat().st_size > 1000
