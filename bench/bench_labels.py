"""Label preservation of the cpu upstream across the knobs that move it: LCE codes, the edited
layers and the edit budget (``natra_ray.workflow.labels``; issue: robustness that holds, point 5).

For every combination, on the first 512 validation images: the share of reconstructions, of
random edits ``r ~ N(0, eps^2)`` and of corner edits ``r = eps * s`` (where the attacks and the
pool mode end up) that a plainly trained reference classifier still assigns to the true class,
among the images it gets right. Reads the upstream ``make run`` trained (the stage cache; an
empty cache trains it first); each number is a cache entry, so a rerun is free.

    .venv/bin/python bench/bench_labels.py                 # the cpu profile's upstream
    .venv/bin/python bench/bench_labels.py --storage /tmp/x/natra_ray_results
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchlib  # noqa: E402

EPS = (0.2, 0.35, 0.5, 0.8, 1.2)  # the cpu search space's robust.eps range, 0.2..1.2
LAYERS = ((0, -1), (2, 5), (4, 7))  # every style input; the middle ones; the fine ones
LCE = (1, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--storage", default=os.path.expanduser("~/natra_ray_results"))
    args = p.parse_args()
    info = benchlib.start(threads=int(os.environ.get("NATRA_BENCH_THREADS", "1")))

    from natra_ray.config import load_config
    from natra_ray.workflow.labels import REFERENCE_EPOCHS, label_preservation
    from natra_ray.workflow.layout import StorageLayout
    from natra_ray.workflow.upstream import load_splits, prepare_upstream

    base = load_config("cpu")
    layout = StorageLayout.from_config(args.storage)
    splits = load_splits(base)
    up = prepare_upstream(base, layout, splits["train"])
    rows, data = [], []
    for lce in LCE:
        for start, end in LAYERS:
            for eps in EPS:
                cfg = base.replace(**{"encoder.lce_codes": lce, "robust.layer_start": start,
                                      "robust.layer_end": end, "robust.eps": eps})
                m = label_preservation(cfg, up, layout, splits)
                data.append({"lce_codes": lce, "layers": [start, end], "eps": eps, **m})
                rows.append([lce, f"{start}..{end}" if end >= 0 else f"{start}..last", eps, m["label_kept_recon"],
                             m["label_kept_edit"], m["label_kept_corner"]])
    ref = data[0]
    body = (f"Upstream: the cpu profile's (`{', '.join(Path(v).name for v in up.entries.values())}`); "
            f"{int(ref['label_images'])} validation images, the reference classifier (plain, "
            f"{REFERENCE_EPOCHS} epochs) gets {ref['reference_acc_measured']:.3f} of them right and "
            "the shares are among those. eps in the latent std unit; 8 directions.\n\n"
            + benchlib.md_table(["LCE codes", "edited layers", "eps", "reconstructions kept", "random edits kept",
                                 "corner edits kept"], rows) + "\n")
    benchlib.write_results("labels", "full", body, {"rows": data}, info)


if __name__ == "__main__":
    main()
