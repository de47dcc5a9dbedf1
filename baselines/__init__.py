"""Baseline samplers: DPS, Pi-GDM, DDRM, unconditional DDIM and the pseudo-inverse.

Each is one file with one class, ``Class(**hyperparameters).sample(y, operator, prior, rng, callback=None)``
(the protocol of :mod:`reddiff.samplers.base`).

May import: reddiff.core, reddiff.operators, reddiff.samplers
"""
from .ddim import DDIM
from .ddrm import DDRM
from .dps import DPS
from .pigdm import PiGDM
from .pinv import Pinv

__all__ = ["DDIM", "DDRM", "DPS", "PiGDM", "Pinv"]
