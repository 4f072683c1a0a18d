"""One trial, read top to bottom: train ``robust.method`` on the shared upstream, score it with the
evaluation suite, save the classifier, and say so to a Recorder.

    inputs = trial_inputs(cfg, layout, upstream, splits)      # codes + extra models, cached
    result = run_trial(cfg, inputs, out_dir, fit=in_process_fit, recorder=NullRecorder())

Where the heavy work runs is what differs between callers, and they say it with capabilities:
``fit`` trains the classifier, ``encode`` (to ``trial_inputs``) inverts the splits, ``score``
runs the evaluation suite. The defaults do it in this process (the benchmark's tasks, tests, a
GPU machine without Ray); the Ray layer passes a ``TorchTrainer`` fed by the Ray Data stream
(``distributed/train.py``) and Ray tasks with the resources they need, over shards of the split
and parts of the suite (``distributed/remote_stages.py``), so none of it runs in a trial driver
that holds half a CPU. Everything else - the cache, the saved checkpoint, what is recorded - is
this module's, once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from natra_ray import cache
from natra_ray.augment import method_needs
from natra_ray.augment.latent import LatentSource
from natra_ray.config import Config
from natra_ray.data import ImageDataset
from natra_ray.data.datasets import dataset_card, input_spec, load_dataset
from natra_ray.models.latent import Directions, resolve_layer_range
from natra_ray.runtime import Reporter, null_reporter, resolve_device
from natra_ray.stages import evaluate, gan, robust
from natra_ray.stages.lce import LatentCodes
from natra_ray.workflow.layout import StorageLayout
from natra_ray.workflow.recorder import Recorder
from natra_ray.workflow.upstream import (UPSTREAM_SEED, Encode, Upstream, coded_part, codes_path, encode_in_process,
                                         extra_model_paths, load_extra_models)

# Upstream grids logged with each trial, per cache entry (the first few, sorted by name).
UPSTREAM_IMAGES = 12


@dataclass(frozen=True)
class TrialInputs:
    """What a trial reads: its splits, the upstream, the cached codes of each split, and the
    files of the extra models its method needs. Paths only cross process boundaries
    (``codes``, ``extra``); the splits stay in the process that made them."""

    splits: Mapping[str, ImageDataset]
    upstream: Upstream
    codes: Mapping[str, Path]  # split -> codes.pt
    extra: Mapping[str, Path]  # "vae" / "cvae" -> its checkpoint

    @property
    def num_classes(self) -> int:
        return len(self.splits["train"].class_names)


def trial_inputs(cfg: Config, layout: StorageLayout, upstream: Upstream, splits: Mapping[str, ImageDataset],
                 report: Reporter = null_reporter, encode: Encode = encode_in_process) -> TrialInputs:
    """The codes of every split (with the LCE count the method asks for; ``encode`` computes
    those the cache lacks) and its extra models, from the cache or computed into it."""
    n_codes = method_needs(cfg.robust.method).lce_codes(cfg.encoder.lce_codes)
    codes = {name: codes_path(cfg, upstream, layout, name, coded_part(cfg, name, ds), n_codes, encode)
             for name, ds in splits.items()}
    return TrialInputs(dict(splits), upstream, codes, extra_model_paths(cfg, layout, splits["train"], report))


def latent_source(cfg: Config, up: Upstream, codes: LatentCodes, device: Optional[torch.device] = None) -> LatentSource:
    """The split's codes with the generator and directions, as the *training* attack of this trial
    sees them: ``robust.layer_start..layer_end`` and ``robust.num_directions`` (what a search
    space samples). Every example starts with the budget ``robust.eps`` (APT grows or shrinks it
    per example). Evaluations read ``eval_source`` instead."""
    r = cfg.robust
    return _source(cfg, up, codes, device, (r.layer_start, r.layer_end), r.num_directions)


def eval_source(cfg: Config, up: Upstream, codes: LatentCodes, device: Optional[torch.device] = None) -> LatentSource:
    """The split's codes as every *evaluation* attacks them (val_natural_acc each epoch, the test
    split's natural metrics): ``eval.natural_layer_start..natural_layer_end`` and
    ``eval.natural_directions`` (0 = ``directions.num_directions``), whatever ``robust.*`` the
    trial sampled - so a trial cannot make its own test easier by narrowing its training attack."""
    e = cfg.eval
    return _source(cfg, up, codes, device, (e.natural_layer_start, e.natural_layer_end),
                   e.natural_directions or cfg.directions.num_directions)


def _source(cfg: Config, up: Upstream, codes: LatentCodes, device: Optional[torch.device],
            layers: Tuple[int, int], num_directions: int) -> LatentSource:
    G = gan.load_generator(up.generator_path).to(device or resolve_device(cfg.device))
    start, end = resolve_layer_range(G, *layers)
    directions = Directions.load(up.directions_path)
    if num_directions > len(directions):
        raise ValueError(f"the attack asks for {num_directions} directions; {up.directions_path} holds {len(directions)}")
    return LatentSource(G, codes.ws, codes.alpha, codes.layer, directions, num_directions, (start, end),
                        torch.full((len(codes),), float(cfg.robust.eps)), precision=cfg.robust.precision)


# --------------------------------------------------------------------------- fitting
@dataclass(frozen=True)
class Fitted:
    """A trained classifier's weights and its per-epoch metrics."""

    model_state: Mapping[str, torch.Tensor]
    history: List[Dict[str, float]]


# fit(cfg, inputs, report) -> Fitted; ``report`` is called with each epoch's metrics.
Fit = Callable[[Config, TrialInputs, Reporter], Fitted]


def in_process_fit(cfg: Config, inputs: TrialInputs, report: Reporter = null_reporter) -> Fitted:
    """Train here, on this process's device (``stages.robust.train``)."""
    dev = resolve_device(cfg.device)
    codes = {k: LatentCodes.load(p) for k, p in inputs.codes.items() if k in ("train", "val")}
    latent = latent_source(cfg, inputs.upstream, codes["train"], dev) if method_needs(cfg.robust.method).latent else None
    state = robust.train(cfg, inputs.splits["train"], inputs.splits["val"], latent=latent,
                         val_latent=eval_source(cfg, inputs.upstream, codes["val"], dev), report=report,
                         device=dev, extra=load_extra_models(inputs.extra, dev))
    return Fitted(state.bare.state_dict(), state.history)


# --------------------------------------------------------------------------- scoring
# score(cfg, inputs, model_state, out_dir) -> the evaluation suite's metrics (``test_*``), with
# the files it makes (escaped_examples.png) written into out_dir.
Score = Callable[[Config, TrialInputs, Mapping[str, torch.Tensor], Path], Dict[str, float]]


def classifier_from(cfg: Config, num_classes: int, model_state: Mapping[str, torch.Tensor],
                    device: torch.device) -> torch.nn.Module:
    """The trial's classifier with ``model_state``, on ``device``, in eval mode."""
    model = robust.build_classifier(cfg, num_classes)
    model.load_state_dict(model_state)
    return model.to(device).eval()


def scoring_source(cfg: Config, up: Upstream, codes: Path, device: Optional[torch.device] = None) -> LatentSource:
    """The evaluation source over the first ``eval.max_examples`` test codes."""
    return eval_source(cfg, up, LatentCodes.load(codes).subset(slice(0, cfg.eval.max_examples)), device)


def in_process_score(cfg: Config, inputs: TrialInputs, model_state: Mapping[str, torch.Tensor],
                     out_dir: Path) -> Dict[str, float]:
    """The whole evaluation suite here, on this process's device (``stages.evaluate.run``)."""
    dev = resolve_device(cfg.device)
    model = classifier_from(cfg, inputs.num_classes, model_state, dev)
    return evaluate.run(cfg, model, inputs.splits["test"], scoring_source(cfg, inputs.upstream, inputs.codes["test"], dev),
                        out_dir)


# --------------------------------------------------------------------------- the trial
@dataclass(frozen=True)
class TrialResult:
    metrics: Dict[str, float]  # the last epoch's, the evaluation suite's, trial_seconds
    history: List[Dict[str, float]]
    classifier_path: Path


def _numbers(m: Mapping[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_trial(cfg: Config, inputs: TrialInputs, out_dir: Path, fit: Fit, recorder: Recorder,
              log_model: bool = False, score: Score = in_process_score) -> TrialResult:
    """Fit, evaluate on the test split (``score``), save ``classifier.pt`` in ``out_dir``, record
    it all. ``log_model``: also log the classifier as an MLflow-style model (what the sweep registers)."""
    t0, out_dir = time.time(), Path(out_dir)
    recorder.set_tags(inputs.upstream.tags())
    recorder.log_dataset(dataset_card(cfg.data, inputs.splits))

    def report(m: Mapping[str, Any]) -> None:
        recorder.log_metrics({k: v for k, v in m.items() if k != "epoch"}, step=int(m.get("epoch", 0)))

    fitted = fit(cfg, inputs, report)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = score(cfg, inputs, fitted.model_state, out_dir)
    # saved and logged from the CPU: the heavy passes are done (in ``fit`` and ``score``)
    model = classifier_from(cfg, inputs.num_classes, fitted.model_state, torch.device("cpu"))
    clf = robust.save_classifier(out_dir / "classifier.pt", model, cfg, inputs.num_classes,
                                 extra={"history": fitted.history, "method": cfg.robust.method})
    last = fitted.history[-1]
    metrics = _numbers({**extra_model_numbers(inputs), **last, **scores, "trial_seconds": time.time() - t0})
    recorder.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=int(last["epoch"]))
    for f in sorted(p for p in out_dir.iterdir() if p.is_file()):
        recorder.log_artifact(f)
    for entry in inputs.upstream.entries.values():
        for png in sorted(Path(entry).rglob("*.png"))[:UPSTREAM_IMAGES]:
            recorder.log_artifact(png, artifact_path=f"upstream/{Path(entry).name}")
    if log_model:  # it takes the dataset's own images (28 px Fashion-MNIST) and pads them itself
        native = load_dataset(cfg.data, "test", seed=UPSTREAM_SEED, native=True).images[:4]
        recorder.log_classifier(model, native.numpy(), input_spec(cfg.data))
    return TrialResult(metrics, fitted.history, clf)


def extra_model_numbers(inputs: TrialInputs) -> Dict[str, float]:
    """The summaries of the extra models' cache entries (a CVAE's closure metrics, ...)."""
    out: Dict[str, float] = {}
    for p in inputs.extra.values():
        out.update(_numbers(cache.read_manifest(Path(p).parent)["summary"]))
    return out


__all__ = ["TrialInputs", "trial_inputs", "latent_source", "eval_source", "scoring_source", "Fitted", "Fit",
           "in_process_fit", "Score", "in_process_score", "classifier_from", "TrialResult", "run_trial"]
