import sys

import pytest
import torch

from pyprefopt import fused_linear_logprobs
from pyprefopt.reference import reference_logprobs, reference_token_statistics
from tests.tensor_asserts import assert_close_verbose, assert_within_torch_error

# (batch, seq, hidden, vocab): odd widths, GPT-2's and a Qwen-like vocabulary at tiny hidden sizes,
# length-1 sequences, hidden sizes that are not multiples of 16.
SHAPES = [(3, 47, 31, 123), (2, 3, 16, 50257), (1, 4, 8, 151936), (5, 1, 24, 1000), (2, 6, 40, 257)]
SMALL_SHAPES = [(3, 7, 31, 123), (5, 1, 24, 100), (2, 6, 40, 257)]  # for the Triton interpreter
GRAD_SETS = [("hidden",), ("hidden", "weight", "bias"), ("weight",), ("hidden", "bias")]


def make_inputs(batch, seq, width, vocab, dtype=torch.float32, grads=("hidden",), with_bias=True):
    hidden = torch.randn(batch, seq, width).to(dtype)
    weight = (torch.randn(vocab, width) / width**0.5 * 3).to(dtype)
    bias = torch.randn(vocab).to(dtype) if with_bias else None
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, : seq // 2] = -100  # a prompt
    if batch > 2:
        labels[1] = -100  # a row with nothing to score
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None:
            t.requires_grad_(name in grads)
    return hidden, weight, bias, labels


def value_and_grads(fn, hidden, weight, bias, labels, grads, **kwargs):
    out = fn(hidden, weight, labels, bias, **kwargs)
    tensors = {"hidden": hidden, "weight": weight, "bias": bias}
    wanted = [tensors[g] for g in grads if tensors[g] is not None]
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return out, torch.autograd.grad(out, wanted, upstream)


def float64_copies(*tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def check_against_reference(backend, shape, grads, **transform):
    """fp32 results within 2x the error of PyTorch's own fp32 materialised-logits path, both against an fp64
    truth: a fixed atol would pass or fail with the BLAS's summation order over the vocabulary (MKL on AMD
    Zen 5 sums a 151936-long row far less accurately than on Intel). `transform`: temperature, softcap,
    logit_scale."""
    hidden, weight, bias, labels = make_inputs(*shape, grads=grads)
    # A first step leaves a trained fp32 CPU head the weight-gradient buffer the next forward keeps logits in.
    value_and_grads(fused_linear_logprobs, hidden, weight, bias, labels, grads, backend=backend, **transform)
    out, got = value_and_grads(fused_linear_logprobs, hidden, weight, bias, labels, grads, backend=backend,
                               **transform)
    ref, want = value_and_grads(reference_logprobs, hidden, weight, bias, labels, grads, **transform)
    truth, true_grads = value_and_grads(reference_logprobs, *float64_copies(hidden, weight, bias), labels, grads,
                                        dtype=torch.float64, **transform)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    assert (out[labels == -100] == 0).all()
    assert_within_torch_error(out, truth, ref, name="logp")
    for name, g, w, t in zip(grads, got, want, true_grads):
        assert_within_torch_error(g, t, w, name=f"grad {name}")


@pytest.mark.parametrize("grads", GRAD_SETS, ids="+".join)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_matches_reference_fp32(shape, grads, cpu_gemm):
    check_against_reference("torch", shape, grads)


@pytest.mark.parametrize("grads", GRAD_SETS, ids="+".join)
def test_cpu_many_token_blocks_and_tiles(grads, monkeypatch):
    """Token blocks of 8 and vocabulary tiles of 256 (the smallest) on 71 scored tokens at H = 31: a trained head
    keeps the first 3 blocks' logits in its weight gradient, whose rows they write in backward (no zero-fill),
    and the other 6 blocks are recomputed and added."""
    monkeypatch.setattr(sys.modules["pyprefopt.fused_linear_logprobs"], "CPU_TOKEN_BLOCK", 8)
    monkeypatch.setattr(sys.modules["pyprefopt.fused_linear_logprobs"], "CPU_TILE_BYTES", 4096)
    check_against_reference("torch", (3, 47, 31, 1000), grads)


def count_recomputed_tiles(monkeypatch):
    """The rows of every logits tile the CPU path computes, forward and backward alike (clear it in between)."""
    module = sys.modules["pyprefopt.fused_linear_logprobs"]
    calls = []
    real = module.logits_tile
    monkeypatch.setattr(module, "logits_tile", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    return calls


@pytest.mark.parametrize("tokens,recomputed", [(12, 0), (20, 0), (30, 14)], ids=["12<H", "20=H", "30>H"])
def test_trained_head_keeps_the_first_tokens_logits_for_backward(tokens, recomputed, monkeypatch):
    """A trained head's forward keeps the logits of the token blocks among the first H tokens in the weight
    gradient's buffer (where backward writes their gradient): backward recomputes only the tokens after them."""
    module = sys.modules["pyprefopt.fused_linear_logprobs"]
    monkeypatch.setattr(module, "CPU_TOKEN_BLOCK", 8)
    monkeypatch.setattr(module, "CPU_TILE_BYTES", 4096)
    hidden, weight, bias, labels = make_inputs(1, tokens, 20, 1000, grads=("hidden", "weight", "bias"))
    labels[:] = torch.randint(0, 1000, labels.shape)
    calls = count_recomputed_tiles(monkeypatch)
    # The first step allocates the weight gradient in backward (and recomputes); the next forward keeps logits in it.
    fused_linear_logprobs(hidden, weight, labels, bias).sum().backward()
    weight.grad = None
    out = fused_linear_logprobs(hidden, weight, labels, bias, temperature=0.7)
    calls.clear()
    upstream = torch.randn(out.shape)
    got = torch.autograd.grad(out, [hidden, weight, bias], upstream)
    assert sum(calls) == recomputed * 4  # 4 vocabulary tiles of 256
    want = torch.autograd.grad(reference_logprobs(hidden, weight, labels, bias, temperature=0.7),
                               [hidden, weight, bias], upstream)
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        assert_close_verbose(g, w, name=f"grad {name}")


def test_trained_head_keeps_logits_only_in_a_free_weight_gradient(monkeypatch):
    """Two forwards pending before one backward: only the first keeps its logits (the weight gradient's buffer is
    then held), so no second weight-sized buffer is taken; a retained graph's second backward recomputes."""
    hidden, weight, bias, labels = make_inputs(2, 5, 16, 300, grads=("hidden", "weight"))
    calls = count_recomputed_tiles(monkeypatch)
    # Before any backward there is no buffer to keep logits in: the forward allocates none, backward recomputes.
    out = fused_linear_logprobs(hidden, weight, labels, bias)
    calls.clear()
    out.sum().backward()
    assert calls == [8] and weight in sys.modules["pyprefopt.fused_linear_logprobs"]._WEIGHT_GRAD_STORAGE
    weight.grad = None
    first = fused_linear_logprobs(hidden, weight, labels, bias)
    second = fused_linear_logprobs(hidden * 2, weight, labels, bias)
    calls.clear()
    (first.sum() + second.sum()).backward(retain_graph=True)
    assert calls == [8]  # the second call's 8 scored tokens, one tile
    want = weight.grad.clone()
    ref = reference_logprobs(hidden, weight, labels, bias).sum() + reference_logprobs(hidden * 2, weight, labels,
                                                                                      bias).sum()
    assert_close_verbose(want, torch.autograd.grad(ref, [weight])[0], name="grad weight")
    weight.grad = None
    calls.clear()
    (first.sum() + second.sum()).backward()
    assert calls == [8, 8]
    assert_close_verbose(weight.grad, want, name="grad weight of the second backward")


@pytest.mark.parametrize("grads", GRAD_SETS, ids="+".join)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_triton_interpreted_matches_reference_fp32(shape, grads):
    check_against_reference("triton", shape, grads)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_temperature(backend):
    check_against_reference(backend, (2, 5, 24, 300), ("hidden", "weight", "bias"), temperature=0.7)


# Model heads' own logit transforms (transformers' order: scale, soft-cap, then the temperature). The logits of
# `make_inputs` have a standard deviation of about 3; a logit scale of 8 takes them deep into a cap of 20, and a
# temperature of 0.25 then spreads them over +-80, where exp(logit - max) underflows in fp32 (kept tiles must
# not lose the label's gradient there).
TRANSFORMS = {
    "gemma-softcap30": dict(softcap=30.0),
    "capped-saturated": dict(softcap=20.0, logit_scale=8.0),
    "capped-underflow": dict(softcap=20.0, logit_scale=8.0, temperature=0.25),
    "granite-scale": dict(logit_scale=0.125),
}


@pytest.mark.parametrize("grads", GRAD_SETS, ids="+".join)
@pytest.mark.parametrize("transform", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize("backend,shape", [("torch", (3, 47, 31, 1000)), ("triton", (3, 7, 31, 300))], ids=str)
def test_logit_transforms(backend, shape, transform, grads, monkeypatch):
    """Soft-capped and scaled heads against the fp64 materialised reference, gradients included; on CPU with
    token blocks of 8 and small tiles, so a trained head keeps some blocks' tiles for backward and recomputes
    the others."""
    monkeypatch.setattr(sys.modules["pyprefopt.fused_linear_logprobs"], "CPU_TOKEN_BLOCK", 8)
    monkeypatch.setattr(sys.modules["pyprefopt.fused_linear_logprobs"], "CPU_TILE_BYTES", 4096)
    check_against_reference(backend, shape, grads, **transform)


@pytest.mark.parametrize("transform", [dict(softcap=0.0), dict(softcap=-1.0), dict(softcap=True),
                                       dict(logit_scale=0.0), dict(logit_scale=float("nan")),
                                       dict(temperature=float("inf")), dict(softcap="30")], ids=str)
def test_bad_logit_transform_is_a_clear_error(transform):
    hidden, weight, bias, labels = make_inputs(2, 3, 8, 20)
    name = next(iter(transform))
    with pytest.raises((TypeError, ValueError), match=name):
        fused_linear_logprobs(hidden, weight, labels, bias, **transform)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_low_precision_within_twice_torch_error(backend, dtype):
    """Error vs an fp64 truth is at most 2x that of PyTorch's materialised logits in the same dtype."""
    grads = ("hidden", "weight")
    hidden, weight, bias, labels = make_inputs(3, 9, 48, 500, dtype=dtype, grads=grads, with_bias=False)
    out, got = value_and_grads(fused_linear_logprobs, hidden, weight, bias, labels, grads, backend=backend)
    same_dtype, torch_grads = value_and_grads(reference_logprobs, hidden, weight, bias, labels, grads, dtype=dtype)
    truth, true_grads = value_and_grads(reference_logprobs, *float64_copies(hidden, weight), None, labels, grads,
                                        dtype=torch.float64)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_within_torch_error(out, truth, same_dtype, name="logp")
    for name, g, t, tg in zip(grads, got, torch_grads, true_grads):
        assert_within_torch_error(g, tg, t, name=f"grad {name}")


@pytest.mark.parametrize("grads", [("hidden",), ("hidden", "weight")], ids=["frozen", "trained"])
def test_a_bf16_head_over_many_tiles_on_cpu(grads, monkeypatch):
    """Token blocks of 8 and vocabulary tiles of 256 on a bf16 head: each tile is upcast into the one fp32 scratch
    that the next tile overwrites, forward and backward (kept and recomputed tiles alike)."""
    module = sys.modules["pyprefopt.fused_linear_logprobs"]
    monkeypatch.setattr(module, "CPU_TOKEN_BLOCK", 8)
    monkeypatch.setattr(module, "CPU_TILE_BYTES", 4096)
    hidden, weight, bias, labels = make_inputs(3, 23, 31, 1000, dtype=torch.bfloat16, grads=grads, with_bias=False)
    value_and_grads(fused_linear_logprobs, hidden, weight, bias, labels, grads, backend="torch")
    out, got = value_and_grads(fused_linear_logprobs, hidden, weight, bias, labels, grads, backend="torch")
    fp32, fp32_grads = value_and_grads(reference_logprobs, hidden, weight, bias, labels, grads)
    truth, true_grads = value_and_grads(reference_logprobs, *float64_copies(hidden, weight), None, labels, grads,
                                        dtype=torch.float64)
    assert_within_torch_error(out, truth, fp32, name="logp")
    for name, g, t, tg in zip(grads, got, fp32_grads, true_grads):
        assert_within_torch_error(g.float(), tg, t, name=f"grad {name}")


def test_bf16_operands_give_fp32_logits_on_cpu():
    """bf16 hidden states and head multiply exactly on CPU (`cpu_linear.operand_precision`) and the logits stay fp32:
    the log-probs' error against fp64 on the same values is that of fp32 logits, far below bf16 logits' error."""
    hidden, weight, _, labels = make_inputs(4, 128, 256, 3000, dtype=torch.bfloat16, with_bias=False)
    out = fused_linear_logprobs(hidden, weight, labels, backend="torch")
    truth = reference_logprobs(*float64_copies(hidden, weight), labels, dtype=torch.float64)
    fp32_logits = reference_logprobs(hidden.float(), weight.float(), labels)
    bf16_logits = reference_logprobs(hidden, weight, labels, dtype=torch.bfloat16)
    assert_within_torch_error(out, truth, fp32_logits, name="logp")
    assert (out - truth).abs().max() * 100 < (bf16_logits - truth).abs().max()


def gemm_precisions(monkeypatch):
    """The oneDNN fp32 matmul precision in force at each of `cpu_linear`'s GEMMs, as they run."""
    from pyprefopt import cpu_linear

    seen = []
    for name in ("linear", "addmm_"):
        gemm = getattr(cpu_linear, name)
        monkeypatch.setattr(cpu_linear, name, lambda *args, gemm=gemm, **kwargs: seen.append(
            torch.backends.mkldnn.matmul.fp32_precision) or gemm(*args, **kwargs))
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("grads", [("hidden",), ("hidden", "weight", "bias")], ids=["frozen", "trained"])
def test_blocked_gemms_run_in_the_operand_precision(grads, dtype, monkeypatch):
    """Every GEMM of the blocked forward and backward (gradient factor, kept and recomputed logits, gradients) runs
    in bf16 operand precision for bf16 operands and in the caller's precision otherwise, which is back on return."""
    before = torch.backends.mkldnn.matmul.fp32_precision
    hidden, weight, bias, labels = make_inputs(2, 40, 16, 300, dtype=dtype, grads=grads)
    seen = gemm_precisions(monkeypatch)
    for _ in range(2):  # the second step keeps logits in the weight gradient the first left free
        fused_linear_logprobs(hidden, weight, labels, bias, backend="torch").sum().backward()
    assert seen and set(seen) == {"bf16" if dtype == torch.bfloat16 else before}
    assert torch.backends.mkldnn.matmul.fp32_precision == before


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_positions_ignored(backend):
    hidden, weight, bias, labels = make_inputs(2, 3, 16, 50, grads=("hidden", "weight"))
    labels.fill_(-7)
    out = fused_linear_logprobs(hidden, weight, labels, bias, ignore_index=-7, backend=backend)
    assert torch.equal(out, torch.zeros(2, 3))
    out.sum().backward()
    assert not hidden.grad.any()


def test_frozen_head_does_no_recompute(monkeypatch):
    """A frozen head takes the factorised path: backward only scales what the forward formed."""

    def fail(*args, **kwargs):
        raise AssertionError("backward recomputed logits for a frozen head")

    # `pyprefopt.fused_linear_logprobs` the attribute is the function; the module is in sys.modules.
    monkeypatch.setattr(sys.modules["pyprefopt.fused_linear_logprobs"], "cpu_backward", fail)
    hidden, weight, bias, labels = make_inputs(2, 5, 16, 70, grads=("hidden",))
    fused_linear_logprobs(hidden, weight, labels, bias).sum().backward()
    assert hidden.grad is not None and weight.grad is None and bias.grad is None


def test_leading_shapes_are_kept():
    hidden = torch.randn(2, 3, 4, 8)
    weight = torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 3, 4))
    out = fused_linear_logprobs(hidden, weight, labels)
    assert_close_verbose(out, reference_logprobs(hidden, weight, labels), name="logp")


BAD_INPUTS = [
    ("hidden's last dimension", lambda h, w, y: (h[..., :-1], w, y, {})),
    ("must share a dtype", lambda h, w, y: (h.double(), w, y, {})),
    ("leading shape", lambda h, w, y: (h, w, y[:, :-1], {})),
    ("integer tensor", lambda h, w, y: (h, w, y.float(), {})),
    ("out of range", lambda h, w, y: (h, w, y.clone().fill_(10), {})),
    ("out of range", lambda h, w, y: (h, w, y.clone().fill_(-3), {})),
    ("empty batch", lambda h, w, y: (h[:0], w, y[:0], {})),
    ("one device", lambda h, w, y: (h, w.to("meta"), y, {})),
    ("temperature", lambda h, w, y: (h, w, y, {"temperature": 0.0})),
    ("bias must be", lambda h, w, y: (h, w, y, {"bias": torch.zeros(3)})),
    ("weight must be", lambda h, w, y: (h, w[None], y, {})),
    ("backend", lambda h, w, y: (h, w, y, {"backend": "cuda"})),
]


@pytest.mark.parametrize("message,make", BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(message, make):
    hidden, weight, labels = torch.randn(2, 3, 8), torch.randn(10, 8), torch.randint(0, 10, (2, 3))
    h, w, y, kwargs = make(hidden, weight, labels)
    with pytest.raises((ValueError, TypeError), match=message):
        fused_linear_logprobs(h, w, y, **kwargs)


def test_no_grad_forms_no_gradient_factor(monkeypatch):
    """Under torch.no_grad() (evaluation, reference passes) the forward skips the gradient factor."""
    module = sys.modules["pyprefopt.fused_linear_logprobs"]
    calls = []
    real = module.cpu_forward
    monkeypatch.setattr(module, "cpu_forward", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    hidden, weight, bias, labels = make_inputs(2, 5, 16, 70, grads=("hidden",))
    with torch.no_grad():
        fused_linear_logprobs(hidden, weight, labels, bias)
    fused_linear_logprobs(hidden, weight, labels, bias)
    assert calls == [False, True]


@pytest.mark.parametrize("transform", [dict(temperature=0.7), dict(temperature=0.7, **TRANSFORMS["capped-saturated"])],
                         ids=["plain", "capped"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("grads", [("hidden",), ("hidden", "weight"), ()], ids=["frozen", "trained", "no-grad"])
@pytest.mark.parametrize("backend,shape", [("torch", s) for s in SHAPES] + [("triton", s) for s in SMALL_SHAPES],
                         ids=str)
def test_statistics_match_reference(backend, shape, grads, with_bias, transform, monkeypatch):
    """Entropy, log sum p^2, mean logit and is-top-1 beside the log-probs, on every path (frozen head, trained
    head, no grad), with tiles small enough that the online rescaling runs; each within 2x the error of
    PyTorch's fp32 materialised logits against an fp64 truth."""
    monkeypatch.setattr(sys.modules["pyprefopt.fused_linear_logprobs"], "CPU_TILE_BYTES", 4096)
    hidden, weight, bias, labels = make_inputs(*shape, grads=grads, with_bias=with_bias)
    # Make some labels the argmax, so is_top1 is not all False.
    with torch.no_grad():
        logits = torch.nn.functional.linear(hidden, weight, bias)
        labels[:, ::2] = torch.where(labels[:, ::2] == -100, labels[:, ::2], logits.argmax(-1)[:, ::2])
    statistics = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    logp, stats = fused_linear_logprobs(hidden, weight, labels, bias, backend=backend, statistics=statistics,
                                        **transform)
    want = reference_token_statistics(hidden, weight, labels, bias, **transform)
    as_float64 = float64_copies(hidden, weight, bias)
    truth = reference_token_statistics(*as_float64[:2], labels, as_float64[2], dtype=torch.float64, **transform)
    assert_within_torch_error(logp, reference_logprobs(*as_float64[:2], labels, as_float64[2], dtype=torch.float64,
                                                       **transform),
                              reference_logprobs(hidden, weight, labels, bias, **transform), name="logp")
    assert list(stats) == list(statistics)
    for name in statistics:
        # The entropy is differentiable (an entropy bonus); the other statistics are metrics.
        assert stats[name].shape == labels.shape
        assert stats[name].requires_grad == (name == "entropy" and bool(grads))
        if name == "is_top1":
            assert torch.equal(stats[name], want[name]) and stats[name].any()
        else:
            assert_within_torch_error(stats[name], truth[name], want[name], name=name)
    if grads:
        # The statistics change nothing about the gradients.
        upstream = torch.randn(logp.shape)
        tensors = [{"hidden": hidden, "weight": weight}[g] for g in grads]
        got = torch.autograd.grad(logp, tensors, upstream)
        want_grads = torch.autograd.grad(fused_linear_logprobs(hidden, weight, labels, bias, backend=backend,
                                                               **transform), tensors, upstream)
        for g, w in zip(got, want_grads):
            assert_close_verbose(g, w, name="grad")


def test_unknown_statistic_is_an_error():
    hidden, weight, bias, labels = make_inputs(2, 3, 8, 20)
    with pytest.raises(ValueError, match="statistics must be distinct names"):
        fused_linear_logprobs(hidden, weight, labels, bias, statistics=("perplexity",))


def entropy_and_logp_grads(fn, hidden, weight, bias, labels, grads, with_logp, **kwargs):
    """Gradients of `sum(g_H * entropy) (+ sum(g_lp * logp))` for fixed random upstreams: `fn` is
    `fused_linear_logprobs` or the reference (which returns the entropy alone)."""
    tensors = {"hidden": hidden, "weight": weight, "bias": bias}
    wanted = [tensors[g] for g in grads if tensors[g] is not None]
    generator = torch.Generator().manual_seed(1)
    upstream_entropy, upstream_logp = (torch.randn(labels.shape, generator=generator) for _ in range(2))
    entropy, logp = fn(hidden, weight, labels, bias, **kwargs)
    loss = (entropy * upstream_entropy.to(entropy.dtype)).sum()
    if with_logp:
        loss = loss + (logp * upstream_logp.to(logp.dtype)).sum()
    return torch.autograd.grad(loss, wanted)


def fused_entropy(hidden, weight, labels, bias, **kwargs):
    logp, stats = fused_linear_logprobs(hidden, weight, labels, bias, statistics=("is_top1", "entropy"), **kwargs)
    return stats["entropy"], logp


def reference_entropy(hidden, weight, labels, bias, dtype=torch.float32, **transform):
    return (reference_token_statistics(hidden, weight, labels, bias, dtype=dtype, **transform)["entropy"],
            reference_logprobs(hidden, weight, labels, bias, dtype=dtype, **transform))


@pytest.mark.parametrize("with_logp", [True, False], ids=["entropy+logp", "entropy-only"])
@pytest.mark.parametrize("grads", GRAD_SETS, ids="+".join)
@pytest.mark.parametrize("transform", [dict(temperature=0.7), dict(softcap=5.0, temperature=0.7),
                                       TRANSFORMS["capped-underflow"]], ids=["temperature", "capped", "underflow"])
@pytest.mark.parametrize("backend,shape", [("torch", (3, 47, 31, 1000)), ("triton", (3, 7, 31, 300))], ids=str)
def test_entropy_gradient_within_torch_error(backend, shape, transform, grads, with_logp, monkeypatch):
    """The entropy's gradient, dH / dlogits_v = -p_v (log p_v + H) through the soft-cap's slope and the
    temperature, alone and beside the log-probs', within 2x the error of PyTorch's fp32 autograd through the
    materialised logits against an fp64 truth. On CPU with token blocks of 8 and small tiles, so a trained head
    keeps the first blocks' tiles for backward and recomputes the others; a frozen head's factorised forward falls
    back to the recomputing backward; the Triton path differentiates the entropy through the blocked backward."""
    monkeypatch.setattr(sys.modules["pyprefopt.fused_linear_logprobs"], "CPU_TOKEN_BLOCK", 8)
    monkeypatch.setattr(sys.modules["pyprefopt.fused_linear_logprobs"], "CPU_TILE_BYTES", 4096)
    hidden, weight, bias, labels = make_inputs(*shape, grads=grads)
    # A first step leaves a trained fp32 CPU head the weight-gradient buffer the next forward keeps logits in.
    entropy_and_logp_grads(fused_entropy, hidden, weight, bias, labels, grads, with_logp, backend=backend,
                           **transform)
    got = entropy_and_logp_grads(fused_entropy, hidden, weight, bias, labels, grads, with_logp, backend=backend,
                                 **transform)
    want = entropy_and_logp_grads(reference_entropy, hidden, weight, bias, labels, grads, with_logp, **transform)
    truth = entropy_and_logp_grads(reference_entropy, *float64_copies(hidden, weight, bias), labels, grads,
                                   with_logp, dtype=torch.float64, **transform)
    for name, g, w, t in zip(grads, got, want, truth):
        assert g.abs().max() > 0, name
        assert_within_torch_error(g, t, w, name=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_entropy_gradient_low_precision_within_twice_torch_error(dtype):
    grads = ("hidden", "weight")
    transform = dict(softcap=5.0, temperature=0.7)
    hidden, weight, bias, labels = make_inputs(3, 9, 48, 500, dtype=dtype, grads=grads, with_bias=False)
    got = entropy_and_logp_grads(fused_entropy, hidden, weight, bias, labels, grads, True, **transform)
    same_dtype = entropy_and_logp_grads(reference_entropy, hidden, weight, bias, labels, grads, True, dtype=dtype,
                                        **transform)
    truth = entropy_and_logp_grads(reference_entropy, *float64_copies(hidden, weight), None, labels, grads, True,
                                   dtype=torch.float64, **transform)
    for name, g, w, t in zip(grads, got, same_dtype, truth):
        assert g.dtype == dtype
        assert_within_torch_error(g, t, w, name=f"grad {name}")


def test_unused_entropy_costs_a_frozen_head_no_recompute(monkeypatch):
    """An entropy asked for as a metric only (TRL's GRPO without an entropy bonus) leaves a frozen head's
    factorised backward as it is; one that enters the loss recomputes, and its gradient is the reference's."""
    module = sys.modules["pyprefopt.fused_linear_logprobs"]
    calls = []
    real = module.cpu_backward
    monkeypatch.setattr(module, "cpu_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, bias, labels = make_inputs(2, 5, 16, 70, grads=("hidden",))
    logp, stats = fused_linear_logprobs(hidden, weight, labels, bias, statistics=("entropy",))
    (logp.sum() + stats["entropy"].detach().sum()).backward()
    assert not calls and hidden.grad is not None
    logp, stats = fused_linear_logprobs(hidden, weight, labels, bias, statistics=("entropy",))
    got = torch.autograd.grad(logp.sum() + stats["entropy"].sum(), hidden)[0]
    assert calls == [1]
    ref_entropy, ref_logp = reference_entropy(hidden, weight, labels, bias)
    assert_close_verbose(got, torch.autograd.grad(ref_logp.sum() + ref_entropy.sum(), hidden)[0], name="grad hidden")
