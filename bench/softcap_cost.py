"""The soft-cap's cost on CPU: `fused_linear_logprobs` forward + backward (fp32), plain and with `softcap=30.0`,
side by side in one process, alternated run by run (the GPU's figures come from `bench/gpu_check.py`).

    OMP_NUM_THREADS=1 python -m bench.softcap_cost [--tokens 2048 --hidden 1024 --vocab 32000 --runs 5]

Prints one line per head (frozen, trained): the median over the runs after the first of each, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pyprefopt import fused_linear_logprobs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    hidden = torch.randn(a.tokens, a.hidden, requires_grad=True)
    labels = torch.randint(0, a.vocab, (a.tokens,))
    for trained in (False, True):
        weight = (torch.randn(a.vocab, a.hidden) / a.hidden**0.5 * 3).requires_grad_(trained)
        seconds = {None: [], 30.0: []}
        for _ in range(a.runs):
            for softcap in seconds:
                hidden.grad = weight.grad = None
                start = time.perf_counter()
                fused_linear_logprobs(hidden, weight, labels, softcap=softcap).sum().backward()
                seconds[softcap].append(time.perf_counter() - start)
        plain, capped = (statistics.median(s[1:]) for s in seconds.values())
        print(f"{'trained' if trained else 'frozen'} N{a.tokens} H{a.hidden} V{a.vocab} fp32: "
              f"plain {plain * 1e3:.0f} ms, "
              f"softcap {capped * 1e3:.0f} ms, capped / plain {capped / plain:.3f}")


if __name__ == "__main__":
    main()
