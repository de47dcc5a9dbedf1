"""The result store: the files of one job folder, written crash-safely and read back by the reports.

``results`` (``metrics.csv`` rows, features, atomic writes), ``jobdir`` (fingerprint, writer lock, inputs log),
``images`` (restored PNGs, ``grid.png``), ``aggregate`` (per-image rows -> ``summary.json`` numbers),
``provenance`` (identity, versions, git commit, peak memory) and ``formatting`` (``mean ± ci`` cells).

May import: reddiff.core
"""
