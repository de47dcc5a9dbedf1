"""SW against the exact posterior as a function of the particle count N (and of wall time) for the particle
samplers, beside the exact-vs-exact floor and the best non-particle samplers, on the GMM benchmark problems.

    python -m benchmarks.particle_curve [--cells 8:1,80:2,800:4] [--problems 10,5,3]
        [--per-system 1,4,16,64] [--per-system-max 80:16,800:4] [--pooled 10,50,250,500,2000]
        [--samplers mcgdiff,fps_smc] [--baselines pigdm,dps] [--out results/particle_curve]

Two ways of turning particle systems into the 2000 samples (``draws_per_system``, reddiff/samplers/smc.py):
``per-system`` runs one system of N particles per sample and keeps one particle drawn by the final weights (the
official scripts; cost N x 2000 particle evaluations per step); ``pooled`` runs 2000 / N systems of N particles
and keeps all their particles (the SMC estimate of the posterior; cost 2000 evaluations per step whatever N).
Problems, directions, reference samples and seeds are those of ``benchmarks.gmm_posterior.run_problem`` (the same
problem p of a cell as the full table); only ``particles`` and ``draws_per_system`` are overridden, every other
setting is the class's ``gmm_hparams``.  Writes ``<out>.json``, ``<out>.md`` (table) and ``<out>.png``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time

import numpy as np
import torch

from benchmarks.gmm_posterior import run_problem


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


MODES = {"per-system": 1, "pooled": 0}   # draws_per_system of each mode


def run(cells, particles, problems, samplers, baselines, samples=2000, steps=100, seed=0, log=print) -> dict:
    """``particles[mode][d]``: the N values of a mode in dimension d (``"default"`` for the others)."""
    torch.set_num_threads(1)
    out = {}
    for (d, dy), P in zip(cells, problems):
        key = f"{d}:{dy}"
        rec = {"floor": [], "prior": [], **{b: [] for b in baselines},
               "curves": {f"{n} {mode}": {} for n in samplers for mode in MODES}}
        for p in range(P):
            r = run_problem(d, dy, p, samples=samples, steps=steps, seed=seed, samplers=list(baselines))
            for ref, name in (("floor", "exact"), ("prior", "prior"), *((b, b) for b in baselines)):
                rec[ref].append(r["methods"][name]["sw"])
            for n in samplers:
                for mode, draws in MODES.items():
                    for N in particles[mode].get(d, particles[mode]["default"]):
                        r = run_problem(d, dy, p, samples=samples, steps=steps, seed=seed, samplers=[n],
                                        overrides={n: {"particles": N, "draws_per_system": draws}})
                        m = r["methods"][n]
                        rec["curves"][f"{n} {mode}"].setdefault(str(N), []).append((m["sw"], m["seconds"]))
                        log(f"d={d} dy={dy} p={p} {n} {mode} N={N}: sw {m['sw']:.3f} ({m['seconds']:.2f} s)")
        out[key] = rec
    return out


def summarise(res: dict) -> dict:
    s = {}
    for key, rec in res.items():
        c = {k: float(np.mean(v)) for k, v in rec.items() if k != "curves"}
        c["curves"] = {n: {N: {"sw": float(np.mean([a for a, _ in v])), "seconds": float(np.mean([b for _, b in v])),
                               "problems": len(v)} for N, v in cur.items()} for n, cur in rec["curves"].items()}
        s[key] = c
    return s


def markdown(summ: dict, meta: dict) -> str:
    lines = ["# SW vs particle count (GMM benchmark problems)", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}; wall {meta['wall_s']:.0f} s, 1 thread.", "",
             "Mean over the first problems of each cell (problem p as in the full table; 2000 samples). "
             "`per-system`: one system of N particles per sample, one particle kept (cost ∝ N); `pooled`: "
             "2000/N systems, all particles kept (cost independent of N). Other settings: each sampler's "
             "`gmm_hparams`. `floor` = exact vs exact, `prior` = ignore the data.",
             ""]
    for key, c in summ.items():
        d, dy = key.split(":")
        refs = ", ".join(f"{k} {v:.3f}" for k, v in c.items() if k != "curves")
        lines += [f"## d = {d}, d_y = {dy}", "", f"References: {refs}", "",
                  "| sampler | N | SW | seconds/problem | problems |", "|---|---|---|---|---|"]
        for n, cur in c["curves"].items():
            for N, v in cur.items():
                lines.append(f"| {n} | {N} | {v['sw']:.3f} | {v['seconds']:.2f} | {v['problems']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(summ: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(2, len(summ), figsize=(4 * len(summ), 7), squeeze=False)
    for j, (key, c) in enumerate(summ.items()):
        for row, xk in enumerate(("N", "seconds")):
            ax = axes[row, j]
            for n, cur in c["curves"].items():
                Ns = sorted(cur, key=int)
                xs = [int(N) for N in Ns] if xk == "N" else [cur[N]["seconds"] for N in Ns]
                ax.plot(xs, [cur[N]["sw"] for N in Ns], "o-", label=n)
            for ref, st in (("floor", "k--"), ("prior", "k:")):
                ax.axhline(c[ref], color="k", ls=st[1:], lw=1, label=ref)
            for b, ls in zip([k for k in c if k not in ("floor", "prior", "curves")], ("-", "-.", (0, (1, 3)))):
                ax.axhline(c[b], color="grey", ls=ls, lw=1.2, alpha=0.8, label=b)
            ax.set_xscale("log"), ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter()), ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("particles N" if xk == "N" else "seconds per problem (2000 samples)")
            ax.set_ylabel("SW_1 to the exact posterior")
            ax.set_title(f"d = {key.split(':')[0]}, d_y = {key.split(':')[1]}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.particle_curve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default="8:1,80:2,800:4")
    ap.add_argument("--problems", default="10,5,3", help="problems per cell")
    ap.add_argument("--per-system", default="1,4,16,64", help="N values, one draw per system")
    ap.add_argument("--per-system-max", default="80:16,800:4",
                    help="largest per-system N in a dimension (d:N, comma-separated; cost grows with N)")
    ap.add_argument("--pooled", default="10,50,250,500,2000", help="N values, all particles (must divide 2000)")
    ap.add_argument("--samplers", default="mcgdiff,fps_smc")
    ap.add_argument("--baselines", default="pigdm,dps")
    ap.add_argument("--out", default="results/particle_curve")
    a = ap.parse_args(argv)
    cells = [tuple(int(v) for v in c.split(":")) for c in a.cells.split(",")]
    pooled = _ints(a.pooled)
    if any(2000 % N for N in pooled):
        ap.error(f"--pooled: every N must divide the 2000 samples, got {pooled}")
    caps = {int(d): int(n) for d, n in (c.split(":") for c in a.per_system_max.split(",") if c)}
    per = _ints(a.per_system)
    particles = {"per-system": {"default": per, **{d: [N for N in per if N <= n] for d, n in caps.items()}},
                 "pooled": {"default": pooled}}
    t0 = time.time()
    res = run(cells, particles, _ints(a.problems), a.samplers.split(","), [b for b in a.baselines.split(",") if b])
    summ = summarise(res)
    # every argument with the value it ran with (defaults included), so the command reruns the same curve
    resolved = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items())
    meta = {"command": f"python -m benchmarks.particle_curve {resolved}",
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "wall_s": time.time() - t0}
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summ, "per_problem": res}, f, indent=1)
    with open(a.out + ".md", "w") as f:
        f.write(markdown(summ, meta))
    plot(summ, a.out + ".png")
    print(markdown(summ, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
