"""Flow-matching solvers: they run on the ``flow`` dialect of a prior (noise at t = 1, velocity and x0 views from
:mod:`reddiff.priors.dialects`), one file and one ``conf/sampler/<name>.yaml`` each.

May import: reddiff.core, reddiff.operators, reddiff.priors, reddiff.samplers, reddiff.baselines
"""
