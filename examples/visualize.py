"""Pictures of a saved model: training curves, first-layer filters, feature maps of one test
digit after each conv/pool layer, and the confusion matrix on the MNIST test set.

    python examples/visualize.py fastconv_mnist.ckpt --out pictures/

The model file is what ``fastconv train`` saves (``--save``; its history draws the curves).
Needs matplotlib; without it, prints how to install it and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="model file saved by fastconv train (--save)")
    p.add_argument("--out", default="pictures", help="output directory (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="MNIST directory (default: as load_mnist)")
    p.add_argument("--test-limit", type=int, default=None, help="first N test images only")
    p.add_argument("--backend", default=None, help="fastconv backend (default: auto)")
    args = p.parse_args(argv)

    from fastconv import nn
    from fastconv._cli import plots as _plots
    from fastconv.datasets import DatasetError, load_mnist, normalize

    missing = _plots.missing_reason()
    if missing:
        print(f"visualize: error: {missing}", file=sys.stderr)
        return 2
    try:
        model = nn.Sequential.load(args.model, backend=args.backend)
        history = (nn.load_checkpoint(args.model).get("metadata") or {}).get("history")
        _, (x_test, y_test) = load_mnist(args.data_dir)
    except (FileNotFoundError, nn.CheckpointError, DatasetError) as e:
        print(f"visualize: error: {e}", file=sys.stderr)
        return 2
    if args.test_limit:
        x_test, y_test = x_test[: args.test_limit], y_test[: args.test_limit]
    for path in _plots.write_all(args.out, model, history, x_test, y_test, normalize):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
