"""The Tune objective cannot be gamed (issue 19): every evaluation attacks through the fixed
``eval.natural_*`` source, whatever ``robust.*`` a trial samples; the validation shift suite
(``natra_ray/data/shifts.py``) is real, deterministic, graded and disjoint from the test
corruptions; and ``val_objective`` is what the README says. Real computation on tiny data: a
classifier trained on scikit-learn's digits, a real tiny generator, no Ray."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from natra_ray.config import ConfigError, Config, load_config
from natra_ray.data import ImageDataset
from natra_ray.data.corruptions import list_corruptions
from natra_ray.data.shifts import SEVERITY, apply_shift, list_shifts, shift_generator
from natra_ray.stages import robust
from natra_ray.workflow.trial import Fitted, TrialInputs, eval_source, in_process_fit, latent_source, run_trial

class Wired(Exception):
    """Raised by a spy once it has seen what it was called with."""


NARROW = {"robust.num_directions": 1, "robust.layer_start": 3, "robust.layer_end": 3}
WIDE = {"robust.num_directions": 4, "robust.layer_start": 0, "robust.layer_end": -1}
# a weaker evaluation attack: what a trial's narrow training range would have been scored against
WEAK_EVAL = {"eval.natural_directions": 1, "eval.natural_layer_start": 3, "eval.natural_layer_end": 3}


def _digits(n: int = 640):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.nn.functional.interpolate(torch.tensor(d.images[:n], dtype=torch.float32)[:, None] / 16, size=32)
    return x, torch.tensor(d.target[:n]), [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A classifier trained on digits; a real tiny generator with directions.num_directions random
    orthonormal directions; a validation split made of the generator's images of the val codes,
    labelled by the classifier (so it is right on every one of them and an attack has something
    to break), and digits for the test split."""
    from natra_ray.checkpoints import save_checkpoint
    from natra_ray.models import create_generator
    from natra_ray.models.latent import Directions
    from natra_ray.stages.lce import LatentCodes
    from natra_ray.workflow.upstream import Upstream

    tmp = tmp_path_factory.mktemp("objective")
    base = load_config("smoke", overrides={"robust.method": "none", "robust.epochs": 2, "robust.batch_size": 32,
                                           "eval.natural_eps": 1.0, "eval.natural_steps": 3, **WIDE,
                                           "eval.max_examples": 32, "eval.deepfool_steps": 2,
                                           "eval.severities": [3], "eval.corruptions": ["rotate"]})
    x, y, names = _digits()
    train = ImageDataset(x[:384], y[:384], names)
    torch.manual_seed(0)
    model = robust.train(base, train, ImageDataset(x[384:448], y[384:448], names)).bare.eval()
    G = create_generator("style_tiny", resolution=32, img_channels=1)
    gpath = Path(save_checkpoint(tmp / "g.pt", G, kind="generator", name="style_tiny",
                                 kwargs={"resolution": 32, "img_channels": 1}))
    k = base.directions.num_directions
    q, _ = torch.linalg.qr(torch.randn(G.w_dim, k))
    Directions(q.t().contiguous(), torch.ones(k), "test").save(tmp / "dirs.pt")
    up = Upstream(gpath, gpath, tmp / "dirs.pt", {}, {})
    codes = {}
    for split, n in (("train", 64), ("val", 64), ("test", 32)):
        with torch.no_grad():
            ws = G.broadcast(G.mapping(G.sample_z(n)))[:, None]
        codes[split] = LatentCodes(ws, torch.ones(n, 1, G.layer_shape(0)[0]), 0)
    with torch.no_grad():
        xv = eval_source(base, up, codes["val"]).reconstruct(torch.arange(64))
        yv = model(xv).argmax(1)
    splits = {"train": ImageDataset(x[:64], y[:64], names), "val": ImageDataset(xv, yv, names),
              "test": ImageDataset(x[448:480], y[448:480], names)}
    paths = {s: c.save(tmp / f"codes-{s}.pt") for s, c in codes.items()}
    return base, model, up, codes, TrialInputs(splits, up, paths, {})


def _val(cfg: Config, world) -> dict:
    _, model, up, codes, inputs = world
    return robust.val_metrics(cfg, model, inputs.splits["val"], eval_source(cfg, up, codes["val"]))


# --------------------------------------------------------------------------- (a) a fixed attack
def test_a_trial_narrowing_its_own_attack_is_scored_against_the_same_one(world):
    base, model, up, codes, inputs = world
    narrow, wide = base.replace(**NARROW), base.replace(**WIDE)
    m_narrow, m_wide = _val(narrow, world), _val(wide, world)
    assert m_narrow["val_natural_acc"] == m_wide["val_natural_acc"]
    assert m_narrow["val_objective"] == m_wide["val_objective"]
    assert m_narrow == m_wide  # every validation number, not just the two the sweep reads
    # the evaluation source is the eval section's whatever robust.* says; the training one is the trial's
    for cfg in (narrow, wide):
        src = eval_source(cfg, up, codes["val"])
        assert (src.num_directions, src.layer_range) == (base.directions.num_directions, (0, src.G.num_ws - 1))
    assert (latent_source(narrow, up, codes["val"]).num_directions, latent_source(narrow, up, codes["val"]).layer_range) \
        == (1, (3, 3))
    # not vacuous: the narrow trial's own attack is weaker here, which is what it used to be scored by ...
    old_score = robust.val_metrics(narrow, model, inputs.splits["val"], latent_source(narrow, up, codes["val"]))
    assert old_score["val_natural_acc"] > m_narrow["val_natural_acc"]
    # ... and the eval section does decide the attack: weaken it and the same model scores higher
    weak = _val(base.replace(**WEAK_EVAL), world)
    assert weak["val_natural_acc"] == old_score["val_natural_acc"] > m_wide["val_natural_acc"]


def test_every_evaluation_uses_the_evaluation_source(world, tmp_path, monkeypatch):
    """The in-process fit validates with the eval source, and run_trial's test natural metrics
    do too: the same model under a narrow and a wide trial config gets the same test scores."""
    base, model, up, codes, inputs = world
    seen = []

    def spy_train(cfg, train, val, latent=None, val_latent=None, **kw):
        seen.append((latent.num_directions, latent.layer_range) if latent is not None else None)
        seen.append((val_latent.num_directions, val_latent.layer_range))
        raise Wired  # the wiring is all this test needs

    monkeypatch.setattr(robust, "train", spy_train)
    narrow = base.replace(**{**NARROW, "robust.method": "natra"})
    with pytest.raises(Wired):
        in_process_fit(narrow, inputs)
    num_ws = eval_source(base, up, codes["val"]).G.num_ws
    assert seen == [(1, (3, 3)), (base.directions.num_directions, (0, num_ws - 1))]
    monkeypatch.undo()

    def fit(cfg, inp, report):  # the same trained classifier for both configs
        return Fitted({k: v.clone() for k, v in model.state_dict().items()}, [{"epoch": 1, "val_acc": 1.0}])

    from natra_ray.workflow.recorder import NullRecorder

    scores = [run_trial(base.replace(**ov), inputs, tmp_path / name, fit, NullRecorder()).metrics
              for name, ov in (("narrow", NARROW), ("wide", WIDE))]
    keys = [k for k in scores[0] if k.startswith("test_") and k != "test_eval_seconds"]
    assert "test_natural_acc" in keys and "test_fixed_s+2_mean_acc" in keys
    assert {k: scores[0][k] for k in keys} == {k: scores[1][k] for k in keys}


# --------------------------------------------------------------------------- (b) the shift suite
@pytest.mark.parametrize("name", list_shifts())
def test_each_shift_changes_images_keeps_shape_and_range_is_seeded_and_graded(name):
    x = _digits(48)[0]
    outs = [apply_shift(name, x, s, shift_generator(0, name)) for s in range(1, 6)]
    for out in outs:
        assert out.shape == x.shape and out.dtype == x.dtype
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    again = apply_shift(name, x, 3, shift_generator(0, name))
    assert torch.equal(again, outs[2])  # deterministic given its seed
    change = [float((out - x).abs().mean()) for out in outs]
    assert change[0] > 1e-3, f"{name} at severity 1 leaves the images as they were"
    assert all(a < b for a, b in zip(change, change[1:])), f"{name}: change per severity {change}"
    with pytest.raises(ValueError, match="severity must be an int in 1..5"):
        apply_shift(name, x, 6, shift_generator(0, name))


def test_random_shifts_depend_on_the_seed_and_draw_on_the_generator():
    x = _digits(48)[0]
    for name in ("perspective", "lens", "gamma", "illumination"):  # the ones with random choices
        a = apply_shift(name, x, 3, shift_generator(0, name))
        b = apply_shift(name, x, 3, shift_generator(1, name))
        assert not torch.equal(a, b), name
    for name in ("vignette", "dilate", "erode"):  # deterministic: the seed plays no part
        assert torch.equal(apply_shift(name, x, 3, shift_generator(0, name)),
                           apply_shift(name, x, 3, shift_generator(1, name)))
    assert set(SEVERITY) == set(list_shifts())
    assert all(len(v) == 5 for v in SEVERITY.values())


# --------------------------------------------------------------------------- (c) not the test suite
def test_no_shift_is_a_test_corruption():
    from natra_ray.config_sections import EvalConfig

    assert not set(list_shifts()) & set(list_corruptions())
    assert not set(list_shifts()) & set(EvalConfig().corruptions)
    assert set(EvalConfig().shifts) <= set(list_shifts())
    with pytest.raises(ConfigError, match="registered validation shifts"):
        load_config("smoke", overrides={"eval.shifts": ["rotate"]})


# --------------------------------------------------------------------------- (d) the objective
def test_val_objective_is_clean_plus_shift_suite_over_two_on_validation(world):
    base, model, up, codes, inputs = world
    val = inputs.splits["val"]
    cfg = base.replace(**{"eval.shift_examples": 40})
    m = _val(cfg, world)
    e = cfg.eval
    x, y = val.images[:40], val.labels[:40]
    want = {}
    for name in e.shifts:
        accs = []
        for s in e.shift_severities:
            with torch.no_grad():
                pred = model(apply_shift(name, x, s, shift_generator(e.shift_seed, name))).argmax(1)
            accs.append(float((pred == y).float().mean()))
        want[name] = sum(accs) / len(accs)
        assert m[f"val_shift_{name}_acc"] == pytest.approx(want[name])
    assert m["val_shift_mean_acc"] == pytest.approx(sum(want.values()) / len(want))
    assert m["val_acc"] == pytest.approx(robust.accuracy(model, val.images, val.labels))
    assert m["val_objective"] == pytest.approx((m["val_acc"] + m["val_shift_mean_acc"]) / 2)
    assert "val_natural_acc" in m  # still reported
    # only the first shift_examples images count
    tail = ImageDataset(torch.cat([x, torch.rand(len(val) - 40, *x.shape[1:])]), val.labels, val.class_names)
    m_tail = robust.val_metrics(cfg, model, tail, None)
    assert {k: v for k, v in m_tail.items() if k.startswith("val_shift_")} == \
        {k: v for k, v in m.items() if k.startswith("val_shift_")}


def test_the_default_objective_is_val_objective_and_no_test_metric_chooses(world):
    from natra_ray.search_space import list_search_spaces, load_search_space

    cfg = load_config("cpu")
    assert cfg.tune.metric == "val_objective"
    for name in list_search_spaces():
        base = cfg.replace(**{"tune.multi_objective": name == "multi_objective"})
        space = load_search_space(name, base)
        assert all(metric.startswith("val_") for metric in space.metrics), (name, space.metrics)
        want = ["val_acc", "val_shift_mean_acc"] if name == "multi_objective" else ["val_objective"]
        assert space.metrics == want, name
    # every name the objective reads is a key val_metrics returns
    assert {"val_objective", "val_acc", "val_shift_mean_acc"} <= set(_val(world[0], world))


def test_eval_attack_rules():
    with pytest.raises(ConfigError, match="eval.natural_directions=5 exceeds directions.num_directions=4"):
        load_config("smoke", overrides={"eval.natural_directions": 5})
    with pytest.raises(ConfigError, match="is not a layer range of the generator"):
        load_config("smoke", overrides={"eval.natural_layer_start": 4, "eval.natural_layer_end": 2})
    with pytest.raises(ConfigError, match="is not a layer range of the generator"):
        load_config("smoke", overrides={"eval.natural_layer_end": 8})  # 32 px: layers 0..7
    with pytest.raises(ConfigError, match="eval.shift_severities"):
        load_config("smoke", overrides={"eval.shift_severities": [0]})
    cfg = load_config("smoke")
    assert (cfg.eval.natural_layer_start, cfg.eval.natural_layer_end, cfg.eval.natural_directions) == (0, -1, 0)
