"""Content-addressed stage outputs: computed once per distinct upstream config, shared.

An entry lives at ``<root>/<stage>-<key>/``. It is produced in a private temporary
directory and renamed into place only when complete, so a killed writer never leaves a
half-written entry that someone else reads. An exclusive ``fcntl`` lock per key makes two
processes (two Tune trials on one node, or on a shared file system that honours POSIX locks)
that ask at once compute it once: the second waits, then reads the finished entry.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator

log = logging.getLogger(__name__)

MANIFEST = "_complete.json"


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def content_key(obj: Any) -> str:
    """The 16-hex-digit key of a JSON-able value (keys sorted): every stage key, config key and
    benchmark setup key is this one hash."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def entry_dir(root: str | Path, stage: str, key: str) -> Path:
    return Path(root) / f"{stage}-{key}"


def is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def cached(root: str | Path, stage: str, key: str, produce: Callable[[Path], Dict[str, Any]],
           meta: Dict[str, Any] | None = None) -> Path:
    """Return the directory of the finished entry, calling ``produce(tmp_dir)`` if needed.

    ``produce`` writes its files into the directory it is given and returns a small JSON-able
    summary (stored in the manifest). ``meta`` (e.g. the upstream config) is stored too, so an
    entry says what made it.
    """
    final = entry_dir(root, stage, key)
    if is_complete(final):
        return final
    with _locked(Path(root) / ".locks" / f"{stage}-{key}.lock"):
        if is_complete(final):  # another process finished it while we waited
            log.info("cache hit after wait: %s", final)
            return final
        if final.exists():  # left by a writer that died between rename and manifest: redo
            shutil.rmtree(final)
        # Temporary folders of writers of this key that were killed (only the lock holder makes
        # them, so none of these is in use): never read, removed so they do not pile up.
        for stale in Path(root).glob(f".{stage}-{key}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stage}-{key}.", dir=root))
        try:
            t0 = time.time()
            summary = produce(tmp)
            manifest = {"stage": stage, "key": key, "seconds": time.time() - t0,
                        "summary": summary, "meta": meta or {}, "pid": os.getpid()}
            os.replace(tmp, final)
            # The manifest is written last: its presence is what "complete" means.
            (final / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=1, default=str))
            os.replace(final / (MANIFEST + ".tmp"), final / MANIFEST)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("cache stored: %s", final)
        return final


def read_manifest(path: Path) -> Dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())
