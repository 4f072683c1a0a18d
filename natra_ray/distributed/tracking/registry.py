"""The trained classifier as an MLflow model: how a trial logs it (a ``torch.export`` program
that takes the dataset's own images), registering the best one in the Model Registry, loading
it back, and the files of a trial run the direction explorer opens.
"""
from __future__ import annotations

import contextlib
import copy
import os
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from natra_ray.distributed.tracking.uri import validate_tracking_uri
from natra_ray.distributed.tracking.values import (
    TrackingError,
    _client,
    _error_code,
    _fluent_target,
    _one_line,
    _retry,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

CLASSIFIER_NAME = "classifier"


def log_classifier_model(uri: str, experiment_id: str, run_id: str, trial_id: str, model: torch.nn.Module,
                         input_example: Any, input_spec: Any = None, max_examples: int = 4) -> str:
    """The body of :meth:`~natra_ray.distributed.tracking.runs.TrialTracker.log_classifier`:
    log ``model`` as the MLflow model ``classifier`` of run ``run_id`` (of experiment
    ``experiment_id`` in store ``uri``) and return its model URI."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    from natra_ray.data.datasets import InputSpec
    from natra_ray.export import NativeInputClassifier, input_shape_message

    if isinstance(input_example, torch.Tensor):
        input_example = input_example.detach().cpu().numpy()
    x = np.asarray(input_example)
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating) or not len(x):
        raise ValueError(f"log_classifier: input_example must be float images of shape (B, C, H, W); "
                         f"got dtype {x.dtype}, shape {x.shape}")
    spec = input_spec if input_spec is not None else InputSpec.identity(*x.shape[1:])
    if tuple(x.shape[1:]) != spec.shape:
        raise ValueError(f"log_classifier: input_example: {input_shape_message(x.shape, spec)}")
    x = np.ascontiguousarray(x[:max(2, max_examples)], dtype=np.float32)
    if len(x) == 1:  # torch.export fixes a batch axis of size 1: show it two images
        x = np.concatenate([x, x])
    if float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise ValueError(f"log_classifier: input_example must lie in [0, 1] (the classifier's input "
                         f"range); got [{float(x.min()):.3g}, {float(x.max()):.3g}]")
    served = NativeInputClassifier(copy.deepcopy(model).to("cpu"), spec).eval()
    with torch.no_grad():
        logits = served(torch.from_numpy(x)).detach().cpu().numpy()
    signature = infer_signature(x, logits)
    metadata = {"natra.input_shape": list(spec.shape), "natra.model_input_shape": list(spec.model_shape),
                "natra.preprocessing": ("zero-pad 28 -> 32 px, centered" if spec.pad_28_to_32
                                        else "none" if spec.shape == spec.model_shape else "bilinear resize")}

    def log_it() -> str:
        # log_model has no client form and files the LoggedModel under the *active* experiment
        # even with run_id given: _fluent_target points MLflow's globals at our store and experiment
        with _fluent_target(uri, experiment_id):
            info = mlflow.pytorch.log_model(
                served, name=CLASSIFIER_NAME, input_example=x, signature=signature, run_id=run_id,
                serialization_format="pt2", metadata=metadata,
                # explicit pins skip MLflow's slow requirement inference (a subprocess that
                # re-imports the model) and are what a loader needs: the program needs no natra_ray
                pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            )
        return info.model_uri

    return _retry(log_it, f"log the classifier of trial {trial_id} (run {run_id})", attempts=2)


def register_best(uri: str, run_id: str, model_name: str, alias: str | None = "best",
                  await_s: int = 300) -> int:
    """Register ``runs:/<run_id>/classifier`` as a new version of ``model_name`` in the Model
    Registry (created on first use) and point ``alias`` at it (``models:/<name>@best``; ``None``
    skips). Returns the version number."""
    import mlflow

    uri = validate_tracking_uri(uri)
    model_uri = f"runs:/{run_id}/{CLASSIFIER_NAME}"

    def register() -> int:
        with _fluent_target(uri):  # register_model reads MLflow's global registry URI
            mv = mlflow.register_model(model_uri, model_name, await_registration_for=await_s)
        return int(mv.version)

    try:
        version = register()
    except Exception as e:
        # mlflow 3.17 raises "Unable to find a logged_model" with error_code INTERNAL_ERROR (it passes
        # the code as a string, which MlflowException does not recognise), so match the text too
        if _error_code(e) in ("NOT_FOUND", "RESOURCE_DOES_NOT_EXIST") or "Unable to find a logged_model" in str(e):
            raise TrackingError(f"cannot register {model_uri} as {model_name!r}: the run has no logged "
                                f"classifier (was log_classifier called?): {_one_line(e)}") from e
        raise TrackingError(f"cannot register {model_uri} as {model_name!r}: {_one_line(e)}") from e
    if alias:
        _retry(lambda: _client(uri).set_registered_model_alias(model_name, alias, str(version)),
               f"set alias {alias!r} on {model_name} v{version}")
    return version


def load_classifier(model_uri: str, uri: str | None = None, map_location: Any = None) -> torch.nn.Module:
    """Load a classifier logged by :meth:`TrialTracker.log_classifier` (``models:/m-...``,
    ``runs:/<run>/classifier``, ``models:/<name>/<version>``, ``models:/<name>@best``) in eval
    mode. ``uri`` is the tracking store to resolve it against (default: MLflow's global one).
    A ``pt2`` classifier comes back as the exported program's module: it takes images at the
    dataset's native size (``natra.input_shape`` in the model's metadata)."""
    import mlflow.pytorch
    import torch

    kwargs = {"map_location": map_location} if map_location is not None else {}
    ctx = _fluent_target(validate_tracking_uri(uri)) if uri else contextlib.nullcontext()
    with ctx:
        model = mlflow.pytorch.load_model(model_uri, **kwargs)
    if isinstance(model, torch.fx.GraphModule):  # a torch.export program: exported in eval mode, no .eval()
        return model
    return model.eval()


def fetch_trial_files(uri: str, run_id: str, dst: str | os.PathLike) -> dict[str, Any]:
    """What the direction explorer needs from a trial's run: downloads its ``classifier.pt`` into
    ``dst`` and returns ``{"classifier": path, "upstream": [cache entry names], "params": {...}}``;
    the upstream names are the folders the trial logged its GAN / BIES / directions previews under
    (``upstream/<stage>-<key>/``), i.e. the cache entries holding its generator, encoder and
    directions."""
    uri = validate_tracking_uri(uri)
    client = _client(uri)
    run = _retry(lambda: client.get_run(run_id), f"fetch run {run_id}")
    listed = _retry(lambda: client.list_artifacts(run_id, "upstream"), f"list the artifacts of run {run_id}")
    top = {posixpath.basename(a.path) for a in _retry(lambda: client.list_artifacts(run_id), f"list run {run_id}")}
    if "classifier.pt" not in top:
        raise TrackingError(f"MLflow run {run_id} has no classifier.pt artifact (is it a finished trial run? "
                            f"its artifacts: {', '.join(sorted(top)) or 'none'})")
    Path(dst).mkdir(parents=True, exist_ok=True)
    path = _retry(lambda: client.download_artifacts(run_id, "classifier.pt", str(dst)),
                  f"download classifier.pt of run {run_id}")
    tagged = sorted(v for k, v in run.data.tags.items() if k.startswith("natra.upstream."))  # set by the sweep
    return {"classifier": Path(path),
            "upstream": tagged or sorted(posixpath.basename(a.path) for a in listed if a.is_dir),
            "params": dict(run.data.params), "experiment_id": run.info.experiment_id}


__all__ = ["CLASSIFIER_NAME", "fetch_trial_files", "load_classifier", "register_best"]
