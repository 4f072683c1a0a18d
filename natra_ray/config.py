"""Typed configuration: one frozen dataclass per section, checked once when loaded.

Resolution order (later wins): dataclass defaults -> profile YAML (``natra_ray/profiles``)
-> a user YAML file -> ``section.key=value`` overrides from the command line.
Unknown sections/keys and wrong types are rejected with a message that names the key and
what is allowed, so a typo fails before any compute, not an hour into a sweep.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Mapping, Tuple

import yaml

PROFILE_DIR = Path(__file__).parent / "profiles"


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["fashion_mnist", "image_folder"] = "fashion_mnist"
    root: str = ""  # "" = NATRA_DATA_DIR, then the Debian location, then download
    download: bool = True  # fetch the official files when nothing is found locally
    image_size: int = 32  # Fashion-MNIST 28 px is zero-padded to 32 (generator needs 2^k)
    channels: int = 1
    train_subset: int = 0  # 0 = use the whole split; >0 = a fixed, class-balanced-ish subset
    test_subset: int = 0
    val_fraction: float = 0.1  # held out of train: Tune selects on it, never on test
    num_workers: int = 0


@dataclass(frozen=True)
class GanConfig:
    generator: str = "style"
    discriminator: str = "resnet"
    z_dim: int = 128
    w_dim: int = 128
    mapping_layers: int = 4
    channels: int = 128  # feature maps at 4x4; halves per resolution doubling (min 16)
    # How the style generator doubles resolution: "bilinear" interpolation then a 3x3 conv, or
    # "transpose" (a stride-2 4x4 transposed conv at the old resolution, ~half the generator's cost).
    upsample: Literal["bilinear", "transpose"] = "bilinear"
    d_channels: int = 64
    loss: Literal["ns_r1", "wgan_gp"] = "ns_r1"
    # R1 weight. StyleGAN2-ADA's rule of thumb is 0.0002 * resolution^2 / batch: ~0.01 at 32 px
    # (its CIFAR setting), 10 only near 1024 px. Measured here at 32 px: gamma 1 gave blurry,
    # sleeveless tops after 1200 steps; 0.01 gives garment detail in the same steps.
    r1_gamma: float = 0.01
    gp_lambda: float = 10.0
    n_critic: int = 1  # D steps per G step (5 is usual for WGAN-GP)
    lr: float = 0.002
    mapping_lr_mult: float = 0.01
    beta1: float = 0.0
    beta2: float = 0.99
    batch_size: int = 64
    steps: int = 2000
    ema_half_life_images: int = 10000  # EMA horizon measured in images (StyleGAN2-ADA style)
    r1_every: int = 16  # lazy R1 regularisation interval (StyleGAN2: every 16 D steps)
    style_mixing: float = 0.5
    sample_every: int = 500
    checkpoint: str = ""  # an external generator checkpoint: skip pretraining, load this


@dataclass(frozen=True)
class EncoderConfig:
    encoder: str = "resnet"
    channels: int = 32
    steps: int = 1000
    batch_size: int = 64
    lr: float = 0.0003
    latent_weight: float = 1.0  # weight of Eq. 8 (latent reconstruction on generated images)
    gamma1: float = 1.0  # Eq. 9 pixel MSE weight
    gamma2: float = 0.8  # Eq. 9 perceptual (LPIPS) weight
    lpips_net: Literal["vgg", "alex", "squeeze"] = "alex"
    lpips_weights: str = ""  # path to the backbone weights; "" = torch hub cache
    # What to do when pretrained LPIPS backbone weights are absent (offline machines):
    # "random_backbone" logs a loud warning and uses a randomly initialised backbone,
    # "error" refuses to run.
    lpips_fallback: Literal["random_backbone", "error"] = "random_backbone"
    shift_steps: int = 300
    shift_lr: float = 0.0002
    lce_codes: int = 1  # N in Sec. 3.3; 1 = plain inversion (NaTra-OL)
    lce_layer: int = 2  # composition layer l
    lce_steps: int = 100
    lce_lr: float = 0.01


@dataclass(frozen=True)
class DirectionsConfig:
    estimator: Literal["umap", "pca"] = "umap"
    space: Literal["w", "activation"] = "w"
    num_samples: int = 5000  # K
    num_directions: int = 8
    activation_layer: int = 1  # for space="activation"
    umap_neighbors: int = 15
    layer_start: int = 0  # default edit range D(u_i, a-b) on W+ (inclusive)
    layer_end: int = -1  # -1 = last style input
    grid_strengths: Tuple[float, ...] = (-3.0, -1.5, 0.0, 1.5, 3.0)
    grid_images: int = 6


@dataclass(frozen=True)
class RobustConfig:
    classifier: str = "small_cnn"
    classifier_width: int = 32
    classifier_depth: int = 16  # WideResNet depth
    method: str = "natra"  # augmentation method registry name
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eps: float = 0.5  # initial / fixed latent l_inf budget (in units of the direction basis)
    rho: float = 0.1  # APT step
    eps_cap: float = 2.0  # APT truncation
    apt: bool = True  # False = NaTra-OA
    label_smoothing_c: float = 0.1
    pgd_steps: int = 3
    pgd_step_size: float = 0.0  # 0 = 2.5 * eps / steps (Madry's rule)
    num_directions: int = 8
    layer_start: int = 0
    layer_end: int = -1
    clean_weight: float = 1.0
    pixel_eps: float = 0.1  # pixel PGD/FGSM baselines and pixel-PGD evaluation
    mixup_alpha: float = 1.0  # lambda ~ Beta(a, a) for mixup, manifold_mixup, gan_mixup, vae_mixup
    # classic: per-image random affine + photometric jitter, each drawn uniformly in +-range
    classic_rotation_deg: float = 15.0
    classic_scale: float = 0.1  # zoom factor in [1 - s, 1 + s]
    classic_shear_deg: float = 10.0
    classic_translate: float = 0.1  # shift per axis, fraction of the image side
    classic_brightness: float = 0.1  # added to every pixel
    classic_contrast: float = 0.2  # factor in [1 - c, 1 + c] on deviations from the image mean
    advmix_split: int = -1  # first "fine" (style) input of W+; -1 = num_ws // 2
    advmix_candidates: int = 4  # other images whose fine styles the adversary may mix in
    # cvae: one member of the learned set S(x) = {Q(x, mu_p + sigma_p u) : ||u||_2 <= cvae_eps}
    cvae_eps: float = 1.0
    cvae_attack: Literal["random", "pgd"] = "pgd"  # u ~ N(0, I) projected into the ball, or the worst case
    cvae_steps: int = 5  # PGD steps on u
    cvae_step_size: float = 0.0  # 0 = 2.5 * cvae_eps / cvae_steps


@dataclass(frozen=True)
class VaeConfig:
    """The small conv VAE behind ``vae_mixup`` (paper 002 Sec. 2.2), trained once per data config."""

    z_dim: int = 16
    channels: int = 32  # first conv's width; doubles per downsampling
    steps: int = 2000
    batch_size: int = 128
    lr: float = 0.001


@dataclass(frozen=True)
class CvaeConfig:
    """The learned perturbation set of paper 001 (after Wong & Kolter): a CVAE on pairs (x, x')."""

    arch: Literal["fc", "conv"] = "fc"  # fc = paper 001's one-hidden-layer MLPs
    latent_dim: int = 1  # k; 1 = paper 001's one-number code of a rotation
    hidden: int = 512  # fc: hidden units; conv: first conv's channels
    family: Literal["rotation", "thickness", "brightness", "lighting", "folders"] = "rotation"
    max_param: float = 0.0  # theta ~ U[-max, max]; 0 = the family's default (rotation: 20 deg)
    pairs_x: str = ""  # family=folders: the originals ...
    pairs_x_prime: str = ""  # ... and their perturbed versions, same file names
    recon: Literal["bce", "mse"] = "bce"  # Bernoulli (paper 001's MNIST setting) or Gaussian
    beta: float = 1.0  # KL weight
    reg_weight: float = 0.0  # linear-cost regulariser weight; 0 = paper 001's baseline
    epochs: int = 10
    batch_size: int = 128  # bundles per step
    lr: float = 0.001
    sweep_images: int = 6


@dataclass(frozen=True)
class EvalConfig:
    corruptions: Tuple[str, ...] = (
        "rotate", "shear", "scale", "translate", "gaussian_blur",
        "gaussian_noise", "brightness", "contrast", "fog", "elastic",
    )
    severities: Tuple[int, ...] = (1, 3, 5)
    natural_eps: float = 0.5
    natural_steps: int = 5
    fixed_strengths: Tuple[float, ...] = (-2.0, 2.0)
    pixel_pgd_steps: int = 10
    deepfool_steps: int = 50
    max_examples: int = 1000  # evaluation subset size for the costly attacks


@dataclass(frozen=True)
class TuneConfig:
    name: str = "natra"
    search_space: str = "default"  # a file in search_spaces/ (name or path)
    num_samples: int = 4
    metric: str = "val_natural_acc"
    mode: Literal["max", "min"] = "max"
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    multi_objective: bool = False
    max_concurrent_trials: int = 0  # 0 = derived from cluster resources
    scheduler: Literal["asha", "none"] = "asha"  # ASHA stops weak trials at its rungs
    asha_grace_period: int = 1
    train_workers: int = 1
    cpus_per_worker: int = 1
    # The upstream stages (GAN, BIES) run before any trial, as their own TorchTrainer jobs:
    # workers x CPUs each; 0 CPUs = a whole node's (at most 8), one torch thread per CPU.
    upstream_workers: int = 1
    upstream_cpus_per_worker: int = 0
    # Where a local Ray's dashboard listens: loopback; anything else is a deliberate exposure
    # (logged as a warning). Clusters set it in ray_cluster.yaml instead.
    dashboard_host: str = "127.0.0.1"
    # Logical CPUs reserved for each trial's driver (it mostly waits on its TorchTrainer) and
    # for the Ray Data actor that decodes latent codes. Tune -> Train -> Data reserve CPUs at
    # every level; counting 1 for each would need 3 CPUs per trial and deadlock a 2-core box.
    driver_cpus: float = 0.5
    data_cpus: float = 0.5
    data_stream: bool = True  # feed classifier workers through Ray Data (False: in-memory)
    max_failures: int = 2  # Ray Train FailureConfig: worker restarts from the last checkpoint
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    storage_path: str = ""  # "" = ~/natra_ray_results (absolute, survives `ray job submit`)


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite at ~/natra_ray_results/mlflow.db
    experiment: str = ""  # "" = tune.name
    register_model: str = "natra_classifier"
    log_images: bool = True


@dataclass(frozen=True)
class BenchmarkConfig:
    """``jobs/benchmark.py``: every method x seed on the same data, classifier and budget.
    The budget fields shrink only the classifier runs; the upstream (GAN, encoder, directions)
    is the profile's own, so the benchmark reuses the cache of the main job."""

    name: str = "benchmark"  # results under <storage>/benchmarks/<name>/
    methods: Tuple[str, ...] = ()  # () = every registered augmentation method
    seeds: Tuple[int, ...] = (0, 1, 2)
    epochs: int = 0  # classifier epochs per run; 0 = robust.epochs
    train_examples: int = 0  # first N images of the train split; 0 = all
    val_examples: int = 0  # first N of the val split (val metrics each epoch); 0 = all
    eval_examples: int = 0  # test images for the costly attacks; 0 = eval.max_examples
    cpus_per_task: float = 1.0  # one method x seed task (and as many torch threads)
    gpus_per_task: float = 0.0


@dataclass(frozen=True)
class Config:
    profile: str = "cpu"
    seed: int = 0
    output_dir: str = ""  # "" = <storage>/runs/<profile>
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    directions: DirectionsConfig = field(default_factory=DirectionsConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    cvae: CvaeConfig = field(default_factory=CvaeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict (tuples become lists): feeds YAML, MLflow params and Tune."""
        return _plain(dataclasses.asdict(self))

    def flat(self) -> Dict[str, Any]:
        """``{"section.key": value}`` for MLflow params."""
        out: Dict[str, Any] = {}
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out

    def replace(self, **overrides: Any) -> "Config":
        """Return a validated copy with ``{"section.key": value}`` overrides applied."""
        return from_dict(_apply_overrides(self.to_dict(), overrides))

    def key(self, *sections: str) -> str:
        """Stable content hash of the named sections (stage cache keys)."""
        d = self.to_dict()
        blob = json.dumps({s: d[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


SECTIONS: Dict[str, type] = {f.name: f.default_factory().__class__ for f in dataclasses.fields(Config)
                             if f.default_factory is not dataclasses.MISSING}


# --------------------------------------------------------------------------- checking
def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple, Tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"config key {key!r} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}"
            )
        return value
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects {_type_name(tp)}; got {value!r}")
        (inner, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a new annotation kind must be taught here
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    if not ok:
        raise ConfigError(
            f"config key {key!r} expects {_type_name(tp)}; got {value!r} ({type(value).__name__})"
        )
    return value


def _build_section(name: str, cls: type, values: Mapping[str, Any]) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section {name!r} must be a mapping of keys; got {values!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in hints:
            raise ConfigError(
                f"unknown config key '{name}.{k}'; allowed keys in section {name!r}: {', '.join(allowed)}"
            )
        kwargs[k] = _coerce(f"{name}.{k}", v, hints[k])
    return cls(**kwargs)


def from_dict(d: Mapping[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (missing keys take defaults)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"a config must be a mapping; got {type(d).__name__}")
    hints = typing.get_type_hints(Config)
    top: Dict[str, Any] = {}
    for k, v in d.items():
        if k in SECTIONS:
            top[k] = _build_section(k, SECTIONS[k], v or {})
        elif k in hints:
            top[k] = _coerce(k, v, hints[k])
        else:
            allowed = [f.name for f in dataclasses.fields(Config)]
            raise ConfigError(f"unknown config key {k!r}; allowed top-level keys: {', '.join(allowed)}")
    cfg = Config(**top)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field and range checks that types alone cannot express."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    s = cfg.data.image_size
    need(s >= 8 and (s & (s - 1)) == 0, f"data.image_size must be a power of two >= 8; got {s}")
    need(cfg.data.channels in (1, 3), f"data.channels must be 1 or 3; got {cfg.data.channels}")
    need(0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")
    for name in ("train_subset", "test_subset"):
        need(getattr(cfg.data, name) >= 0, f"data.{name} must be >= 0 (0 = whole split)")
    for sec, keys in {
        "gan": ("z_dim", "w_dim", "mapping_layers", "channels", "batch_size", "n_critic", "r1_every"),
        "encoder": ("batch_size", "lce_codes"),
        "directions": ("num_samples", "num_directions"),
        "robust": ("epochs", "batch_size", "num_directions", "classifier_width", "advmix_candidates"),
        "vae": ("z_dim", "channels", "batch_size"),
        "tune": ("num_samples", "train_workers", "cpus_per_worker", "upstream_workers"),
    }.items():
        for k in keys:
            v = getattr(getattr(cfg, sec), k)
            need(v >= 1, f"{sec}.{k} must be >= 1; got {v}")
    for k in ("steps", "sample_every"):
        need(getattr(cfg.gan, k) >= 0, f"gan.{k} must be >= 0")
    need(cfg.gan.lr > 0, "gan.lr must be > 0")
    r = cfg.robust
    from natra_ray.augment import list_methods  # lazy: the method registry imports this module

    need(r.method in list_methods(), f"robust.method {r.method!r} is not a registered augmentation method; "
                                     f"choose one of: {', '.join(list_methods())}")
    need(r.eps >= 0, f"robust.eps must be >= 0; got {r.eps}")
    need(r.rho >= 0, f"robust.rho must be >= 0; got {r.rho}")
    need(r.eps_cap >= r.eps, f"robust.eps_cap ({r.eps_cap}) must be >= robust.eps ({r.eps})")
    need(r.rho < r.eps_cap, f"robust.rho ({r.rho}) must be smaller than the truncation cap robust.eps_cap ({r.eps_cap})")
    need(r.label_smoothing_c >= 0, "robust.label_smoothing_c must be >= 0")
    need(r.pgd_steps >= 0, "robust.pgd_steps must be >= 0")
    need(0 <= r.pixel_eps <= 1, f"robust.pixel_eps must be in [0, 1] (images are in [0, 1]); got {r.pixel_eps}")
    need(r.mixup_alpha > 0, f"robust.mixup_alpha must be > 0 (Beta(a, a) mixing); got {r.mixup_alpha}")
    for k in ("classic_rotation_deg", "classic_shear_deg", "classic_translate", "classic_brightness"):
        need(getattr(r, k) >= 0, f"robust.{k} must be >= 0 (a +- range); got {getattr(r, k)}")
    need(0 <= r.classic_scale < 1, f"robust.classic_scale must be in [0, 1) (zoom in [1 - s, 1 + s]); got {r.classic_scale}")
    need(0 <= r.classic_contrast < 1, f"robust.classic_contrast must be in [0, 1); got {r.classic_contrast}")
    need(r.advmix_split >= -1, f"robust.advmix_split must be >= 0, or -1 for num_ws // 2; got {r.advmix_split}")
    need(cfg.vae.steps >= 0 and cfg.vae.lr > 0, "vae.steps must be >= 0 and vae.lr > 0")
    need(cfg.directions.num_directions >= r.num_directions,
         f"robust.num_directions ({r.num_directions}) exceeds directions.num_directions "
         f"({cfg.directions.num_directions}) - cannot attack along directions that were not estimated")
    need(cfg.eval.natural_eps >= 0, "eval.natural_eps must be >= 0")
    need(all(1 <= v <= 5 for v in cfg.eval.severities), "eval.severities must lie in 1..5")
    b = cfg.benchmark
    need(len(b.seeds) >= 1, "benchmark.seeds must list at least one seed")
    for k in ("epochs", "train_examples", "val_examples", "eval_examples"):
        need(getattr(b, k) >= 0, f"benchmark.{k} must be >= 0 (0 = the profile's own value)")
    need(b.cpus_per_task > 0 and b.gpus_per_task >= 0, "benchmark.cpus_per_task must be > 0, gpus_per_task >= 0")
    c = cfg.cvae
    for k in ("latent_dim", "hidden", "batch_size"):
        need(getattr(c, k) >= 1, f"cvae.{k} must be >= 1; got {getattr(c, k)}")
    for k in ("epochs", "sweep_images", "beta", "reg_weight", "max_param"):
        need(getattr(c, k) >= 0, f"cvae.{k} must be >= 0; got {getattr(c, k)}")
    for k in ("cvae_eps", "cvae_steps", "cvae_step_size"):
        need(getattr(r, k) >= 0, f"robust.{k} must be >= 0; got {getattr(r, k)}")
    need(c.lr > 0, f"cvae.lr must be > 0; got {c.lr}")
    need(c.family != "folders" or (bool(c.pairs_x) and bool(c.pairs_x_prime)),
         "cvae.family=folders needs cvae.pairs_x and cvae.pairs_x_prime (two folders, same file names)")
    need(c.family != "folders" or c.reg_weight == 0,
         "cvae.reg_weight needs sample bundles (x, T_theta x, T_2theta x); user pairs have none: set it to 0")


# --------------------------------------------------------------------------- loading
def list_profiles() -> List[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections; got {type(data).__name__}")
    return data


def _merge(base: Dict[str, Any], extra: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> Tuple[str, Any]:
    """``"gan.lr=0.001"`` -> ("gan.lr", 0.001); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. gan.steps=500)")
    k, v = text.split("=", 1)
    try:
        return k.strip(), yaml.safe_load(v) if v.strip() != "" else ""
    except yaml.YAMLError:
        return k.strip(), v


def _apply_overrides(d: Dict[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    out = _merge({}, d)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if len(parts) == 1:
            out[parts[0]] = value
        elif len(parts) == 2:
            sec = out.setdefault(parts[0], {})
            if not isinstance(sec, dict):
                raise ConfigError(f"override {dotted!r}: {parts[0]!r} is not a config section")
            sec[parts[1]] = value
        else:
            raise ConfigError(f"override key {dotted!r} must be 'key' or 'section.key'")
    return out


def load_config(
    profile: str = "cpu",
    config_file: str | Path | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
) -> Config:
    """Defaults -> profile -> YAML file -> overrides, validated once."""
    if profile not in list_profiles():
        raise ConfigError(f"unknown profile {profile!r}; known profiles are: {', '.join(list_profiles())}")
    d = _read_yaml(PROFILE_DIR / f"{profile}.yaml")
    if config_file:
        p = Path(config_file)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        d = _merge(d, _read_yaml(p))
    d["profile"] = profile  # the profile actually loaded, even if the file names another
    if not isinstance(overrides, Mapping):
        overrides = dict(parse_override(o) for o in overrides)
    return from_dict(_apply_overrides(d, overrides))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
