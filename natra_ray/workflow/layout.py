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
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Folders that hold one trained classifier per sub-folder (what the explorer can open).
CLASSIFIER_FOLDERS = ("trials", "runs")


@dataclass(frozen=True)
class StorageLayout:
    root: Path

    @classmethod
    def from_config(cls, storage_path: str = "") -> "StorageLayout":
        """``tune.storage_path``, else ``$NATRA_STORAGE``, else ``~/natra_ray_results``; absolute,
        because a job sent with ``ray job submit`` runs in a temporary copy of its working dir,
        where a relative default would silently vanish."""
        root = storage_path or os.environ.get("NATRA_STORAGE") or str(Path.home() / "natra_ray_results")
        return cls(Path(root).expanduser().resolve())

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
