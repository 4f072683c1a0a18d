"""Losses shared by BIES (NaTra Sec. 3.2) and LCE (Sec. 3.3): a perceptual distance and two
small pure functions.

``Perceptual`` wraps the ``lpips`` package (Zhang et al. 2018). Its linear calibration layers
ship inside the pip package; its *backbone* (AlexNet / VGG-16 / SqueezeNet ImageNet weights)
is normally downloaded by torchvision, which our offline machines cannot do. So the backbone
is always built without weights (torchvision is never asked to download) and then filled from
a local file: ``encoder.lpips_weights`` when set, else the torch hub cache. With no file,
``encoder.lpips_fallback`` decides: ``"random_backbone"`` runs on a randomly initialised
backbone (a loud warning; ``Perceptual.pretrained`` is False so callers log it), ``"error"``
refuses. A random-backbone LPIPS is still a usable feature-space distance for training, but
its values are not comparable with published LPIPS numbers (the random backbone is seeded, so
they are comparable between our own runs).

The paper's Eq. 9 perceptual term is an l1 distance between VGG-16 features; LPIPS (METHOD.md
Sec. 2) is the calibrated version of the same idea.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# torchvision's file names for the ImageNet weights lpips uses (what the hub cache holds).
BACKBONE_FILES: Dict[str, str] = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
BACKBONE_URL = "https://download.pytorch.org/models/{}"
# AlexNet's stride-4 stem and three max-pools need >= 32 px; smaller images (the config
# allows 8 and 16 px generators) are bilinearly upsampled to this side before LPIPS.
LPIPS_MIN_SIZE = 32
RANDOM_BACKBONE_SEED = 0  # the fallback backbone is identical everywhere (see Perceptual)
# Set by a job's driver once it has warned about the random-backbone fallback: the processes it
# starts (trials, Train workers) inherit it and note the fallback at debug level only, so a run
# says it once instead of once per process that builds LPIPS.
FALLBACK_ANNOUNCED_ENV = "NATRA_LPIPS_FALLBACK_ANNOUNCED"


def random_backbone_message(net: str) -> str:
    return (f"LPIPS-{net} is running on a RANDOMLY INITIALISED backbone: no pretrained "
            f"weights found on this machine (no download is attempted). Perceptual values "
            f"are NOT comparable with published LPIPS; they remain a usable training "
            f"distance. {_instructions(net)}")


def announce_random_backbone(enc_cfg: object) -> bool:
    """In a job's driver, before it starts other processes: warn once if this run's LPIPS will
    fall back to a random backbone, and mark the environment so its processes do not repeat it."""
    if getattr(enc_cfg, "gamma2", 0) <= 0 or getattr(enc_cfg, "lpips_fallback", "") != "random_backbone":
        return False
    try:
        if find_backbone_weights(enc_cfg.lpips_net, enc_cfg.lpips_weights) is not None:  # type: ignore[attr-defined]
            return False
    except Exception:  # a bad encoder.lpips_weights path: the stage that builds LPIPS reports it
        return False
    log.warning("!" * 20 + " %s " + "!" * 20, random_backbone_message(enc_cfg.lpips_net))  # type: ignore[attr-defined]
    os.environ[FALLBACK_ANNOUNCED_ENV] = "1"
    return True


class PerceptualWeightsMissing(FileNotFoundError):
    """Pretrained LPIPS backbone weights were required but are not on this machine."""


def hub_checkpoint_dir() -> Path:
    """Where torch hub keeps downloaded weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _instructions(net: str) -> str:
    fname = BACKBONE_FILES[net]
    return (f"To use pretrained LPIPS, copy torchvision's ImageNet weights {fname} (from "
            f"{BACKBONE_URL.format(fname)}, on a machine with internet) into {hub_checkpoint_dir()}/ "
            f"or point encoder.lpips_weights at the file.")


def find_backbone_weights(net: str, weights: str = "") -> Optional[Path]:
    """The local backbone weight file for ``net``, or None. An explicit ``weights`` path that
    does not exist is an error (a typo must not silently fall back to a random backbone)."""
    if net not in BACKBONE_FILES:
        raise ValueError(f"unknown LPIPS net {net!r}; known: {', '.join(BACKBONE_FILES)}")
    if weights:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise PerceptualWeightsMissing(
                f"encoder.lpips_weights={weights!r} does not exist. {_instructions(net)}")
        return p
    p = hub_checkpoint_dir() / BACKBONE_FILES[net]
    return p if p.is_file() else None


def _backbone_state(raw: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                    source: Path) -> Dict[str, torch.Tensor]:
    """Map a torchvision state dict (``features.3.weight``; bare ``3.weight`` also accepted)
    onto lpips' sliced backbone (``slice2.3.weight``: slices keep torchvision's indices)."""
    flat = {}
    for k, v in raw.items():
        if k.startswith("features."):
            flat[k[len("features."):]] = v
        elif k.split(".", 1)[0].isdigit():
            flat[k] = v
    out: Dict[str, torch.Tensor] = {}
    for k, ref in target.items():
        inner = k.split(".", 1)[1]  # "slice2.3.weight" -> "3.weight"
        if inner not in flat:
            raise ValueError(f"{source} has no tensor 'features.{inner}': not torchvision weights "
                             f"of this LPIPS backbone?")
        if tuple(flat[inner].shape) != tuple(ref.shape):
            raise ValueError(f"{source}: 'features.{inner}' has shape {tuple(flat[inner].shape)}, "
                             f"expected {tuple(ref.shape)} (weights of another network?)")
        out[k] = flat[inner]
    return out


class Perceptual(nn.Module):
    """LPIPS distance between [0, 1] images with 1 or 3 channels -> (B,). Frozen; gradients
    flow to the inputs only."""

    def __init__(self, net: str = "alex", weights: str = "",
                 fallback: str = "random_backbone") -> None:
        super().__init__()
        import lpips  # imported here: a slow import only the BIES / LCE stages need

        if fallback not in ("random_backbone", "error"):
            raise ValueError(f"lpips_fallback must be 'random_backbone' or 'error'; got {fallback!r}")
        path = find_backbone_weights(net, weights)
        if path is None and fallback == "error":
            raise PerceptualWeightsMissing(
                f"no pretrained LPIPS backbone weights for net={net!r} on this machine "
                f"(encoder.lpips_fallback='error'). {_instructions(net)} Or set "
                f"encoder.lpips_fallback=random_backbone to run on a random backbone.")
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            # pnet_rand=True -> torchvision builds the backbone with weights=None: it never
            # tries to download. Its "pretrained is deprecated" chatter is silenced here.
            # A fixed seed makes the fallback backbone the same in every process, so random-
            # backbone LPIPS values are at least comparable between our own runs and trials;
            # fork_rng leaves the caller's RNG stream untouched.
            warnings.simplefilter("ignore", UserWarning)
            torch.manual_seed(RANDOM_BACKBONE_SEED)
            self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        self.net_name = net
        self.pretrained = path is not None
        self.weights_path = str(path) if path else ""
        if path is not None:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(raw, dict) and "state_dict" in raw:
                raw = raw["state_dict"]
            state = _backbone_state(raw, self.lpips.net.state_dict(), path)
            self.lpips.net.load_state_dict(state, strict=True)
            log.info("LPIPS-%s: pretrained backbone from %s", net, path)
        elif os.environ.get(FALLBACK_ANNOUNCED_ENV):
            log.debug(random_backbone_message(net))
        else:
            msg = random_backbone_message(net)
            log.warning("!" * 20 + " %s " + "!" * 20, msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_config(cls, enc_cfg: object) -> "Perceptual":
        """Build from an ``EncoderConfig`` (lpips_net, lpips_weights, lpips_fallback)."""
        return cls(enc_cfg.lpips_net, enc_cfg.lpips_weights, enc_cfg.lpips_fallback)  # type: ignore[attr-defined]

    def train(self, mode: bool = True) -> "Perceptual":
        # Always eval: lpips' linear layers carry dropout that must never be on in a metric.
        return super().train(False)

    @staticmethod
    def _prep(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # gray -> RGB
        elif x.shape[1] != 3:
            raise ValueError(f"LPIPS needs 1 or 3 channels; got {x.shape[1]}")
        if min(x.shape[-2:]) < LPIPS_MIN_SIZE:
            x = F.interpolate(x, size=(LPIPS_MIN_SIZE, LPIPS_MIN_SIZE), mode="bilinear", align_corners=False)
        return x * 2 - 1  # lpips expects [-1, 1]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (B, C, H, W) in [0, 1] -> distance (B,)."""
        return self.lpips(self._prep(x), self._prep(y)).flatten()  # (B,)


# --------------------------------------------------------------------------- pure losses
def unit(img: torch.Tensor) -> torch.Tensor:
    """[-1, 1] generator output -> [0, 1] with a straight-through clamp: the value equals
    ``to_unit(img)`` (so a loss equals the reported metric), but the gradient is the identity,
    so an overshooting pixel is still pulled back (a hard clamp would give it zero gradient)."""
    v = (img + 1) * 0.5
    return v + (v.clamp(0, 1) - v).detach()


def latent_loss(w_true: torch.Tensor, w_pred: torch.Tensor) -> torch.Tensor:
    """Eq. 8 on W+: mean squared error between codes (B, num_ws, w_dim) -> scalar.
    (The mean, not the sum, keeps the weight independent of num_ws * w_dim.)"""
    return (w_true - w_pred).pow(2).mean()


def image_loss(x: torch.Tensor, x_rec: torch.Tensor, perceptual: Optional[nn.Module],
               gamma1: float, gamma2: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Eq. 9 / 10: gamma1 * pixel MSE + gamma2 * LPIPS, per example.

    x, x_rec (B, C, H, W) in [0, 1] -> (total (B,), {"mse": (B,), "lpips": (B,)}); the parts
    are detached (for logging). ``perceptual=None`` or ``gamma2 == 0`` skips the LPIPS pass.
    """
    mse = (x - x_rec).pow(2).flatten(1).mean(1)  # (B,)
    total = gamma1 * mse
    parts = {"mse": mse.detach()}
    if perceptual is not None and gamma2 != 0:
        lp = perceptual(x, x_rec)  # (B,)
        total = total + gamma2 * lp
        parts["lpips"] = lp.detach()
    return total, parts


def finite_or_raise(value: float, what: str, hint: str) -> float:
    """Raise FloatingPointError naming the loss and a remedy when ``value`` is nan/inf."""
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} became {value}; {hint}")
    return value

