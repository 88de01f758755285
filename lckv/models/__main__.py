"""Command line of the model registry.

    python -m lckv.models list                 # name, architecture, size, whether cached
    python -m lckv.models fetch NAME           # download and verify; prints the directory
    python -m lckv.models path NAME            # prints the directory; exit 1 if not fetched

Exit status: 0 on success, 1 when ``path`` finds the model not fetched, 2 on any other error
(message on stderr).
"""
from __future__ import annotations

import argparse
import sys

from lckv.models.registry import (
    MODELS, ModelNotFetchedError, ModelRegistryError, fetch, is_fetched, list_models, model_dir, model_path,
)


def _print_list() -> None:
    rows = [("name", "architecture", "size", "context", "cached")]
    for name in list_models():
        spec = MODELS[name]
        rows.append((name, spec.architecture, f"{spec.size / 2**20:.1f} MiB", str(spec.context_length),
                     "yes" if is_fetched(spec) else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    print(f"\ncache: {model_dir(list_models()[0]).parent}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lckv.models", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the registered models and whether they are cached")
    commands.add_parser("fetch", help="download and verify a model").add_argument("name")
    commands.add_parser("path", help="print the directory of a fetched model").add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            _print_list()
        elif args.command == "fetch":
            print(fetch(args.name))
        else:
            print(model_path(args.name))
    except ModelNotFetchedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ModelRegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
