"""Conv fwd and fwd+bwd times of one contender alone in its process (a cross-check of
`fastconv bench`, which interleaves all contenders in one process).

In one process PyTorch's OpenMP threads and the numba/Cython ones compete for the same 2 cores
after each call (one spins while the other starts), which inflated numba's fwd+bwd on shape B
from ~25 ms alone to ~49 ms interleaved on the development machine. Run each side alone and
compare the medians:

    for c in torch numba cython; do
        env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE MALLOC_MMAP_THRESHOLD_=1073741824 \
            MALLOC_TRIM_THRESHOLD_=4294967296 OPENBLAS_THREAD_TIMEOUT=4 python benchmarks/conv_separate_processes.py $c
    done

Prints ``contender shape fwd_ms fwdbwd_ms`` (medians of 9, 2 threads, float32).
"""
import statistics
import sys
import time

import numpy as np

which = sys.argv[1]
shapes = {"B": (64,32,26,26,64,3,1,0), "E": (32,64,56,56,64,3,1,1), "F": (32,64,56,56,128,3,2,1), "G": (32,256,14,14,64,1,1,0), "D": (64,6,14,14,16,5,1,0), "A": (64,1,28,28,32,3,1,0)}
rng = np.random.default_rng(0)
res = {}
if which == "torch":
    import torch, torch.nn.functional as F
    torch.set_num_threads(2)
else:
    import fastconv as fc, numba
    numba.set_num_threads(2)
for name, (n,ci,h,w,co,k,s,p) in shapes.items():
    x = rng.standard_normal((n,ci,h,w)).astype(np.float32); wt = rng.standard_normal((co,ci,k,k)).astype(np.float32)*0.1
    b = np.zeros(co, np.float32)
    if which == "torch":
        xt = torch.from_numpy(x).requires_grad_(); wtt = torch.from_numpy(wt).requires_grad_(); bt = torch.from_numpy(b).requires_grad_()
        def fwd(): return F.conv2d(xt, wtt, bt, stride=s, padding=p)
        def fb():
            y = F.conv2d(xt, wtt, bt, stride=s, padding=p); y.backward(torch.ones_like(y))
    else:
        def fwd(): return fc.conv2d(x, wt, b, stride=s, padding=p, backend=which)
        def fb():
            y = fc.conv2d(x, wt, b, stride=s, padding=p, backend=which)
            fc.conv2d_backward(np.ones_like(y), x, wt, stride=s, padding=p, backend=which)
    for f in (fwd, fb): f(); f()
    out = []
    for f in (fwd, fb):
        ts = []
        for _ in range(9):
            t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
        out.append(statistics.median(ts) * 1e3)
    print(which, name, " ".join(f"{v:.2f}" for v in out), flush=True)
