"""What a trial reports, and to whom: the ``Recorder`` protocol.

``run_trial`` and the stages never import a tracking library: they are handed a Recorder. The
Ray layer passes an MLflow one (``distributed/tracking``); tests, the GPU machine and the
single-process jobs pass ``NullRecorder`` (or a ``MemoryRecorder`` to look at what was said).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Protocol, Tuple, runtime_checkable


@runtime_checkable
class Recorder(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> Any: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> Any: ...

    def log_dataset(self, card: Mapping[str, Any], context: str = "training") -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None: ...

    def log_classifier(self, model: Any, input_example: Any, input_spec: Any = None) -> Any: ...


class NullRecorder:
    """Says nothing anywhere."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        pass

    def log_dataset(self, card: Mapping[str, Any], context: str = "training") -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        pass

    def log_classifier(self, model: Any, input_example: Any, input_spec: Any = None) -> None:
        pass


class MemoryRecorder(NullRecorder):
    """Keeps what it is told, for tests and in-process callers that read it back."""

    def __init__(self) -> None:
        self.params: Dict[str, Any] = {}
        self.tags: Dict[str, Any] = {}
        self.metrics: List[Tuple[Optional[int], Dict[str, Any]]] = []
        self.datasets: List[Dict[str, Any]] = []
        self.artifacts: List[Tuple[str, Optional[str]]] = []
        self.models: List[Any] = []

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tags.update(tags)

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_dataset(self, card: Mapping[str, Any], context: str = "training") -> None:
        self.datasets.append({**card, "context": context})

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def log_classifier(self, model: Any, input_example: Any, input_spec: Any = None) -> None:
        self.models.append(model)


__all__ = ["Recorder", "NullRecorder", "MemoryRecorder"]
