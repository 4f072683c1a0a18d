"""MLflow tracking for sweeps and benchmarks: one parent run per job, one child run per trial.

The only package of the project that imports ``mlflow`` (lazily: resolving and checking a URI
costs no MLflow import, so a bad URI fails in milliseconds, before any compute).

* ``uri``: which store. URI validation, the given or default URI (``<storage>/mlflow.db``), the
  experiment name and artifact root, reachability checks, the UI's command and runs page.
* ``values``: talking to MLflow safely. :class:`TrackingError`, key and value clean-up, retries
  of transient errors, and the patch of MLflow's private globals for calls with no client form.
* ``experiment``: the experiment a job's runs go into, and the record of a resumable job's
  parent run (which run, in which store).
* ``runs``: the run lifecycle. :class:`SweepTracker` (the parent run, on the driver) and
  :class:`TrialTracker` (a trial's child run: the MLflow ``workflow.recorder.Recorder``).
* ``registry``: the classifier as an MLflow model: logged, registered, loaded, and the trial
  files the explorer fetches.
"""
from natra_ray.distributed.tracking.experiment import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    PARENT_RECORD,
    ensure_experiment,
    recorded_parent_run,
    save_parent_run,
)
from natra_ray.distributed.tracking.registry import (
    CLASSIFIER_NAME,
    fetch_trial_files,
    load_classifier,
    register_best,
)
from natra_ray.distributed.tracking.runs import SweepTracker, TrialTracker
from natra_ray.distributed.tracking.uri import (
    SUPPORTED_SCHEMES,
    check_tracking,
    default_artifact_root,
    experiment_name,
    given_tracking_uri,
    open_ui_command,
    resolve_tracking_uri,
    runs_page_url,
    validate_tracking_uri,
)
from natra_ray.distributed.tracking.values import TrackingError, sanitize_key

# Internals the tests reach for (the store's client, the retry, the fluent-globals patch).
from natra_ray.distributed.tracking.values import _client, _fluent_target, _retry  # noqa: F401  isort: skip

__all__ = [
    "CLASSIFIER_NAME", "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "PARENT_RECORD", "SUPPORTED_SCHEMES", "SweepTracker",
    "TrackingError", "TrialTracker", "check_tracking", "default_artifact_root", "ensure_experiment", "experiment_name",
    "fetch_trial_files", "given_tracking_uri", "load_classifier", "open_ui_command", "recorded_parent_run",
    "register_best", "resolve_tracking_uri", "runs_page_url", "sanitize_key", "save_parent_run", "validate_tracking_uri",
]
