"""Reporting: everything that turns finished job folders into tables, plots and verdicts; it runs nothing.

``tables`` (sweep tables, shards merged; command line :mod:`reddiff.tables`), ``plots`` and ``figures``
(``python -m reddiff.report.plots``), ``stats`` (photo-clustered intervals, paired differences), ``anchors``
(published numbers) and ``claims`` (``python -m reddiff.report.claims``: the paper's claims with verdicts).

May import: reddiff.core, reddiff.data, reddiff.samplers, reddiff.registry, reddiff.store
"""
