"""What every latent solver shares: it refuses a prior without an encoder and a decoder, and checks its operator
requirements on the task's pixel operator (the runner hands a latent sampler ``A(D(.))``, whose ``pixel`` is
``A``)."""
from __future__ import annotations


class LatentOnly:
    """Mixin for a :class:`reddiff.samplers.base.Sampler` defined on latent priors only."""

    needs_latent = True

    def check(self, operator) -> None:
        super().check(getattr(operator, "pixel", operator))

    def check_prior(self, prior) -> None:
        if not (hasattr(prior, "decode") and hasattr(prior, "encode")):
            raise ValueError(f"{self.name}: needs a latent prior (an encoder and a decoder: prior=latent_tiny, sd15, "
                             f"sd21_base, ldm_ffhq256, ldm_celebahq256); prior "
                             f"{getattr(prior, 'name', type(prior).__name__)} has none")
        super().check_prior(prior)
