import os

# The Triton kernels run on CPU tensors under the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# DeepSpeed picks its accelerator when first imported, and the processes the distributed tests spawn import it with
# their test module: the CPU one, which those gloo tests run on, whatever the machine has.
os.environ["DS_ACCELERATOR"] = "cpu"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["torch.mm", "oneDNN"])
def cpu_gemm(request, monkeypatch):
    """Runs a test on both GEMM paths of `pyprefopt.cpu_linear`: oneDNN takes only large fp32 GEMMs, so at test
    shapes it is forced by dropping its thresholds."""
    from pyprefopt import cpu_linear

    if request.param == "oneDNN":
        if not torch.backends.mkldnn.is_available():
            pytest.skip("this torch build has no oneDNN")
        monkeypatch.setattr(cpu_linear, "ONEDNN_MIN_MACS", 0)
        monkeypatch.setattr(cpu_linear, "ONEDNN_MIN_ACCUMULATE_DEPTH", 0)
    else:
        monkeypatch.setattr(cpu_linear, "ONEDNN_MIN_MACS", 1 << 62)
    return request.param
