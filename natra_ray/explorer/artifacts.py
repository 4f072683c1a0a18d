"""Find the four saved files of one trained pipeline: generator, encoder, directions, classifier.

Reads files and their small JSON manifests only; nothing here trains or imports the stages.

A folder given to the explorer is one of:

1. *flat*: ``generator_shifted.pt`` (or ``generator.pt``), ``encoder.pt``, ``directions.pt`` and
   ``classifier.pt`` side by side (what ``jobs/explore.py --run-id`` assembles);
2. a *storage root* (``~/natra_ray_results``, a ``run_pipeline`` root): the cache entries
   ``cache/bies-<key>/{encoder.pt, generator_shifted.pt}`` and ``cache/directions-<key>/
   directions.pt`` written by ``stages/pipeline.py``, and classifiers under ``trials/<id>/`` (Tune)
   or ``runs/<name>/`` (``run_pipeline``);
3. one *trial folder* of a storage root (``trials/<id>``): its classifier, the root's cache.

When a root holds several cache entries, the ones whose saved config matches the classifier's
(the trial's config is stored in ``classifier.pt``) are kept; what is still ambiguous is an error
that lists the candidates.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from natra_ray import cache
from natra_ray.checkpoints import read_checkpoint
from natra_ray.workflow.layout import CLASSIFIER_FOLDERS, StorageLayout

GENERATOR_NAMES = ("generator_shifted.pt", "generator.pt")  # the shifted one is what decoding uses
# Data fields that do not change the training images (stages/pipeline.py ignores them in its keys):
# a BIES entry trained with another test subset still fits a classifier (bies_matches).
_NOT_TRAINING_DATA = ("test_subset", "num_workers", "download")


class ArtifactError(ValueError):
    """The pipeline's files cannot be found, or are ambiguous; the message says what to pass."""


@dataclass(frozen=True)
class PipelineFiles:
    generator: Path
    encoder: Path
    directions: Path
    classifier: Path
    source: str = ""  # where they came from (shown on the page)

    def missing(self) -> List[str]:
        return [f"{k} ({p})" for k, p in self.as_dict().items() if not Path(p).is_file()]

    def as_dict(self) -> Dict[str, Path]:
        return {"generator": self.generator, "encoder": self.encoder,
                "directions": self.directions, "classifier": self.classifier}


def _first_existing(folder: Path, names: Sequence[str]) -> Optional[Path]:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _complete_entries(entries: Path, stage: str, must_hold: str) -> List[Path]:
    return sorted(p for p in entries.glob(f"{stage}-*")
                  if p.is_dir() and cache.is_complete(p) and (p / must_hold).is_file())


def _manifest(entry: Path) -> Dict[str, Any]:
    try:
        return cache.read_manifest(entry)
    except (OSError, ValueError):
        return {}


def _agrees(saved: Any, wanted: Any) -> bool:
    """Equal on the keys both sides have (a config saved by an older version may lack new keys)."""
    if isinstance(saved, Mapping) and isinstance(wanted, Mapping):
        return all(_agrees(saved[k], wanted[k]) for k in saved.keys() & wanted.keys())
    return saved == wanted


def _training_data(d: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if k not in _NOT_TRAINING_DATA}


def _lce_free(d: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if not k.startswith("lce_")}


def bies_matches(entry: Path, cfg: Mapping[str, Any]) -> bool:
    """Was this BIES entry trained for ``cfg`` (same training data, GAN and encoder settings)?"""
    saved = read_checkpoint(entry / "encoder.pt").get("config") or {}
    return (_agrees(_training_data(saved.get("data", {})), _training_data(cfg.get("data", {})))
            and _agrees(saved.get("gan", {}), cfg.get("gan", {}))
            and _agrees(_lce_free(saved.get("encoder", {})), _lce_free(cfg.get("encoder", {}))))


def directions_match(entry: Path, cfg: Mapping[str, Any]) -> bool:
    saved = _manifest(entry).get("meta", {}).get("directions")
    return saved is None or _agrees(saved, cfg.get("directions", {}))


def _pick(stage: str, entries: List[Path], cfg: Optional[Mapping[str, Any]], match, hint: str) -> Path:
    if not entries:
        raise ArtifactError(f"no finished {stage} cache entry ({stage}-<key>/) found; {hint}")
    if len(entries) > 1 and cfg is not None:
        fitting = [e for e in entries if match(e, cfg)]
        entries = fitting or entries
    if len(entries) > 1:
        names = ", ".join(e.name for e in entries)
        raise ArtifactError(f"several {stage} cache entries fit this classifier ({names}); pass --run-id "
                            f"(MLflow records which ones a trial used) or the files explicitly ({hint})")
    return entries[0]


def from_cache(entries: Path, classifier: Path, source: str = "") -> PipelineFiles:
    """Upstream entries of the stage cache ``entries`` that fit ``classifier`` (see the module docstring)."""
    cfg = read_checkpoint(classifier).get("config") or None
    hint = "--encoder/--generator/--directions select files directly"
    bies = _pick("bies", _complete_entries(entries, "bies", "encoder.pt"), cfg, bies_matches, hint)
    dirs = _pick("directions", _complete_entries(entries, "directions", "directions.pt"), cfg, directions_match, hint)
    gen = _first_existing(bies, GENERATOR_NAMES)
    if gen is None:
        raise ArtifactError(f"{bies} has no {' or '.join(GENERATOR_NAMES)}")
    return PipelineFiles(gen, bies / "encoder.pt", dirs / "directions.pt", classifier, source or str(entries.parent))


def from_cache_names(entries: Path, names: Sequence[str], classifier: Path, source: str = "") -> PipelineFiles:
    """The entries named ``names`` (e.g. ``bies-<key>``, ``directions-<key>``, as a trial logs them)."""
    by_stage = {n.split("-", 1)[0]: entries / n for n in names}
    missing = [s for s in ("bies", "directions") if s not in by_stage]
    if missing:
        raise ArtifactError(f"the run does not name its {' and '.join(missing)} cache entries "
                            f"(logged as upstream/<stage>-<key>/); pass --artifacts instead")
    bies, dirs = by_stage["bies"], by_stage["directions"]
    for entry in (bies, dirs):
        if not entry.is_dir():
            raise ArtifactError(f"cache entry {entry} does not exist on this machine; run the explorer where "
                                f"the pipeline's storage is, or pass --storage with the folder holding cache/")
    gen = _first_existing(bies, GENERATOR_NAMES)
    if gen is None:
        raise ArtifactError(f"{bies} has no {' or '.join(GENERATOR_NAMES)}")
    return PipelineFiles(gen, bies / "encoder.pt", dirs / "directions.pt", classifier, source)


def find_pipeline(folder: str | Path) -> PipelineFiles:
    """The pipeline files in ``folder`` (flat folder, storage root, or a trial folder of one)."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist; pass a pipeline folder (with cache/ "
                            f"and trials/ or runs/) or a folder holding the four .pt files")
    gen = _first_existing(folder, GENERATOR_NAMES)
    flat = [folder / n for n in ("encoder.pt", "directions.pt", "classifier.pt")]
    if gen is not None and all(p.is_file() for p in flat):
        return PipelineFiles(gen, *flat, source=str(folder))
    root = StorageLayout(folder)
    if root.is_root():
        clfs = root.classifiers()  # newest first
        if not clfs:
            raise ArtifactError(f"{folder} has a cache/ but no trained classifier under "
                                f"{' or '.join(f'{s}/<name>/classifier.pt' for s in CLASSIFIER_FOLDERS)}")
        if len(clfs) > 1:
            listed = ", ".join(str(c.parent.relative_to(folder)) for c in clfs[:8])
            raise ArtifactError(f"{folder} holds {len(clfs)} classifiers ({listed}{' ...' if len(clfs) > 8 else ''}); "
                                f"pass one of those folders, e.g. --artifacts {clfs[0].parent}")
        return from_cache(root.cache, clfs[0], f"{folder} ({clfs[0].parent.relative_to(folder)})")
    owner = StorageLayout.of_classifier_folder(folder)  # trials/<id> or runs/<name> of a root
    if owner is not None and (folder / "classifier.pt").is_file():
        return from_cache(owner.cache, folder / "classifier.pt", str(folder))
    raise ArtifactError(f"{folder} is not a pipeline folder: expected generator_shifted.pt, encoder.pt, "
                        f"directions.pt and classifier.pt, or a storage root with cache/ and trials/ or runs/")


def with_overrides(files: Optional[PipelineFiles], **paths: Optional[str | Path]) -> PipelineFiles:
    """``files`` with any explicitly given paths replacing the found ones."""
    given = {k: Path(v).expanduser().resolve() for k, v in paths.items() if v}
    if files is None:
        lacking = [k for k in ("generator", "encoder", "directions", "classifier") if k not in given]
        if lacking:
            raise ArtifactError(f"without --artifacts or --run-id, pass all four files; missing: "
                                f"{', '.join('--' + k for k in lacking)}")
        return PipelineFiles(**given, source="explicit files")  # type: ignore[arg-type]
    return PipelineFiles(**{**files.as_dict(), **given}, source=files.source)
