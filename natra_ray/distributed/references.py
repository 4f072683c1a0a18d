"""The sweep's reference classifiers: the same classifier, data and budget as every trial, trained
with ``tune.references`` (by default ``none``, plain training, and ``classic``, flips / crops /
small shifts), so the summary shows beside the trials what the natural-transformation training
bought, or cost. Scored by the same validation and test functions as the trials, never chosen as
the sweep's best.

Each reference is a Ray task running ``workflow.trial.run_trial`` in process (one torch thread
per CPU it holds), with its own MLflow child run (``natra.role=reference``); its result file makes
``--resume`` skip it when the config it was trained with has not changed.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Mapping

from natra_ray.cache import content_key
from natra_ray.config import Config
from natra_ray.workflow.layout import StorageLayout
from natra_ray.workflow.upstream import Upstream, drop_added_defaults

log = logging.getLogger(__name__)

REFERENCE_STATUS = "REFERENCE"


def reference_config(cfg: Config, method: str) -> Config:
    return cfg.replace(**{"robust.method": method})


def reference_key(cfg: Config) -> str:
    """What a reference's numbers depend on: everything but where and how the sweep runs."""
    return content_key({k: v for k, v in drop_added_defaults(cfg.flat()).items()
                        if not k.startswith(("tune.", "tracking."))})


def train_reference(cfg: Config, method: str, layout: StorageLayout, upstream: Upstream,
                    tracking: Mapping[str, str], threads: int) -> Dict[str, Any]:
    """One reference classifier: ``run_trial`` with the in-process fit and its MLflow child run."""
    import torch

    from natra_ray.distributed.tracking import TrialTracker
    from natra_ray.runtime import setup_logging
    from natra_ray.workflow.trial import in_process_fit, run_trial, trial_inputs
    from natra_ray.workflow.upstream import load_splits

    setup_logging()
    torch.set_num_threads(threads)
    rcfg, name = reference_config(cfg, method), f"reference-{method}"
    with TrialTracker.from_spec(tracking, name, rcfg.flat(), run_name=name) as recorder:
        recorder.set_tags({"natra.role": "reference", "natra.method": method})
        inputs = trial_inputs(rcfg, layout, upstream, load_splits(rcfg))
        result = run_trial(rcfg, inputs, layout.trial(name), in_process_fit, recorder)
    row = {**result.metrics, "trial_id": name, "status": REFERENCE_STATUS, "robust.method": method,
           "mlflow_run_id": recorder.run_id, "reference_key": reference_key(rcfg)}
    path = layout.sweep_reference(cfg.tune.name, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(row, indent=1, default=str))
    os.replace(tmp, path)  # a killed writer never leaves a half-written result a resume trusts
    return row


def _finished(cfg: Config, method: str, layout: StorageLayout) -> Dict[str, Any] | None:
    path = layout.sweep_reference(cfg.tune.name, method)
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return row if row.get("reference_key") == reference_key(reference_config(cfg, method)) else None


def run_references(cfg: Config, layout: StorageLayout, upstream: Upstream, tracking: Mapping[str, str]) -> List[Dict[str, Any]]:
    """Every ``tune.references`` method, as Ray tasks of ``tune.cpus_per_worker`` CPUs each, at
    once; finished ones of the same config are read back instead of retrained."""
    import ray

    rows, pending = {}, []
    for m in cfg.tune.references:
        row = _finished(cfg, m, layout)
        if row is not None:
            rows[m] = row
        else:
            pending.append(m)
    if pending:
        cpus = cfg.tune.cpus_per_worker
        task = ray.remote(num_cpus=cpus, max_retries=0)(train_reference)
        refs = {m: task.remote(cfg, m, layout, upstream, dict(tracking), max(1, int(cpus))) for m in pending}
        try:
            rows.update({m: ray.get(r) for m, r in refs.items()})
        except BaseException:
            for r in refs.values():
                ray.cancel(r)
            raise
    for m in cfg.tune.references:
        log.info("reference %s: %s", m, ", ".join(f"{k}={rows[m][k]:.4f}" for k in ("val_acc", "test_clean_acc")
                                                    if isinstance(rows[m].get(k), float)))
    return [rows[m] for m in cfg.tune.references]


__all__ = ["REFERENCE_STATUS", "run_references", "train_reference", "reference_key"]
