"""One rank of tests/test_torch_ddp.py (also the single-process reference with world=1).

``python torch_ddp_worker.py RANK WORLD PORT OUT``: trains a converted model for STEPS SGD steps
on seeded global batches (each rank takes its contiguous share), under DistributedDataParallel
with gloo on 127.0.0.1:PORT when WORLD > 1, and writes its final parameters and losses to
``OUT/rank<RANK>.npz``.
"""

from __future__ import annotations

import datetime
import sys

import numpy as np
import torch

import fastconv.torch as ft

STEPS = 20
GLOBAL_BATCH = 8


def model():
    torch.manual_seed(0)
    nn = torch.nn
    return ft.convert(nn.Sequential(
        nn.Conv2d(1, 6, 3, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, groups=2, dilation=2), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 10),
    ))


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(GLOBAL_BATCH, 1, 16, 16, generator=g),
            torch.randint(0, 10, (GLOBAL_BATCH,), generator=g))


def main(rank, world, port, out):
    net = model()
    if world > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=60))
        net = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    share = GLOBAL_BATCH // world
    losses = []
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    module = net.module if world > 1 else net
    np.savez(f"{out}/rank{rank}.npz", losses=np.array(losses),
             **{k: v.detach().numpy() for k, v in module.state_dict().items()})
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
