"""What `cpu_linear.operand_precision` buys the CPU head of a bf16 model: `fused_linear_logprobs` forward + backward
on bf16 hidden states and head, as shipped (oneDNN's bf16 fp32-math mode: bf16 products on CPUs with bf16 matrix
units, fp32 kernels elsewhere) and with plain fp32 GEMMs (`operand_precision` replaced by a no-op), side by side in
one process, alternated run by run.

    python -m bench.operand_precision [--tokens 800 --hidden 1536 --vocab 151936 --runs 4 --threads 2]

Prints one line per head (frozen, trained): the median over the runs after the first of each, the ratio, and the
largest difference of the log-probs between the two.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from pyprefopt import cpu_linear, fused_linear_logprobs


def fp32_gemms(dtype):
    return contextlib.nullcontext()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=800)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    hidden = torch.randn(a.tokens, a.hidden).bfloat16().requires_grad_()
    labels = torch.randint(0, a.vocab, (a.tokens,))
    shipped = cpu_linear.operand_precision
    for trained in (False, True):
        weight = (torch.randn(a.vocab, a.hidden) / a.hidden**0.5 * 3).bfloat16().requires_grad_(trained)
        seconds = {shipped: [], fp32_gemms: []}
        logps = {}
        try:
            for _ in range(a.runs):
                for precision in seconds:
                    # in_operand_precision_of looks the context up at each call.
                    cpu_linear.operand_precision = precision
                    hidden.grad = weight.grad = None
                    start = time.perf_counter()
                    logps[precision] = fused_linear_logprobs(hidden, weight, labels)
                    logps[precision].sum().backward()
                    seconds[precision].append(time.perf_counter() - start)
        finally:
            cpu_linear.operand_precision = shipped
        bf16_math, fp32 = (statistics.median(s[1:]) for s in seconds.values())
        difference = (logps[shipped] - logps[fp32_gemms]).abs().max().item()
        print(f"{'trained' if trained else 'frozen'} N{a.tokens} H{a.hidden} V{a.vocab} bf16 operands: "
              f"fp32 GEMMs {fp32 * 1e3:.0f} ms, bf16 fp32-math {bf16_math * 1e3:.0f} ms, ratio {bf16_math / fp32:.2f}, "
              f"max log-prob difference {difference:.1e}")


if __name__ == "__main__":
    main()
