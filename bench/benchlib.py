"""Shared helpers for the ``bench/`` scripts (not part of the package; no tests import it).

Every benchmark reports *ratios measured in one run on one machine*: the machines are shared
and noisy, so absolute times move from run to run while ratios of interleaved measurements
hold much better. Each script writes ``bench/results/<name>.md`` (a Markdown table with the
exact command, the machine and the load average) and ``bench/results/<name>.json`` (raw
numbers); ``bench/collect.py`` copies the tables into ``BENCHMARKS.md``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# NATRA_BENCH_RESULTS: another folder (bench/gpu/run.sh writes a GPU machine's results under $OUT)
RESULTS = Path(os.environ["NATRA_BENCH_RESULTS"]) if os.environ.get("NATRA_BENCH_RESULTS") else BENCH / "results"


# --------------------------------------------------------------------------- machine
def load_avg() -> Tuple[float, float, float]:
    return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_version() -> str:
    """Which natra_ray was measured: ``$NATRA_BENCH_COMMIT`` when the caller ran a snapshot
    (``git archive <commit>`` on PYTHONPATH), else this checkout's HEAD (+ "dirty" when
    natra_ray/ has uncommitted changes)."""
    if os.environ.get("NATRA_BENCH_COMMIT"):
        return os.environ["NATRA_BENCH_COMMIT"]
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "natra_ray"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def machine() -> Dict[str, Any]:
    """What the numbers were measured on (the load average is taken again at the end)."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "load_avg_start": load_avg(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "natra_ray": code_version()}


def matmul_peak(threads: Sequence[int] = (1, 2), n: int = 2048, reps: int = 5) -> Dict[int, float]:
    """This machine's fp32 matmul peak in GFLOP/s: best of ``reps`` ``torch.mm`` of two n x n
    matrices (2 n^3 FLOPs), per intra-op thread count. Restores the caller's thread count."""
    before = torch.get_num_threads()
    a, b = torch.randn(n, n), torch.randn(n, n)
    out: Dict[int, float] = {}
    try:
        for t in threads:
            torch.set_num_threads(t)
            torch.mm(a, b)  # warm-up (allocations, thread pool)
            best = min(_time(lambda: torch.mm(a, b)) for _ in range(reps))
            out[t] = 2 * n ** 3 / best / 1e9
    finally:
        torch.set_num_threads(before)
    return out


# --------------------------------------------------------------------------- timing
def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # a kernel still queued is time of the call that queued it


def _time(fn: Callable[[], Any]) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


@dataclass
class Timing:
    """Seconds of each repetition; ``median`` is what tables report, ``best`` the noise floor."""

    samples: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)

    def as_dict(self) -> Dict[str, Any]:
        return {"median_s": self.median, "best_s": self.best, "samples_s": self.samples}


def interleaved(fns: Dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> Dict[str, Timing]:
    """Time every function once per round, in turn (A B C A B C ...), after ``warmup`` untimed
    calls each: load that comes and goes on a shared machine then hits every variant alike,
    which keeps their *ratios* meaningful even when absolute times drift."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(_time(fn))
    return {k: Timing(v) for k, v in samples.items()}


def paired_ratio(num: Timing, den: Timing) -> float:
    """Median over rounds of num_i / den_i (paired: each round's two samples saw the same load)."""
    return statistics.median(a / b for a, b in zip(num.samples, den.samples))


# --------------------------------------------------------------------------- output
def command() -> str:
    """The exact command that produced a result, runnable from the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    return " ".join([".venv/bin/python", script, *sys.argv[1:]])


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """``natra_ray.report.markdown_table`` with three significant digits (whole numbers from 100
    on), without the final newline (the scripts join tables and paragraphs with blank lines)."""
    from natra_ray.report import markdown_table

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    return markdown_table(headers, rows, cell).rstrip("\n")


def write_results(name: str, mode: str, body_md: str, data: Dict[str, Any], info: Dict[str, Any]) -> Path:
    """``results/<name>.md`` (header + body) and ``results/<name>.json`` (info + data);
    ``<name>_full.*`` for a full-mode run."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = {**info, "load_avg_end": load_avg(), "command": command(), "mode": mode,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    head = (f"Command: `{info['command']}` ({mode} mode, {info['finished']})  \n"
            f"Machine: {info['cpu']}, {info['usable_cores']} usable cores, torch {info['torch']}, "
            f"{info['torch_threads']} intra-op thread(s); load average (1/5/15 min) "
            f"{info['load_avg_start']} at start, {info['load_avg_end']} at end; natra_ray at {info['natra_ray']}.\n\n")
    stem = name if mode == "quick" else f"{name}_{mode}"  # a full run does not overwrite the quick one
    md = RESULTS / f"{stem}.md"
    md.write_text(head + body_md.rstrip() + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"info": info, "data": data}, indent=1, default=str))
    print(md.read_text())
    return md


def start(threads: int = 1) -> Dict[str, Any]:
    """Common start of a benchmark: one intra-op thread (2 shared cores: a spinning OpenMP
    thread that gets descheduled stalls the rest) and the machine record."""
    torch.set_num_threads(threads)
    return machine()


# --------------------------------------------------------------------------- models
def cpu_stage_dir(stage: str, storage: str = "") -> Path:
    """The stage-cache entry of ``stage`` ("gan", "bies", "directions") for the ``cpu`` profile,
    i.e. what ``make run`` trained, under ``storage`` (default: the profile's storage root)."""
    from natra_ray import cache
    from natra_ray.config import load_config
    from natra_ray.workflow.layout import StorageLayout
    from natra_ray.workflow.upstream import upstream_keys

    cfg = load_config("cpu")
    layout = StorageLayout.from_config(storage or cfg.tune.storage_path)
    return cache.entry_dir(layout.cache, stage, upstream_keys(cfg)[stage])


def random_latent_source(cfg: Any, n_items: int, n_codes: int, seed: int = 0, device: Any = "cpu") -> Any:
    """A ``LatentSource`` at ``cfg``'s sizes with random weights: the generator of ``cfg.gan``,
    ``n_items`` random W+ codes (n_codes per item, like LCE's), alpha = (1, 0, ...) and
    ``robust.num_directions`` random orthonormal directions. Speed does not depend on trained
    weights, so the speed benchmarks use this and need no upstream artifacts."""
    from natra_ray.augment.latent import LatentSource
    from natra_ray.models import create_generator
    from natra_ray.models.latent import Directions, resolve_layer_range
    from natra_ray.stages.gan import generator_kwargs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        G = create_generator(cfg.gan.generator, **generator_kwargs(cfg)).eval().requires_grad_(False)
        with torch.no_grad():
            w = G.mapping(torch.randn(n_items, cfg.gan.z_dim))  # (n, w_dim)
        ws = G.broadcast(w)[:, None].repeat(1, n_codes, 1, 1)  # (n, N, num_ws, w_dim)
        ws = ws + 0.05 * torch.randn_like(ws)
        c_l = G.layer_shape(cfg.encoder.lce_layer)[0]
        alpha = torch.zeros(n_items, n_codes, c_l)
        alpha[:, 0] = 1.0
        k = cfg.directions.num_directions
        q, _ = torch.linalg.qr(torch.randn(G.w_dim, k))  # (w_dim, k) orthonormal columns
        dirs = Directions(q.T.contiguous(), torch.ones(k), "random")
    start_, end = resolve_layer_range(G, cfg.robust.layer_start, cfg.robust.layer_end)
    # The pipeline's codes carry encoder.lce_layer whatever N is (N = 1 decodes exactly as G).
    return LatentSource(G.to(device), ws, alpha, cfg.encoder.lce_layer, dirs, cfg.robust.num_directions, (start_, end),
                        torch.full((n_items,), float(cfg.robust.eps)), precision=cfg.robust.precision)
