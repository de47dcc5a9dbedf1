"""Pixel-space solvers of the wider field (InverseBench's list beyond round 2), one file and one
``conf/sampler/<name>.yaml`` each.

May import: reddiff.core, reddiff.operators, reddiff.priors, reddiff.samplers, reddiff.baselines
"""
