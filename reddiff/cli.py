"""``reddiff`` command line (entry point in pyproject.toml).

    reddiff weights status [--json]      every registry entry: present / missing, its path, what uses it (offline)
    reddiff weights fetch NAME... [--dest]  download entries into their standard cache (needs internet)
    reddiff data status [--json]         the data files of the registry (e.g. the ImageNet 1k list)
    reddiff data fetch NAME [--dest]     download one data file (e.g. imagenet_val_1k)

``status`` never touches the network: it looks at the cache paths, and checks the sha256 pin of files
that are present.

May import: reddiff.core
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional


def _is_data(spec) -> bool:
    return spec.used_by.startswith("data=")


def _status(data_only: bool, as_json: bool) -> int:
    from reddiff.core.weights import REGISTRY, status_rows

    rows = [r for r in status_rows() if _is_data(REGISTRY[r["name"]]) == data_only or not data_only]
    if not data_only:  # model folders (latent diffusion models): placed by hand, never fetched
        from reddiff.core.folders import status_rows as folder_rows

        rows += folder_rows()
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    w = max(len(r["name"]) for r in rows)
    ws = max(len(r["state"]) for r in rows)
    for r in rows:
        print(f"{r['name']:{w}s}  {r['state']:{ws}s}  {r['path']}  [{r['used_by']}]")
    n_missing = sum(not r["state"].startswith("present") for r in rows)
    print(f"\n{len(rows) - n_missing} present, {n_missing} missing"
          + ("; get one with: reddiff " + ("data" if data_only else "weights") + " fetch NAME" if n_missing else ""))
    return 0


def _fetch(name: str, dest: Optional[str], data_only: bool) -> int:
    from reddiff.core.folders import FOLDERS
    from reddiff.core.weights import REGISTRY, HashMismatchError, fetch

    if name in FOLDERS and not data_only:  # a model folder: placed by hand; say where and what
        spec = FOLDERS[name]
        print(f"{name} already present at {spec.path()}" if not spec.missing() else spec.missing_message(),
              file=sys.stdout if not spec.missing() else sys.stderr)
        return 0 if not spec.missing() else 1
    if name not in REGISTRY:
        print(f"unknown name {name!r}; known: {', '.join(sorted(REGISTRY))}", file=sys.stderr)
        return 2
    spec = REGISTRY[name]
    if data_only and not _is_data(spec):
        print(f"{name} is not a data file; use: reddiff weights fetch {name}", file=sys.stderr)
        return 2
    if spec.find() is not None and dest is None:
        print(f"{name} already present at {spec.find()}")
        return 0
    try:
        path = fetch(name, Path(dest) if dest else None)
    except HashMismatchError as e:
        print(f"fetch {name} failed: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # no direct download: the message is the manual instructions
        print(str(e), file=sys.stderr)
        return 1
    except OSError as e:  # URLError, HTTPError, DNS failure, disk
        print(f"fetch {name} failed: {e} (downloading needs internet access to {spec.url})", file=sys.stderr)
        return 1
    print(f"{name}: {path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="reddiff", description="RED-diff harness utilities")
    groups = p.add_subparsers(dest="group", required=True)
    for group, helptext in (("weights", "model / metric weights"), ("data", "data files (image lists)")):
        g = groups.add_parser(group, help=helptext)
        sub = g.add_subparsers(dest="cmd", required=True)
        st = sub.add_parser("status", help="list entries, present or missing, with paths (offline)")
        st.add_argument("--json", action="store_true")
        fe = sub.add_parser("fetch", help="download entries into their standard cache (needs internet)")
        fe.add_argument("names", nargs="+", metavar="NAME")
        fe.add_argument("--dest", default=None, help="write here instead of the standard cache (one NAME only)")
    a = p.parse_args(argv)
    data_only = a.group == "data"
    if a.cmd == "status":
        return _status(data_only, a.json)
    if a.dest is not None and len(a.names) > 1:
        print("--dest takes one NAME; fetch the others into their standard cache", file=sys.stderr)
        return 2
    codes = [_fetch(name, a.dest, data_only) for name in a.names]  # each one reports its own outcome
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
