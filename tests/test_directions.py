"""ADMR directing (stages/directions.py): estimators on synthetic data with planted structure,
Eq. 11 on an exactly linear "generator", layer-limited edits, grids and the stage end to end."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from natra_ray.checkpoints import save_checkpoint
from natra_ray.config import load_config
from natra_ray.models import Generator, create_generator, to_unit
from natra_ray.models.latent import Directions
from natra_ray.registry import UnknownNameError
from natra_ray.stages import directions as dr


def assert_orthonormal(v: torch.Tensor, atol: float = 1e-6) -> None:
    v = v.double()
    torch.testing.assert_close(v @ v.T, torch.eye(v.shape[0], dtype=v.dtype), atol=atol, rtol=0)


def random_rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T  # rows orthonormal


def anisotropic(n: int, stds: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian with std ``stds[i]`` along row i of a random rotation R -> (samples (n, D), R)."""
    r = random_rotation(len(stds), seed)
    z = torch.randn(n, len(stds), generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return z * torch.tensor(stds, dtype=torch.float64) @ r + 3.0, r  # + 3: estimators must centre


def test_registry_lists_both_estimators_and_rejects_unknown():
    assert dr.ESTIMATORS.names() == ["pca", "umap"]
    with pytest.raises(UnknownNameError, match="known names are: pca, umap"):
        dr.ESTIMATORS.get("ica")


@pytest.mark.parametrize("randomized", [False, True])
def test_pca_is_orthonormal_sorted_and_recovers_planted_direction(monkeypatch, randomized):
    if randomized:  # force the pca_lowrank path used for large activation spaces
        monkeypatch.setattr(dr, "EXACT_SVD_MAX", 4)
    x, r = anisotropic(2000, [6.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], seed=0)
    basis, coords = dr.ESTIMATORS.get("pca")(x, 3, seed=0)
    assert basis.shape == (3, 10) and coords.shape == (2000, 3)
    assert_orthonormal(basis)
    assert abs(float(basis[0] @ r[0])) > 0.99  # the dominant (std 6) axis
    assert abs(float(basis[1] @ r[1])) > 0.98
    var = coords.var(0)
    assert torch.all(var[:-1] >= var[1:])
    torch.testing.assert_close(coords, (x - x.mean(0)) @ basis.T)
    ev = dr.explained_variance(coords, x)
    assert 0.75 < float(ev.sum()) <= 1.0 and float(ev[0]) > 0.6


def test_estimators_reject_too_many_directions():
    with pytest.raises(ValueError, match="cannot estimate 5 directions"):
        dr.ESTIMATORS.get("pca")(torch.randn(100, 4), 5, seed=0)


def test_umap_linear_step_recovers_a_linear_embedding_in_variance_order():
    """When the 'embedding' is an exact linear projection, the regression step must give back
    the projection axes, reordered by data variance (no UMAP needed to test the linear half)."""
    x, r = anisotropic(4000, [3.0, 2.0, 1.5, 0.5, 0.5, 0.5], seed=1)
    emb = (x - x.mean(0)) @ r[[2, 0, 1]].T * torch.tensor([5.0, -1.0, 0.1], dtype=x.dtype)  # permuted, rescaled
    basis, coords = dr.directions_from_embedding(x, emb)
    assert_orthonormal(basis)
    cos = (basis @ r[:3].T).abs()
    assert torch.all(torch.diagonal(cos) > 0.98), cos  # back in order of variance: axes 0, 1, 2
    torch.testing.assert_close(coords, (x - x.mean(0)) @ basis.T)


def test_umap_basis_is_orthonormal_deterministic_and_finds_cluster_axis():
    g = torch.Generator().manual_seed(3)
    u = torch.nn.functional.normalize(torch.randn(8, generator=g, dtype=torch.float64), dim=0)
    side = torch.randint(0, 2, (300, 1), generator=g).double() * 2 - 1
    x = torch.randn(300, 8, generator=g, dtype=torch.float64) + 5.0 * side * u  # two clusters along u
    basis, coords = dr.ESTIMATORS.get("umap")(x, 3, seed=0, n_neighbors=10)
    assert basis.shape == (3, 8)
    assert_orthonormal(basis)
    torch.testing.assert_close(coords, (x - x.mean(0)) @ basis.T)
    assert abs(float(basis[0] @ u)) > 0.9  # the cluster axis dominates the embedding
    again, _ = dr.ESTIMATORS.get("umap")(x, 3, seed=0, n_neighbors=10)
    torch.testing.assert_close(again, basis)


def test_exact_knn_matches_brute_force():
    x = torch.randn(50, 5) + 10.0  # offset: float32 matmul-form distances would cancel here
    idx, dist = dr.exact_knn(x, 4, chunk=16)
    full = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist").float()
    assert torch.equal(idx[:, 0], torch.arange(50)) and torch.all(dist[:, 0] == 0)
    torch.testing.assert_close(dist.float(), full.sort(dim=1).values[:, :4], atol=1e-5, rtol=0)
    assert torch.equal(idx, full.argsort(dim=1)[:, :4])


# --------------------------------------------------------------------------- Eq. 11
def test_eq11_regression_recovers_known_latent_map():
    """w_j = mean + U^T b_j (+ tiny noise) -> regress_directions(w, b) = U."""
    g = torch.Generator().manual_seed(4)
    b = torch.randn(3000, 3, generator=g, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 2.0]], dtype=torch.float64)  # correlated coords
    u_true = torch.randn(3, 7, generator=g, dtype=torch.float64)
    w = 1.5 + b @ u_true + 1e-3 * torch.randn(3000, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(dr.regress_directions(w, b), u_true, atol=1e-3, rtol=0)


def test_eq11_directions_move_only_their_own_activation_coordinate():
    """activations = w A (known, non-orthogonal A, anisotropic w): each Eq. 11 direction moves its
    own PCA coordinate by exactly 1 and leaves the others alone (U (A V^T) = I)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(2000, 6, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2, 1, 1, 0.5, 0.2], dtype=torch.float64)
    a = torch.randn(6, 20, generator=g, dtype=torch.float64)
    act = w @ a
    v, coords = dr.ESTIMATORS.get("pca")(act, 4, seed=0)
    u = dr.regress_directions(w, coords)  # (4, 6)
    torch.testing.assert_close(u @ a @ v.T, torch.eye(4, dtype=torch.float64), atol=1e-8, rtol=0)


class LinearGenerator(Generator):
    """A 'generator' whose layer-0 activations are exactly w A (reshaped to (C, H, W))."""

    def __init__(self, a: torch.Tensor, w_std: torch.Tensor) -> None:
        super().__init__()
        self.z_dim = self.w_dim = a.shape[0]
        self.num_layers, self.num_ws = 1, 2
        self.register_buffer("w_avg", torch.zeros(self.w_dim))
        self.register_buffer("a", a.float())
        self.register_buffer("w_std", w_std.float())

    def mapping(self, z, truncation_psi=1.0):
        return z * self.w_std  # an anisotropic W

    def activations(self, ws, layers):
        w = ws[:, 0] if ws.dim() == 3 else ws
        return {0: (w @ self.a).view(-1, 3, 2, 2)}


def test_estimate_in_activation_space_recovers_the_planted_latent_axes():
    # Orthogonal rows of A with decreasing norms: activation PCA axis i is A's row i, whose
    # preimage in w is the coordinate axis e_i; so Eq. 11 must return e_0, e_1, e_2 in order.
    rows = random_rotation(12, seed=6)[:4] * torch.tensor([[4.0], [2.0], [1.0], [0.5]], dtype=torch.float64)
    w_std = torch.tensor([1.0, 1.2, 0.8, 1.0])
    G = LinearGenerator(rows, w_std)
    cfg = load_config("smoke", overrides={"directions.space": "activation", "directions.estimator": "pca",
                                          "directions.activation_layer": 0, "directions.num_samples": 3000,
                                          "directions.num_directions": 3, "robust.num_directions": 3})
    dirs = dr.estimate(cfg, G, seed=0)
    assert dirs.meta["orthonormal"] is False and dirs.meta["layer"] == 0
    assert dirs.meta["activation_dim"] == 12
    cos = dirs.vectors.abs()[:, :3]
    assert torch.all(torch.diagonal(cos) > 0.99), dirs.vectors
    torch.testing.assert_close(dirs.vectors.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(dirs.scales, w_std[:3], atol=0.06, rtol=0)  # std of w along e_i
    assert dirs.meta["coords_linear_r2"] > 0.999  # the map is exactly linear
    with pytest.raises(ValueError, match="activation_layer=3 is out of range"):
        dr.estimate(cfg.replace(**{"directions.activation_layer": 3}), G, seed=0)


# --------------------------------------------------------------------------- edits and grids
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    G = create_generator("style_tiny").eval().requires_grad_(False)
    cfg = load_config("smoke", overrides={"directions.estimator": "pca", "directions.num_samples": 256,
                                          "directions.num_directions": 3, "robust.num_directions": 3})
    return G, cfg, dr.estimate(cfg, G, seed=0)


def test_w_space_directions_are_orthonormal_with_data_scales(tiny):
    G, cfg, dirs = tiny
    assert dirs.vectors.shape == (3, G.w_dim) and dirs.meta["orthonormal"] is True
    assert_orthonormal(dirs.vectors, atol=1e-5)
    w = dr.sample_latents(G, 256, seed=0)
    torch.testing.assert_close(dirs.scales, ((w - w.mean(0)) @ dirs.vectors.T).std(0), atol=1e-5, rtol=1e-4)
    assert dirs.meta["config"]["num_directions"] == 3 and len(dirs.meta["explained_variance"]) == 3


def test_layer_limited_edit_touches_only_its_style_inputs(tiny):
    G, _, dirs = tiny
    ws = G.broadcast(dr.sample_latents(G, 4, seed=9))  # (4, num_ws, w_dim)
    coeffs = torch.tensor([[0.0, 2.0]] * 4)
    edited = dirs.edit(ws, coeffs, 2, 4)
    diff = (edited - ws).abs().amax(dim=(0, 2))  # (num_ws,)
    assert torch.all(diff[2:5] > 1e-3) and torch.all(diff[:2] == 0) and torch.all(diff[5:] == 0)
    assert (G.synthesis(edited) - G.synthesis(ws)).abs().max() > 1e-3
    torch.testing.assert_close(G.synthesis(dirs.edit(ws, torch.zeros(4, 2), 2, 4)), G.synthesis(ws))
    for start, end in [(3, 2), (0, G.num_ws), (-1, 2)]:
        with pytest.raises(ValueError, match="invalid"):
            dirs.edit(ws, coeffs, start, end)
    with pytest.raises(ValueError, match="invalid"):
        dr.direction_grids(G, dirs, ws, [1.0], 0, G.num_ws + 3, "unused")


def test_grid_rows_are_images_and_columns_are_strengths(tiny, tmp_path):
    G, _, dirs = tiny
    ws = dr.sample_latents(G, 2, seed=11)
    paths = dr.direction_grids(G, dirs, ws, [-2.0, 0.0, 2.0], 0, -1, tmp_path)
    assert [p.name for p in paths] == [f"direction_{i:02d}_layers_0-{G.num_ws - 1}.png" for i in range(3)]
    arr = np.asarray(Image.open(paths[1]))
    up, pad, h = 2, 2, G.resolution
    assert arr.shape == (up * (2 * (h + pad) + pad), up * (3 * (h + pad) + pad))
    plain = (to_unit(G.synthesis(ws)) * 255).round().to(torch.uint8)[:, 0]  # (2, H, W)

    def cell(r: int, c: int) -> np.ndarray:
        y, x = up * (pad + r * (h + pad)), up * (pad + c * (h + pad))
        return arr[y:y + up * h:up, x:x + up * h:up]

    for r in range(2):
        assert np.abs(cell(r, 1).astype(int) - plain[r].numpy()).max() <= 1  # strength 0 = unedited
        assert np.abs(cell(r, 0).astype(int) - plain[r].numpy()).max() > 1


def test_directions_save_load_round_trip(tiny, tmp_path):
    _, _, dirs = tiny
    back = Directions.load(dirs.save(tmp_path / "d.pt"))
    assert torch.equal(back.vectors, dirs.vectors) and torch.equal(back.scales, dirs.scales)
    assert back.estimator == "pca" and back.meta["space"] == "w"
    assert back.meta["explained_variance"] == dirs.meta["explained_variance"]
    assert back.meta["config"]["grid_strengths"] == list(dirs.meta["config"]["grid_strengths"])


def test_run_writes_directions_and_one_grid_per_direction(tiny, tmp_path):
    G, cfg, _ = tiny
    gen_path = save_checkpoint(tmp_path / "generator.pt", G, kind="generator", name="style_tiny",
                               kwargs={"resolution": 32, "img_channels": 1})
    cfg = cfg.replace(**{"directions.grid_images": 2, "directions.grid_strengths": [-1.0, 0.0, 1.0, 2.0],
                         "directions.layer_start": 1, "directions.layer_end": 3})
    seen = []
    art = dr.run(cfg, gen_path, tmp_path / "out", report=seen.append)
    assert art.path == tmp_path / "out" / "directions.pt" and len(Directions.load(art.path)) == 3
    assert len(art.grid_paths) == 3 and all("layers_1-3" in p.name for p in art.grid_paths)
    size = (2 * (4 * 34 + 2), 2 * (2 * 34 + 2))  # PIL (width, height): 4 strengths x 2 images
    assert all(Image.open(p).size == size for p in art.grid_paths)
    assert seen == [art.metrics] and art.metrics["directions_seconds"] > 0
    assert 0 < art.metrics["directions_explained_variance"] <= 1 + 1e-6
    # real images' codes: the first grid_images of them become the rows
    art2 = dr.run(cfg, gen_path, tmp_path / "out2", inversion_ws=G.broadcast(dr.sample_latents(G, 5, 1)))
    assert all(Image.open(p).size == size for p in art2.grid_paths)
    assert math.isclose(art2.metrics["directions_explained_variance"], art.metrics["directions_explained_variance"])
