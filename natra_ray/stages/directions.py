"""ADMR directing (NaTra Sec. 3.4.1): an unsupervised basis of latent directions, plus the
D(u_i, a-b) preview grids of Sec. 3.4.2 / Figure 2. No Ray, no MLflow.

Two spaces (``directions.space``):

- ``"w"`` (StyleGAN in the paper): sample K codes z, map them to w = M(z), reduce the K x w_dim
  matrix to ``num_directions`` orthonormal directions with the chosen estimator.
- ``"activation"`` (the paper's BigGAN / GANSpace procedure): sample K codes, take the feature map
  after layer ``activation_layer`` (``G.activations``), estimate a basis V with coordinates
  b_j = V (o_j - mu) in activation space, then transfer it to w by the linear regression of
  Eq. 11, U = argmin_U sum_j ||U b_j - w_j||^2. Feature maps are flattened whole, as GANSpace
  does (spatial layout carries pose/position); ``spatial_mean=True`` averages over H, W instead
  (C dims, far cheaper at large K, but blind to where things are).

Estimators (``ESTIMATORS``) share one signature, ``(samples (K, D), num_directions, seed,
**options) -> (basis (k, D) orthonormal rows, coords (K, k) = centred samples projected on
them)``:

- ``pca``: GANSpace's principal components, sorted by variance.
- ``umap``: UMAP gives a nonlinear embedding, not a basis. Our reading of "UMAP ... resulting in a
  low-rank basis V": embed the K samples in k dims, then regress the centred samples on the
  centred embedding coordinates (least squares, the regression idea of Eq. 11): row i of the
  solution is the mean displacement in sample space per unit of UMAP coordinate i. Rows are
  sorted by the data variance along them and orthonormalised in that order (QR = Gram-Schmidt),
  so direction 1 is exactly the regressed direction of the most spread-out component and each
  later one is its part orthogonal to the earlier ones. The linear step is
  ``directions_from_embedding`` and is tested without UMAP.

Every ``Directions`` gets ``scales`` = std of the sampled w projected on each unit row, so an edit
strength of 1 means one standard deviation of the latent data, whatever the estimator or space.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from natra_ray.config import Config, DirectionsConfig
from natra_ray.models import Generator, to_unit
from natra_ray.models.latent import Directions, resolve_layer_range
from natra_ray.registry import Registry
from natra_ray.runtime import Reporter, null_reporter, resolve_device
from natra_ray.stages.gan import load_generator
from natra_ray.viz import save_rows

log = logging.getLogger(__name__)

Basis = Tuple[torch.Tensor, torch.Tensor]  # (basis (k, D) orthonormal rows, coords (K, k))
ESTIMATORS: Registry[Basis] = Registry("direction estimator")

EXACT_SVD_MAX = 512  # min(K, D) up to which PCA uses a full SVD; above, randomized (pca_lowrank)
EXACT_KNN_MAX = 20000  # samples up to which the umap estimator computes exact neighbours
BATCH = 512  # generator forward passes per batch while sampling


# --------------------------------------------------------------------------- linear algebra
def _check_rank(samples: torch.Tensor, k: int) -> None:
    if samples.dim() != 2:
        raise ValueError(f"samples must be (K, D); got shape {tuple(samples.shape)}")
    n, d = samples.shape
    if not 1 <= k <= min(n - 1, d):
        raise ValueError(f"cannot estimate {k} directions from {n} samples of dimension {d} "
                         f"(need 1 <= num_directions <= min(K - 1, D) = {min(n - 1, d)})")


def _canonical_signs(basis: torch.Tensor) -> torch.Tensor:
    """Flip rows so each one's largest-magnitude entry is positive: same basis on every run."""
    idx = basis.abs().argmax(dim=1, keepdim=True)
    return torch.where(basis.gather(1, idx) < 0, -basis, basis)


def orthonormalise(rows: torch.Tensor) -> torch.Tensor:
    """(k, D) linearly independent rows -> orthonormal rows spanning the same nested subspaces
    (Gram-Schmidt in order, via QR); row i keeps a positive dot product with input row i."""
    q, r = torch.linalg.qr(rows.T)  # rows.T = Q R, Q (D, k)
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1
    return (q * sign).T.contiguous()


def regress_directions(targets: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Eq. 11: U = argmin_U sum_j ||U b_j - t_j||^2 over centred targets t_j (K, D) and centred
    coordinates b_j (K, k); returns the rows u_i (k, D) (the columns of the paper's U).

    u_i is the mean change of t per unit change of coordinate i with the other coordinates
    held fixed, so when t is linear in b, moving t by u_i moves b_i by exactly one and leaves the
    other coordinates alone ("each column of U aligns with the variation along the corresponding
    column of V", Sec. 3.4.1). The reverse regression (b from w) would give the gradients of the
    coordinates instead, which move the other coordinates too unless w is white."""
    t = (targets - targets.mean(0)).double()
    b = (coords - coords.mean(0)).double()
    return torch.linalg.lstsq(b, t).solution.to(targets.dtype)  # (k, D)


def explained_variance(coords: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Variance of each coordinate over the total variance of the samples (k,)."""
    total = samples.double().var(dim=0).sum().clamp_min(1e-30)
    return (coords.double().var(dim=0) / total).to(coords.dtype)


def r2_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of the (summed) variance of ``target`` (K, m) that ``pred`` explains."""
    t = target.double()
    res = (t - pred.double()).pow(2).sum()
    tot = (t - t.mean(0)).pow(2).sum().clamp_min(1e-30)
    return float(1 - res / tot)


# --------------------------------------------------------------------------- estimators
@ESTIMATORS.register("pca")
def pca(samples: torch.Tensor, num_directions: int, seed: int) -> Basis:
    """Principal components of ``samples`` (K, D) -> (basis (k, D), coords (K, k)), rows sorted
    by decreasing variance. Full SVD when small, randomized (``torch.pca_lowrank``) otherwise."""
    _check_rank(samples, num_directions)
    x = samples - samples.mean(0)  # (K, D)
    if min(x.shape) <= EXACT_SVD_MAX:
        _, _, vh = torch.linalg.svd(x, full_matrices=False)  # vh (min(K, D), D), sorted
        basis = vh[:num_directions]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            q = min(num_directions + 10, *x.shape)
            _, _, v = torch.pca_lowrank(x, q=q, center=False, niter=4)  # v (D, q), sorted
        basis = v[:, :num_directions].T
    basis = _canonical_signs(basis.contiguous())
    return basis, x @ basis.T


def directions_from_embedding(samples: torch.Tensor, embedding: torch.Tensor) -> Basis:
    """The linear half of the ``umap`` estimator: samples (K, D), embedding (K, k) ->
    (basis (k, D) orthonormal, coords (K, k)).

    Regress the samples on the embedding coordinates (Eq. 11's regression), sort the regressed
    directions by the data variance along them, orthonormalise in that order."""
    x = samples - samples.mean(0)
    rows = regress_directions(x, embedding.to(x.dtype))  # (k, D)
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    order = torch.argsort((x @ rows.T).var(dim=0), descending=True)
    basis = orthonormalise(rows[order])
    return basis, x @ basis.T


def exact_knn(samples: torch.Tensor, n_neighbors: int, chunk: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact Euclidean k nearest neighbours (self included, first) -> (indices, distances), both
    (K, n_neighbors). UMAP's own small-data path loops over all pairs in Python (16 of 18 s at
    K=2000); one chunked ``torch.cdist`` does the same in well under a second."""
    x = samples.double()  # float64: the fast matmul form of cdist cancels badly in float32
    idx, dist = [], []
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i:i + chunk], x)  # (chunk, K)
        d[torch.arange(d.shape[0]), torch.arange(i, i + d.shape[0])] = 0.0  # self first, exactly
        v, j = d.topk(n_neighbors, dim=1, largest=False)  # sorted ascending
        idx.append(j)
        dist.append(v)
    return torch.cat(idx), torch.cat(dist)


@ESTIMATORS.register("umap")
def umap_directions(samples: torch.Tensor, num_directions: int, seed: int, n_neighbors: int = 15,
                    n_epochs: int = 200, min_dist: float = 0.1) -> Basis:
    """UMAP embedding of ``samples`` (K, D) in k = num_directions dims, turned into linear
    directions by ``directions_from_embedding`` (see the module docstring for why).

    ``n_epochs=200`` (UMAP's own default is 500 below 10k samples): we only need the coarse
    geometry of the embedding for a linear regression, and it saves a third of the time. Up to
    ``EXACT_KNN_MAX`` samples the neighbour graph is computed exactly here (``exact_knn``); above,
    UMAP's approximate NN-descent takes over."""
    _check_rank(samples, num_directions)
    n = samples.shape[0]
    if n <= num_directions + 1:
        raise ValueError(f"UMAP's spectral init needs more than {num_directions + 1} samples; got {n}")
    import umap  # lazy: importing umap (numba) costs seconds

    n_neighbors = min(n_neighbors, n - 1)
    knn: Tuple[Any, ...] = (None, None, None)
    if n <= EXACT_KNN_MAX:
        i, d = exact_knn(samples, n_neighbors)
        knn = (i.numpy().astype(np.int32), d.numpy().astype(np.float32), None)
    with warnings.catch_warnings():
        # random_state forces single-threaded UMAP (what reproducibility costs); without a
        # search index UMAP cannot ``transform`` new points, which we never do.
        warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*")
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        reducer = umap.UMAP(n_components=num_directions, n_neighbors=n_neighbors, min_dist=min_dist,
                            n_epochs=n_epochs, random_state=seed, precomputed_knn=knn)
        emb = reducer.fit_transform(samples.detach().float().cpu().numpy())  # (K, k)
    return directions_from_embedding(samples, torch.as_tensor(emb, dtype=samples.dtype))


def estimator_options(cfg: DirectionsConfig) -> Dict[str, Any]:
    """The config keys each estimator takes (so estimators can reject unknown options)."""
    return {"n_neighbors": cfg.umap_neighbors} if cfg.estimator == "umap" else {}


# --------------------------------------------------------------------------- sampling
def _device(G: Generator) -> torch.device:
    return G.w_avg.device


@torch.no_grad()
def sample_latents(G: Generator, n: int, seed: int) -> torch.Tensor:
    """n codes w = M(z), z ~ N(0, I) from ``seed`` -> (n, w_dim) on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    out = [G.mapping(G.sample_z(min(BATCH, n - i), gen)).cpu() for i in range(0, n, BATCH)]
    return torch.cat(out)


@torch.no_grad()
def sample_activations(G: Generator, n: int, layer: int, seed: int,
                       spatial_mean: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (w (n, w_dim), activations (n, C*H*W), or (n, C) with ``spatial_mean``) on the CPU;
    the activations are the feature map after layer ``layer`` (``G.activations``)."""
    if not 0 <= layer < G.num_layers:
        raise ValueError(f"directions.activation_layer={layer} is out of range for a generator with "
                         f"{G.num_layers} layers (valid: 0..{G.num_layers - 1})")
    w = sample_latents(G, n, seed)
    acts = []
    for i in range(0, n, BATCH):
        a = G.activations(w[i:i + BATCH].to(_device(G)), [layer])[layer]  # (b, C, H, W)
        acts.append((a.mean(dim=(2, 3)) if spatial_mean else a.flatten(1)).cpu())
    return w, torch.cat(acts)


# --------------------------------------------------------------------------- estimate
def estimate(cfg: Config | DirectionsConfig, G: Generator, seed: int, spatial_mean: bool = False) -> Directions:
    """Sample K = ``num_samples`` latents, estimate ``num_directions`` directions in w.

    ``cfg`` is the whole Config or its ``directions`` section. In w space the rows are
    orthonormal; in activation space they are the unit-normalised Eq. 11 rows, not orthogonal in
    general (``meta["orthonormal"]`` says which)."""
    d = cfg.directions if isinstance(cfg, Config) else cfg
    fit = ESTIMATORS.get(d.estimator)
    t0 = time.time()
    meta: Dict[str, Any] = {"estimator": d.estimator, "space": d.space, "num_samples": d.num_samples,
                            "seed": seed, "config": dataclasses.asdict(d),
                            "scales": "std of the sampled w projected on each unit direction"}
    if d.space == "w":
        w = sample_latents(G, d.num_samples, seed).double()  # (K, w_dim)
        vectors, coords = fit(w, d.num_directions, seed, **estimator_options(d))  # (k, w_dim), (K, k)
        ev = explained_variance(coords, w)
        meta.update(layer=None, orthonormal=True)
    elif d.space == "activation":
        w, act = sample_activations(G, d.num_samples, d.activation_layer, seed, spatial_mean)
        w, act = w.double(), act.double()  # (K, w_dim), (K, D_act)
        basis, coords = fit(act, d.num_directions, seed, **estimator_options(d))  # V (k, D_act), b (K, k)
        ev = explained_variance(coords, act)
        # Eq. 11: transfer V to the latent space, w ~ mean + sum_i b_i u_i.
        u = regress_directions(w, coords)  # (k, w_dim)
        norms = u.norm(dim=1, keepdim=True)
        if bool((norms < 1e-12).any()):
            raise FloatingPointError("an activation-space direction regressed to a zero latent direction")
        vectors = u / norms
        wc = w - w.mean(0)
        # How linear is w -> activation coordinates? (Eq. 11 transfers directions linearly.)
        coef = torch.linalg.lstsq(wc, coords - coords.mean(0)).solution
        meta.update(layer=d.activation_layer, orthonormal=False, activation_dim=act.shape[1],
                    spatial_mean=spatial_mean, coords_linear_r2=r2_score(wc @ coef, coords - coords.mean(0)))
    else:  # config validation makes this unreachable; keep the message for direct callers
        raise ValueError(f"unknown directions.space {d.space!r}; known: 'w', 'activation'")
    scales = ((w - w.mean(0)) @ vectors.T).std(dim=0)  # (k,): strength 1 = one std of the data
    meta.update(explained_variance=[float(v) for v in ev], explained_variance_total=float(ev.sum()),
                seconds=time.time() - t0)
    return Directions(vectors.float().contiguous(), scales.float(), d.estimator, meta)


# --------------------------------------------------------------------------- grids
@torch.no_grad()
def direction_grids(G: Generator, directions: Directions, ws: torch.Tensor, strengths: Sequence[float],
                    start: int, end: int, out_dir: str | Path) -> List[Path]:
    """Figure 2 style previews of D(u_i, start-end): one PNG per direction, one row per image of
    ``ws`` (B, num_ws, w_dim) or (B, w_dim), one column per strength (in units of ``scales``).

    ``end = -1`` means the last style input (config convention)."""
    ws = G.broadcast(ws.to(_device(G)))
    if ws.dim() != 3:
        raise ValueError(f"ws must be (B, num_ws, w_dim) or (B, w_dim); got {tuple(ws.shape)} "
                         f"(for LCE codes pass one code per image)")
    start, end = resolve_layer_range(G, start, end)
    out_dir = Path(out_dir)
    b = ws.shape[0]
    s = torch.as_tensor(list(strengths), dtype=ws.dtype, device=ws.device)  # (S,)
    rep = ws.repeat_interleave(len(s), dim=0)  # (B*S, num_ws, w_dim): image-major, strength-minor
    paths = []
    for i in range(len(directions)):
        coeffs = torch.zeros(rep.shape[0], i + 1, dtype=ws.dtype, device=ws.device)
        coeffs[:, i] = s.repeat(b)
        img = to_unit(G.synthesis(directions.edit(rep, coeffs, start, end)))  # (B*S, C, H, W)
        rows = list(img.view(b, len(s), *img.shape[1:]).cpu())
        paths.append(save_rows(rows, out_dir / f"direction_{i:02d}_layers_{start}-{end}.png"))
    return paths


# --------------------------------------------------------------------------- stage
@dataclass
class DirectionsArtifacts:
    path: Path
    grid_paths: List[Path] = field(default_factory=list)
    metrics: Dict[str, float] = field(default_factory=dict)


def run(cfg: Config, generator_path: str | Path, out_dir: str | Path, report: Reporter = null_reporter,
        inversion_ws: torch.Tensor | None = None) -> DirectionsArtifacts:
    """Estimate directions for the generator at ``generator_path``; write ``directions.pt`` and
    one preview grid per direction (``grids/``) to ``out_dir``.

    Grids use the first ``grid_images`` of ``inversion_ws`` (real images' codes) when given,
    else freshly sampled codes."""
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = cfg.directions
    G = load_generator(generator_path, cfg).to(resolve_device(cfg.device))
    dirs = estimate(cfg, G, cfg.seed)
    path = dirs.save(out_dir / "directions.pt")
    if inversion_ws is not None:
        ws = inversion_ws[:d.grid_images]
    else:  # a seed stream of its own, so the grid images are not the estimation samples
        ws = sample_latents(G, d.grid_images, cfg.seed + 1)
    grids = direction_grids(G, dirs, ws, d.grid_strengths, d.layer_start, d.layer_end, out_dir / "grids")
    ev = dirs.meta["explained_variance"]
    metrics: Dict[str, float] = {"directions_seconds": time.time() - t0,
                                 "directions_estimate_seconds": dirs.meta["seconds"],
                                 "directions_explained_variance": dirs.meta["explained_variance_total"],
                                 **{f"directions_ev_{i}": v for i, v in enumerate(ev)}}
    if "coords_linear_r2" in dirs.meta:
        metrics["directions_coords_linear_r2"] = dirs.meta["coords_linear_r2"]
    report(metrics)
    log.info("directions: %d %s/%s directions, explained variance %.3f (%.1f s)", len(dirs),
             d.estimator, d.space, metrics["directions_explained_variance"], metrics["directions_seconds"])
    return DirectionsArtifacts(path, grids, metrics)
