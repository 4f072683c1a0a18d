"""Label preservation (workflow/labels.py), measured for real on a tiny upstream whose images are
its generator's own: the codes are exact, so a reconstruction is the image itself and keeps every
label the reference classifier gets right; an edit of size 0 is the reconstruction; a huge edit
leaves the classes and falls toward chance. No Ray, no MLflow; seconds on one core."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from natra_ray import cache
from natra_ray.config import load_config
from natra_ray.data import ImageDataset
from natra_ray.workflow import labels
from natra_ray.workflow.layout import StorageLayout
from natra_ray.workflow.upstream import Upstream

CLASSES, DIRECTIONS = 4, 4


def config(eps: float):
    return load_config("smoke", overrides={"robust.num_directions": DIRECTIONS, "robust.layer_start": 0,
                                           "robust.layer_end": -1, "robust.batch_size": 16, "robust.eps_cap": 100.0,
                                           "robust.eps": eps, "device": "cpu"})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A real tiny generator, random orthonormal directions, and splits made by the generator from
    four class prototypes in W (plus noise), with their exact codes."""
    from natra_ray.checkpoints import save_checkpoint
    from natra_ray.models import create_generator
    from natra_ray.models.generator import to_unit
    from natra_ray.models.latent import Directions
    from natra_ray.stages.lce import LatentCodes

    tmp = tmp_path_factory.mktemp("labels")
    torch.manual_seed(0)
    G = create_generator("style_tiny", resolution=32, img_channels=1).eval()
    gpath = save_checkpoint(tmp / "g.pt", G, kind="generator", name="style_tiny",
                            kwargs={"resolution": 32, "img_channels": 1})
    q, _ = torch.linalg.qr(torch.randn(G.w_dim, DIRECTIONS))
    Directions(q.t().contiguous(), torch.ones(DIRECTIONS), "test").save(tmp / "dirs.pt")
    splits, codes = {}, {}
    with torch.no_grad():
        protos = G.mapping(G.sample_z(CLASSES))
        for name, n, seed in (("train", 512, 1), ("val", 64, 2), ("test", 32, 3)):
            y = torch.arange(n) % CLASSES
            w = protos[y] + 0.15 * protos.std() * torch.randn(n, G.w_dim, generator=torch.Generator().manual_seed(seed))
            ws = G.broadcast(w)
            splits[name] = ImageDataset(to_unit(G.synthesis(ws)), y, [f"c{i}" for i in range(CLASSES)])
            codes[name] = LatentCodes(ws[:, None], torch.ones(n, 1, G.layer_shape(0)[0]), 0).save(tmp / f"codes-{name}.pt")
    up = Upstream(Path(gpath), Path(gpath), tmp / "dirs.pt", {}, {})
    return {"up": up, "splits": splits, "codes": codes, "layout": StorageLayout(tmp / "store")}


def measure(world, eps: float):
    return labels.label_preservation(config(eps), world["up"], world["layout"], world["splits"],
                                     codes=world["codes"]["val"])


def test_shares_are_fractions_and_an_exact_reconstruction_keeps_every_label(world):
    m = measure(world, 0.5)
    assert set(labels.KEYS) <= set(m)
    for k in ("label_kept_recon", "label_kept_edit", "label_kept_corner", "label_kept_recon_all", "label_kept_edit_all",
              "label_kept_corner_all", "reference_val_acc", "reference_acc_measured"):
        assert 0.0 <= m[k] <= 1.0, (k, m[k])
    assert m["reference_val_acc"] > 1 / CLASSES + 0.25  # a labeller, not a coin
    assert m["label_kept_recon"] == 1.0  # the codes are exact: dec(enc(x)) is x
    assert m["label_kept_recon_all"] == pytest.approx(m["reference_acc_measured"])
    assert m["label_images"] == 64 and m["label_eps"] == 0.5
    line = labels.describe(m)
    assert line.startswith(f"label preservation: reconstructions 1.00, edits at eps=0.5 {m['label_kept_edit']:.2f}, "
                           f"at its corners {m['label_kept_corner']:.2f} "
                           f"(reference classifier val acc {m['reference_val_acc']:.2f}")


def test_no_edit_is_the_reconstruction_and_a_huge_edit_falls_toward_chance(world):
    zero, some, large, huge = (measure(world, eps) for eps in (0.0, 0.5, 2.0, 50.0))
    assert zero["label_kept_edit"] == zero["label_kept_recon"]
    assert zero["label_kept_edit_all"] == zero["label_kept_recon_all"] == zero["label_kept_corner_all"]
    for key in ("label_kept_edit", "label_kept_corner"):
        kept = [m[key] for m in (zero, some, large, huge)]
        assert kept == sorted(kept, reverse=True), (key, kept)  # the larger the edit, the fewer labels it keeps
    assert huge["label_kept_corner"] < 1 / CLASSES + 0.2
    assert huge["label_kept_edit"] < 1 / CLASSES + 0.2 < zero["label_kept_edit"]
    assert huge["label_kept_edit_all"] < 1 / CLASSES + 0.2
    for m in (some, large, huge):  # the edit budget does not touch reconstructions
        assert m["label_kept_recon"] == zero["label_kept_recon"]


def test_a_rerun_is_read_from_the_cache(world, monkeypatch):
    first = measure(world, 0.5)
    cfg = config(0.5)
    ref = cache.entry_dir(world["layout"].cache, labels.REFERENCE_STAGE, labels.reference_key(cfg))
    assert cache.is_complete(ref) and (ref / "classifier.pt").is_file()
    assert len(list(world["layout"].cache.glob(f"{labels.LABELS_STAGE}-*"))) >= 1

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(labels.robust, "train", boom)  # no retraining of the reference ...
    monkeypatch.setattr(labels, "latent_source", boom)  # ... and no decoding
    assert measure(world, 0.5) == first
    monkeypatch.undo()
    monkeypatch.setattr(labels.robust, "train", boom)
    other = measure(world, 1.0)  # another budget decodes again, with the same reference
    assert other["label_eps"] == 1.0 and other["reference_val_acc"] == first["reference_val_acc"]
    # the reference's key is its training data, classifier and budget; not the edit budget, nor the method
    assert labels.reference_key(config(1.0)) == labels.reference_key(cfg.replace(**{"robust.method": "natra_oa"}))
    assert labels.reference_key(cfg) != labels.reference_key(cfg, epochs=3)
    assert labels.reference_key(cfg) != labels.reference_key(cfg.replace(**{"robust.classifier_width": 16}))
