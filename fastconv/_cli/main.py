"""The ``fastconv`` command: ``fastconv info | train | bench | warmup``.

Each subcommand lives in its own module and is imported only when run. ``train`` first keeps
freed memory in the heap (``fastconv/_cli/malloc.py``): a process-wide setting, so the library
itself never does it.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fastconv", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["info", "train", "bench", "warmup"])
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    args, rest = parser.parse_known_args(argv[:1])
    rest = argv[1:]
    if args.command == "info":
        from .info import main as run
    elif args.command == "train":
        from .malloc import keep_freed_memory

        keep_freed_memory()  # every step allocates the same large arrays again (see malloc.py)
        from .train import main as run
    elif args.command == "warmup":
        from .._warmup import main as run
    else:
        from .bench_cmd import main as run
    return run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
