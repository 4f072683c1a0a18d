"""Device placement and mixed precision, on whatever device is visible (CUDA when there is one,
else the CPU): the per-example APT state lives where the attack runs, labels and budgets meet on
one device, the Ray worker loop's stream batches land on the Train device, the APT all-reduce
runs on the process group's device, and robust.precision=bf16 / fp16 autocast the decode and the
classifier. Real tiny parts (scikit-learn's digits, an untrained style_tiny generator), no Ray:
``distributed/train.py``'s worker-loop helpers import without it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from natra_ray.augment import AugmentContext, Batch, create_method
from natra_ray.augment.latent import smooth_labels
from natra_ray.augment.pool import TwoPass
from natra_ray.config import ConfigError, load_config
from natra_ray.stages import robust

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B = 16


def _cfg(**over):
    base = {"robust.method": "natra", "robust.epochs": 1, "robust.batch_size": B, "robust.num_directions": 4,
            "robust.pgd_steps": 2, "robust.rho": 0.2, "robust.label_smoothing_c": 0.5}
    return load_config("smoke", overrides={**base, **over})


def _tiny(cfg, n=64, device=DEVICE):
    from test_fast_latent import _tiny as tiny

    return tiny(cfg, n, device)


def test_the_budgets_live_on_the_attack_device_and_the_codes_on_the_cpu():
    _, src = _tiny(_cfg())
    assert src.eps.device == src.device == torch.device(DEVICE.type, src.device.index)
    assert src.ws.device.type == "cpu"  # the whole split's codes; a batch's are moved
    idx = torch.tensor([3, 1, 4])
    src.set_budgets(idx.to(DEVICE), torch.tensor([0.1, 0.2, 0.3]))  # values from the CPU, indices from anywhere
    assert torch.allclose(src.budgets(idx).cpu(), torch.tensor([0.1, 0.2, 0.3]))


def test_smooth_labels_follow_the_labels_whatever_device_the_budgets_are_on():
    y = torch.tensor([0, 2, 1], device=DEVICE)
    alpha = torch.tensor([0.0, 0.5, 1.0])  # CPU budgets times c, as a CPU APT state gives them
    t = smooth_labels(y, 3, alpha, torch.Generator().manual_seed(0))
    assert t.device == y.device and torch.allclose(t.sum(1), torch.ones(3, device=DEVICE))
    assert t[0].argmax() == 0 and t[0, 0] == 1  # alpha 0: the one-hot label
    assert float(t[1, 2]) >= 0.5  # alpha 0.5 keeps at least half the mass on the label


@pytest.mark.parametrize("mode", ["exact", "fraction", "pool"])
@pytest.mark.parametrize("batch_on", ["train_device", "cpu"])
def test_natra_with_apt_and_label_smoothing_trains_with_batches_on_either_device(mode, batch_on):
    """Stream batches arrive on the Train device, memory batches on the CPU; the APT state and
    G are on the attack device: every natra mode takes both and moves the budgets it may."""
    cfg = _cfg(**{"robust.natra_mode": mode, "robust.adv_fraction": 0.5})
    ds, src = _tiny(cfg)
    state = robust.make_state(cfg, 10, len(ds) // B, DEVICE)
    dev = DEVICE if batch_on == "train_device" else torch.device("cpu")

    def batches():
        for i in range(0, len(ds), B):
            idx = torch.arange(i, i + B)
            yield Batch(ds.images[idx].to(dev), ds.labels[idx].to(dev), idx.to(dev))

    before = src.eps.clone()
    m = robust.train_epoch(cfg, state, ds, src, torch.Generator().manual_seed(0), batches)
    assert torch.isfinite(torch.tensor(m["train_loss"])) and 0 <= m["adv_fooled"] <= 1
    assert src.eps.device == src.device
    grown = src.eps - before
    # APT: an example the attack did not fool grows by rho (the cap is far), a fooled one keeps eps
    assert bool(((grown == 0) | torch.isclose(grown, torch.full_like(grown, cfg.robust.rho))).all())
    assert float(grown.sum()) > 0


def test_stream_batches_land_on_the_train_device_with_the_loops_dtypes():
    from natra_ray.distributed.train import stream_batch

    b = {"image": torch.rand(4, 1, 32, 32, dtype=torch.float64), "label": torch.tensor([1, 2, 3, 4], dtype=torch.int32),
         "idx": torch.tensor([7, 8, 9, 10], dtype=torch.int32), "x_rand": torch.rand(4, 1, 32, 32).half()}
    got = stream_batch(b, DEVICE)
    for t, dtype in ((got.x, torch.float32), (got.y, torch.int64), (got.idx, torch.int64), (got.x_rand, torch.float32)):
        assert t.device.type == DEVICE.type and t.dtype == dtype
    assert got.y.tolist() == [1, 2, 3, 4]
    assert stream_batch({k: v for k, v in b.items() if k != "x_rand"}, DEVICE).x_rand is None


def _reduce_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from natra_ray.distributed.train import all_reduce_budgets, collective_device

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        before = torch.full((6,), 0.5)
        eps = before.clone()
        eps[rank::world] += 0.1 * (rank + 1)  # each worker saw its own examples this epoch
        all_reduce_budgets(eps, before)
        torch.save({"eps": eps, "device": str(collective_device())}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_apt_all_reduce_sums_every_workers_changes_on_the_process_groups_device(tmp_path):
    """Two real gloo workers (what the Ray worker loop runs at the end of each epoch): each ends
    with both workers' budget changes; the reduction runs where the backend reduces (gloo: CPU)."""
    import torch.multiprocessing as mp

    # fork: a spawned worker re-imports torch (a minute on a loaded 2-core machine); after CUDA
    # is initialised only spawn is safe
    how = "spawn" if torch.cuda.is_initialized() else "fork"
    mp.start_processes(_reduce_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2,
                       start_method=how)
    want = torch.tensor([0.6, 0.7, 0.6, 0.7, 0.6, 0.7])
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}")
        assert torch.allclose(got["eps"], want) and got["device"] == "cpu"


def test_apt_all_reduce_with_one_worker_keeps_the_budgets_on_their_device(tmp_path):
    import torch.distributed as dist

    from natra_ray.distributed.train import all_reduce_budgets

    eps = torch.tensor([0.2, 0.7], device=DEVICE)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        all_reduce_budgets(eps, torch.tensor([0.2, 0.5]))  # ``before`` as a CPU checkpoint holds it
    finally:
        dist.destroy_process_group()
    assert eps.device.type == DEVICE.type and torch.allclose(eps.cpu(), torch.tensor([0.2, 0.7]))


# --------------------------------------------------------------------------- precision
def test_precision_is_one_checked_key():
    assert load_config("smoke").robust.precision == "fp32"
    with pytest.raises(ConfigError, match="must be one of 'fp32', 'bf16', 'fp16'"):
        load_config("smoke", overrides={"robust.precision": "fp8"})
    with pytest.raises(ConfigError, match=r"robust.precision=fp16 is for CUDA.*use robust.precision=bf16"):
        load_config("smoke", overrides={"robust.precision": "fp16", "device": "cpu"})


@pytest.fixture
def conv_dtypes(monkeypatch):
    """The output dtype of every 2-d convolution run while the test runs (G's modulated layers
    and the classifier's both call ``F.conv2d``; autocast picks the dtype beneath it)."""
    seen = []
    real = F.conv2d

    def recording(*a, **kw):
        out = real(*a, **kw)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(F, "conv2d", recording)
    return seen


def test_bf16_autocasts_the_decode_and_the_classifier_and_keeps_state_float32(conv_dtypes):
    cfg = _cfg(**{"robust.precision": "bf16"})
    ds, src = _tiny(cfg)
    state = robust.make_state(cfg, 10, len(ds) // B, DEVICE)
    x = src.reconstruct(torch.arange(B))
    assert torch.bfloat16 in conv_dtypes and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
    conv_dtypes.clear()
    loss, logits = robust._loss(state.model, x, F.one_hot(ds.labels[:B], 10).float().to(x.device), "bf16")
    assert set(conv_dtypes) == {torch.bfloat16} and logits.dtype == loss.dtype == torch.float32
    m = robust.train_epoch(cfg, state, ds, src, torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.tensor(m["train_loss"]))
    assert src.eps.dtype == torch.float32 and all(p.dtype == torch.float32 for p in state.model.parameters())
    assert not state.scaler.is_enabled()  # bf16 needs no loss scaling


def test_fp32_decodes_and_classifies_without_autocast(conv_dtypes):
    cfg = _cfg()
    ds, src = _tiny(cfg)
    state = robust.make_state(cfg, 10, len(ds) // B, DEVICE)
    robust.train_epoch(cfg, state, ds, src, torch.Generator().manual_seed(0))
    assert conv_dtypes and set(conv_dtypes) == {torch.float32}


def test_fp16_trains_through_a_grad_scaler_whose_state_is_checkpointed():
    cfg = _cfg(**{"robust.precision": "fp16", "robust.natra_mode": "pool"})  # pool: the two-pass path too
    ds, src = _tiny(cfg)
    state = robust.make_state(cfg, 10, len(ds) // B, DEVICE)
    assert state.scaler.is_enabled()
    m = robust.train_epoch(cfg, state, ds, src, torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.tensor(m["train_loss"]))
    saved = state.state_dict(src)
    assert saved["scaler"]["scale"] > 0 and saved["eps"].device.type == "cpu"
    fresh = robust.make_state(cfg, 10, len(ds) // B, DEVICE)
    fresh.load_state_dict(saved, src)
    assert fresh.scaler.get_scale() == state.scaler.get_scale()


def test_the_two_pass_second_half_sees_the_unscaled_input_gradient():
    """fp16 scales the loss, so the clean half's input gradient; the method choosing the second
    half must see the true gradient (what fp32 gives), not one 65536x larger."""
    cfg = _cfg(**{"robust.natra_mode": "pool"})
    ds, src = _tiny(cfg)
    seen = {}
    for prec in ("fp32", "fp16"):
        torch.manual_seed(5)
        state = robust.make_state(cfg.replace(**{"robust.precision": prec}), 10, 4, DEVICE)
        aug = create_method("natra")(AugmentContext(state.model, cfg.robust, 10, torch.Generator().manual_seed(1), src),
                                     Batch(ds.images[:B], ds.labels[:B], torch.arange(B)))
        assert isinstance(aug, TwoPass)
        second = aug.second

        def spy(grad, second=second, prec=prec):
            seen[prec] = grad.detach().float().abs().mean().item()
            return second(grad)

        aug.second = spy
        robust._two_pass(state.model, aug, DEVICE, prec, state.scaler)
    assert seen["fp16"] == pytest.approx(seen["fp32"], rel=0.2)


# --------------------------------------------------------------------------- the GPU machine's run
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_the_gpu_tests_import_without_the_ray_layer():
    """A lent GPU machine has torch but no Ray, MLflow, Optuna or umap-learn: what tests/test_gpu.py,
    this file and the bf16 benchmarks import must load without them."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('ray', 'mlflow', 'optuna', 'umap'): sys.modules[m] = None\n"
            "sys.path[:0] = ['tests', 'bench']\n"
            "import test_gpu, test_devices, bench_step, bench_epoch\n"
            "import natra_ray.stages.gan, natra_ray.stages.bies, natra_ray.stages.directions, natra_ray.distributed.train\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA visible the script runs for real, not its dry path")
def test_the_gpu_script_without_cuda_says_so_and_stops(tmp_path):
    import os
    import subprocess
    import sys

    r = subprocess.run(["bash", "bench/gpu/run.sh"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert r.returncode == 0 and "no CUDA: skipping" in r.stdout, r.stdout + r.stderr
    assert (tmp_path / "summary.md").read_text().startswith("no CUDA: skipping")
    assert not (tmp_path / "tests.log").exists() and not (tmp_path / "nvidia_smi.csv").exists()


def test_the_gpu_summary_splits_the_utilisation_samples_by_phase(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(REPO / "bench" / "gpu"))
    import summarize

    from datetime import datetime

    t0 = datetime(2026, 1, 1, 12, 0, 0).timestamp()
    lines = [f"{datetime.fromtimestamp(t0 + i).strftime('%Y/%m/%d %H:%M:%S.%f')[:-3]}, NVIDIA H200, {u}, {m}, 143771, 300"
             for i, (u, m) in enumerate([(10, 100), (90, 5000), (70, 6000), (0, 50)])]
    (tmp_path / "nvidia_smi.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "phases.csv").write_text(f"tests,{t0 + 0.5},{t0 + 2.5},0\nbench,{t0 + 2.6},{t0 + 3.5},1\n")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "step_cuda_bf16_cpu.json").write_text(json.dumps({"data": {"rows": [
        {"label": "NaTra", "ratio": 3.5, "images_per_s_augmented": 2000.0, "images_per_s_standard": 7000.0}]}}))
    text = summarize.main(tmp_path)
    assert "GPU: NVIDIA H200" in text
    assert "| tests | 0 | 2 | 80 | 90 | 6000 | 2 |" in text and "| bench | 1 | 1 | 0 | 0 | 50 | 1 |" in text
    assert "NaTra: 3.50x standard, 2000 images/s (standard 7000)" in text
