"""The drop-in fused head under FSDP2 (`fully_shard`, 2 gloo CPU processes, each its own batch): the same losses
and gradients as the unsharded model with the gradients averaged over the processes, whether the head is in the
root's FSDP group (unsharded during the root's forward) or sharded in a group of its own (a DTensor when read)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

from pyprefopt import drop_in
from tests.gloo_processes import WORLD, report_every_check_passed, run_in_processes
from tests.tiny_trl_setup import CHECKED, model, random_state, rank_batch, tiny_config

HEAD_GROUPS = ("head-in-root-group", "head-in-own-group")


def _worker(head_group):
    """One of the WORLD processes torchrun starts (its rank and rendezvous in the environment)."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        config = tiny_config("qwen3")
        state = random_state(config, 0)
        plain, sharded = model(config, state), model(config, state)
        for m in (plain, sharded):
            drop_in.add_fused_lm_head(m)
        for layer in sharded.model.layers:
            fully_shard(layer)
        if head_group == "head-in-own-group":
            fully_shard(sharded.lm_head)
        fully_shard(sharded)
        input_ids, labels = rank_batch(rank)
        loss = sharded(input_ids=input_ids, labels=labels, fused_lm_head=True).loss
        loss.backward()
        want = plain(input_ids=input_ids, labels=labels, fused_lm_head=True).loss
        want.backward()
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
        got_grads = dict(sharded.named_parameters())
        want_grads = dict(plain.named_parameters())
        for name in CHECKED:
            expected = want_grads[name].grad.clone()
            dist.all_reduce(expected)
            expected /= WORLD  # FSDP2 averages gradients over the data-parallel processes
            torch.testing.assert_close(got_grads[name].grad.full_tensor(), expected, rtol=1e-5, atol=1e-7,
                                       msg=lambda m, name=name: f"rank {rank} grad {name}: {m}")
        report_every_check_passed(rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("head_group", HEAD_GROUPS)
def test_fused_head_under_fsdp2_matches_the_unsharded_model(head_group):
    run_in_processes("tests.test_drop_in_fsdp", head_group)


if __name__ == "__main__":
    _worker(sys.argv[1])
