"""pyprefopt.memory's release of a checkpoint's mapped pages: the pages a loaded model's views of its checkpoint
file hold resident are unmapped and read back right; a map with a written page is left alone; the train CLI's
loader leaves none of its checkpoint resident, with --load-in-4bit on a bf16 Gemma-3n checkpoint (whose embeddings
stay views of the file while its layers are quantised from it) among them."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
import torch
import transformers

from pyprefopt import model_loading, train
from pyprefopt.memory import release_mapped_file_pages, smaps_mappings
from tests.cli_fixtures import data_dir, one_thread_and_private_cache  # noqa: F401
from tests.tiny_models import gemma3n_config, qwen_config, save_tiny_model

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")


def resident_kib(path) -> list[tuple[int, int]]:
    """(resident KiB, of which written copies) of each of this process's maps of the file `path`."""
    real = os.path.realpath(path)
    return [(fields["Rss"], fields["Anonymous"])
            for _, _, mapped, fields in smaps_mappings(Path("/proc/self/smaps").read_text()) if mapped == real]


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A tiny Qwen3 saved in bf16, its 4 MiB embedding tied to the head."""
    config = transformers.Qwen3Config(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("bf16")
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(directory)
    return directory / "model.safetensors"


def test_the_pages_views_hold_are_released_and_read_back_right(bf16_checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(bf16_checkpoint.parent, dtype=torch.bfloat16)
    input_ids = torch.randint(0, 8192, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids).logits
    [(resident, written)] = resident_kib(bf16_checkpoint)  # the weights are views of the one map of the file
    assert resident >= 4096 and written == 0
    assert release_mapped_file_pages([bf16_checkpoint]) == 1024 * resident
    assert resident_kib(bf16_checkpoint) == [(0, 0)]
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, logits)


def test_a_map_with_a_written_page_is_left_alone(bf16_checkpoint):
    """Unmapping a private map's written page would revert it to the file's value."""
    model = transformers.AutoModelForCausalLM.from_pretrained(bf16_checkpoint.parent, dtype=torch.bfloat16)
    weight = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        weight[0, 0] = 7.0
    [(resident, written)] = resident_kib(bf16_checkpoint)
    assert written > 0
    assert release_mapped_file_pages([bf16_checkpoint]) == 0
    assert resident_kib(bf16_checkpoint) == [(resident, written)]
    assert weight[0, 0].item() == 7.0


def test_files_not_mapped_release_nothing(tmp_path, bf16_checkpoint):
    assert release_mapped_file_pages([tmp_path / "absent.safetensors", bf16_checkpoint]) == 0


# Tiny checkpoints whose layers --load-in-4bit quantises (2^16 weights and more), saved in bf16.
BF16_MODELS = {
    "qwen3": (qwen_config(transformers.Qwen3Config), []),
    "gemma3n-4bit": (partial(gemma3n_config, hidden_size=128, intermediate_size=512), ["--load-in-4bit"]),
}


@pytest.mark.parametrize("family", sorted(BF16_MODELS))
def test_the_cli_loader_leaves_no_checkpoint_page_resident(family, data_dir, tmp_path):  # noqa: F811
    """Loaded in bf16 from a bf16 checkpoint, the weights (Gemma-3n's embeddings, with --load-in-4bit) are views of
    its map, so it is still there once the model is loaded: with none of its pages resident."""
    make_config, extra = BF16_MODELS[family]
    model_dir = save_tiny_model(tmp_path / family, data_dir, make_config)
    transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(model_dir)
    args = train.parse_args(["--method", "sft", "--model", str(model_dir), "--dtype", "bf16", *extra])
    model, _, _ = model_loading.load_model(args, [], torch.device("cpu"))
    maps = resident_kib(model_dir / "model.safetensors")
    assert maps and all(resident == 0 for resident, _ in maps), maps
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
