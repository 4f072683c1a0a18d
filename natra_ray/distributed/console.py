"""The console of a Ray job: stage lines and progress bars, and Ray's own chatter off unless
``--verbose`` / ``NATRA_VERBOSE=1``.

Ray's chatter reaches the driver's console from every process of the job (controllers, Train
workers, Ray Data coordinators, C++ core workers). Where Ray has a setting for it, it is turned
down there (``train_logging_config``, ``quiet_ray_data``, ``MLFLOW_LOGGING_LEVEL``); what has none
(the C++ core worker's notes, Ray Train's and Ray Data's lifecycle lines) is dropped by
``RayNoiseFilter`` on the driver's stdout / stderr, which every forwarded line passes through.
"""
from __future__ import annotations

import io
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from natra_ray import progress
from natra_ray.workflow.layout import StorageLayout

# Lines Ray prints for itself that say nothing a user acts on. Matched anywhere in a line
# (forwarded lines carry a "(Actor pid=...)" prefix).
RAY_NOISE = re.compile("|".join([
    r"core_worker\.cc:\d+",                       # C++ core worker notes (PreemptionWatcher max_restarts, ...)
    r"Checkpoint successfully created at: ",      # Ray Train, per report
    r"Reporting training result \d+: TrainingReport\(",
    r"Setting up process group for: ",
    r"Moving model to device: ",
    r"Requesting resources: \{",
    r"Attempting to start training worker group",
    r"Started training worker group of size",
    r"world_rank=\d+, local_rank=\d+, node_rank=\d+",
    r"Starting execution of Dataset ",            # Ray Data lifecycle
    r"Execution plan of Dataset ",
    r"Progress bars disabled\. To enable",
    r"Dataset \S+ execution finished in ",
    r"Token authentication is enabled for this Ray cluster",
    r"To visualize your results with TensorBoard",
    r"A new study created in memory with name",   # Optuna
    # a forwarded line with nothing after its "(Actor pid=...)" prefix: the newline that ends a
    # remote progress bar's update
    r"^(\x1b\[[0-9;]*m)*\([^)]*pid=\d+[^)]*\)(\x1b\[[0-9;]*m)*\s*$",
]))


class RayNoiseFilter(io.TextIOBase):
    """A text stream that forwards everything to ``inner`` except whole lines matching
    ``RAY_NOISE``. Text without a newline that redraws in place (a progress bar's ``\\r``) goes
    through at once, so bars stay live."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self._buf = ""
        self.dropped = 0

    def write(self, s: str) -> int:
        self._buf += s
        while True:
            nl = self._buf.find("\n")
            if nl < 0:
                break
            line, self._buf = self._buf[:nl + 1], self._buf[nl + 1:]
            if RAY_NOISE.search(line):
                self.dropped += 1
            else:
                self.inner.write(line)
        if "\r" in self._buf or len(self._buf) > 4096:
            self.inner.write(self._buf)
            self._buf = ""
        return len(s)

    def flush(self) -> None:
        self.inner.flush()

    def isatty(self) -> bool:
        return self.inner.isatty()

    def fileno(self) -> int:
        return self.inner.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.inner, "encoding", "utf-8")


def setup_driver(verbose: bool, encoder_cfg: Any = None) -> None:
    """Once, at the start of a job's driver, before Ray starts: the verbosity reaches every
    process of a local cluster through ``NATRA_VERBOSE`` (set before ``ray.init``, inherited by
    its raylet and workers), Ray's chatter is filtered out of this process's console, the LPIPS
    fallback of ``encoder_cfg`` is warned about once for the whole run (``None``: not here, e.g.
    a job called in-process, whose environment is not its own), and Ctrl-C / SIGTERM end the job
    in one line (``stop_on_signals``)."""
    from natra_ray.losses import announce_random_backbone
    from natra_ray.runtime import setup_logging

    if verbose:
        os.environ[progress.VERBOSE_ENV] = "1"
    # Ray Train routes a worker's print() through its logger, which splits a remote progress
    # bar's update from its newline and loses its closing one (the bar stays drawn, redrawn
    # forever): prints go to the worker's stdout as in any other Ray process.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    verbose = progress.verbose()
    setup_logging(verbose=verbose)
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # its info and notes, in every process
        # Ray's C++ handler prints a stack dump for SIGTERM (`ray job stop`) and then aborts the
        # driver, before and instead of the job's own one-line ending. Read when Ray is imported.
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        sys.stdout = RayNoiseFilter(sys.stdout)
        sys.stderr = RayNoiseFilter(sys.stderr)
    if encoder_cfg is not None:
        announce_random_backbone(encoder_cfg)
    stop_on_signals()


def worker_env() -> Dict[str, str]:
    """This run's console settings that a Ray worker must see too (``setup_driver`` and the
    LPIPS notice set them here; a local cluster's workers inherit them, a remote one's get them
    through the job's runtime env)."""
    from natra_ray.losses import FALLBACK_ANNOUNCED_ENV

    keys = (progress.VERBOSE_ENV, "RAY_TRAIN_ENABLE_PRINT_PATCH", "MLFLOW_LOGGING_LEVEL", FALLBACK_ANNOUNCED_ENV)
    return {k: os.environ[k] for k in keys if k in os.environ}


def train_logging_config():
    """Ray Train's ``LoggingConfig`` for our trainers: its per-report info lines only with
    ``--verbose``."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if progress.verbose() else "WARNING")


def tune_verbosity() -> int:
    """Tune's console: its trial table and each trial's start and end (1), or every result (2)."""
    return 2 if progress.verbose() else 1


def quiet_ray_data() -> None:
    """In the process that builds a Ray Data pipeline: no per-execution plan printout, no
    per-operator bars (the trial's epoch bar shows the progress)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = progress.verbose()


def setup_worker() -> None:
    """In a Ray worker (trial driver, Train worker): our logging levels, and progress bars drawn
    by the job's driver (``ray.experimental.tqdm_ray``) instead of this process's stderr."""
    from natra_ray.runtime import setup_logging

    import logging

    setup_logging()
    if not progress.verbose():  # the worker loops' per-step logs: the bars show the same
        logging.getLogger("natra_ray.distributed.train").setLevel(logging.WARNING)
    from ray.experimental import tqdm_ray

    progress.set_bar_factory(lambda total, desc, unit: tqdm_ray.tqdm(total=total, desc=desc, unit=unit))


_SIGNALLED: List[int] = []  # the signals that asked this job to stop
_HANDLERS: List[Any] = []  # the job's own handler, once stop_on_signals installed it


def stop_on_signals() -> None:
    """SIGTERM (``ray job stop``, ``kill``) ends the job like Ctrl-C: a ``KeyboardInterrupt``
    in the main thread, and the signal remembered for ``is_interrupt``. Tune's own Ctrl-C
    handler is off, so both end in the same one line instead of Tune reporting an unfinished
    sweep as the job's result."""
    def stop(signum, frame):
        _SIGNALLED.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    _HANDLERS.append(stop)
    reclaim_signals()


def reclaim_signals() -> None:
    """Put the job's handlers back after ``ray.init``, which installs its own SIGTERM handler in
    a driver (a bare ``SystemExit(1)``: the job would end as a failure, with no word of what was
    kept). A no-op in processes that did not call ``stop_on_signals``."""
    import signal
    import threading

    if _HANDLERS and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _HANDLERS[-1])
        signal.signal(signal.SIGINT, _HANDLERS[-1])


def is_interrupt(e: BaseException) -> bool:
    """Whether ``e`` is the job being stopped. Ray's blocking calls (``ray.wait`` inside Tune,
    ``ray.get``) turn the interrupt raised in them into ``SystemExit(1)``, so a ``SystemExit``
    after one of our signals is an interrupt too, not a failure."""
    return isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and bool(_SIGNALLED))


def end_status(e: BaseException) -> str:
    """The MLflow status of a run that ``e`` ended."""
    return "KILLED" if is_interrupt(e) else "FAILED"


def kept_summary(root: Path | StorageLayout, tune_name: Optional[str] = None) -> str:
    """What an interrupted run leaves to resume from under the storage root (a path or its
    layout), in words: the stage cache's finished entries, the sweep's finished trials, the Train
    runs' checkpoints."""
    from natra_ray import cache

    store = root if isinstance(root, StorageLayout) else StorageLayout(Path(root))
    parts = []
    entries = sorted(p.name.split("-")[0] if not p.name.startswith("codes-") else "-".join(p.name.split("-")[:2])
                     for p in store.cache.glob("*-*") if cache.is_complete(p))
    if entries:
        parts.append(f"{len(entries)} cache entr{'y' if len(entries) == 1 else 'ies'} "
                     f"({', '.join(dict.fromkeys(entries))}) in {store.cache}")
    if tune_name:
        done = 0
        experiment = store.tune_experiment(tune_name)
        for f in experiment.glob("*/result.json"):
            try:
                done += any('"done": true' in line for line in f.read_text().splitlines())
            except OSError:
                pass
        parts.append(f"{done} finished trial{'' if done == 1 else 's'} in {experiment}")
    runs = sorted({c.parent.name for c in store.train_runs.glob("*/checkpoint_*")})
    if runs:
        parts.append(f"Train checkpoints of {len(runs)} run{'' if len(runs) == 1 else 's'} in {store.train_runs}")
    return ", ".join(parts) or "nothing (no stage had finished)"


def resume_command(job: str, argv: List[str], flag: Optional[str] = "--resume") -> str:
    """The command line that continues this run: the same arguments, plus ``flag``."""
    args = [a for a in argv if a != "--verbose"]
    if flag and flag not in args:
        args.append(flag)
    return shlex.join(["python", job, *args])


def end_interrupted(what: str, resume: str) -> int:
    """Ctrl-C / SIGTERM: stop Ray without its shutdown noise (the C++ core worker writes to the
    file descriptor, not to ``sys.stderr``), then one line. Returns the exit status (130)."""
    import signal
    import threading

    import ray

    if threading.current_thread() is threading.main_thread():  # a second Ctrl-C must not tear the line
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if ray.is_initialized():
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            ray.shutdown()
        except BaseException:  # the line below matters more than a clean shutdown
            pass
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
    progress.say(f"interrupted: kept {what}; resume with: {resume}")
    return 130


__all__ = ["RAY_NOISE", "RayNoiseFilter", "setup_driver", "worker_env", "train_logging_config",
           "tune_verbosity", "quiet_ray_data", "setup_worker", "stop_on_signals", "reclaim_signals", "is_interrupt", "end_status", "kept_summary", "resume_command", "end_interrupted"]
