"""The one batch loop behind ``run.py`` jobs (:mod:`reddiff.run.experiment`) and batched RED-diff sweeps
(:mod:`reddiff.run.sweep`): load, measure, restore, score, write rows, PNGs and features.

**Fixed batches.**  Batch ``k`` is always items ``k*B .. k*B+B-1`` of the selection, whatever was done before.
A batch with any image missing from any job dir is redone whole (rows already on disk are kept, not
rewritten), so a batch redone after a ``kill -9`` has the same composition, and therefore the same bits, as in
an uninterrupted run.  A different ``batch_size`` gives results equal to float32 rounding only (README).

``restore(y, indices, monitor, callback) -> (outputs, nfe)`` returns one ``(n, *shape)`` tensor per job dir
(``sinks``); with K job dirs, item ``b*K + k`` of the monitored network batch is image ``b`` of job ``k``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from reddiff.data import CorruptImageError
from reddiff.store.images import save_png
from reddiff.store.jobdir import InputsLog, file_sha256
from reddiff.store.results import ResultStore, safe_name
from reddiff.core.rng import BatchRNG

log = logging.getLogger("reddiff")

#: measurement noise uses its own stream, so changing the sampler never changes y
MEASUREMENT_SEED_OFFSET = 1_000_003


class DivergenceMonitor:
    """Wraps a prior's ``eps`` to record, without host synchronisation, the first network call at which each
    item's input became non-finite (the step of divergence).  ``begin(start, n)`` announces that the next calls
    see items ``start .. start+n-1`` (a chunk of a batched sweep); call counts restart per chunk."""

    def __init__(self, prior, items: int):
        self.prior, self.items = prior, int(items)
        self.first_bad = None
        self.start, self.n, self.calls = 0, self.items, 0
        self.chunk_calls: list[tuple[int, int, int]] = []
        self._orig = prior.eps

        def eps(x_t, t):
            self.calls += 1
            if x_t.shape[0] == self.n:
                bad = ~torch.isfinite(x_t.detach()).reshape(x_t.shape[0], -1).all(dim=1)
                if self.first_bad is None:
                    self.first_bad = torch.zeros(self.items, dtype=torch.long, device=x_t.device)
                cur = self.first_bad[self.start:self.start + self.n]
                self.first_bad[self.start:self.start + self.n] = torch.where(
                    bad & (cur == 0), torch.full_like(cur, self.calls), cur)
            return self._orig(x_t, t)

        prior.eps = eps

    def begin(self, start: int, n: int) -> None:
        self._end_chunk()
        self.start, self.n, self.calls = int(start), int(n), 0

    def _end_chunk(self) -> None:
        if self.calls:
            self.chunk_calls.append((self.start, self.n, self.calls))

    def close(self) -> None:
        self._end_chunk()
        self.calls = 0
        self.prior.__dict__.pop("eps", None)

    def steps(self, final_bad: list[bool]) -> list[int | None]:
        """Per item: None when finite, else the call at which its input first went non-finite (or the
        chunk's last call, when only the final output did)."""
        fb = self.first_bad.cpu().tolist() if self.first_bad is not None else [0] * self.items
        last = [0] * self.items
        for s, n, c in self.chunk_calls:
            last[s:s + n] = [c] * n
        return [(s if s > 0 else last[i]) if b else None for i, (s, b) in enumerate(zip(fb, final_bad))]


@dataclass
class Sink:
    """One job dir of the loop: its rows (store) and its inputs log."""
    dir: Path
    store: ResultStore
    inputs: InputsLog


def fixed_batches(entries: list, batch_size: int) -> list[list]:
    return [entries[k * batch_size:(k + 1) * batch_size] for k in range(math.ceil(len(entries) / batch_size))]


def run_batches(*, dataset, operator, prior, suite, sinks: list[Sink], restore: Callable, seed: int,
                batch_size: int, device: torch.device, logger, save_images: bool = True, progress: bool = False,
                desc: str = "", prefix: str = "[reddiff]", dtype=torch.float32) -> int:
    """Run every unfinished fixed batch of ``dataset`` into ``sinks``; returns the number of batches run."""
    from tqdm import tqdm

    K = len(sinks)
    names = list(suite.names)
    for s in sinks:  # a resume over changed input files is refused before any work (store.jobdir)
        s.inputs.check_sources(dataset, s.store.done_ids())
    skipped = set().union(*(s.inputs.skipped for s in sinks))
    batches = fixed_batches(dataset.entries(), int(batch_size))

    def missing(batch) -> bool:
        return any(e.image_id not in skipped and e.image_id not in s.store.done_ids() for s in sinks for e in batch)

    todo = [b for b in batches if missing(b)]
    n_done = sum(len(b) for b in batches) - sum(len(b) for b in todo)
    if n_done:
        print(f"{prefix} resuming: {n_done} image(s) in finished batches, {sum(map(len, todo))} to go "
              f"(batches of {batch_size})")
    warned: set[str] = set()
    bar = tqdm(total=sum(map(len, todo)), desc=desc, unit="img", disable=not progress)
    for batch in todo:
        imgs, ok, skipped_now = [], [], {}
        for e in batch:
            try:
                imgs.append(dataset.load(e))
                ok.append(e)
            except CorruptImageError as err:  # corrupt image: skip, record, go on
                skipped_now[e.image_id] = str(err)
                log.warning("skipping %s: %s", e.image_id, err)
        conv = {e.image_id: list(dataset.conversions[e.image_id]) for e in ok
                if e.image_id in getattr(dataset, "conversions", {})}
        for kind in sorted({k for v in conv.values() for k in v} - warned):
            warned.add(kind)
            first = next(i for i, v in conv.items() if kind in v)
            log.warning("input %s: %s to %dx%d px (counted in summary.json 'converted'; not warned again)",
                        first, kind.replace("_", " "), dataset.resolution, dataset.resolution)
        hashes = {}
        for e in ok:
            src = dataset.source(e)
            if isinstance(src, (str, Path)) and Path(src).is_file():
                hashes[e.image_id] = file_sha256(src)
        for s in sinks:
            s.inputs.update(skipped_now, conv, hashes)
        if not ok:
            bar.update(len(batch))
            continue
        x = torch.stack(imgs).to(device=device, dtype=dtype)
        indices = [e.index for e in ok]
        n = len(ok)
        operator.setup(indices, tuple(x.shape), device, dtype)
        y = operator.measure(x, BatchRNG.for_images(seed + MEASUREMENT_SEED_OFFSET, indices, device))
        prior.reset_nfe()
        monitor = DivergenceMonitor(prior, n * K)
        t0 = time.time()
        try:
            outs, nfe = restore(y, indices, monitor, logger.step_callback(indices))
        finally:
            monitor.close()
        if device.type == "cuda":
            torch.cuda.synchronize()
        sec = (time.time() - t0) / (n * K)
        bad_all = [bool(~torch.isfinite(outs[k][b]).all()) for b in range(n) for k in range(K)]
        steps = monitor.steps(bad_all)
        vis = operator.visualize(y)
        for k, sink in enumerate(sinks):
            x_hat = outs[k]
            bad = torch.tensor([bad_all[b * K + k] for b in range(n)])
            x_eval = torch.where(bad.to(x_hat.device).view(-1, *[1] * (x_hat.ndim - 1)),
                                 torch.zeros_like(x_hat), x_hat).clamp(-1, 1)
            with torch.no_grad():  # scored on the whole batch, as an uninterrupted run scores it
                vals = {a: v.detach().cpu() for a, v in suite.per_image(x_eval, x).items()}
                feats = suite.features(x_eval, x)
            done = sink.store.done_ids()
            for j, e in enumerate(ok):
                if e.image_id in done:
                    continue  # a redone batch: the row on disk is the same computation
                diverged = bool(bad[j])
                row = {"image_id": e.image_id, "nfe": nfe, "seconds": sec, "diverged": diverged,
                       "diverged_step": steps[j * K + k]}
                for name in names:
                    row[name] = None if diverged or name not in vals else float(vals[name][j])
                if save_images:
                    save_png(sink.dir / "images" / f"{safe_name(e.image_id)}.png", x_eval[j])
                    if vis is not None and tuple(vis.shape[1:]) == tuple(x.shape[1:]):
                        save_png(sink.dir / "images" / f"{safe_name(e.image_id)}_y.png", vis[j])
                fj = {a: np.asarray(v[j]) for a, v in feats.items()}
                if e.label is not None:
                    fj["label"] = np.asarray(e.label)
                sink.store.append(row, fj)
                if diverged:
                    log.warning("%s diverged at network call %s", e.image_id, row["diverged_step"])
            logger.log_batch(ok, vals, job=k if K > 1 else None)
        bar.update(len(batch))
    bar.close()
    return len(todo)
