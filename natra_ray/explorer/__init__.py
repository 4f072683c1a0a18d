"""The direction explorer (NaTra Sec. 3.4.2): a loopback web page to edit an image along the
saved principal directions and watch the classifier's prediction. Reads saved artifacts only
(models + checkpoints + directions); no training, no Ray, no MLflow (``jobs/explore.py`` resolves
an MLflow run id through ``natra_ray.distributed.tracking``)."""
from natra_ray.explorer.artifacts import ArtifactError, PipelineFiles, find_pipeline, from_cache_names, with_overrides
from natra_ray.explorer.model import Explorer, RequestError
from natra_ray.explorer.server import ExplorerServer, make_server

__all__ = ["ArtifactError", "PipelineFiles", "find_pipeline", "from_cache_names", "with_overrides",
           "Explorer", "RequestError", "ExplorerServer", "make_server"]
