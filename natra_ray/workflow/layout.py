"""Where everything lives under the storage root: every folder name is spelled here, once.

```
<root>/
  cache/<stage>-<key>/        stage outputs, content-addressed (natra_ray.cache)
  train_runs/<run>/           Ray Train runs (checkpoints) of the upstream stages and trials
  tune/<sweep>/               Tune's experiment state (what --resume restores)
  sweeps/<sweep>/             a sweep's summary, trial table, Pareto front, MLflow parent record,
                              references/<method>.json (its reference classifiers' results)
  trials/<trial id>/          one sweep trial's classifier and evaluation artifacts
  benchmarks/<name>/          a benchmark's results/, runs/<method>-s<seed>/, report
  runs/<name>/                single-process runs (jobs/run_pipeline.py, the CVAE job)
  reports/                    reports of the one-off jobs
  mlflow.db, mlartifacts/     the default local MLflow store
```

Everything here outlives a node or is read by another, so on a cluster the root is one shared
file system (``tune.storage_path``; ``ray_cluster.yaml`` mounts EFS): a trial on any node opens
the cache entries, codes and checkpoints the head wrote. Node-local disk holds scratch only
(a checkpoint being written before Ray Train copies it here, Ray's own session files).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from natra_ray.config import ConfigError
from natra_ray.config_rules import storage_problem

# Folders that hold one trained classifier per sub-folder (what the explorer can open).
CLASSIFIER_FOLDERS = ("trials", "runs")


@dataclass(frozen=True)
class StorageLayout:
    root: Path

    @classmethod
    def from_config(cls, storage_path: str = "") -> "StorageLayout":
        """``tune.storage_path``, else ``$NATRA_STORAGE``, else ``~/natra_ray_results``; resolved
        once, in the driver, to the absolute path every node opens (a relative path would name
        another folder on each node, and vanish with ``ray job submit``'s temporary copy of the
        working dir). On a cluster it must be a file system every node mounts at that path."""
        env = os.environ.get("NATRA_STORAGE", "")
        if not storage_path and (problem := storage_problem(env)):
            raise ConfigError(f"$NATRA_STORAGE {problem}: give an absolute path that every node mounts (EFS/NFS)")
        root = storage_path or env or str(Path.home() / "natra_ray_results")
        return cls(Path(root).expanduser().resolve())

    @property
    def is_default(self) -> bool:
        """The home-directory default: on a cluster, a folder of the head node's own disk."""
        return self.root == (Path.home() / "natra_ray_results").resolve()

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def train_runs(self) -> Path:
        return self.root / "train_runs"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlartifacts(self) -> Path:
        return self.root / "mlartifacts"

    def sweep(self, name: str) -> Path:
        return self.root / "sweeps" / name

    def sweep_reference(self, name: str, method: str) -> Path:
        """The result file of sweep ``name``'s reference classifier trained with ``method``."""
        return self.sweep(name) / "references" / f"{method}.json"

    def tune_experiment(self, name: str) -> Path:
        return self.tune / name

    def trial(self, trial_id: str) -> Path:
        return self.root / "trials" / trial_id

    def benchmark(self, name: str) -> Path:
        return self.root / "benchmarks" / name

    def benchmark_run(self, name: str, run: str) -> Path:
        """The output folder (classifier, grids) of one method x seed of benchmark ``name``."""
        return self.benchmark(name) / "runs" / run

    def benchmark_result(self, name: str, run: str) -> Path:
        """The result file a finished method x seed leaves (what a resumed benchmark skips)."""
        return self.benchmark(name) / "results" / f"{run}.json"

    def classifiers(self) -> list:
        """Every ``<trials|runs>/<name>/classifier.pt`` under the root, newest first."""
        found = [p for f in CLASSIFIER_FOLDERS for p in (self.root / f).glob("*/classifier.pt")]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    def is_root(self) -> bool:
        return self.cache.is_dir()

    @classmethod
    def of_classifier_folder(cls, folder: Path) -> Optional["StorageLayout"]:
        """The layout a ``trials/<id>`` or ``runs/<name>`` folder belongs to, if it is in one."""
        folder = Path(folder)
        if folder.parent.name in CLASSIFIER_FOLDERS and (folder.parent.parent / "cache").is_dir():
            return cls(folder.parent.parent)
        return None


__all__ = ["StorageLayout", "CLASSIFIER_FOLDERS"]
