"""Learned perturbation sets (paper 001, after Wong & Kolter): train a CVAE on pairs (x, x'),
measure it on held-out pairs, draw its latent sweep. Ray-free.

Losses (paper 001 Sec. 5.1-5.2), all pure functions of tensors:

* the canonical CVAE loss ``sum_x recon(x', Q(x, z)) + beta * KL(q(z | x, x') || p(z | x))``
  (``recon_loss``, ``gaussian_kl``);
* the linear-cost regulariser ``sum_x |2 (mu1 - mu_prior) - (mu2 - mu_prior)|`` over sample
  bundles (x, x1 = T_theta x, x2 = T_2theta x) (``linear_cost_reg``; L1 over latent dims).

``cvae_loss`` sums every term over the batch and divides by the number of *pairs* (two per
bundle), which is how paper 001's loss table is normalised (its code averages over the
doubled batch). The regulariser counts once per bundle, so with weight w its share of the
reported total is ``w * sum_bundles(reg) / n_pairs``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from natra_ray.checkpoints import load_module, save_checkpoint
from natra_ray.config import Config
from natra_ray.data.pairs import PairData, make_bundles, read_pair_folders, split_pairs
from natra_ray.models.cvae import CVAE, CVAES, CvaeOutput, create_cvae
from natra_ray.report import markdown_table
from natra_ray.runtime import Reporter, null_reporter
from natra_ray.viz import save_rows

log = logging.getLogger(__name__)

PAIRS_SEED = 0  # theta draws of the bundles: fixed, so every run sees the same pairs
SWEEP_STEPS = 11  # paper 001 Sec. 6: z = mu + (i - 5) sigma / 5, i = 0..10


# --------------------------------------------------------------------------- pure losses
def gaussian_kl(mu: Tensor, logvar: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mu, e^logvar) || N(mu_p, e^logvar_p)) per example, summed over latent dims: (B,)."""
    return 0.5 * (logvar_p - logvar + (logvar.exp() + (mu - mu_p) ** 2) / logvar_p.exp() - 1).sum(1)


def recon_loss(logits: Tensor, target: Tensor, kind: str = "bce") -> Tensor:
    """Negative log-likelihood of x' per example (B,): Bernoulli (BCE on the decoder's logits)
    or Gaussian (squared error of sigmoid(logits)), summed over pixels."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1)
    if kind == "mse":
        return (torch.sigmoid(logits) - target).pow(2).flatten(1).sum(1)
    raise ValueError(f"reconstruction loss must be 'bce' or 'mse'; got {kind!r}")


def linear_cost_reg(mu1: Tensor, mu2: Tensor, mu_prior: Tensor) -> Tensor:
    """Paper 001 Sec. 5.2: |2 (mu1 - mu_prior) - (mu2 - mu_prior)| per bundle (B,), L1 over
    latent dims. Zero exactly when the code of T_2theta x lies twice as far from the prior
    mean as the code of T_theta x (a linear encoding of theta)."""
    return (2 * (mu1 - mu_prior) - (mu2 - mu_prior)).abs().sum(1)


@dataclass
class LossTerms:
    """Batch loss terms, each summed over the batch / number of pairs (scalars)."""

    recon: Tensor
    kl: Tensor  # unweighted KL
    reg: Tensor  # unweighted regulariser (0 without bundles)
    total: Tensor  # recon + beta * kl + reg_weight * reg

    def floats(self) -> Dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("recon", "kl", "reg", "total")}


def cvae_loss(outs: Sequence[CvaeOutput], targets: Sequence[Tensor], *, beta: float = 1.0,
              reg_weight: float = 0.0, recon: str = "bce") -> LossTerms:
    """The CVAE objective over one pair set (``outs`` = [out1]) or a bundle ([out1, out2] for
    x1 = T_theta x and x2 = T_2theta x; the regulariser needs both)."""
    n_pairs = sum(o.mu.shape[0] for o in outs)
    rec = sum(recon_loss(o.logits, t, recon).sum() for o, t in zip(outs, targets)) / n_pairs
    kl = sum(gaussian_kl(o.mu, o.logvar, o.mu_p, o.logvar_p).sum() for o in outs) / n_pairs
    reg = linear_cost_reg(outs[0].mu, outs[1].mu, outs[0].mu_p).sum() / n_pairs if len(outs) == 2 \
        else rec.new_zeros(())
    return LossTerms(rec, kl, reg, rec + beta * kl + reg_weight * reg)


# --------------------------------------------------------------------------- data
def build_pairs(cfg: Config, train_images: Optional[Tensor] = None,
                test_images: Optional[Tensor] = None) -> Dict[str, PairData]:
    """{"train", "test"} pairs for ``cfg.cvae``: bundles of a transformation family applied to
    the given images, or the user's two aligned folders (split 80/20 with a fixed seed).
    Without ``test_images`` the family's bundles are split 90/10 the same way."""
    c = cfg.cvae
    if c.family == "folders":
        return split_pairs(read_pair_folders(c.pairs_x, c.pairs_x_prime, cfg.data.image_size, cfg.data.channels))
    if train_images is None:
        raise ValueError(f"cvae.family={c.family} needs the dataset's training images")
    gen = torch.Generator().manual_seed(PAIRS_SEED)
    train = make_bundles(train_images, c.family, c.max_param, gen)
    if test_images is None:
        return split_pairs(train, test_fraction=0.1)
    return {"train": train, "test": make_bundles(test_images, c.family, c.max_param, gen)}


def _batch_loss(model: CVAE, p: PairData, c, sample: bool = True) -> LossTerms:
    if p.bundles:  # one forward over both pairs of every bundle: (2B, ...)
        out = model(torch.cat([p.x, p.x]), torch.cat([p.x1, p.x2]), sample=sample)
        b = len(p)
        halves = [CvaeOutput(*(t[s] for t in (out.logits, out.mu, out.logvar, out.mu_p, out.logvar_p)))
                  for s in (slice(0, b), slice(b, 2 * b))]
        return cvae_loss(halves, [p.x1, p.x2], beta=c.beta, reg_weight=c.reg_weight, recon=c.recon)
    return cvae_loss([model(p.x, p.x1, sample=sample)], [p.x1], beta=c.beta, reg_weight=c.reg_weight, recon=c.recon)


# --------------------------------------------------------------------------- train / measure
def model_kwargs(cfg: Config) -> Dict[str, int]:
    return dict(image_size=cfg.data.image_size, channels=cfg.data.channels,
                latent_dim=cfg.cvae.latent_dim, hidden=cfg.cvae.hidden)


def train(cfg: Config, pairs: PairData, device: torch.device, report: Reporter = null_reporter,
          model: Optional[CVAE] = None) -> Tuple[CVAE, List[Dict[str, float]]]:
    """Adam over shuffled batches of pairs for ``cvae.epochs``; returns the model and the
    per-epoch mean training terms."""
    c = cfg.cvae
    if len(pairs) < c.batch_size:
        raise ValueError(f"only {len(pairs)} training pairs, fewer than cvae.batch_size={c.batch_size}")
    torch.manual_seed(cfg.seed)
    model = (model or create_cvae(c.arch, **model_kwargs(cfg))).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: List[Dict[str, float]] = []
    t0 = time.time()
    for epoch in range(1, c.epochs + 1):
        perm, sums, n = torch.randperm(len(pairs), generator=gen), {}, 0
        for i in range(0, len(perm) - c.batch_size + 1, c.batch_size):
            terms = _batch_loss(model, _to(pairs.subset(perm[i:i + c.batch_size]), device), c)
            if not math.isfinite(float(terms.total.detach())):
                raise FloatingPointError(f"CVAE loss became {float(terms.total)} in epoch {epoch}; lower cvae.lr")
            opt.zero_grad(set_to_none=True)
            terms.total.backward()
            opt.step()
            for k, v in terms.floats().items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        m = {"epoch": epoch, **{f"train_{k}": v / max(1, n) for k, v in sums.items()},
             "cvae_seconds": time.time() - t0}
        history.append(m)
        report(m)
        log.info("cvae epoch %d/%d %s", epoch, c.epochs, " ".join(f"{k}={v:.4g}" for k, v in m.items() if k != "epoch"))
    return model.eval(), history


def _to(p: PairData, device: torch.device) -> PairData:
    mv = (lambda t: None if t is None else t.to(device))  # noqa: E731
    return PairData(p.x.to(device), p.x1.to(device), mv(p.x2), mv(p.theta))


@torch.no_grad()
def evaluate_loss(cfg: Config, model: CVAE, pairs: PairData, batch_size: int = 512) -> Dict[str, float]:
    """The loss terms on ``pairs`` (z sampled as in training, seeded): recon, kl, reg, the
    paper's "KL (+ linear cost)" column ``kl_reg`` = beta kl + w reg, and total."""
    dev = next(model.parameters()).device
    sums: Dict[str, float] = {}
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # seeded z, caller's RNG untouched
        torch.manual_seed(cfg.seed)
        for i in range(0, len(pairs), batch_size):
            part = pairs.subset(slice(i, i + batch_size))
            for k, v in _batch_loss(model, _to(part, dev), cfg.cvae).floats().items():
                sums[k] = sums.get(k, 0.0) + v * len(part)
    out = {k: v / max(1, len(pairs)) for k, v in sums.items()}
    out["kl_reg"] = cfg.cvae.beta * out["kl"] + cfg.cvae.reg_weight * out["reg"]
    return out


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).flatten(1).mean(1)  # per example, per pixel


@torch.no_grad()
def closure_metrics(model: CVAE, pairs: PairData, batch_size: int = 512) -> Dict[str, float]:
    """Paper 001 Sec. 2's properties on held-out pairs, as mean per-pixel squared errors, with
    every code the recognition mean P(a, b):

    * ``closure_mse``: Q(x, P(x, y)) vs y (y = x1);
    * ``identity_mse``: x vs y - what "no perturbation" scores, the scale to read the others by;
    and with bundles (z = x2 = T_2theta x = T_theta y):
    * ``closure2_mse``: Q(x, P(x, z)) vs z;
    * ``composition_mse``: Q(Q(x, P(x, y)), P(y, z)) vs Q(x, P(x, z))  (x -> y -> z = x -> z);
    * ``composition_gt_mse``: the same two-step image vs the true z;
    * ``linear_mse``: Q(Q(x, P(x, y)), P(x, y)) vs Q(x, P(x, z))  (theta/2 + theta/2 = theta);
    * ``linear_gap``: mean |2 (mu1 - mu_p) - (mu2 - mu_p)| (the regulariser, unweighted);
    * ``code_ratio``: median over bundles of the projection (mu2 - mu_p).(mu1 - mu_p) / |mu1 - mu_p|^2
      (2 for a linear code of theta; per image, so it holds even where the latent's orientation
      differs between images);
    * ``theta_corr``: Pearson correlation of theta with mu1 - mu_p across images (latent_dim 1
      only; a conditional model may orient its latent differently per image, which lowers it).
    """
    dev = next(model.parameters()).device
    sums: Dict[str, float] = {}
    deltas: List[Tensor] = []
    ratios: List[Tensor] = []

    def add(k: str, v: Tensor) -> None:
        sums[k] = sums.get(k, 0.0) + float(v.sum())

    for i in range(0, len(pairs), batch_size):
        p = _to(pairs.subset(slice(i, i + batch_size)), dev)
        x, y = p.x, p.x1
        mu_xy, _ = model.posterior(x, y)
        y_hat = model.decode(x, mu_xy)
        add("closure_mse", _mse(y_hat, y))
        add("identity_mse", _mse(x, y))
        if p.x2 is None:
            continue
        z = p.x2
        mu_xz, _ = model.posterior(x, z)
        mu_yz, _ = model.posterior(y, z)
        mu_p, _ = model.prior(x)
        z_hat = model.decode(x, mu_xz)
        two_step = model.decode(y_hat, mu_yz)
        add("closure2_mse", _mse(z_hat, z))
        add("composition_mse", _mse(two_step, z_hat))
        add("composition_gt_mse", _mse(two_step, z))
        add("linear_mse", _mse(model.decode(y_hat, mu_xy), z_hat))
        add("linear_gap", linear_cost_reg(mu_xy, mu_xz, mu_p))
        d1, d2 = mu_xy - mu_p, mu_xz - mu_p
        ratios.append(((d2 * d1).sum(1) / d1.pow(2).sum(1).clamp_min(1e-12)).cpu())
        if mu_xy.shape[1] == 1 and p.theta is not None:
            deltas.append(torch.stack([p.theta.float(), (mu_xy - mu_p)[:, 0]], 1).cpu())
    out = {k: v / max(1, len(pairs)) for k, v in sums.items()}
    if ratios:
        out["code_ratio"] = float(torch.cat(ratios).median())
    if deltas:
        d = torch.cat(deltas)
        out["theta_corr"] = float(torch.corrcoef(d.T)[0, 1])
    return out


@torch.no_grad()
def save_sweep(model: CVAE, pairs: PairData, path: Path, n: int, prior: bool = False) -> Path:
    """Paper 001 Figs. 2-3: per held-out example, x, its target x1, then Q(x, z) for 11 codes
    z = mu + (i - 5) sigma / 5, i = 0..10, with (mu, sigma) from the recognition network on
    (x, x1) (``prior=False``, the paper's sweep) or from the prior p(z | x) (``prior=True``:
    the perturbation set along its first latent axis)."""
    dev = next(model.parameters()).device
    p = _to(pairs.subset(slice(0, n)), dev)
    mu, logvar = model.prior(p.x) if prior else model.posterior(p.x, p.x1)
    std = torch.exp(0.5 * logvar)
    steps = torch.linspace(-1.0, 1.0, SWEEP_STEPS, device=dev)  # (i - 5) / 5
    rows = []
    for j in range(len(p)):
        codes = mu[j] + steps[:, None] * std[j]  # (11, k): every latent dim moves together
        xs = p.x[j:j + 1].expand(SWEEP_STEPS, -1, -1, -1)
        rows.append(torch.cat([p.x[j:j + 1], p.x1[j:j + 1], model.decode(xs, codes)]).cpu())
    return save_rows(rows, path)


# --------------------------------------------------------------------------- checkpoints
def save_cvae(path: Path, model: CVAE, cfg: Config, extra: Optional[Dict] = None) -> Path:
    return save_checkpoint(path, model, kind="cvae", name=cfg.cvae.arch, kwargs=model_kwargs(cfg),
                           config=cfg.to_dict(), extra=extra)


def load_cvae(path: str | Path, cfg: Optional[Config] = None) -> CVAE:
    """Rebuild a CVAE from its checkpoint alone; with ``cfg`` also check the image shape."""
    model, ckpt = load_module(path, kind="cvae", factory=CVAES.create)
    kw = ckpt["kwargs"]
    if cfg is not None and (kw.get("image_size"), kw.get("channels")) != (cfg.data.image_size, cfg.data.channels):
        raise ValueError(f"CVAE {path} was trained on {kw.get('channels')}x{kw.get('image_size')} px images but the "
                         f"data is {cfg.data.channels}x{cfg.data.image_size} px; retrain it or fix data.image_size")
    return model.eval().requires_grad_(False)  # type: ignore[return-value]


# --------------------------------------------------------------------------- the stage
@dataclass
class CvaeArtifacts:
    model_path: Path
    losses: Dict[str, Dict[str, float]]  # split -> loss terms (paper 001's table)
    closure: Dict[str, float]  # held-out closure metrics
    sweeps: List[Path] = field(default_factory=list)
    history: List[Dict[str, float]] = field(default_factory=list)

    @property
    def metrics(self) -> Dict[str, float]:
        """Flat numbers for a cache manifest / tracker."""
        out = {f"cvae_{s}_{k}": v for s, d in self.losses.items() for k, v in d.items()}
        out.update({f"cvae_{k}": v for k, v in self.closure.items()})
        if self.history:
            out["cvae_seconds"] = self.history[-1]["cvae_seconds"]
        return out


def run(cfg: Config, data: Dict[str, PairData], out_dir: str | Path, report: Reporter = null_reporter,
        device: Optional[torch.device] = None) -> CvaeArtifacts:
    """Train the CVAE on ``data["train"]``, measure losses on train and ``data["test"]`` and
    closure on test, save ``cvae.pt`` and the sweep PNGs in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or torch.device("cpu")
    model, history = train(cfg, data["train"], device, report)
    losses = {s: evaluate_loss(cfg, model, data[s]) for s in ("train", "test") if len(data.get(s, ())) > 0}
    closure = closure_metrics(model, data["test"]) if len(data.get("test", ())) > 0 else {}
    sweeps: List[Path] = []
    n = min(cfg.cvae.sweep_images, len(data.get("test", ())))
    if n:
        sweeps = [save_sweep(model, data["test"], out_dir / "sweep_posterior.png", n),
                  save_sweep(model, data["test"], out_dir / "sweep_prior.png", n, prior=True)]
    path = save_cvae(out_dir / "cvae.pt", model, cfg, extra={"losses": losses, "closure": closure})
    log.info("cvae held-out: %s", " ".join(f"{k}={v:.4g}" for k, v in {**losses.get("test", {}), **closure}.items()))
    return CvaeArtifacts(path, losses, closure, sweeps, history)


def loss_table(rows: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """Markdown in the shape of paper 001's table: one row per (model, split)."""
    header = ["model, dataset", "reconstruction loss", "KL divergence (+ linear cost)", "total loss", "KL",
              "linear cost (unweighted)"]
    return markdown_table(header, [[f"{name}, {split}", t["recon"], t["kl_reg"], t["total"], t["kl"], t["reg"]]
                                   for name, losses in rows.items() for split, t in losses.items()], _cell)


def closure_table(rows: Dict[str, Dict[str, float]]) -> str:
    """Markdown: one row per model, the held-out closure metrics as columns."""
    keys = [k for k in ("identity_mse", "closure_mse", "closure2_mse", "composition_mse", "composition_gt_mse",
                        "linear_mse", "linear_gap", "code_ratio", "theta_corr") if any(k in r for r in rows.values())]
    return markdown_table(["model", *keys], [[name, *(r.get(k) for k in keys)] for name, r in rows.items()], _cell)


def _cell(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))
