"""The explorer's model side: load a trained pipeline from its saved files, invert a source image,
apply the layer-wise edit D(u, a-b) of NaTra Sec. 3.4 with one strength per direction, and ask
the classifier about the result (Sec. 3.4.2: the interface that finds "escaped examples").

Everything comes from saved artifacts: the shifted generator, the BIES encoder, the directions
tensor file and the classifier checkpoint (whose stored config gives the data and LCE settings).
Nothing here trains a model; LCE (Sec. 3.3) optimises the codes of the one source image only.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from natra_ray.checkpoints import load_module
from natra_ray.config import Config, from_dict
from natra_ray.explorer.artifacts import PipelineFiles
from natra_ray.models import Generator, create_model, to_unit
from natra_ray.models.latent import Directions, lce_decode
from natra_ray.stages import lce

log = logging.getLogger(__name__)

MAX_UPLOAD_PIXELS = 4096 * 4096  # larger images are refused before decoding (decompression bombs)


class RequestError(ValueError):
    """A request the explorer cannot serve; ``status`` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Prediction:
    label: int
    name: str
    prob: float
    probs: List[float]

    def as_dict(self) -> Dict[str, Any]:
        return {"label": self.label, "name": self.name, "prob": self.prob, "probs": self.probs}


@dataclass
class Source:
    """One inverted source image: x (1, C, H, W) in [0, 1], its LCE codes and reconstruction."""

    image: torch.Tensor
    ws: torch.Tensor  # (1, N, num_ws, w_dim)
    alpha: torch.Tensor  # (1, N, C_l)
    layer: int
    recon: torch.Tensor  # (1, C, H, W) in [0, 1]
    label: Optional[int] = None  # the dataset's label, when it came from the dataset
    meta: Dict[str, Any] = field(default_factory=dict)


def _load(path: Any, kind: str) -> tuple[nn.Module, Dict[str, Any]]:
    return load_module(path, kind=kind, factory=lambda name, **kw: create_model(kind, name, **kw))


def png_bytes(img: torch.Tensor) -> bytes:
    """(C, H, W) or (1, C, H, W) in [0, 1] -> PNG bytes (gray for 1 channel)."""
    img = img.detach().cpu().reshape(-1, *img.shape[-2:]) if img.dim() == 4 else img.detach().cpu()
    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    pil = Image.fromarray(arr[0], "L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def decode_upload(data: bytes, image_size: int, channels: int, pad_28_to_32: bool, invert: bool = False) -> torch.Tensor:
    """Uploaded file bytes -> (1, C, size, size) float in [0, 1], the way the dataset's images are
    made (``data.datasets.to_float_images``): centre-cropped to a square first. Raises
    ``RequestError`` (415) when the bytes are not an image PIL can read."""
    from natra_ray.data.datasets import to_float_images

    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
            if w * h > MAX_UPLOAD_PIXELS:
                raise RequestError(f"the uploaded image is {w}x{h} pixels; the limit is {MAX_UPLOAD_PIXELS} "
                                   f"pixels: scale it down first", 413)
            probe.verify()
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L" if channels == 1 else "RGB")
    except RequestError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise RequestError(f"the upload is not a readable image ({type(e).__name__}); send a PNG, JPEG, GIF "
                           f"or BMP file", 415) from None
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    arr = np.asarray(im.crop((left, top, left + side, top + side)))
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)[None]  # (1, H, W) or (1, C, H, W)
    if invert:
        arr = 255 - arr
    return to_float_images(arr, image_size, channels, pad_28_to_32=pad_28_to_32)


class Explorer:
    """A loaded pipeline. Thread-safe: model calls are serialised by one lock (the page sends
    at most one edit at a time per tab; a second tab simply waits its turn)."""

    def __init__(self, files: PipelineFiles, device: str = "cpu", lce_codes: Optional[int] = None,
                 lce_steps: Optional[int] = None, max_strength: float = 3.0, gallery_size: int = 48,
                 split: str = "test", perceptual: bool = True):
        missing = files.missing()
        if missing:
            raise FileNotFoundError(f"pipeline files missing: {', '.join(missing)}")
        self.files = files
        self.device = torch.device(device)
        self.lock = threading.Lock()
        G, _ = _load(files.generator, "generator")
        self.G: Generator = G.eval().requires_grad_(False).to(self.device)  # type: ignore[assignment]
        E, _ = _load(files.encoder, "encoder")
        if (E.num_ws, E.w_dim) != (self.G.num_ws, self.G.w_dim):
            raise ValueError(f"encoder {files.encoder} predicts W+ of shape ({E.num_ws}, {E.w_dim}) but the "
                             f"generator {files.generator} takes ({self.G.num_ws}, {self.G.w_dim}): not one pipeline")
        self.E = E.eval().requires_grad_(False).to(self.device)
        self.dirs = Directions.load(files.directions)
        if self.dirs.vectors.shape[1] != self.G.w_dim:
            raise ValueError(f"directions {files.directions} live in a {self.dirs.vectors.shape[1]}-d latent space; "
                             f"the generator's w has {self.G.w_dim} dimensions: not one pipeline")
        clf, ckpt = _load(files.classifier, "classifier")
        self.classifier = clf.eval().requires_grad_(False).to(self.device)
        self.cfg: Config = from_dict(ckpt.get("config") or {})
        shape = (self.cfg.data.channels, self.cfg.data.image_size, self.cfg.data.image_size)
        if shape != (self.G.img_channels, self.G.resolution, self.G.resolution):
            raise ValueError(f"the classifier was trained on {shape} images but the generator makes "
                             f"{(self.G.img_channels, self.G.resolution, self.G.resolution)}: not one pipeline")
        self.num_classes = int(ckpt["kwargs"].get("num_classes", 0)) or self._probe_classes()
        self.max_strength = float(max_strength)
        self.codes = lce_codes if lce_codes is not None else self._trial_codes()
        self.lce_steps = self.cfg.encoder.lce_steps if lce_steps is None else int(lce_steps)
        self.perceptual = self._perceptual() if (perceptual and self.codes > 1) else None
        self.noise_scale = lce.LCE_INIT_NOISE * lce.w_spread(self.G) if self.codes > 1 else 0.0
        self.gallery_images, self.gallery_labels, self.class_names, self.gallery_note = self._gallery(split, gallery_size)
        self.default_start, self.default_end = self._default_range()

    # ------------------------------------------------------------------ setup helpers
    def _probe_classes(self) -> int:
        x = torch.zeros(1, self.G.img_channels, self.G.resolution, self.G.resolution, device=self.device)
        with torch.no_grad():
            return int(self.classifier(x).shape[1])

    def _trial_codes(self) -> int:
        """The codes per image the trial's training used: what its method's registry entry asks for."""
        from natra_ray.augment import method_needs  # the registry: imported when a pipeline is opened

        return method_needs(self.cfg.robust.method).lce_codes(self.cfg.encoder.lce_codes)

    def _perceptual(self) -> Optional[nn.Module]:
        from natra_ray.losses import Perceptual, PerceptualWeightsMissing

        try:
            return Perceptual.from_config(self.cfg.encoder).to(self.device)
        except PerceptualWeightsMissing as e:
            log.warning("LCE without the LPIPS term (%s)", e)
            return None

    def _gallery(self, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor, List[str], str]:
        from natra_ray.data import FASHION_MNIST_CLASSES, DatasetError, load_dataset

        names = (list(FASHION_MNIST_CLASSES) if self.cfg.data.dataset == "fashion_mnist"
                 else [f"class {i}" for i in range(self.num_classes)])
        empty = torch.zeros(0, self.G.img_channels, self.G.resolution, self.G.resolution)
        if n <= 0:
            return empty, torch.zeros(0, dtype=torch.long), names, "dataset gallery disabled"
        try:  # seed 0: the same test images the pipeline scored (stages/pipeline.py UPSTREAM_SEED)
            ds = load_dataset(dataclasses.replace(self.cfg.data, download=False), split, seed=0)
        except (DatasetError, OSError, ValueError) as e:
            log.warning("no dataset gallery: %s", str(e).splitlines()[0])
            return empty, torch.zeros(0, dtype=torch.long), names, f"dataset not available: {str(e).splitlines()[0]}"
        if len(ds.class_names) == self.num_classes:
            names = list(ds.class_names)
        return ds.images[:n], ds.labels[:n], names, f"{self.cfg.data.dataset} {split} split"

    def _default_range(self) -> tuple[int, int]:
        """The trial's edit range (robust.layer_start/end), ``-1`` = last style input."""
        start, end = self.cfg.robust.layer_start, self.cfg.robust.layer_end
        end = self.G.num_ws - 1 if end < 0 else end
        if not 0 <= start <= end < self.G.num_ws:
            return 0, self.G.num_ws - 1
        return start, end

    # ------------------------------------------------------------------ info
    def info(self) -> Dict[str, Any]:
        ev = list(self.dirs.meta.get("explained_variance", []))
        dirs = [{"index": i, "estimator": self.dirs.estimator, "space": self.dirs.meta.get("space", "w"),
                 "scale": float(self.dirs.scales[i]),
                 "explained_variance": float(ev[i]) if i < len(ev) else None} for i in range(len(self.dirs))]
        return {"source": self.files.source, "files": {k: str(v) for k, v in self.files.as_dict().items()},
                "generator": {"resolution": self.G.resolution, "channels": self.G.img_channels,
                              "num_ws": self.G.num_ws, "w_dim": self.G.w_dim},
                "directions": dirs, "estimator": self.dirs.estimator,
                "layer_start": self.default_start, "layer_end": self.default_end,
                "max_strength": self.max_strength, "class_names": self.class_names,
                "classifier": {"name": self.cfg.robust.classifier, "method": self.cfg.robust.method},
                "lce": {"codes": self.codes, "layer": self.cfg.encoder.lce_layer, "steps": self.lce_steps,
                        "perceptual": self.perceptual is not None},
                "gallery": {"size": len(self.gallery_images), "note": self.gallery_note}}

    def gallery_item(self, i: int) -> torch.Tensor:
        n = len(self.gallery_images)
        if not 0 <= i < n:
            raise RequestError(f"dataset image {i} does not exist; the gallery has images 0..{n - 1}"
                               if n else "the dataset gallery is empty (dataset not available); upload an image", 404)
        return self.gallery_images[i:i + 1]

    # ------------------------------------------------------------------ model calls
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> Prediction:
        with self.lock:
            probs = torch.softmax(self.classifier(x.to(self.device)).float(), dim=1)[0].cpu()
        k = int(probs.argmax())
        name = self.class_names[k] if k < len(self.class_names) else f"class {k}"
        return Prediction(k, name, float(probs[k]), [round(float(p), 5) for p in probs])

    def encode(self, x: torch.Tensor, label: Optional[int] = None) -> Source:
        """Invert ``x`` (1, C, H, W) in [0, 1]: BIES encoder, then LCE refinement (Sec. 3.3)."""
        layer = self.cfg.encoder.lce_layer if self.codes > 1 else 0  # N = 1: plain G.synthesis
        with self.lock:
            ws, alpha = lce.invert(self.G, self.E, x.to(self.device), self.codes, layer, self.lce_steps,
                                   self.cfg.encoder.lce_lr, self.perceptual, self.cfg.encoder.gamma1,
                                   self.cfg.encoder.gamma2, noise_scale=self.noise_scale, seed=0)
            with torch.no_grad():
                recon = to_unit(lce_decode(self.G, ws, alpha, layer)).cpu()
        return Source(x.cpu(), ws.detach(), alpha.detach(), layer, recon, label)

    def check_edit(self, strengths: Sequence[float], start: int, end: int) -> torch.Tensor:
        """Validate an edit request -> coefficients (1, K); ``RequestError`` names what is wrong."""
        k = len(self.dirs)
        if len(strengths) != k:
            raise RequestError(f"expected {k} strengths (one per direction 0..{k - 1}); got {len(strengths)}")
        vals = torch.tensor([float(s) for s in strengths], dtype=torch.float32)
        if not bool(torch.isfinite(vals).all()):
            raise RequestError("strengths must be finite numbers")
        bad = (vals.abs() > self.max_strength + 1e-6).nonzero().flatten().tolist()
        if bad:
            raise RequestError(f"strength of direction {bad[0]} is {float(vals[bad[0]])}; the limit is "
                               f"+-{self.max_strength} (in units of the data's std along it)")
        if not 0 <= start <= end < self.G.num_ws:
            raise RequestError(f"layer range {start}..{end} is out of range: this generator has "
                               f"{self.G.num_ws} style inputs (use 0 <= start <= end <= {self.G.num_ws - 1})")
        return vals[None]

    @torch.no_grad()
    def edit(self, src: Source, strengths: Sequence[float], start: int, end: int) -> torch.Tensor:
        """D(u, start-end) with coefficients ``strengths`` applied to every LCE code -> (1, C, H, W)."""
        coeffs = self.check_edit(strengths, start, end)
        with self.lock:
            ws = self.dirs.edit(src.ws.to(self.device), coeffs.to(self.device), start, end)
            return to_unit(lce_decode(self.G, ws, src.alpha.to(self.device), src.layer)).cpu()
