"""A tiny Qwen3, a WordLevel tokenizer and in-memory TRL datasets, shared by the tests that run TRL's
trainers (tests/test_trl_oracle.py, tests/test_drop_in.py). Nothing downloads anything."""

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    GraniteConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

SENTENCES = [
    "what is the capital of france",
    "paris is the capital",
    "london is big",
    "tell me a joke",
    "why did the chicken cross the road ? to get to the other side",
    "i do not know why",
    "what color is the sky",
    "blue",
    "grass is green",
    "the cat sat on the mat",
    "a dog ran in the park",
    "where did the dog run",
]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer():
    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    # Sanity: the EOS string the trainers append is one special token, and nothing maps to <unk>.
    ids = tok("why did the chicken cross the road<eos>")["input_ids"]
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    return tok


# Architectures of the same tiny size; each has its own attention, norm and embedding quirks, three their own
# transform of the head's output: Gemma 2 soft-caps it (a cap of 5 over logits reaching about 4 bends every one),
# Cohere multiplies it by `logit_scale`, Granite divides it by `logits_scaling`; and a Qwen3 mixture of experts.
CONFIG_CLASSES = {"qwen3": Qwen3Config, "qwen2": Qwen2Config, "llama": LlamaConfig, "llama_tied": LlamaConfig,
                  "gemma2": Gemma2Config, "cohere": CohereConfig, "granite": GraniteConfig, "qwen3_moe": Qwen3MoeConfig}
HEAD_TRANSFORMS = {"gemma2": {"final_logit_softcapping": 5.0}, "cohere": {"logit_scale": 0.25},
                   "granite": {"logits_scaling": 4.0},
                   # Every layer a mixture of 4 experts, 2 per token, with the router's load-balancing loss.
                   "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                 "decoder_sparse_step": 1, "output_router_logits": True, "router_aux_loss_coef": 0.1}}


def tiny_config(architecture: str):
    return CONFIG_CLASSES[architecture](
        vocab_size=320,  # > the tokenizer's ~50 words: the unused rows still enter every softmax
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=64,
        # Untied (but for llama_tied) so lm_head.weight's gradient is the head's alone.
        tie_word_embeddings=architecture.endswith("_tied") or architecture == "cohere",
        initializer_range=0.2,  # peakier than the default 0.02, so rewards are not all ~0
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        dtype="float32",
        **HEAD_TRANSFORMS.get(architecture, {}),
    )


def random_state(config, seed):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float().state_dict()


@pytest.fixture(scope="module")
def qwen3_config():
    return tiny_config("qwen3")


@pytest.fixture(scope="module")
def policy_state(qwen3_config):
    return random_state(qwen3_config, 0)


@pytest.fixture(scope="module")
def ref_state(qwen3_config):
    return random_state(qwen3_config, 1)


def model(config, state):
    """A fresh model per trainer: the trainers patch `forward` (fused LM head) and tag the model."""
    model = AutoModelForCausalLM.from_config(config).float()
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def preference_dataset():
    return Dataset.from_dict(
        {
            "prompt": [
                "what is the capital of france",
                "tell me a joke",
                "what color is the sky",
                "why did the chicken cross the road",
            ],
            "chosen": [
                " paris is the capital",
                " why did the chicken cross the road ? to get to the other side",
                " blue",
                " to get to the other side",
            ],
            "rejected": [" london is big", " i do not know", " grass is green", " i do not know why"],
        }
    )


@pytest.fixture(scope="module")
def unpaired_dataset():
    # 5 desirable, 3 undesirable rows: one batch of 8 (KTO rotates completions within a batch for its KL term).
    return Dataset.from_dict(
        {
            "prompt": [
                "what is the capital of france",
                "tell me a joke",
                "what color is the sky",
                "why did the chicken cross the road",
                "where did the dog run",
                "what is the capital of france",
                "what color is the sky",
                "tell me a joke",
            ],
            "completion": [
                " paris is the capital",
                " why did the chicken cross the road ? to get to the other side",
                " blue",
                " to get to the other side",
                " the dog ran in the park",
                " london is big",
                " grass is green",
                " i do not know",
            ],
            "label": [True, True, True, True, True, False, False, False],
        }
    )


@pytest.fixture(scope="module")
def prompt_dataset():
    """Prompts for the trainers that generate their completions (GRPO, RLOO)."""
    return Dataset.from_dict({"prompt": ["what is the capital of", "tell me a", "what color is the",
                                         "where did the dog"]})


def common_args(tmp_path, batch_size):
    return dict(
        output_dir=str(tmp_path),
        report_to="none",
        per_device_train_batch_size=batch_size,
        bf16=False,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )


# The weights whose gradients the two-process drop-in tests compare: the head and a decoder layer's.
CHECKED = ("lm_head.weight", "model.layers.1.mlp.down_proj.weight")


def rank_batch(rank):
    """Process `rank`'s own batch: 3 rows of 10 tokens, the first 3 of each a prompt (label -100)."""
    g = torch.Generator().manual_seed(rank)
    input_ids = torch.randint(2, 300, (3, 10), generator=g)
    return input_ids, input_ids.masked_fill(torch.arange(10) < 3, -100)
