"""Latent DPS: DPS's update (:mod:`reddiff.baselines.dps`) on a latent prior, the residual through the decoder:
``x_s = ... - zeta / ||y - A(D(z0_hat))|| * grad_{z_t} ||y - A(D(z0_hat))||^2`` (the baseline that PSLD and ReSample
compare with, there called LDPS / Latent-DPS: PSLD paper Sec. 4, ReSample paper Sec. 5).  The harness's pixel DPS
runs unchanged through the runner's ``A(D(.))``; this class only refuses a pixel prior, so that ``sampler=latent_dps``
never silently means pixel DPS.  Defaults: DPS's own (``conf/sampler/latent_dps.yaml``; no official latent values
exist: unverified)."""
from __future__ import annotations

from reddiff.baselines.dps import DPS
from reddiff.baselines.latent.common import LatentOnly


class LatentDPS(LatentOnly, DPS):
    name = "latent_dps"
