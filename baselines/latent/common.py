"""What the latent solvers built on pixel updates share: ``needs_latent`` (``Sampler.check_prior`` then refuses a
pixel prior in one line) and the operator requirements checked on the task's pixel operator (the runner hands a
latent sampler ``A(D(.))``, whose ``pixel`` is ``A``)."""
from __future__ import annotations


class LatentOnly:
    """Mixin for a :class:`reddiff.samplers.base.Sampler` defined on latent priors only."""

    needs_latent = True

    def check(self, operator) -> None:
        super().check(getattr(operator, "pixel", operator))
