"""gpu_check.py's CPU dry run: every check it would make on a lent GPU, here on CPU tensors with the Triton
kernels interpreted, so the script is known to run (and to pass) before a GPU is ever lent."""

import json

from bench import gpu_check


def test_dry_run_passes_every_check(tmp_path):
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    families = {row["check"].split(" ")[0] for row in report["checks"]}
    assert families == {"fused_linear_logprobs", "FusedLinearPreferenceLoss", "FusedLoRALinearFunction",
                        "dequant_merge_nf4", "swiglu", "geglu", "rms_norm", "SwiGLUMLP"}
    assert all(row["ok"] for row in report["checks"])
    assert len(report["timings"]) == 12 and all(row["ours_ms"] > 0 for row in report["timings"])


def test_a_wrong_result_fails_the_check(monkeypatch):
    """A log-prob off by a relative 1e-5 in fp32 (a few times torch's own fp32 error) is caught."""
    import pyprefopt

    real = pyprefopt.fused_linear_logprobs
    monkeypatch.setattr(pyprefopt, "fused_linear_logprobs", lambda *a, **k: real(*a, **k) * (1 + 1e-5))
    rows = gpu_check.check_logprobs("cpu", quick=True)
    assert any(not r["ok"] and "float32" in r["check"] and r["check"].endswith("logp") for r in rows)
