"""The diffusion core: what every other part of the harness stands on.

The DDPM schedule and timestep orderings (``diffusion``), per-image random streams (``rng``), the one-line user
errors (``errors``), safe weight loading (``checkpoint``) and the registry of every known weight file
(``weights``, ``python -m reddiff.core.weights``).

May import: nothing of the harness (only the standard library, torch, numpy and safetensors).
"""
