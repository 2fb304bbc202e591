"""Comparisons shared by the tests: tight fp32 checks that name the worst element, and low-precision
checks bounded by a multiple of the same-dtype PyTorch error (as flash-attention's tests do)."""

import torch


def max_error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_close_verbose(actual, expected, rtol=1e-5, atol=1e-5, name="tensor"):
    """`torch.testing.assert_close` that names the tensor and shows the worst element."""
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, check_dtype=False)
    except AssertionError as err:
        diff = (actual.double() - expected.double()).abs().flatten()
        i = int(diff.argmax())
        raise AssertionError(
            f"{name}: max abs error {diff[i].item():.3e} at flat index {i} of shape {tuple(actual.shape)} "
            f"(actual {actual.flatten()[i].item():.6g}, expected {expected.flatten()[i].item():.6g})\n{err}"
        ) from None


def assert_within_torch_error(actual, truth, torch_same_dtype, factor=2.0, name="tensor"):
    """|actual - truth| <= factor * |torch_same_dtype - truth| (+ a tiny floor for exact-zero torch error)."""
    ours = max_error(actual, truth)
    theirs = max_error(torch_same_dtype, truth)
    assert ours <= factor * theirs + 1e-6, (
        f"{name}: error {ours:.3e} > {factor} x torch's same-dtype error {theirs:.3e}")


def output_and_grads(fn, inputs, upstream, dtype=None):
    """fn(*inputs) on leaf copies of `inputs` (cast to `dtype` if given) and the gradients of every input, for the
    gradient `upstream` of the output."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(upstream.to(out.dtype))
    return (out, *(leaf.grad for leaf in leaves))


def assert_elementwise_op_matches_fp64(ours, reference, inputs, upstream, names, fp32_atol):
    """An op's output and input gradients against `reference` computed in fp64: fp32 within rtol 1e-5 and `fp32_atol`
    (a name -> atol dict), 16-bit within 2x the reference's own error in that dtype. Returns our results."""
    got = output_and_grads(ours, inputs, upstream)
    truth = output_and_grads(reference, inputs, upstream, torch.float64)
    same_dtype = output_and_grads(reference, inputs, upstream)
    for name, mine, want, torch_same in zip(names, got, truth, same_dtype):
        assert mine.dtype == inputs[0].dtype and mine.shape == want.shape, name
        if mine.dtype == torch.float32:
            assert_close_verbose(mine, want, rtol=1e-5, atol=fp32_atol[name], name=name)
        else:
            assert_within_torch_error(mine, want, torch_same, name=name)
    return got, same_dtype
