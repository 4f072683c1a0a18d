"""The sweep's and the benchmark's result tables and plots: pure formatting and plotting
(no Ray, no MLflow), handed finished rows by ``distributed/tune.py`` and ``distributed/benchmark.py``.

- the sweep: one row per trial (``summary_table``), the Pareto front of two objectives
  (``pareto_front``, ``pareto_png``);
- the benchmark: mean +- std per method over seeds, the Latent-Mixup paper's Fashion-MNIST rows
  beside ours, where the two setups differ, and a PNG chart (``write_report``), from the runs
  (one dict of metrics per method x seed) and a plain ``setup`` dict describing the budget.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from natra_ray.report import markdown_table

if TYPE_CHECKING:
    from natra_ray.search_space import SearchSpace


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# =========================================================================== the sweep
# What the trial table shows besides the objectives (and Tune's per-trial progress box).
SUMMARY_METRICS = ("val_objective", "val_acc", "val_shift_mean_acc", "val_natural_acc", "test_clean_acc", "test_natural_acc",
                   "test_corruption_mean_acc", "test_pixel_pgd_acc", "test_deepfool_score")


def summary_table(rows: List[Dict[str, Any]], space: "SearchSpace", metrics: List[str]) -> str:
    """One line per trial, best first by ``metrics[0]``: status, metrics, sampled parameters."""
    cols = list(dict.fromkeys([*metrics, *SUMMARY_METRICS]))
    params = space.param_names()
    key = metrics[0]
    rows = sorted(rows, key=lambda r: r.get(key) if isinstance(r.get(key), (int, float)) else -1e9, reverse=True)

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))

    return markdown_table(["trial", "status", *cols, *params],
                          [[r.get("trial_id", "?"), r.get("status", "?"), *(r.get(c) for c in cols + params)]
                           for r in rows], cell)


def pareto_front(rows: List[Dict[str, Any]], metrics: List[str], modes: List[str]) -> List[Dict[str, Any]]:
    """Non-dominated rows (all objectives turned into maximisation)."""
    def vec(r):
        return [r[m] if mode == "max" else -r[m] for m, mode in zip(metrics, modes)]

    valid = [r for r in rows if all(isinstance(r.get(m), (int, float)) for m in metrics)]
    front = []
    for r in valid:
        v = vec(r)
        dominated = any(all(a >= b for a, b in zip(vec(o), v)) and any(a > b for a, b in zip(vec(o), v))
                        for o in valid if o is not r)
        if not dominated:
            front.append(r)
    return front


def pareto_png(rows: List[Dict[str, Any]], front: List[Dict[str, Any]], metrics: List[str], path: Path) -> Path:
    """Every trial in grey, the front of the two ``metrics`` as a red line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    xs = [r[metrics[0]] for r in rows if metrics[0] in r and metrics[1] in r]
    ys = [r[metrics[1]] for r in rows if metrics[0] in r and metrics[1] in r]
    ax.scatter(xs, ys, c="lightgray", label="trials")
    f = sorted(front, key=lambda r: r[metrics[0]])
    ax.plot([r[metrics[0]] for r in f], [r[metrics[1]] for r in f], "o-", c="C3", label="Pareto front")
    ax.set_xlabel(metrics[0])
    ax.set_ylabel(metrics[1])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# =========================================================================== the benchmark
# (metric key, column header): the evaluation suite's headline numbers (stages/evaluate.py).
MAIN_METRICS: Tuple[Tuple[str, str], ...] = (
    ("val_acc", "val clean acc"),
    ("val_shift_mean_acc", "val shift-suite acc"),
    ("test_clean_acc", "clean acc"),
    ("test_natural_acc", "natural worst-case acc"),
    ("test_corruption_mean_acc", "corruptions, mean acc"),
    ("test_blurred_acc", "blurred acc"),
    ("test_deepfool_score", "DeepFool score"),
    ("test_pixel_pgd_acc", "pixel PGD acc"),
    ("trial_seconds", "seconds / run"),
    ("task_cpu_seconds", "CPU seconds / run"),
)
# Accuracies drawn in the chart's first panel (all in [0, 1]); the DeepFool score has its own.
CHART_ACCURACIES = ("test_clean_acc", "test_natural_acc", "test_corruption_mean_acc",
                    "test_blurred_acc", "test_pixel_pgd_acc")
_SEVERITY = re.compile(r"_s\d+$")

# Paper 002 (Girard, Gundersen, Laborie: "Latent-Mixup"), Table 3 "Results on the FashionMNIST
# dataset": mean (std over runs) of Accuracy, DeepFool score, Blurred accuracy, quoted verbatim.
PAPER_002_FMNIST: Dict[str, Tuple[str, Dict[str, Tuple[float, float]]]] = {
    "none": ("Standard", {"test_clean_acc": (0.9252, 0.0016), "test_deepfool_score": (0.3429, 0.0314),
                          "test_blurred_acc": (0.6727, 0.0123)}),
    "mixup": ("MIXUP", {"test_clean_acc": (0.8883, 0.0034), "test_deepfool_score": (0.9098, 0.0216),
                        "test_blurred_acc": (0.7163, 0.0087)}),
    "manifold_mixup": ("MANIFOLD MIXUP", {"test_clean_acc": (0.9044, 0.0028), "test_deepfool_score": (0.6736, 0.0265),
                                          "test_blurred_acc": (0.7175, 0.0037)}),
    "gan_mixup": ("GAN-MIXUP", {"test_clean_acc": (0.9192, 0.0014), "test_deepfool_score": (0.3559, 0.0242),
                                "test_blurred_acc": (0.6769, 0.0135)}),
}
REFERENCE_METRICS = (("test_clean_acc", "accuracy"), ("test_deepfool_score", "DeepFool score"),
                     ("test_blurred_acc", "blurred accuracy"))

Stat = Tuple[float, float, int]  # mean, sample std (nan for one seed), number of seeds


# --------------------------------------------------------------------------- numbers
def mean_std(values: Sequence[float]) -> Stat:
    """Mean and sample standard deviation (ddof = 1, as for 'std over runs'); std is nan for n = 1."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return m, s, n


def aggregate(rows: Sequence[Mapping[str, Any]]) -> Dict[str, Dict[str, Stat]]:
    """``rows`` (each with ``method`` and a ``metrics`` dict) -> method -> metric -> (mean, std, n).
    Methods keep the order of their first row."""
    values: Dict[str, Dict[str, List[float]]] = {}
    for r in rows:
        per = values.setdefault(str(r["method"]), {})
        for k, v in (r.get("metrics") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                per.setdefault(k, []).append(float(v))
    return {m: {k: mean_std(v) for k, v in per.items()} for m, per in values.items()}


def fmt_stat(s: Optional[Stat], digits: int = 4) -> str:
    if s is None or s[2] == 0:
        return "-"
    mean, std, n = s
    if n < 2:
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# --------------------------------------------------------------------------- tables
def main_table(agg: Mapping[str, Mapping[str, Stat]], metrics: Sequence[Tuple[str, str]] = MAIN_METRICS) -> str:
    """One row per method: every headline metric as mean ± std over seeds."""
    cols = [(k, h) for k, h in metrics if any(k in a for a in agg.values())]
    lines = [[m, str(max((s[2] for s in a.values()), default=0))]
             + [fmt_stat(a.get(k), 1 if k.endswith("seconds") else 4) for k, _ in cols] for m, a in agg.items()]
    return markdown_table(["method", "seeds"] + [h for _, h in cols], lines)


def corruption_names(agg: Mapping[str, Mapping[str, Stat]], prefix: str = "test_corruption") -> List[str]:
    """The suite's members present in the results (``<prefix>_<name>_acc``: corruptions, or with
    ``prefix="val_shift"`` the validation shifts), in first-seen order (per-severity keys excluded)."""
    key = re.compile(rf"^{prefix}_(?!mean_)(.+?)_acc$")
    names: List[str] = []
    for a in agg.values():
        for k in a:
            m = key.match(k)
            if m and not _SEVERITY.search(m.group(1)) and m.group(1) not in names:
                names.append(m.group(1))
    return names


def corruption_table(agg: Mapping[str, Mapping[str, Stat]], prefix: str = "test_corruption") -> str:
    """Accuracy per corruption (``prefix="val_shift"``: per validation shift), each the mean over
    its severities, mean ± std over seeds, and the suite's mean."""
    names = corruption_names(agg, prefix)
    cols = [(f"{prefix}_{n}_acc", n) for n in names] + [(f"{prefix}_mean_acc", "mean")]
    lines = [[m] + [fmt_stat(a.get(k), 3) for k, _ in cols] for m, a in agg.items()]
    return markdown_table(["method"] + [h for _, h in cols], lines)


def reference_table(agg: Mapping[str, Mapping[str, Stat]]) -> str:
    """Paper 002's Fashion-MNIST rows (Table 3) beside our measured numbers for the same variants."""
    header = ["paper variant", "our method"]
    for _, h in REFERENCE_METRICS:
        header += [f"{h} (paper)", f"{h} (ours)"]
    lines = []
    for method, (variant, paper) in PAPER_002_FMNIST.items():
        cells = [variant, f"`{method}`"]
        for k, _ in REFERENCE_METRICS:
            mean, std = paper[k]
            cells += [f"{mean:.4f} ({std:.4f})", fmt_stat(agg.get(method, {}).get(k)) if method in agg else "not run"]
        lines.append(cells)
    return markdown_table(header, lines)


def setup_differences(setup: Mapping[str, Any]) -> str:
    """Where our measurement differs from paper 002's (Sec. 2.1.1, 3, 3.2), from the ``setup`` values."""
    s = dict(setup)
    g = s.get
    return "\n".join([
        "Where the setups differ (read the reference rows with these in mind):",
        "",
        f"- **Classifier and training.** Paper: a generic CNN with 575k parameters, Adam, 50 epochs, "
        f"lr 0.001 decayed by 0.9 per epoch, on the training set (no subset is mentioned), hyperparameters "
        f"grid-searched per variant on validation accuracy. Ours: `{g('classifier')}` with "
        f"{g('classifier_params', '?'):,} parameters, SGD (momentum {g('momentum')}) with a one-cycle schedule "
        f"to lr {g('lr')}, "
        f"{g('epochs')} epoch(s), batch {g('batch_size')} on {g('train_images')} training images, one fixed "
        f"set of hyperparameters for every method (Mixup alpha {g('mixup_alpha')}), no search.",
        f"- **Images.** Paper: 28x28. Ours: 28x28 zero-padded to {g('image_size')}x{g('image_size')} "
        f"(the generator needs a power of two); the padding adds zeros, so ||x|| in the DeepFool ratio is "
        f"unchanged, but the perturbation may use the border.",
        f"- **Test set and metrics.** Paper: the whole 10k test set; DeepFool score = mean "
        f"||r(x)||_2 / ||x||_2; blur = Gaussian kernel of size 5 (sigma not stated). Ours: clean accuracy on "
        f"{g('test_images')} test images; DeepFool (at most {g('deepfool_steps')} iterations, overshoot "
        f"included), blurred (5x5 Gaussian, sigma 1.1), the corruptions, pixel PGD and the natural worst "
        f"case on the first {g('eval_examples')} of them.",
        f"- **GAN-Mixup's generative model.** Paper: their own GAN with a 1024-d latent, images inverted by "
        f"1000 AdamW steps on a feature loss, badly inverted images excluded, half of the training data "
        f"original images. Ours: the profile's style GAN (w_dim {g('w_dim')}) inverted by the BIES encoder with "
        f"{g('lce_codes')} LCE code(s) per image, no image excluded; the batch is the clean images plus "
        f"their decoded mixes (also half original).",
        f"- **Seeds.** Paper: std over an unstated number of runs. Ours: sample std over seeds "
        f"{', '.join(str(x) for x in g('seeds', []))}; the data, upstream models and test images are the "
        f"same for every seed; the seed sets the classifier's initialisation and batch order, and also the "
        f"corruption noise and the attacks' random starts, so the std includes evaluation noise.",
    ]) + "\n"


def setup_lines(setup: Mapping[str, Any]) -> str:
    keys = ("profile", "dataset", "train_images", "val_images", "test_images", "eval_examples", "epochs",
            "batch_size", "classifier", "classifier_params", "seeds", "setup_key")
    return "\n".join(f"- {k}: `{setup[k]}`" for k in keys if k in setup) + "\n"


# --------------------------------------------------------------------------- chart
def chart(agg: Mapping[str, Mapping[str, Stat]], path: str | Path, title: str = "") -> Path:
    """Grouped bars with std error bars: the accuracies (left), the DeepFool score (right)."""
    plt = _pyplot()
    methods = list(agg)
    accs = [k for k in CHART_ACCURACIES if any(k in a for a in agg.values())]
    labels = dict(MAIN_METRICS)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(8.0, 0.12 * len(methods) * len(accs) + 4), 5.5),
                                  gridspec_kw={"width_ratios": [4, 1.3]})
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        means = [agg[m].get(k, (math.nan, math.nan, 0))[0] for k in accs]
        errs = [0.0 if math.isnan(agg[m].get(k, (0, math.nan, 0))[1]) else agg[m][k][1] for k in accs]
        ax.bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(accs))], means, width,
               yerr=errs, capsize=2, label=m, color=f"C{i % 10}", hatch="//" if i >= 10 else None)
        d = agg[m].get("test_deepfool_score")
        if d is not None:
            ax2.bar([i], [d[0]], 0.8, yerr=[0.0 if math.isnan(d[1]) else d[1]], capsize=2, color=f"C{i % 10}",
                    hatch="//" if i >= 10 else None)
    ax.set_xticks(range(len(accs)))
    ax.set_xticklabels([labels[k].removesuffix(" acc") for k in accs], rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=min(5, max(1, len(methods))), loc="upper center", bbox_to_anchor=(0.5, -0.16))
    ax2.set_xticks(range(len(methods)))
    ax2.set_xticklabels(methods, rotation=90, fontsize=7)
    ax2.set_title("DeepFool score", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the report
def render(rows: Sequence[Mapping[str, Any]], setup: Mapping[str, Any],
           failed: Sequence[Mapping[str, Any]] = (), missing: Sequence[str] = (), chart_name: str = "") -> str:
    """The whole Markdown report."""
    agg = aggregate(rows)
    parts = [f"# Benchmark `{setup.get('name', 'benchmark')}`", "",
             "Every augmentation method trained on the same data, classifier, budget and seeds, and scored "
             "by the same evaluation suite (`natra_ray/stages/evaluate.py`). Cells: mean ± sample std over "
             "seeds.", "", "## Setup", "", setup_lines(setup), "## Results", "", main_table(agg)]
    if chart_name:
        parts += ["", f"![benchmark chart]({chart_name})", ""]
    if corruption_names(agg):
        parts += ["", "## Corruption suite (accuracy per corruption, mean over severities)", "", corruption_table(agg)]
    if corruption_names(agg, "val_shift"):
        parts += ["", "## Validation shift suite (the objective's shifts: accuracy per shift, mean over its severities)",
                  "", corruption_table(agg, "val_shift")]
    parts += ["", "## Reference: Latent-Mixup paper (002), Table 3, Fashion-MNIST", "",
              "Paper numbers are quoted from the paper: mean (std over runs).", "", reference_table(agg), "",
              setup_differences(setup)]
    if failed or missing:
        parts += ["", "## Not in the table", ""]
        parts += [f"- `{f['method']}` seed {f['seed']}: failed: {f.get('error', '?')}" for f in failed]
        parts += [f"- `{m}`: not finished (rerun the same command to resume)" for m in missing]
    return "\n".join(parts).rstrip() + "\n"


def write_report(rows: Sequence[Mapping[str, Any]], setup: Mapping[str, Any], out_dir: str | Path,
                 failed: Sequence[Mapping[str, Any]] = (), missing: Sequence[str] = ()) -> Tuple[Path, Path]:
    """``report.md`` and ``chart.png`` in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = chart(aggregate(rows), out / "chart.png", title=f"benchmark {setup.get('name', '')} "
                f"({setup.get('profile', '')}, seeds {', '.join(str(s) for s in setup.get('seeds', []))})")
    md = out / "report.md"
    md.write_text(render(rows, setup, failed, missing, chart_name=png.name))
    return md, png



__all__ = ["SUMMARY_METRICS", "summary_table", "pareto_front", "pareto_png",
           "MAIN_METRICS", "PAPER_002_FMNIST", "mean_std", "aggregate", "fmt_stat", "main_table", "corruption_names",
           "corruption_table", "reference_table", "setup_differences", "chart", "render", "write_report"]
