"""The runs of a sweep or benchmark: one parent run (:class:`SweepTracker`, on the driver) and
one child run per trial (:class:`TrialTracker`, in the trial's process; the MLflow
:class:`~natra_ray.workflow.recorder.Recorder`).

Layout in the store::

    experiment  (tracking.experiment or tune.name; see experiment.ensure_experiment)
      parent run  "<sweep name>"          tags natra.role=sweep, params = the flat config
        child run "<trial id>"            tags mlflow.parentRunId=<parent>, natra.trial_id=<id>
        child run ...

Every call goes through an explicit ``MlflowClient(uri)`` (no global "active run"), retried on
transient errors (``values._retry``).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from natra_ray.distributed.tracking.experiment import ensure_experiment
from natra_ray.distributed.tracking.registry import log_classifier_model
from natra_ray.distributed.tracking.uri import (
    _scheme,
    check_tracking,
    experiment_name,
    resolve_tracking_uri,
    validate_tracking_uri,
)
from natra_ray.distributed.tracking.values import (
    METRICS_PER_BATCH,
    PARAMS_PER_BATCH,
    TrackingError,
    _client,
    _retry,
    as_number,
    filter_quote,
    lost_insert_race,
    sanitize_key,
    sanitized_params,
    tag_value,
)
from natra_ray.workflow.layout import StorageLayout

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from typing_extensions import Self

    from natra_ray.config import Config

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "natra.trial_id"
ROLE_TAG = "natra.role"
ATTEMPT_TAG = "natra.attempt"
FAILURE_TAG = "natra.failure_reason"

_END_STATUSES = ("FINISHED", "FAILED", "KILLED")


class _RunLogger:
    """Logging shared by the parent and the trial runs (an explicit client; no global run)."""

    uri: str
    experiment_id: str
    run_id: str | None

    @property
    def client(self):
        c = self.__dict__.get("_client")
        if c is None:
            c = self.__dict__["_client"] = _client(self.uri)
        return c

    def __getstate__(self) -> dict[str, Any]:  # picklable: plain values only
        return {k: v for k, v in self.__dict__.items() if k != "_client"}

    def _need_run(self) -> str:
        if not self.run_id:
            raise TrackingError(f"{type(self).__name__}: no run started yet (call start first)")
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Log a flat dict (values become strings of at most 6000 characters, keys sanitized).
        Params already logged with the same value are skipped; a different value for a logged
        param raises :class:`TrackingError` (a resumed run must not silently change its config).
        Returns what was logged."""
        from mlflow.entities import Param

        run_id = self._need_run()
        wanted = sanitized_params(params)
        existing = _retry(lambda: self.client.get_run(run_id).data.params, f"read params of run {run_id}")
        clash = {k: (existing[k], v) for k, v in wanted.items() if k in existing and existing[k] != v}
        if clash:
            shown = "; ".join(f"{k}: logged {a!r}, now {b!r}" for k, (a, b) in list(clash.items())[:5])
            raise TrackingError(f"MLflow run {run_id} already has different values for {len(clash)} "
                                f"param(s) ({shown}); start a new run instead of resuming this one")
        new = {k: v for k, v in wanted.items() if k not in existing}
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            chunk = items[i:i + PARAMS_PER_BATCH]
            _retry(lambda chunk=chunk: self.client.log_batch(run_id, params=chunk), f"log params to run {run_id}")
        return new

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
        """Log the numeric values of ``metrics`` at ``step`` (non-numeric values such as strings
        or nested dicts are skipped; bools count as 0/1). Transient store errors are retried with
        backoff; if the values still cannot be stored, :class:`TrackingError` is raised - numeric
        metrics are never dropped silently. Returns what was logged."""
        from mlflow.entities import Metric

        run_id = self._need_run()
        ts = int(time.time() * 1000)  # fixed across retries: a repeated batch is the same rows
        values: dict[str, float] = {}
        for k, v in metrics.items():
            x = as_number(v)
            if x is not None:
                values[sanitize_key(k)] = x
        items = [Metric(k, x, ts, int(step or 0)) for k, x in values.items()]
        for i in range(0, len(items), METRICS_PER_BATCH):
            chunk = items[i:i + METRICS_PER_BATCH]
            _retry(lambda chunk=chunk: self.client.log_batch(run_id, metrics=chunk),
                   f"log {len(chunk)} metric(s) at step {step} to run {run_id}")
        return values

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        run_id = self._need_run()
        items = [RunTag(sanitize_key(k), tag_value(str(v))) for k, v in tags.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            chunk = items[i:i + PARAMS_PER_BATCH]
            _retry(lambda chunk=chunk: self.client.log_batch(run_id, tags=chunk), f"set tags on run {run_id}")

    def log_dataset(self, card: Mapping[str, Any], context: str = "training") -> None:
        """Record the data the run used as an MLflow dataset input (the runs table's Dataset
        column: ``name (digest)`` and ``context``). ``card``: ``data.datasets.dataset_card``:
        name, source folder, digest, split sizes, native image shape, classes; the split sizes
        and classes go into the dataset's profile, the image and label shapes into its schema.
        Logging the same card again (a resumed run) adds nothing."""
        import json

        from mlflow.data.schema import TensorDatasetSchema
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.types.schema import Schema, TensorSpec
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        run_id = self._need_run()
        sizes = {str(k): int(v) for k, v in dict(card.get("split_sizes") or {}).items()}
        schema = TensorDatasetSchema(
            features=Schema([TensorSpec(np.dtype(np.float32), (-1, *map(int, card["input_shape"])), "images")]),
            targets=Schema([TensorSpec(np.dtype(np.int64), (-1,), "labels")]))
        profile = {"num_rows": sum(sizes.values()), **{f"{k}_rows": v for k, v in sizes.items()},
                   "num_classes": len(card.get("classes") or []), "classes": list(card.get("classes") or [])}
        # MLflow's local-file source, as LocalArtifactDatasetSource writes it (resolving a path to a
        # source class instead warns that two registered classes match)
        source = json.dumps({"uri": str(card["source"])})
        dataset = Dataset(name=str(card["name"]), digest=str(card["digest"])[:36], source_type="local", source=source,
                          schema=json.dumps(schema.to_dict()), profile=json.dumps(profile))
        item = DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        _retry(lambda: self.client.log_inputs(run_id, datasets=[item]), f"log the dataset input of run {run_id}",
               retry_if=lost_insert_race)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload one file (into ``artifact_path`` folder of the run, if given)."""
        run_id = self._need_run()
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"artifact {p} does not exist or is not a file")
        _retry(lambda: self.client.log_artifact(run_id, str(p), artifact_path),
               f"upload artifact {p} to run {run_id}")

    def _terminate(self, status: str, reason: str | None) -> None:
        status = status.upper()
        if status not in _END_STATUSES:
            raise ValueError(f"run status must be one of {', '.join(_END_STATUSES)}; got {status!r}")
        run_id = self._need_run()
        if status != "FINISHED":
            self.set_tags({FAILURE_TAG: reason or f"{status.lower()} (no reason given)"})
        elif FAILURE_TAG in _retry(lambda: self.client.get_run(run_id).data.tags, f"read run {run_id}"):
            # an earlier attempt failed, this one (resumed/retried) finished: keep the run truthful
            _retry(lambda: self.client.delete_tag(run_id, FAILURE_TAG), f"clear failure tag on {run_id}")
        _retry(lambda: self.client.set_terminated(run_id, status), f"end run {run_id} as {status}")

    def _reopen(self, run_id: str) -> Any:
        run = _retry(lambda: self.client.get_run(run_id), f"fetch run {run_id}")
        if run.info.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow run {run_id} was deleted; it cannot be resumed")
        if run.info.experiment_id != self.experiment_id:
            raise TrackingError(f"MLflow run {run_id} belongs to experiment {run.info.experiment_id}, "
                                f"not {self.experiment_id}; it cannot be resumed here")
        if run.info.status != "RUNNING":
            _retry(lambda: self.client.update_run(run_id, status="RUNNING"), f"reopen run {run_id}")
        attempt = int(run.data.tags.get(ATTEMPT_TAG, "1")) + 1
        self.run_id = run_id
        self.set_tags({ATTEMPT_TAG: attempt})
        return run


class SweepTracker(_RunLogger):
    """The Tune driver's side: one parent run per sweep.

    >>> sweep = SweepTracker.from_config(cfg)            # resolves, checks, creates the experiment
    >>> parent = sweep.start_parent(cfg.tune.name, cfg.flat())
    >>> spec = sweep.trial_spec()                        # plain values, put into the trainable
    >>> ... TrialTracker.from_spec(spec, trial_id, params) inside each trial ...
    >>> sweep.finish("FINISHED")
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str | None = None):
        self.uri = validate_tracking_uri(uri)
        self.experiment_id = str(experiment_id)
        self.run_id = parent_run_id

    @classmethod
    def from_config(cls, cfg: Config, check: bool = True, timeout_s: float = 10) -> SweepTracker:
        """Resolve the URI, check the store (unless ``check=False``) and ensure the experiment
        (artifacts under ``<storage>/mlartifacts`` for a local SQLite store)."""
        uri = resolve_tracking_uri(cfg)
        if check:
            check_tracking(uri, timeout_s)
        root = StorageLayout.from_config(cfg.tune.storage_path).mlartifacts if _scheme(uri) == "sqlite" else None
        return cls(uri, ensure_experiment(uri, experiment_name(cfg), root))

    def start_parent(self, run_name: str, params: Mapping[str, Any] | None = None,
                     tags: Mapping[str, Any] | None = None,
                     parent_run_id: str | None = None) -> str:
        """Create the sweep's parent run, or (``parent_run_id`` given, e.g. on ``--resume``)
        reopen that existing run. Logs ``params`` (idempotently) and ``tags``; returns its id."""
        if parent_run_id:
            self._reopen(parent_run_id)
        else:
            all_tags = {ROLE_TAG: "sweep", ATTEMPT_TAG: "1", **{k: str(v) for k, v in (tags or {}).items()}}
            run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags),
                         f"create parent run {run_name!r}")
            self.run_id = run.info.run_id
        if parent_run_id and tags:
            self.set_tags(tags)
        if params:
            self.log_params(params)
        return self.run_id  # type: ignore[return-value]

    def trial_spec(self) -> dict[str, str]:
        """Plain values a trial needs to build its :class:`TrialTracker` (put it in the trainable)."""
        return {"uri": self.uri, "experiment_id": self.experiment_id, "parent_run_id": self._need_run()}

    def trial_tracker(self, trial_id: str, params: Mapping[str, Any] | None = None,
                      run_name: str | None = None) -> TrialTracker:
        return TrialTracker.from_spec(self.trial_spec(), trial_id, params, run_name)

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """End the parent run (``FAILED``/``KILLED`` record ``reason`` as ``natra.failure_reason``)."""
        self._terminate(status, reason)




class TrialTracker(_RunLogger):
    """One trial's child run: the MLflow :class:`~natra_ray.workflow.recorder.Recorder`. Built
    from plain values, so it pickles into a Ray worker; the MLflow client is created lazily in the
    process that uses it. Also a context manager::

        with TrialTracker(uri, exp_id, parent_id, trial_id, params) as t:
            t.log_metrics({"val_acc": 0.9}, step=1)
        # -> FINISHED, or FAILED (KILLED if interrupted) with the exception as natra.failure_reason
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, trial_id: str,
                 params: Mapping[str, Any] | None = None, run_name: str | None = None):
        if not trial_id:
            raise ValueError("TrialTracker needs a non-empty trial_id (it identifies the child run)")
        self.uri = validate_tracking_uri(uri)
        self.experiment_id = str(experiment_id)
        self.parent_run_id = parent_run_id
        self.trial_id = str(trial_id)
        self.params = dict(params or {})
        self.run_name = run_name or self.trial_id
        self.run_id: str | None = None

    @classmethod
    def from_spec(cls, spec: Mapping[str, str], trial_id: str, params: Mapping[str, Any] | None = None,
                  run_name: str | None = None) -> TrialTracker:
        return cls(spec["uri"], spec["experiment_id"], spec["parent_run_id"], trial_id, params, run_name)

    def _find_existing(self) -> Any | None:
        parent_q = filter_quote(self.parent_run_id)
        trial_q = filter_quote(self.trial_id)
        flt = f"tags.`{PARENT_TAG}` = {parent_q}"
        if trial_q is not None:
            flt += f" and tags.`{TRIAL_TAG}` = {trial_q}"
        runs = _retry(lambda: self.client.search_runs([self.experiment_id], filter_string=flt,
                                                      max_results=1000),
                      f"search child runs of {self.parent_run_id}")
        runs = [r for r in runs if r.data.tags.get(TRIAL_TAG) == self.trial_id]
        if not runs:
            return None
        runs.sort(key=lambda r: r.info.start_time or 0)
        if len(runs) > 1:
            log.warning("%d MLflow runs carry trial id %s under parent %s; reusing the oldest, %s",
                        len(runs), self.trial_id, self.parent_run_id, runs[0].info.run_id)
        return runs[0]

    def start(self) -> str:
        """Create the child run, or reuse the one this trial id already has under the parent (a
        retried or resumed trial), reopening it; logs the params. Returns the run id."""
        existing = self._find_existing()
        if existing is not None:
            self._reopen(existing.info.run_id)
            log.info("MLflow: trial %s resumes run %s", self.trial_id, self.run_id)
        else:
            tags = {PARENT_TAG: self.parent_run_id, TRIAL_TAG: self.trial_id, ROLE_TAG: "trial",
                    ATTEMPT_TAG: "1"}
            run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags),
                         f"create run for trial {self.trial_id}")
            self.run_id = run.info.run_id
        if self.params:
            self.log_params(self.params)
        return self.run_id  # type: ignore[return-value]

    def log_classifier(self, model: torch.nn.Module, input_example: Any, input_spec: Any = None,
                       max_examples: int = 4) -> str:
        """Log ``model`` as the MLflow model ``classifier`` of this run and return its model URI.

        What is logged takes the dataset's own images: ``input_spec`` (a
        ``data.datasets.InputSpec``, e.g. ``input_spec(cfg.data)``) says their native shape and
        the preprocessing the loader applies (Fashion-MNIST: 1x28x28, zero-padded to 32), which
        becomes part of the model (``natra_ray.export.NativeInputClassifier``); ``None`` means the
        example is already at the model's size. ``input_example``: float32 images in [0, 1] at
        that native shape, (B, C, H, W); the signature (tensor (-1, C, H, W) -> logits
        (-1, classes)) is inferred from a CPU eval copy. The model is saved as a ``torch.export``
        program (MLflow's ``pt2``): loading it needs torch and MLflow, not natra_ray, and it
        refuses any other image shape."""
        return log_classifier_model(self.uri, self.experiment_id, self._need_run(), self.trial_id, model,
                                    input_example, input_spec, max_examples)

    def end(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """End the run: ``FINISHED``, or ``FAILED``/``KILLED`` with ``reason`` recorded as the tag
        ``natra.failure_reason``."""
        self._terminate(status, reason)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """FINISHED, or the status the jobs give a run that an exception ended
        (``console.end_status``: KILLED for an interrupt, FAILED otherwise) with the exception as
        the reason. The exception itself always propagates."""
        if exc is None:
            self.end("FINISHED")
            return
        from natra_ray.distributed.console import end_status

        try:
            self.end(end_status(exc), f"{type(exc).__name__}: {exc}"[:5000])
        except Exception:  # never mask the trial's own exception
            log.exception("MLflow: could not record the failure of trial %s", self.trial_id)
