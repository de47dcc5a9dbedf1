"""Cost of every task operator against one ADM-256 network evaluation.

    python -m benchmarks.operator_cost [--threads 1] [--repeats 5] [--out results/operator_cost.md] [--json FILE]

For each task: one batch of 1 image at 256 x 256, float32, CPU.  ``setup`` (per-image masks/kernels, per-axis
SVDs), ``forward`` and ``forward + backward`` (the VJP that DPS and RED-diff take through H) are timed, the
median of ``--repeats`` runs after one warm-up.  The reference is one forward of the ADM ImageNet-256
unconditional UNet (``reddiff.priors.adm.UNet(ADM_IMAGENET_256_UNCOND)``, random weights, ``torch.no_grad``),
timed once (``--adm-seconds`` reuses a measured value instead).  ``deblur_nonlinear`` needs the user-supplied
bkse weights; without them its row is timed with a randomly initialised network of the same architecture
(same cost) and labelled so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from reddiff.registry import build_operator, task_info, task_names
from reddiff.core.weights import MissingWeightsError

LIMIT = 0.02  # operators must cost < 2% of one ADM forward


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_adm(n: int = 256) -> float:
    from reddiff.priors.adm import ADM_IMAGENET_256_UNCOND, UNet

    net = UNet(ADM_IMAGENET_256_UNCOND).eval()
    x = torch.randn(1, 3, n, n)
    t = torch.tensor([500])
    with torch.no_grad():
        t0 = time.perf_counter()
        net(x, t)
        return time.perf_counter() - t0


def network_gflops(n: int = 256) -> dict:
    """Forward GFLOPs of the ADM-256 UNet and of the bkse blur network, counted on the meta device (no compute):
    a machine-independent version of the ratio for the one operator that is itself a network."""
    from torch.utils.flop_counter import FlopCounterMode

    from reddiff.operators.bkse import KernelWizard
    from reddiff.priors.adm import ADM_IMAGENET_256_UNCOND, UNet

    out = {}
    with torch.device("meta"), torch.no_grad():
        adm, bk = UNet(ADM_IMAGENET_256_UNCOND), KernelWizard()
        x = torch.empty(1, 3, n, n)
        for name, fn in (("adm", lambda: adm(x, torch.tensor([500]))),
                         ("bkse", lambda: bk.adapt_kernel(x, torch.empty(1, *bk.kernel_shape(n))))):
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            out[name] = counter.get_total_flops() / 1e9
    return out


def build(name: str):
    """(operator, note). Without the bkse weights, a randomly initialised network of the same architecture."""
    try:
        return build_operator(name), ""
    except MissingWeightsError:
        if name != "deblur_nonlinear":
            raise
        from reddiff.operators.bkse import KernelWizard, NonlinearBlur

        torch.manual_seed(0)
        return NonlinearBlur(network=KernelWizard()), f"random weights ({task_info(name)['needs_weights']} not installed)"


def time_task(name: str, n: int, repeats: int) -> dict:
    op, note = build(name)
    shape = (1, 3, n, n)
    t0 = time.perf_counter()
    op.setup([0], shape, "cpu", torch.float32)  # first setup: per-axis SVDs are computed here, then cached
    first_setup_s = time.perf_counter() - t0
    setup_s = _median_time(lambda: op.setup([0], shape, "cpu", torch.float32), repeats)
    op.setup([0], shape, "cpu", torch.float32)
    x = torch.rand(shape) * 2 - 1
    with torch.no_grad():
        y = op.forward(x)
        fwd = _median_time(lambda: op.forward(x), repeats)

    def fwd_bwd():
        xg = x.clone().requires_grad_(True)
        op.forward(xg).square().sum().backward()

    kind = "SVD" if task_info(name)["svd"] else "nonlinear"
    return {"task": name, "class": type(op).__name__, "kind": kind, "y_shape": list(y.shape),
            "first_setup_s": first_setup_s, "setup_s": setup_s, "forward_s": fwd, "forward_backward_s": _median_time(fwd_bwd, repeats), "note": note}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_markdown(rows: list[dict], adm_s: float, adm_note: str, args, path: Path, gflops: dict) -> None:
    cmd = "python -m benchmarks.operator_cost " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k not in ("out", "json"))
    lines = [
        "# Operator cost vs one ADM-256 forward",
        "",
        f"Command: `{cmd.strip()}` (writes this file; `--out` sets the path).",
        "",
        f"Machine: {cpu_name()}, torch {torch.__version__}, "
        f"{args.threads} CPU thread(s), float32, batch 1, {args.size} x {args.size}; load average at the end "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine: timings are noisy).",
        f"Reference: one ADM ImageNet-256 unconditional UNet forward (random weights, no_grad): "
        f"**{adm_s:.2f} s** {adm_note}.",
        "",
        "Times are medians over the repeats after one warm-up. `fwd+bwd` is a forward plus the backward pass "
        "through the operator (what DPS / RED-diff need). `setup` binds a batch of 1 (masks, kernels); `1st setup` "
        "includes the per-axis SVDs that separable operators then cache per image size. Ratio = forward / ADM forward; the requirement is < 2%.",
        "",
        "| task | class | kind | y shape | 1st setup ms | setup ms | forward ms | fwd+bwd ms | forward / ADM | < 2% | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["forward_s"] / adm_s
        lines.append(
            f"| {r['task']} | {r['class']} | {r['kind']} | {tuple(r['y_shape'])} | {1e3 * r['first_setup_s']:.2f} | "
            f"{1e3 * r['setup_s']:.2f} | "
            f"{1e3 * r['forward_s']:.2f} | {1e3 * r['forward_backward_s']:.2f} | {100 * ratio:.3f}% | "
            f"{'yes' if ratio < LIMIT else '**no**'} | {r['note']} |")
    lines += ["", f"Counted forward FLOPs (meta device, conv/matmul only): ADM-256 {gflops['adm']:.1f} GFLOP, bkse blur "
              f"network {gflops['bkse']:.2f} GFLOP, ratio {100 * gflops['bkse'] / gflops['adm']:.2f}%. The other operators "
              "are matrix products / FFTs of well under 1 GFLOP."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    p.add_argument("--adm-seconds", type=float, default=None, help="reuse a measured ADM forward time")
    p.add_argument("--out", default="results/operator_cost.md")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.tasks.split(",") if args.tasks else task_names()
    rows = []
    for name in names:
        r = time_task(name, args.size, args.repeats)
        rows.append(r)
        print(f"{name:18s} setup {1e3 * r['setup_s']:8.2f} ms  forward {1e3 * r['forward_s']:8.2f} ms  "
              f"fwd+bwd {1e3 * r['forward_backward_s']:8.2f} ms  {r['note']}", flush=True)
    if args.adm_seconds is not None:
        adm_s, adm_note = args.adm_seconds, "(given with --adm-seconds, not re-measured)"
    else:
        adm_s, adm_note = time_adm(args.size), "(measured once in this run)"
    print(f"ADM-256 forward: {adm_s:.2f} s {adm_note}")
    gflops = network_gflops(args.size)
    print(f"GFLOPs: ADM {gflops['adm']:.1f}, bkse {gflops['bkse']:.2f}")
    write_markdown(rows, adm_s, adm_note, args, Path(args.out), gflops)
    if args.json:
        Path(args.json).write_text(json.dumps({"adm_forward_s": adm_s, "gflops": gflops, "operators": rows}, indent=2))
    worst = max(r["forward_s"] / adm_s for r in rows)
    print(f"worst forward / ADM = {100 * worst:.3f}%  -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
