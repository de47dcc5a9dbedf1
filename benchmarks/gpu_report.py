"""Markdown report of ``benchmarks.gpu_check`` (layout of results/speed.md: command, date, machine, then tables),
with the paper's numbers beside ours and their provenance tags."""
from __future__ import annotations


def _f(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v)


def _cell(r: dict) -> str | None:
    """The one-cell text of an entry that was not measured or failed, else None."""
    if "n/a" in r:
        return f"n/a ({r['n/a']})"
    if "not_measured" in r:
        return f"not measured ({r['not_measured']})"
    if "error" in r:
        return f"error: {r['error']}"
    return None


def _paper(res, name, key):
    p = res["paper"].get(name)
    return (p[key], p["tag"]) if p else ("-", "")


def against_paper(res: dict) -> list[str]:
    """One line per sampler with a paper figure: our s/step/image (every dtype and batch) and max batch."""
    out = []
    for n, p in res["paper"].items():
        t = [f"{_f(r.get('s_per_step_per_image'), '{:.4f}')} ({dt}, batch {b})"
             for dt, per in res["timing"].items() for b, r in per.get(n, {}).items()
             if r.get("s_per_step_per_image") is not None]
        mb = [f"{'>= ' if r['status'] != 'exact' else ''}{r['max_batch']} ({dt})"
              for dt, per in res["max_batch"].items() for k, r in per.items() if k == n and "max_batch" in r]
        if not t and not mb:
            out.append(f"- {n}: not measured (paper: {p['s_per_step']} s/step, max batch {p['max_batch']}, {p['tag']})")
            continue
        out.append(f"- {n}: s/step/image {', '.join(t) or 'not measured'} against the paper's {p['s_per_step']}; "
                   f"max batch {', '.join(mb) or 'not measured'} against {p['max_batch']} ({p['tag']})")
    return out


def markdown(res: dict) -> str:
    m = res["meta"]
    mach = m["machine"]
    gpu = (f"{mach['gpu']} ({mach['gpu_memory_gib']} GiB, compute {mach['capability']}), CUDA {mach['cuda']}, "
           f"cuDNN {mach['cudnn']}, TF32 matmul {mach['tf32_matmul']} / cuDNN {mach['tf32_cudnn']}, "
           f"cudnn.benchmark {mach['cudnn_benchmark']}" if "gpu" in mach else f"no GPU ({mach['device']})")
    L = ["# GPU check: ADM ImageNet-256 cost per step, max batch, memory (benchmarks/gpu_check.py)", "",
         f"Command: `{m['command']}`  ",
         f"Date: {m['date']}, total {m['elapsed_s']:.0f} s of a {m['budget_s']:.0f} s budget"
         + (" (**deadline reached**: see 'Not measured')" if m["deadline_hit"] else "") + "  ",
         f"Machine: {gpu}; {mach['cpu_cores']} CPU cores, {mach['platform']}, Python {mach['python']}, "
         f"torch {mach['torch']}  ",
         f"Network: {m['network']}, {_f(m['n_params'] and m['n_params'] / 1e6, '{:.1f}')}M parameters; "
         f"task {m['task']} ({m['operator']}); "
         f"{m['steps']} steps per timed run, median of {m['repeats']} run(s) after a 2-step warm-up; bare call "
         f"median of {m['forward_repeats']} after 2 warm-up calls; samplers from {m['sampler_source']}."
         + (" **--dry-run: CPU, tiny UNet, simulated OOM; numbers are not for reporting.**" if m["dry_run"] else ""),
         "",
         "`s/step/img` = wall / (steps x batch), the paper's s/step (one network call per step for RED-diff, DPS, "
         "Pi-GDM, DDRM); `s/call/img` = wall / (NFE x batch).  `wall/fwd` = wall / (NFE x one bare network call at "
         "the same batch: no_grad forward, or forward + backward to the input for samplers that differentiate "
         "through the network); "
         "`limit` is its target (1.05, or 1.10 with a network gradient).  Latent solvers (`+ dec, enc`) run on the "
         "latent model (" + str(m.get("latent_network", "")) + "), fp32 only; their bare cost adds each decoder "
         "and encoder call (timed with a vector-Jacobian product, as the data term differentiates through them) "
         "to the network's.  `(capped)`: fewer steps or runs, so that "
         "one timed run stays within `--measure-cap-s`.  bf16 = autocast with fp32 weights.  "
         "Peak GPU memory is `torch.cuda.max_memory_allocated` over the timed runs (weights included).  "
         "Paper: RED-diff Table 1 (ImageNet-256); `paper*` = read from a public transcription of the paper, "
         "`unverified` = use as approximate only; the paper's GPU and batch for its s/step column are not stated "
         "in our sources.", ""]
    L += ["## Against the paper", ""] + against_paper(res) + [""]
    for dt, per in res["timing"].items():
        for b in m["batches"]:
            L += [f"## Time per step, {dt}, batch {b}", "",
                  "| sampler | steps | NFE | bare call (ms) | wall (s) | s/step/img | s/call/img | wall/fwd | limit | "
                  "within | peak GPU (MB) | paper s/step | tag |", "|" + "---|" * 13]
            for n, byb in per.items():
                r = byb.get(str(b), {"not_measured": "not run"})
                ps, tag = _paper(res, n, "s_per_step")
                c = _cell(r)
                if c:
                    L.append(f"| {n} | {c} |" + " |" * 9 + f" {ps} | {tag} |")
                    continue
                ok = "-" if r["pass"] is None else ("yes" if r["pass"] else "**no**")
                capped = " (capped)" if r.get("capped") else ""
                coder = (f" (+{r['decoder_calls']} dec, {r['encoder_calls']} enc)" if "decoder_calls" in r else "")
                L.append(f"| {n} | {r['steps']}{capped} | {r['nfe']}{coder} | {_f(r['forward_ms'], '{:.1f}')} "
                         f"({r['forward_kind']}) | "
                         f"{r['wall_s']:.3f} | {_f(r['s_per_step_per_image'], '{:.4f}')} | "
                         f"{_f(r.get('s_per_call_per_image'), '{:.4f}')} | "
                         f"{_f(r['wall_over_forward'])} | {r['limit']} | {ok} | {_f(r['peak_gpu_mb'], '{:.0f}')} | "
                         f"{ps} | {tag} |")
            L.append("")
    L += [f"## Max batch within {m['memory_budget_gib']:g} GiB", "",
          f"A batch fits when a {m['probe_steps']}-step run finishes without CUDA out-of-memory "
          f"(`torch.cuda.set_per_process_memory_fraction` = {_f(m['memory_fraction'])}); doubling from 1, then "
          f"bisection; each search time-boxed to at most {m['box_s']:g} s (a box that expires gives a lower bound), "
          f"capped at {m['max_batch_cap']}." + (" Dry run: the OOM is simulated." if m["dry_run"] else ""), "",
          "| sampler | dtype | max batch | first OOM | status | probes (batch: fits) | peak at max (MB) | "
          "paper max batch | tag |", "|---|---|---|---|---|---|---|---|---|"]
    for dt, per in res["max_batch"].items():
        for n, r in per.items():
            pm, tag = _paper(res, n, "max_batch")
            c = _cell(r)
            if c:
                L.append(f"| {n} | {dt} | {c} |" + " |" * 4 + f" {pm} | {tag} |")
                continue
            probes = ", ".join(f"{b}:{'y' if ok else 'n'}" for b, ok in r["probes"])
            lb = ">= " if r["status"] != "exact" else ""
            status = r["status"] + "".join(f"; batch {b}: {e}" for b, e in r.get("errors", {}).items())
            L.append(f"| {n} | {dt} | {lb}{r['max_batch']} | {_f(r['first_oom'], '{}')} | {status} | {probes} | "
                     f"{_f(r['peak_mb_at_max'], '{:.0f}')} | {pm} | {tag} |")
    if not res["max_batch"]:
        L.append("| (not run) |" + " |" * 8)
    L += ["", "## RED-diff peak memory against a bare no_grad forward loop", ""]
    for dt, r in res["memory"].items():
        c = _cell(r)
        if c:
            L.append(f"- {dt}: {c}")
            continue
        L.append(f"- {dt}, batch {r['batch']}, {r['calls']} calls: RED-diff {r['reddiff_peak_mb']:.0f} MB, bare loop "
                 f"{r['bare_loop_peak_mb']:.0f} MB: **ratio {r['ratio']:.3f}**; above the {r['weights_mb']:.0f} MB "
                 f"of weights: {r['ratio_above_weights']:.3f}")
    t = res["cuda_tests"]
    L += ["", "## CUDA-only tests", "", f"Status: **{t.get('status')}**"
          + (f" ({t['summary']}, {t['seconds']} s)" if t.get("summary") else ""), "",
          "Tests: " + (", ".join(f"`{i}`" for i in t.get("tests", [])) or "none found"), ""]
    L += ["## Not measured", ""] + ([f"- {x}" for x in res["not_measured"]] or ["Everything was measured."]) + [""]
    L += ["## Checks", "", "| check | value | target | pass |", "|---|---|---|---|"]
    for c in res["checks"]:
        L.append(f"| {c['check']} | {c['value']:.3f} | {c['target']} | {'yes' if c['pass'] else '**no**'} |")
    return "\n".join(L) + "\n"
