"""Benchmark 1: cost of a NaTra training step vs a standard step (same classifier, same batch).

For each row the script runs the *actual* training step (``stages.robust.train_epoch`` fed a
single batch, so the method, the attack, the loss, backward and the optimiser step are exactly
what training runs) and reports

* the measured time ratio (median of per-round paired ratios, steps interleaved A B A B ...);
* the FLOP-implied ratio: ``torch.utils.flop_counter.FlopCounterMode`` around one real step
  of each kind (matmul/conv FLOPs, forward + backward + attack);
* the "minimal" FLOP-implied ratio: K latent-PGD gradient steps through generator +
  classifier plus the clean+adversarial training step, each counted the same way; the
  difference to the full count is work the step does beyond that (the gradient-free scoring
  of the last PGD iterate, the re-decode of the winner, the APT "fooled?" forward);
* achieved FLOP/s against this machine's measured fp32 matmul peak (torch.mm, 1 and 2 threads);
* what re-encoding the batch every step (encoder + LCE refinement) would cost, against the
  cached-codes lookup the pipeline uses.

Sizes are the ``cpu`` profile's; weights are random (speed does not depend on them).

    .venv/bin/python bench/bench_step.py --quick     # < 2 min
    .venv/bin/python bench/bench_step.py             # full: K in {1,2,3} x codes in {1,2}
    .venv/bin/python bench/bench_step.py --device cuda --precision bf16 [--profile paper]

On another device than the CPU the script times the NaTra and standard steps only (images/s and
their ratio, into ``results/step_<device>_<precision>_<profile>.*``): the FLOP, profile and
re-encoding rows are about the CPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from natra_ray.augment import Batch  # noqa: E402
from natra_ray.config import Config, load_config  # noqa: E402
from natra_ray.stages import robust  # noqa: E402

PREVIOUS = "natra_redecode_bench"  # registered below, in this process only
N_ITEMS = 2048  # latent codes held (the lookup cost does not depend on it)
LATENT_MIXUP_RATIO = 104 / 30  # GAN-Mixup vs standard, ms per batch (Latent-Mixup paper, Sec. 3)


def step_fn(cfg: Config, src: Any, gen: torch.Generator, batch_size: int,
            device: torch.device = torch.device("cpu")) -> Callable[[], Dict[str, float]]:
    """One real training step of ``cfg.robust.method`` on a fresh random batch per call (on
    ``device``, as the Ray Data stream hands a Train worker its batches)."""
    state = robust.make_state(cfg, 10, 100_000, device)
    n = src.ws.shape[0]
    x = torch.rand(n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)

    class _Data:  # train_epoch reads only class_names when it is given batches
        class_names = [str(i) for i in range(10)]

    def run() -> Dict[str, float]:
        idx = torch.randperm(n, generator=gen)[:batch_size]
        return robust.train_epoch(cfg, state, _Data(), src, gen, lambda: iter([Batch(x[idx], y[idx], idx)]))

    return run


def _register_previous() -> None:
    """NaTra (APT on) as it was before the attack kept its best iterate's images and logits:
    the winner decoded again and classified again for the APT "fooled?" test. Registered here
    only, so the fix stays measured against what it replaced."""
    import torch.nn.functional as F

    from natra_ray.attacks import _eval_mode, latent_pgd
    from natra_ray.augment import METHODS, Augmented, one_hot
    from natra_ray.augment.latent import apt_update, smooth_labels

    if PREVIOUS in METHODS.names():
        return

    @METHODS.register(PREVIOUS)
    def natra_redecode(ctx, batch):  # type: ignore[no-untyped-def]
        cfg, src = ctx.cfg, ctx.latent
        eps_i = src.eps[batch.idx.cpu()]
        radius = (eps_i + cfg.rho).clamp(max=cfg.eps_cap)
        ws, alpha = src.codes(batch.idx)

        def loss_fn(r):  # type: ignore[no-untyped-def]
            return F.cross_entropy(ctx.model(src.decode(ws, alpha, r)), batch.y, reduction="none")

        with _eval_mode(ctx.model):
            r = latent_pgd(loss_fn, (len(batch.idx), src.num_directions), eps=radius, steps=cfg.pgd_steps,
                           generator=ctx.generator)
            with torch.no_grad():
                x_adv = src.decode(ws, alpha, r)
                mis = ctx.model(x_adv).argmax(1) != batch.y
        src.eps[batch.idx.cpu()] = apt_update(eps_i, mis, cfg.rho, cfg.eps_cap)
        target = smooth_labels(batch.y, ctx.num_classes, cfg.label_smoothing_c * eps_i, ctx.generator)
        return Augmented(torch.cat([batch.x, x_adv]), torch.cat([one_hot(batch.y, ctx.num_classes), target]))


def previous_matches(cfg: Config) -> float:
    """Largest difference between the batches (images, targets, APT budgets) that ``natra`` and
    the previous re-decoding variant make from the same seed: 0.0 means the fix changed no output."""
    from natra_ray.augment import AugmentContext, create_method

    src = benchlib.random_latent_source(cfg, 256, cfg.encoder.lce_codes)
    model = robust.build_classifier(cfg, 10)
    x, y, idx = torch.rand(64, 1, cfg.data.image_size, cfg.data.image_size), torch.randint(0, 10, (64,)), torch.arange(64)
    outs = []
    for name in ("natra", PREVIOUS):
        src.eps.fill_(cfg.robust.eps)
        a = create_method(name)(AugmentContext(model, cfg.robust, 10, torch.Generator().manual_seed(3), src), Batch(x, y, idx))
        outs.append((a.x, a.target, src.eps.clone()))
    return max(float((p - q).abs().max()) for p, q in zip(*outs))


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def pgd_grad_flops(cfg: Config, src: Any, batch_size: int) -> int:
    """FLOPs of one latent-PGD gradient evaluation: decode (G) + classify + d loss / d r."""
    import torch.nn.functional as F

    model = robust.build_classifier(cfg, 10).eval()
    idx = torch.arange(batch_size)
    ws, alpha = src.codes(idx)
    y = torch.zeros(batch_size, dtype=torch.long)

    def one() -> None:
        r = torch.zeros(batch_size, src.num_directions, requires_grad=True)
        loss = F.cross_entropy(model(src.decode(ws, alpha, r)), y, reduction="none")
        torch.autograd.grad(loss.sum(), r)

    return count_flops(one)


def forward_flops(cfg: Config, src: Any, batch_size: int) -> Dict[str, int]:
    """FLOPs of the gradient-free passes a NaTra step makes after its K gradient steps: one
    decode (G) and one classifier forward, each on ``batch_size`` examples."""
    model = robust.build_classifier(cfg, 10).eval()
    idx = torch.arange(batch_size)
    ws, alpha = src.codes(idx)
    r = torch.zeros(batch_size, src.num_directions)
    with torch.no_grad():
        x = src.decode(ws, alpha, r)
        return {"decode": count_flops(lambda: src.decode(ws, alpha, r)), "classify": count_flops(lambda: model(x))}


def profile_ops(fn: Callable[[], Any], top: int = 10) -> Dict[str, Any]:
    """Self CPU time per op of one step (torch.profiler), and the share spent in ops that
    FlopCounterMode counts (convolutions and matmuls) vs everything else."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    counted = ("conv", "mm", "addmm", "bmm", "matmul", "linear")
    in_counted = sum(r[1] for r in rows if any(c in r[0] for c in counted))
    return {"total_ms": total, "counted_ops_share": in_counted / max(total, 1e-9),
            "top": [{"op": k, "self_ms": ms, "share": ms / max(total, 1e-9), "calls": c} for k, ms, c in rows[:top]]}


def reencode_cost(cfg: Config, src: Any, batch_size: int, rounds: int) -> Dict[str, Any]:
    """Seconds to re-encode one batch (BIES encoder + LCE refinement, the cpu profile's steps
    and codes) vs the cached-code lookup ``LatentSource.codes`` the pipeline does instead."""
    from natra_ray.losses import Perceptual
    from natra_ray.stages import bies, lce

    perc = Perceptual.from_config(cfg.encoder)
    E = bies.build_encoder(cfg, src.G).eval().requires_grad_(False)
    x = torch.rand(batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    idx = torch.randperm(src.ws.shape[0])[:batch_size]
    e = cfg.encoder
    t = benchlib.interleaved({
        "reencode": lambda: lce.invert(src.G, E, x, e.lce_codes, e.lce_layer, e.lce_steps, e.lce_lr, perc,
                                       e.gamma1, e.gamma2, noise_scale=0.1),
        "cached_lookup": lambda: src.codes(idx),
    }, rounds=rounds)
    return {k: v.as_dict() for k, v in t.items()} | {"lpips_pretrained": perc.pretrained}


def device_main(args: argparse.Namespace) -> None:
    """The NaTra step vs the standard step on ``args.device`` at ``args.precision``."""
    device = torch.device(args.device)
    info = benchlib.start(args.threads or 4)
    rounds = args.rounds or 10
    base = load_config(args.profile, overrides={"robust.precision": args.precision, "device": args.device})
    B = base.robust.batch_size
    rows = []
    for label, method in (("NaTra", "natra"), ("Random latent edit", "random_latent")):
        cfg = base.replace(**{"robust.method": method})
        src = benchlib.random_latent_source(cfg, N_ITEMS, cfg.encoder.lce_codes, device=device)
        gen = torch.Generator().manual_seed(0)
        std, aug = step_fn(cfg.replace(**{"robust.method": "none"}), src, gen, B, device), step_fn(cfg, src, gen, B, device)
        t = benchlib.interleaved({"standard": std, "augmented": aug}, rounds=rounds, warmup=2)
        rows.append({"label": label, "method": method, "ratio": benchlib.paired_ratio(t["augmented"], t["standard"]),
                     "images_per_s_standard": B / t["standard"].median, "images_per_s_augmented": B / t["augmented"].median,
                     "standard": t["standard"].as_dict(), "augmented": t["augmented"].as_dict()})
        print(f"{label}: {rows[-1]['ratio']:.2f}x standard, {rows[-1]['images_per_s_augmented']:.0f} vs "
              f"{rows[-1]['images_per_s_standard']:.0f} images/s", flush=True)
    r = base.robust
    md = (f"{args.profile} profile sizes ({r.classifier}, batch {B}, K={r.pgd_steps}, LCE codes {base.encoder.lce_codes}), "
          f"random weights, {device} ({info.get('gpu') or 'cpu'}), robust.precision={args.precision}, {rounds} "
          f"interleaved rounds.\n\n" + benchlib.md_table(
              ["step", "vs standard", "images/s", "standard images/s"],
              [[x["label"], f"{x['ratio']:.2f}x", f"{x['images_per_s_augmented']:.0f}", f"{x['images_per_s_standard']:.0f}"]
               for x in rows]))
    benchlib.write_results(f"step_{device.type}_{args.precision}_{args.profile}", "quick", md, {"rows": rows}, info)
    print(f"ratio={rows[0]['ratio']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one NaTra configuration, few rounds (< 2 min)")
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds per row (default 4 quick, 10 full)")
    ap.add_argument("--device", default="cpu", help="cpu (the full benchmark) or cuda (the step timing only)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="robust.precision")
    ap.add_argument("--profile", default="cpu", help="whose sizes the device timing uses (cpu, paper)")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads on another device (default 4)")
    args = ap.parse_args()
    if args.device != "cpu" or args.precision != "fp32":
        return device_main(args)
    info = benchlib.start(1)
    t_start = time.time()
    rounds = args.rounds or (4 if args.quick else 10)
    base = load_config("cpu")
    B = base.robust.batch_size
    peak = benchlib.matmul_peak((1, 2), n=2048, reps=3 if args.quick else 5)
    # (label, method, pgd_steps K, LCE codes N)
    _register_previous()
    rows_spec = [("NaTra (cpu profile)", "natra", base.robust.pgd_steps, base.encoder.lce_codes),
                 ("NaTra re-decoding its winner (before the fix)", PREVIOUS, base.robust.pgd_steps,
                  base.encoder.lce_codes),
                 ("Random latent edit (1 decode, ~GAN-Mixup)", "random_latent", 0, base.encoder.lce_codes)]
    if not args.quick:
        rows_spec = [("NaTra", "natra", k, n) for n in (1, 2) for k in (1, 2, 3)] + rows_spec[1:]
    results: List[Dict[str, Any]] = []
    profile = None
    for label, method, k, n_codes in rows_spec:
        cfg = base.replace(**{"robust.method": method, "robust.pgd_steps": max(k, 1), "encoder.lce_codes": n_codes})
        src = benchlib.random_latent_source(cfg, N_ITEMS, n_codes)
        gen = torch.Generator().manual_seed(0)
        std_cfg = cfg.replace(**{"robust.method": "none"})
        std, aug = step_fn(std_cfg, src, gen, B), step_fn(cfg, src, gen, B)
        f_std, f_aug = count_flops(std), count_flops(aug)
        timing = benchlib.interleaved({"standard": std, "augmented": aug}, rounds=rounds)
        measured = benchlib.paired_ratio(timing["augmented"], timing["standard"])
        row: Dict[str, Any] = {"label": label, "method": method, "K": k if method != "random_latent" else 0,
                               "codes": n_codes, "batch": B, "flops_standard": f_std, "flops_augmented": f_aug,
                               "flop_ratio": f_aug / f_std, "measured_ratio": measured,
                               "standard": timing["standard"].as_dict(), "augmented": timing["augmented"].as_dict(),
                               "gflops_standard": f_std / timing["standard"].median / 1e9,
                               "gflops_augmented": f_aug / timing["augmented"].median / 1e9}
        if method != "random_latent":
            f_pgd = pgd_grad_flops(cfg, src, B)
            f_train2b = count_flops(step_fn(std_cfg, src, gen, 2 * B))  # clean + adversarial halves
            fwd = forward_flops(cfg, src, B)
            row.update(flops_pgd_grad=f_pgd, flops_train_2b=f_train2b, flops_decode=fwd["decode"],
                       flops_classify=fwd["classify"],
                       # what the previous path spent on re-decoding the winner and on the
                       # separate "fooled?" classifier forward (shipped natra: neither)
                       redecode_flops_share=(fwd["decode"] + fwd["classify"]) / f_aug,
                       flop_ratio_minimal=(k * f_pgd + f_train2b) / f_std,
                       extra_flops_share=1 - (k * f_pgd + f_train2b) / f_aug)
            if profile is None and method == "natra" and k == base.robust.pgd_steps and n_codes == base.encoder.lce_codes:
                profile = profile_ops(aug)
        row["overhead_vs_flops"] = measured / row["flop_ratio"]
        results.append(row)
        print(f"{label} K={row['K']} N={n_codes}: measured {measured:.2f}x, FLOP-implied {row['flop_ratio']:.2f}x",
              flush=True)
    # natra vs the previous variant head to head (their rows above each pair with their own
    # standard steps; load that drifts between rows would otherwise enter the comparison).
    ab_src = benchlib.random_latent_source(base, N_ITEMS, base.encoder.lce_codes)
    ab = benchlib.interleaved({m: step_fn(base.replace(**{"robust.method": m}), ab_src, torch.Generator().manual_seed(0), B)
                               for m in ("natra", PREVIOUS)}, rounds=rounds)
    natra_vs_previous = benchlib.paired_ratio(ab["natra"], ab[PREVIOUS])
    nat_cfg = base
    reenc = reencode_cost(nat_cfg, benchlib.random_latent_source(nat_cfg, N_ITEMS, nat_cfg.encoder.lce_codes), B,
                          rounds=2 if args.quick else 4)
    main_row = next(r for r in results if r["method"] == "natra" and r["K"] == base.robust.pgd_steps
                                                   and r["codes"] == base.encoder.lce_codes)
    data = {"previous_max_abs_diff": previous_matches(base), "natra_vs_previous_time": natra_vs_previous,
            "previous_ab": {k: v.as_dict() for k, v in ab.items()}, "matmul_peak_gflops": peak, "rows": results, "profile_natra_step": profile, "reencode": reenc,
            "latent_mixup_gan_mixup_ratio": LATENT_MIXUP_RATIO, "seconds": time.time() - t_start,
            "rounds": rounds}
    benchlib.write_results("step", "quick" if args.quick else "full", render(data, main_row, base), data, info)


def render(d: Dict[str, Any], main_row: Dict[str, Any], cfg: Config) -> str:
    peak1 = d["matmul_peak_gflops"][1]
    head = ["step", "K", "LCE codes", "batch", "standard ms", "step ms", "measured ratio",
            "FLOP ratio (counted)", "FLOP ratio (K PGD + clean step)", "measured / FLOP ratio",
            "GFLOP/s (step)", "% of 1-thread peak"]
    rows = []
    for r in d["rows"]:
        rows.append([r["label"], r["K"], r["codes"], r["batch"], 1e3 * r["standard"]["median_s"],
                     1e3 * r["augmented"]["median_s"], f"{r['measured_ratio']:.2f}x", f"{r['flop_ratio']:.2f}x",
                     f"{r['flop_ratio_minimal']:.2f}x" if "flop_ratio_minimal" in r else "-",
                     f"{r['overhead_vs_flops']:.2f}", r["gflops_augmented"], f"{100 * r['gflops_augmented'] / peak1:.0f}%"])
    out = [benchlib.md_table(head, rows), ""]
    out.append("Matmul peak (torch.mm 2048x2048 fp32, best of reps): "
               + ", ".join(f"{t} thread(s) {g:.1f} GFLOP/s" for t, g in d["matmul_peak_gflops"].items())
               + f". Standard step: {d['rows'][0]['gflops_standard']:.1f} GFLOP/s.")
    out.append(f"Latent-Mixup reports GAN-Mixup at {d['latent_mixup_gan_mixup_ratio']:.1f}x a standard step "
               f"(104 ms vs 30 ms, RTX 2080 Ti).")
    if "extra_flops_share" in main_row:
        out.append(f"In the main NaTra row, {100 * main_row['extra_flops_share']:.0f}% of the counted FLOPs are beyond "
                   f"K PGD gradient steps + the clean/adversarial training step (the gradient-free scoring of "
                   f"the last iterate, which keeping the best iterate needs).")
    prev = next((r for r in d["rows"] if r["method"] == PREVIOUS), None)
    if prev is not None:
        out.append(f"The attack keeps the best iterate's images and logits (shipped): "
                   f"{100 * (1 - d['natra_vs_previous_time']):.0f}% less step time than re-decoding the winner and "
                   f"classifying it again (timed head to head, {d['rounds']} interleaved rounds), "
                   f"{100 * (1 - main_row['flops_augmented'] / prev['flops_augmented']):.0f}% fewer FLOPs; both make the "
                   f"same batches, soft targets and APT budgets from the same seed (max abs difference "
                   f"{d['previous_max_abs_diff']:.1g}).")
    p = d["profile_natra_step"]
    if p:
        out += ["", f"Profile of one NaTra step at the cpu profile's K and codes (torch.profiler, self CPU time, {p['total_ms']:.0f} ms total; "
                f"{100 * p['counted_ops_share']:.0f}% in conv/matmul ops, the ones FlopCounterMode counts):", ""]
        out.append(benchlib.md_table(["op", "self ms", "share", "calls"],
                                     [[t["op"], t["self_ms"], f"{100 * t['share']:.1f}%", t["calls"]] for t in p["top"]]))
    re = d["reencode"]
    step_s = main_row["augmented"]["median_s"]
    out += ["", f"Cached codes vs re-encoding each batch ({cfg.robust.batch_size} images; encoder + LCE with "
            f"{cfg.encoder.lce_codes} codes x {cfg.encoder.lce_steps} Adam steps, LPIPS "
            f"{'pretrained' if re['lpips_pretrained'] else 'on a random backbone (no pretrained weights offline)'}):", ""]
    out.append(benchlib.md_table(
        ["codes per batch", "ms", "vs NaTra step"],
        [["re-encode (encoder + LCE)", 1e3 * re["reencode"]["median_s"], f"+{100 * re['reencode']['median_s'] / step_s:.0f}%"],
         ["cached lookup (what training does)", 1e3 * re["cached_lookup"]["median_s"],
          f"+{100 * re['cached_lookup']['median_s'] / step_s:.2f}%"]]))
    return "\n".join(out)


if __name__ == "__main__":
    main()
