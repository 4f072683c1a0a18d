"""The config sections: one frozen dataclass per section, its keys, types and defaults.

This module is the schema only. ``natra_ray.config`` assembles the sections into ``Config``,
type-checks loaded values against these annotations and re-exports every class here (import
them from ``natra_ray.config``); ``natra_ray.config_rules`` says which values are in range.
A comment on a field says what it means or why the default is what it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["fashion_mnist", "image_folder", "parquet"] = "fashion_mnist"
    root: str = ""  # "" = NATRA_DATA_DIR, then the Debian location, then download; parquet: a file, folder or URI
    download: bool = True  # fetch the official files when nothing is found locally
    image_size: int = 32  # Fashion-MNIST 28 px is zero-padded to 32 (generator needs 2^k)
    channels: int = 1
    train_subset: int = 0  # 0 = use the whole split; >0 = a fixed, class-balanced-ish subset
    test_subset: int = 0
    val_fraction: float = 0.1  # held out of train: Tune selects on it, never on test
    # data.dataset=parquet: the column of encoded images (binary or {bytes, path}) and of integer labels
    image_column: str = "image"
    label_column: str = "label"


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
    grid_strengths: tuple[float, ...] = (-3.0, -1.5, 0.0, 1.5, 3.0)
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
    # The latent budget's one unit (eps, rho, eps_cap, eval.natural_eps): standard deviations of
    # the latent data along each direction (Directions.scales), |r_i| <= eps for every direction.
    eps: float = 0.5  # initial / fixed l_inf budget on the edit coefficients
    rho: float = 0.1  # APT step
    eps_cap: float = 2.0  # APT truncation
    apt: bool = True  # False = NaTra-OA
    label_smoothing_c: float = 0.1
    pgd_steps: int = 3
    pgd_step_size: float = 0.0  # 0 = 2.5 * eps / steps (Madry's rule)
    # How the natra methods find their transformation (bench/bench_epoch.py compares them):
    # "exact" = pgd_steps of latent PGD through G for every example of every batch (Eq. 6);
    # "pool" = a pool of pool_size decoded edits per example, each slot re-decoded every
    # pool_refresh epochs at a corner pool_propose picks ("surrogate": latent FGSM through a
    # per-class linear fit of the directions' pixel effect; "random"), the worst chosen by
    # pool_select ("gradient": first order, from the clean half's input gradient; "loss": every
    # member classified) - augment/pool.py; "fraction" = the exact attack on adv_fraction of each
    # batch, its mean loss standing in for the whole batch's (unbiased).
    natra_mode: Literal["exact", "pool", "fraction"] = "exact"
    pool_size: int = 4  # P: uint8 members, P x 10 MB per 10k 32 x 32 grey images
    pool_refresh: int = 8  # R: P / R = 0.5 decodes per example per epoch (a decode ~ a standard step)
    pool_select: Literal["gradient", "loss"] = "gradient"
    pool_propose: Literal["surrogate", "random"] = "surrogate"
    adv_fraction: float = 0.2
    # BatchNorm on the second half of a two-pass batch (pool, fraction): the half's own "batch"
    # statistics, or the "running" ones, as at test time (stages.robust._two_pass; on the whole
    # training split "running" cost 3 points of clean accuracy: BENCHMARKS.md section 7).
    two_pass_norm: Literal["batch", "running"] = "batch"
    num_directions: int = 8
    layer_start: int = 0
    layer_end: int = -1
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
    # Autocast dtype of decoding (every latent attack and decode) and of the classifier's training
    # and attack passes; losses, optimiser state and APT budgets stay float32 (natra_ray/precision.py).
    # fp16 adds a GradScaler (its 5-bit exponent underflows small gradients); bf16 needs none.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


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
    corruptions: tuple[str, ...] = (
        "rotate", "shear", "scale", "translate", "gaussian_blur",
        "gaussian_noise", "brightness", "contrast", "fog", "elastic",
    )
    severities: tuple[int, ...] = (1, 3, 5)
    # "every" = each test image at each severity; "one_per_image" = each image once per corruption,
    # at a severity drawn for it (stages/evaluate.py: corruption_accuracies)
    corruption_severity: Literal["every", "one_per_image"] = "every"
    # The evaluation's latent attack (val_natural_acc every epoch, test_natural_acc at the end):
    # fixed here, apart from robust.* (the training attack a trial samples), so that a trial which
    # narrows its own layer range or direction count is still scored against the same attack.
    # Default: the strongest one the upstream offers - every style input, every estimated direction.
    natural_eps: float = 0.5
    natural_steps: int = 5
    natural_layer_start: int = 0
    natural_layer_end: int = -1  # -1 = last style input
    natural_directions: int = 0  # 0 = directions.num_directions
    # The validation shift suite (natra_ray/data/shifts.py: none of them is a generator edit or a
    # test corruption), scored every epoch on the first shift_examples validation images with a
    # fixed seed (the same shifted images for every trial and seed); in val_objective.
    shifts: tuple[str, ...] = ("perspective", "lens", "gamma", "vignette", "illumination", "dilate", "erode")
    shift_severities: tuple[int, ...] = (2, 4)  # one mild, one strong: 14 forward passes of the subset
    shift_seed: int = 0
    shift_examples: int = 512  # 0 = the whole validation split
    fixed_strengths: tuple[float, ...] = (-2.0, 2.0)
    pixel_pgd_steps: int = 10
    deepfool_steps: int = 50
    max_examples: int = 1000  # evaluation subset size for the costly attacks


@dataclass(frozen=True)
class TuneConfig:
    name: str = "natra"
    search_space: str = "default"  # a file in search_spaces/ (name or path)
    num_samples: int = 4
    # (val_acc + val_shift_mean_acc) / 2 on validation (stages/robust.py: val_objective; README "The objective")
    metric: str = "val_objective"
    mode: Literal["max", "min"] = "max"
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    multi_objective: bool = False
    max_concurrent_trials: int = 0  # 0 = derived from cluster resources
    scheduler: Literal["asha", "none"] = "asha"  # ASHA stops weak trials at its rungs
    asha_grace_period: int = 1
    train_workers: int = 1
    cpus_per_worker: int = 1
    # How a trial trains its classifier: "train" = a Ray Train TorchTrainer of train_workers
    # workers (fault-tolerant: a lost worker resumes from its epoch checkpoint), "inline" = in
    # the Tune trial's own process, holding cpus_per_worker CPUs (no worker group, Data actor or
    # checkpoint round trip: ~50 s less per trial; a lost trial restarts from epoch 0). "auto" =
    # inline for one worker, train for more.
    trainer: Literal["auto", "train", "inline"] = "auto"
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
    # GPU share of that actor when trials train on GPUs (0 = it decodes on its CPUs): a whole GPU
    # would sit beside every trial's workers mostly idle, and counts against the GPU budget.
    data_gpus: float = 0.0
    data_stream: bool = True  # feed classifier workers through Ray Data (False: in-memory)
    max_failures: int = 2  # Ray Train FailureConfig: worker restarts from the last checkpoint
    # Reference classifiers every sweep trains at the trials' own budget (distributed/references.py):
    # the summary shows beside the trials what the natural-transformation training bought.
    references: tuple[str, ...] = ("none", "classic")
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    # The autoscaler's config (Ray cluster YAML): the pre-check counts the nodes its
    # available_node_types can add, not only the live ones. "" = ~/ray_bootstrap_config.yaml
    # when present (the head of a `ray up` cluster), else the live nodes alone.
    cluster_yaml: str = ""
    # The one storage root of everything that outlives a node or is read by another (stage cache,
    # codes, Train checkpoints, Tune state, trial outputs, the default MLflow store): on a
    # cluster, a path every node mounts (EFS/NFS). "" = $NATRA_STORAGE, else ~/natra_ray_results.
    storage_path: str = ""
    # Custom Ray resources each trial bundle asks for (its driver and each Train worker), as
    # NAME=AMOUNT: [node2=1] puts trials only on nodes started with --resources='{"node2": N}'.
    trial_resources: tuple[str, ...] = ()

    @property
    def inline(self) -> bool:
        """Whether trials train in their own process (``trainer``, resolved)."""
        return self.trainer == "inline" or (self.trainer == "auto" and self.train_workers == 1)


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite at ~/natra_ray_results/mlflow.db
    experiment: str = ""  # "" = tune.name
    register_model: str = "natra_classifier"


@dataclass(frozen=True)
class BenchmarkConfig:
    """``jobs/benchmark.py``: every method x seed on the same data, classifier and budget.
    The budget fields shrink only the classifier runs; the upstream (GAN, encoder, directions)
    is the profile's own, so the benchmark reuses the cache of the main job."""

    name: str = "benchmark"  # results under <storage>/benchmarks/<name>/
    methods: tuple[str, ...] = ()  # () = every registered augmentation method
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 0  # classifier epochs per run; 0 = robust.epochs
    train_examples: int = 0  # first N images of the train split; 0 = all
    val_examples: int = 0  # first N of the val split (val metrics each epoch); 0 = all
    eval_examples: int = 0  # test images for the costly attacks; 0 = eval.max_examples
    cpus_per_task: float = 1.0  # one method x seed task (and as many torch threads)
    gpus_per_task: float = 0.0


# ``jobs/benchmark.py --budget NAME``: the overrides a budget stands for, applied before the
# command line's own. "profile" = the profile's ``benchmark:`` section as it is; "full" = the
# head-to-head that decides whether NaTra is worth its cost: every training and validation
# image, 5 epochs, the eight methods that matter, 3 seeds, in its own results folder (clean and
# corruption accuracy are always on every test image, the attacks on eval.max_examples).
BENCHMARK_BUDGETS: dict[str, tuple[str, ...]] = {
    "profile": (),
    "full": ("benchmark.name=full", "benchmark.epochs=5", "benchmark.train_examples=0", "benchmark.val_examples=0",
             "benchmark.eval_examples=0", "benchmark.seeds=[0,1,2]",
             "benchmark.methods=[none,classic,pgd,mixup,natra,natra+classic,natra_oa,natra_ol]"),
}
