"""Explore a trained pipeline's latent directions in a web page (NaTra Sec. 3.4.2).

    python jobs/explore.py --artifacts ~/natra_ray_results               # the one trial stored there
    python jobs/explore.py --artifacts ~/natra_ray_results/trials/<id>   # one trial of several
    python jobs/explore.py --run-id <mlflow run id of a trial>           # as listed in the MLflow UI
    python jobs/explore.py ... --screenshot page.png                     # save the page and exit

Serves on http://127.0.0.1:8765/ (loopback). From a laptop: ssh -L 8765:127.0.0.1:8765 <host>.
Binding elsewhere (--host 0.0.0.0) is possible but exposes the page to anyone who can reach
the port (there is no login), and logs a warning.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from natra_ray.cli import fail  # noqa: E402

log = logging.getLogger("explore")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_argument_group("which pipeline (one of --artifacts / --run-id, or all four files)")
    src.add_argument("--artifacts", help="a pipeline folder: a storage root (cache/ + trials/ or runs/), one "
                                         "trial folder of it, or a folder holding the four .pt files")
    src.add_argument("--run-id", help="MLflow run id of a trial; its upstream cache entries must be on this machine")
    src.add_argument("--tracking-uri", default="", help="MLflow store (default: $MLFLOW_TRACKING_URI, else "
                                                        "sqlite:///<storage>/mlflow.db)")
    src.add_argument("--storage", default="", help="the folder holding cache/ (default: the run's "
                                                   "tune.storage_path, $NATRA_STORAGE, ~/natra_ray_results)")
    for k in ("generator", "encoder", "directions", "classifier"):
        src.add_argument(f"--{k}", default=None, help=f"use this {k} checkpoint instead of the one found")
    srv = p.add_argument_group("server")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; anything else logs "
                                                         "a warning: the page has no login)")
    srv.add_argument("--port", type=int, default=8765, help="port (0 = any free port)")
    srv.add_argument("--max-upload-mb", type=float, default=5.0, help="largest accepted upload")
    m = p.add_argument_group("model")
    m.add_argument("--device", default="cpu", help="cpu or cuda")
    m.add_argument("--max-strength", type=float, default=3.0, help="slider range, in data stds per direction")
    m.add_argument("--lce-codes", type=int, default=None, help="LCE codes per image (default: the trial's)")
    m.add_argument("--lce-steps", type=int, default=None, help="LCE refinement steps (default: the trial's)")
    m.add_argument("--gallery", type=int, default=48, help="dataset images offered as sources (0 = none)")
    m.add_argument("--split", default="test", choices=("train", "val", "test"), help="the gallery's split")
    p.add_argument("--screenshot", default=None, metavar="PNG", help="open the page in headless chromium, "
                   "pick a dataset image, move a slider, save a screenshot here and exit")
    p.add_argument("--shot-image", type=int, default=0, help="--screenshot: dataset image to pick")
    p.add_argument("--shot-direction", type=int, default=0, help="--screenshot: direction to move")
    p.add_argument("--shot-strength", type=float, default=2.0, help="--screenshot: strength to move it to")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    if args.artifacts and args.run_id:
        fail("pass either --artifacts or --run-id, not both")
    if not 0 <= args.port <= 65535:
        fail(f"--port must be 0..65535; got {args.port}")
    if args.max_upload_mb <= 0 or args.max_strength <= 0:
        fail("--max-upload-mb and --max-strength must be positive")
    return args


def files_from_run(args: argparse.Namespace, tmp: Path):
    """Download the trial's classifier; find its upstream cache entries (named in its artifacts)."""
    from natra_ray.cli import layout
    from natra_ray.config import from_dict
    from natra_ray.distributed.tracking import (default_artifact_root, fetch_trial_files, resolve_tracking_uri,
                                                validate_tracking_uri)
    from natra_ray.explorer import ArtifactError, from_cache_names
    from natra_ray.workflow.layout import StorageLayout

    # a local folder named on this machine's command line: absolute, as tune.storage_path must be
    cfg = from_dict({"tune": {"storage_path": str(Path(args.storage).expanduser().resolve())}} if args.storage else {})
    uri = validate_tracking_uri(args.tracking_uri, "--tracking-uri") if args.tracking_uri else resolve_tracking_uri(cfg)
    got = fetch_trial_files(uri, args.run_id, tmp)
    roots = [Path(args.storage)] if args.storage else []
    if got["params"].get("tune.storage_path"):
        roots.append(Path(got["params"]["tune.storage_path"]))
    roots.append(layout(cfg).root)
    if default_artifact_root(uri) is not None:  # a local SQLite store: the folder holding mlflow.db
        roots.append(default_artifact_root(uri).parent)
    needed = [n for n in got["upstream"] if n.split("-", 1)[0] in ("bies", "directions")]
    tried = [StorageLayout(r) for r in dict.fromkeys(r.expanduser().resolve() for r in roots)]
    for root in tried:
        if needed and all((root.cache / n).is_dir() for n in needed):
            return from_cache_names(root.cache, needed, got["classifier"], source=f"MLflow run {args.run_id}")
    if len(needed) == 2:
        raise ArtifactError(f"run {args.run_id} used the cache entries {' and '.join(needed)}, which are not under "
                            f"{' or '.join(str(r.cache) for r in tried)}; run the explorer where the pipeline's "
                            f"storage is, or pass --storage with the folder holding cache/")
    return from_cache_names(tried[0].cache, needed, got["classifier"])  # names what the run lacks


def main(argv=None) -> int:
    args = parse_args(argv)
    from natra_ray.runtime import setup_logging

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    import torch

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    from natra_ray.checkpoints import CheckpointError
    from natra_ray.config import ConfigError
    from natra_ray.explorer import ArtifactError, Explorer, find_pipeline, make_server, with_overrides

    tmp = Path(tempfile.mkdtemp(prefix="natra-explorer-"))  # the downloaded classifier of --run-id
    errors: tuple = (ArtifactError, CheckpointError, ConfigError, FileNotFoundError, ValueError, RuntimeError, OSError)
    try:
        if args.run_id:
            files = files_from_run(args, tmp)  # TrackingError is a ValueError
        else:
            files = find_pipeline(args.artifacts) if args.artifacts else None
        files = with_overrides(files, generator=args.generator, encoder=args.encoder,
                               directions=args.directions, classifier=args.classifier)
        log.info("pipeline: %s", ", ".join(f"{k}={v}" for k, v in files.as_dict().items()))
        explorer = Explorer(files, device=args.device, lce_codes=args.lce_codes, lce_steps=args.lce_steps,
                            max_strength=args.max_strength, gallery_size=args.gallery, split=args.split)
        server = make_server(explorer, args.host, args.port, int(args.max_upload_mb * 2**20))
    except errors as e:
        shutil.rmtree(tmp, ignore_errors=True)
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    try:
        if args.screenshot:
            return _screenshot(server, args)
        print(f"NaTra direction explorer on {server.url}  (Ctrl-C to stop)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _screenshot(server, args: argparse.Namespace) -> int:
    from natra_ray.explorer.browser import BrowserUnavailable, screenshot

    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        ex = server.explorer
        out = screenshot(server.url, args.screenshot, dataset_index=args.shot_image if args.gallery else None,
                         direction=args.shot_direction, strength=args.shot_strength,
                         start=ex.default_start, end=ex.default_end)
    except BrowserUnavailable as e:
        fail(str(e))
    finally:
        server.shutdown()
    print(f"screenshot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
