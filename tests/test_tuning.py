"""The device-family lookup of the kernels' tuning (`pyprefopt.kernels.tuning`), with fake capabilities: no CUDA."""

import pytest
import torch

from pyprefopt.kernels import fused_linear_logprobs as logprobs
from pyprefopt.kernels import fused_lora_linear as lora
from pyprefopt.kernels import triton_launch, tuning


@pytest.mark.parametrize("capability, family", [
    ((8, 0), "sm_80"), ((8, 6), "sm_86"), ((8, 7), "sm_86"), ((8, 9), "sm_86"), ((9, 0), "sm_90"),
    ((10, 0), "sm_100"), ((10, 3), "sm_100"), ((11, 0), "sm_100"), ((12, 0), "sm_120"), ((12, 1), "sm_120"),
])
def test_known_capabilities_map_to_their_family(capability, family):
    assert tuning.family_of(capability).name == family


@pytest.mark.parametrize("capability, family", [
    ((9, 5), "sm_90"),  # a minor no family names: the family below it
    ((13, 0), "sm_120"), ((20, 7), "sm_120"),  # a major newer than every family: the newest
    ((7, 5), "sm_80"), ((7, 0), "sm_80"), ((0, 0), "sm_80"),  # older than every family: the lowest
])
def test_unknown_capabilities_fall_back_to_the_nearest_family(capability, family):
    assert tuning.family_of(capability).name == family


def test_the_device_is_read_at_the_first_launch_once_per_device(monkeypatch):
    calls = []

    def capability(index):
        calls.append(index)
        return (9, 0)

    tuning._cuda_family.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    try:
        assert tuning.device_family(torch.device("cuda", 1)).name == "sm_90"
        assert tuning.device_family(torch.device("cuda", 1)).name == "sm_90"
        assert calls == [1]
    finally:
        tuning._cuda_family.cache_clear()


def test_every_kernel_has_configs_for_every_family():
    tables = [logprobs.FORWARD_CONFIGS, logprobs.BACKWARD_CONFIGS, lora.MAIN_CONFIGS, lora.DOWN_CONFIGS,
              lora.DY_CONFIGS, lora.GRAD_CONFIGS]
    for table in tables:
        assert set(table) == set(tuning.FAMILY_NAMES)
    with pytest.raises(ValueError, match="no configs for the families"):
        triton_launch.TunedKernel(logprobs.fused_linear_logprobs_fwd_kernel, {"sm_80": []}, {}, key=[])


def test_register_budgets_and_resident_programs():
    hopper = tuning.family_of((9, 0))
    ada = tuning.family_of((8, 9))
    assert [tuning.register_budget(p, 8) for p in (1, 2, 3, 4)] == [255, 128, 80, 64]
    assert tuning.programs_per_sm(hopper, 64, 8, 16384) == 4
    assert tuning.programs_per_sm(hopper, 65, 8, 16384) == 3  # rounded up to 72 registers a thread
    assert tuning.programs_per_sm(hopper, 32, 8, 16384) == 8  # 2048 threads an SM
    assert tuning.programs_per_sm(ada, 32, 8, 16384) == 5  # 100 KiB of shared memory (1536 threads: 6)
    assert tuning.programs_per_sm(ada, 32, 8, 0) == 6
