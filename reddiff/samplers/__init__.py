"""The sampler protocol and its shared pieces (``base``: ``Sampler``, ``DDIMFamily``), the particle framework
of MCG-diff and FPS-SMC (``smc``) and RED-diff itself (``reddiff``).  The other solvers are one file each in
``baselines/``; every sampler is found through ``conf/sampler/*.yaml`` (:mod:`reddiff.registry`).

May import: reddiff.core
"""
