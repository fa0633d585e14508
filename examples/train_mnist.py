"""Train PyTorch's examples/mnist CNN with fastconv's kernels.

    FASTCONV_DATA_DIR=../shared/data/mnist python examples/train_mnist.py --epochs 5

Same options as ``fastconv train`` (``--help``): --backend, --epochs, --batch-size, --lr,
--optimizer, --seed, --data-dir, --limit, --checkpoint, --resume, --plots DIR, --threads.
Ctrl-C writes a checkpoint and exits with status 130; --resume continues exactly.

Data-parallel over MPI (``pip install "fastconv[mpi]"``), --batch-size being the global batch:

    mpiexec -n 2 python examples/train_mnist.py --distributed --threads 1
"""

import sys

from fastconv._cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
