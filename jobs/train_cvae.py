"""Train paper 001's learned perturbation set (a CVAE on pairs), once per regulariser weight,
and write its loss table, closure errors and latent sweeps.

    python jobs/train_cvae.py --profile cpu --reg-weight 0 1 --out docs/results

writes ``<out>/<name>.md`` (the tables), ``<out>/<name>.json`` and per weight
``<out>/<name>_reg<w>_sweep_posterior.png`` / ``_sweep_prior.png``; checkpoints go to
``<storage>/runs/<name>_reg<w>/cvae.pt``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from natra_ray.cli import add_config_args, fail, layout, parse_job_args  # noqa: E402
from natra_ray.config import ConfigError  # noqa: E402
from natra_ray.data import DatasetError  # noqa: E402


def main(argv=None) -> int:
    p = add_config_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--reg-weight", type=float, nargs="+", default=None,
                   help="linear-cost regulariser weights to train (0 = paper 001's baseline); default cvae.reg_weight")
    p.add_argument("--out", default=None, help="folder for the tables and PNGs (default <storage>/reports)")
    p.add_argument("--name", default=None, help="file name stem (default cvae_<profile>_<family>)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args, cfg = parse_job_args(p, argv)
    import torch  # after arg checks

    from natra_ray.data import load_dataset
    from natra_ray.runtime import resolve_device
    from natra_ray.stages import cvae as stage

    torch.set_num_threads(max(1, args.threads))
    weights = args.reg_weight if args.reg_weight is not None else [cfg.cvae.reg_weight]
    name = args.name or f"cvae_{cfg.profile}_{cfg.cvae.family}"
    store = layout(cfg)
    out = Path(args.out) if args.out else store.reports
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        cfgs = {w: cfg.replace(**{"cvae.reg_weight": w}) for w in weights}
        imgs = {s: None if cfg.cvae.family == "folders" else load_dataset(cfg.data, s).images for s in ("train", "test")}
        pairs = stage.build_pairs(cfgs[weights[0]], imgs["train"], imgs["test"])
    except (DatasetError, ConfigError) as e:
        fail(str(e))
    losses, closure, runs = {}, {}, {}
    for w, c in cfgs.items():
        label = "without reg." if w == 0 else f"with reg. (w={w:g})"
        t = time.time()
        try:
            art = stage.run(c, pairs, store.runs / f"{name}_reg{w:g}", device=resolve_device(cfg.device))
        except (FloatingPointError, ValueError) as e:
            fail(str(e))
        losses[label], closure[label] = art.losses, art.closure
        runs[label] = {"reg_weight": w, "seconds": time.time() - t, "checkpoint": str(art.model_path)}
        for sweep in art.sweeps:
            shutil.copyfile(sweep, out / f"{name}_reg{w:g}_{sweep.name}")
    cmd = "python jobs/train_cvae.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = (f"`{cmd}`\n\n{len(pairs['train'])} training / {len(pairs['test'])} held-out pairs "
          f"(family {cfg.cvae.family}{', bundles (x, T_theta x, T_2theta x)' if pairs['train'].bundles else ''}); "
          f"arch {cfg.cvae.arch}, latent_dim {cfg.cvae.latent_dim}, {cfg.cvae.epochs} epochs; "
          f"{time.time() - t0:.0f} s in all.\n\nLosses per pair:\n\n{stage.loss_table(losses)}\n"
          f"Closure on held-out pairs (mean per-pixel squared error):\n\n{stage.closure_table(closure)}")
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps({"losses": losses, "closure": closure, "runs": runs,
                                                   "config": cfg.to_dict()}, indent=1))
    print(md)
    print(f"wrote {out / name}.md, .json and the sweep PNGs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
