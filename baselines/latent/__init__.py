"""Latent-diffusion solvers: they run on a latent prior (:mod:`reddiff.priors.latent`: ``encode``, ``decode`` and a
latent denoiser) and see the data term through the decoder (the runner's ``ThroughDecoder`` operator, whose
``pixel`` attribute is the task's own operator); one file and one ``conf/sampler/<name>.yaml`` each.

May import: reddiff.core, reddiff.operators, reddiff.priors, reddiff.samplers, reddiff.baselines
"""
