"""The ``fastconv`` command: ``fastconv info | train | bench | warmup``.

Each subcommand lives in its own module and is imported only when run. ``train`` first keeps
freed memory in the heap (``fastconv/_malloc.py``): a process-wide setting, so the library
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
        from ._info import main as run
    elif args.command == "train":
        from ._malloc import keep_freed_memory

        keep_freed_memory()  # every step allocates the same large arrays again (see _malloc)
        from ._train_cli import main as run
    elif args.command == "warmup":
        from ._warmup import main as run
    else:
        from ._bench_cli import main as run
    return run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
