"""``python -m fastconv``: the ``fastconv`` command (``fastconv._cli.main``)."""

from ._cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
