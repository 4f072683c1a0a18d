"""The Ray-free stages on CUDA: GAN, BIES, LCE, a NaTra epoch with APT and label smoothing (fp32
and bf16), the evaluation suite, PCA directions, and the APT all-reduce under NCCL. Skipped
without a visible CUDA device. What they import needs torch, torchvision, numpy, scikit-learn,
pillow, PyYAML and lpips only (no Ray, MLflow, Optuna or umap-learn:
tests/test_devices.py::test_the_gpu_tests_import_without_the_ray_layer), so
``bench/gpu/run.sh`` runs them on a bare GPU machine. tests/test_devices.py runs there too: on
CUDA its device tests put the batches, the budgets and G on the GPU."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from natra_ray.config import load_config
from natra_ray.data import ImageDataset

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA device visible: the gpu tests run on a GPU machine (bench/gpu/run.sh)")]

CUDA = torch.device("cuda")
TINY_GAN = {"gan.generator": "style_tiny", "gan.d_channels": 8, "gan.batch_size": 16, "gan.style_mixing": 0.5,
            "gan.steps": 6, "gan.sample_every": 3}


def _cfg(**over):
    return load_config("smoke", overrides={"device": "cuda", **TINY_GAN, **over})


def _digits(n=128):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = F.interpolate(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16, size=32)
    return ImageDataset(x[:n], torch.tensor(d.target)[:n], [str(i) for i in range(10)])


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """GAN -> BIES -> PCA directions on CUDA, as ``prepare_upstream`` chains them (tiny)."""
    from natra_ray.stages import bies, directions, gan
    from natra_ray.workflow.upstream import Upstream

    tmp = tmp_path_factory.mktemp("gpu_upstream")
    cfg = _cfg(**{"encoder.steps": 6, "encoder.shift_steps": 4, "encoder.batch_size": 16,
                  "directions.estimator": "pca", "directions.num_samples": 256, "directions.num_directions": 4})
    data = _digits()
    g = gan.run(cfg, data, tmp / "gan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lpips on a random backbone: no weights on a bare machine
        b = bies.run(cfg, g.generator_path, data, tmp / "bies")
    d = directions.run(cfg, b.shifted_generator_path, tmp / "directions")
    return cfg, data, g, b, d, Upstream(b.shifted_generator_path, b.encoder_path, d.path, {}, {})


def test_gan_trains_on_cuda(upstream):
    from natra_ray.stages import gan

    _, _, g, *_ = upstream
    assert g.generator_path.exists() and g.sample_grids
    assert all(torch.isfinite(torch.tensor(v)) for v in g.metrics.values() if isinstance(v, float))
    G = gan.load_generator(g.generator_path).to(CUDA)
    with torch.no_grad():
        x = G(G.sample_z(4, torch.Generator().manual_seed(0)))
    assert x.device.type == "cuda" and x.shape == (4, 1, 32, 32)


def test_bies_trains_and_shifts_on_cuda(upstream):
    b = upstream[3]
    assert b.metrics["bies_recon_mse_before_shift"] > 0 and b.metrics["bies_recon_mse_after_shift"] > 0
    assert b.encoder_path.exists() and b.shifted_generator_path.exists()


def test_pca_directions_on_cuda_are_orthonormal(upstream):
    from natra_ray.models.latent import Directions

    d = upstream[4]
    dirs = Directions.load(d.path)
    assert len(dirs) == 4
    v = dirs.vectors
    assert torch.allclose(v @ v.T, torch.eye(4), atol=1e-4)


def test_lce_on_cuda_is_never_worse_than_plain_inversion(upstream):
    from natra_ray.workflow.upstream import encode_in_process

    cfg, data, *_, up = upstream
    cfg = cfg.replace(**{"encoder.lce_steps": 5, "encoder.lce_layer": 1, "encoder.gamma2": 0.0})
    one = encode_in_process(cfg, up, data.images[:64], 1, "one code")
    two = encode_in_process(cfg, up, data.images[:64], 2, "two codes")
    assert two.ws.device.type == "cpu" and two.ws.shape[:2] == (64, 2) and torch.isfinite(two.ws).all()
    assert two.meta["recon_mse"] <= one.meta["recon_mse"] + 1e-6  # LCE keeps its best iterate (pixel loss)


def _source(cfg, up, n_codes_path, precision="fp32"):
    from natra_ray.stages.lce import LatentCodes
    from natra_ray.workflow.trial import latent_source

    return latent_source(cfg.replace(**{"robust.precision": precision}), up, LatentCodes.load(n_codes_path), CUDA)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_natra_epoch_with_apt_and_label_smoothing_on_cuda(upstream, tmp_path, precision):
    """Batches on the GPU (as the Ray Data stream delivers them), G, the budgets and the model there."""
    from natra_ray.augment import Batch
    from natra_ray.stages import robust
    from natra_ray.workflow.upstream import encode_in_process

    cfg, data, *_, up = upstream
    cfg = cfg.replace(**{"robust.method": "natra", "robust.num_directions": 4, "robust.batch_size": 32,
                         "robust.pgd_steps": 2, "robust.rho": 0.2, "robust.label_smoothing_c": 0.5,
                         "robust.precision": precision, "robust.epochs": 1})
    encode_in_process(cfg, up, data.images, 1, "train").save(tmp_path / "codes.pt")
    src = _source(cfg, up, tmp_path / "codes.pt", precision)
    state = robust.make_state(cfg, 10, len(data) // 32, CUDA)

    def batches():
        for i in range(0, len(data) - 31, 32):
            idx = torch.arange(i, i + 32)
            yield Batch(data.images[idx].to(CUDA), data.labels[idx].to(CUDA), idx.to(CUDA))

    before = src.eps.clone()
    m = robust.train_epoch(cfg, state, data, src, torch.Generator().manual_seed(0), batches)
    assert src.eps.device.type == "cuda" and torch.isfinite(torch.tensor(m["train_loss"]))
    assert float((src.eps - before).sum()) > 0 and 0 <= m["adv_fooled"] <= 1
    assert state.scaler.is_enabled() == (precision == "fp16")


def test_the_evaluation_suite_on_cuda_matches_the_cpu(upstream, tmp_path):
    from natra_ray.stages import evaluate, robust
    from natra_ray.workflow.trial import eval_source
    from natra_ray.workflow.upstream import encode_in_process

    cfg, data, *_, up = upstream
    cfg = cfg.replace(**{"eval.max_examples": 64, "eval.deepfool_steps": 3, "eval.natural_directions": 4})
    codes = encode_in_process(cfg, up, data.images[:64], 1, "test")
    test = ImageDataset(data.images[:64], data.labels[:64], data.class_names)
    model = robust.build_classifier(cfg, 10).to(CUDA)
    got = evaluate.run(cfg, model, test, eval_source(cfg, up, codes, CUDA), tmp_path)
    assert all(0 <= v <= 1 for k, v in got.items() if k.endswith("_acc")) and got["test_deepfool_score"] >= 0
    # the CPU's numbers for the clean and the latent-attack parts (the whole suite twice costs minutes)
    cpu = {}
    for part in ("clean", "natural_attack"):
        cpu.update(evaluate.run_part(cfg, model.cpu(), test, eval_source(cfg, up, codes, torch.device("cpu")), part))
    assert got["test_clean_acc"] == pytest.approx(cpu["clean_acc"], abs=2 / 64)
    assert got["test_natural_acc"] == pytest.approx(cpu["natural_acc"], abs=0.1)


def test_apt_all_reduce_runs_on_the_gpu_under_nccl(tmp_path):
    import torch.distributed as dist

    from natra_ray.distributed.train import all_reduce_budgets, collective_device

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert collective_device().type == "cuda"
        eps = torch.tensor([0.3, 0.5], device=CUDA)
        all_reduce_budgets(eps, torch.tensor([0.3, 0.4]))  # budgets on the GPU, ``before`` from a CPU checkpoint
        cpu_eps = torch.tensor([0.3, 0.5])
        all_reduce_budgets(cpu_eps, torch.tensor([0.3, 0.4]))  # a CPU state is moved to the GPU to reduce
    finally:
        dist.destroy_process_group()
    assert torch.allclose(eps.cpu(), torch.tensor([0.3, 0.5])) and torch.allclose(cpu_eps, torch.tensor([0.3, 0.5]))
