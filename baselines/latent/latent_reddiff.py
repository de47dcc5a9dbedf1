"""Latent RED-diff: the RED-diff objective (:mod:`reddiff.samplers.reddiff`) on a latent ``mu``, the data term
through the decoder, ``||y - A(D(mu))||^2 / 2 + lam w_t sg[eps(z_t, t) - eps]^T mu``, initialised at ``E(A^+ y)``.
The official code's Stable Diffusion variant (``alg: varinf`` in NVlabs/RED-diff ``_configs/stablediff/params.yaml``)
runs 999 steps on SD 1.4 at 256 px with the empty prompt (``scale: 0.0``) and eta 1; its sampling code is not in
the repository, so lr and lambda are the pixel defaults (unverified).  The pixel sampler runs unchanged through the
runner's ``A(D(.))``; this class only refuses a pixel prior."""
from __future__ import annotations

from reddiff.baselines.latent.common import LatentOnly
from reddiff.samplers.reddiff import REDDiff


class LatentREDDiff(LatentOnly, REDDiff):
    name = "latent_reddiff"
