"""``python -m reddiff.tables DIR [--format md|csv|tex] [--ref SAMPLER] [--no-write]`` (fixed contract 2): rebuild
``table.md``/``table.csv`` of a sweep dir (or any folder of job dirs) and print the table.  The command line only;
the tables are built in :mod:`reddiff.report.tables`.

May import: reddiff.report
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reddiff.report.tables import build_rows, collect, recorded_ref, render, write_tables


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="sweep dir (or any folder holding job dirs)")
    p.add_argument("--format", choices=["md", "csv", "tex"], default="md")
    p.add_argument("--no-write", action="store_true", help="print only; do not (re)write table.md/table.csv")
    p.add_argument("--ref", default=None, help="sampler name: add the paired difference to it (same task)")
    a = p.parse_args(argv)
    root = Path(a.dir)
    if not root.is_dir():
        print(f"error: {root} is not a directory", file=sys.stderr)
        raise SystemExit(2)
    summaries = collect(root)
    if not summaries:
        print(f"error: no job dirs (summary.json / metrics.csv) under {root}; nothing written", file=sys.stderr)
        raise SystemExit(2)
    ref = a.ref or recorded_ref(root)  # a rebuild keeps the table's recorded reference (its Δ column)
    if not a.no_write:
        try:
            write_tables(root, ref=ref)
        except OSError as e:  # a read-only sweep folder: the table is still printed
            print(f"note: {root} is not writable ({e.strerror or e}); the table is printed, not written",
                  file=sys.stderr)
    header, rows, notes = build_rows(summaries, ref=ref)
    print(render(header, rows, notes, a.format), end="")


if __name__ == "__main__":
    main()
