"""pyprefopt inside TRL's own trainers and transformers' Trainer: a few real training steps with and without
pyprefopt on tiny Qwen3, Qwen2 and Llama models (tied and untied heads; CPU, fp32) log the same losses and metrics,
GRPO's and RLOO's on the same sampled completions; under autocast the head projects in autocast's dtype, as TRL's
does."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
from trl import (
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    RLOOConfig,
    RLOOTrainer,
    SFTConfig,
    SFTTrainer,
)
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from pyprefopt import drop_in
from tests.tiny_trl_setup import (  # noqa: F401 (all but common_args, model, random_state, tiny_config: pytest fixtures)
    common_args,
    model,
    policy_state,
    preference_dataset,
    prompt_dataset,
    qwen3_config,
    random_state,
    ref_state,
    tiny_config,
    tokenizer,
    unpaired_dataset,
)

STEPS = 3
# Logged per step; timing entries differ from run to run by nature.
TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos")
# fp32 on both sides, the same batches and seeds; the head's sums run in a different order, and three
# AdamW steps carry those last-bit differences into the weights.
RTOL, ATOL = 1e-5, 1e-6


def train_logs(build):
    trainer = build()
    trainer.train()
    return [{k: v for k, v in entry.items() if k not in TIMING} for entry in trainer.state.log_history]


def assert_same_logs(ours, theirs):
    assert len(ours) == len(theirs) == STEPS + 1
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert a.keys() == b.keys(), (step, sorted(a.keys() ^ b.keys()))
        for key, value in b.items():
            assert math.isclose(a[key], value, rel_tol=RTOL, abs_tol=ATOL), f"step {step} {key}: {a[key]} vs {value}"
    assert any("loss" in entry for entry in theirs)


@pytest.fixture
def head_calls(monkeypatch):
    """Counts pyprefopt's head calls: a comparison that never reached our code would prove nothing."""
    calls = []
    real = drop_in.fused_linear_logprobs
    monkeypatch.setattr(drop_in, "fused_linear_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def with_and_without_pyprefopt(build, head_calls):
    theirs = train_logs(build)
    assert not head_calls
    undo = drop_in.patch_trl()
    try:
        ours = train_logs(build)
    finally:
        undo()
    assert len(head_calls) >= STEPS
    assert_same_logs(ours, theirs)
    return ours


def args(config_class, tmp_path, batch_size, **kwargs):
    return config_class(**common_args(tmp_path, batch_size), max_steps=STEPS, logging_steps=1,
                        save_strategy="no", **kwargs)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("reference", ["ref_model", "peft", "peft_precomputed"])
def test_dpo_trainer(tmp_path, head_calls, qwen3_config, policy_state, ref_state, tokenizer, preference_dataset,
                     loss_type, reference):
    def build():
        peft = reference.startswith("peft")
        return DPOTrainer(
            model=model(qwen3_config, policy_state),
            ref_model=None if peft else model(qwen3_config, ref_state),
            args=args(DPOConfig, tmp_path, 2, loss_type=loss_type, beta=0.1,
                      precompute_ref_log_probs=reference == "peft_precomputed"),
            train_dataset=preference_dataset,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                   init_lora_weights=False) if peft else None,
        )

    logs = with_and_without_pyprefopt(build, head_calls)
    assert "rewards/margins" in logs[0] and "entropy" in logs[0]


@pytest.mark.parametrize(("architecture", "loss_type"),
                         [("qwen3", "sigmoid"), ("qwen3", "ipo"), ("qwen3", "simpo"), ("gemma2", "sigmoid"),
                          ("granite", "sigmoid")])
def test_cpo_trainer(tmp_path, head_calls, tokenizer, preference_dataset, architecture, loss_type):
    """Also with Gemma 2's soft-capped head, whose mean logit (logged) is not linear in the hidden states, and
    Granite's scaled one, whose is."""
    config = tiny_config(architecture)
    state = random_state(config, 0)

    def build():
        return CPOTrainer(model=model(config, state),
                          args=args(CPOConfig, tmp_path, 2, loss_type=loss_type, max_length=64),
                          train_dataset=preference_dataset, processing_class=tokenizer)

    logs = with_and_without_pyprefopt(build, head_calls)
    assert "nll_loss" in logs[0] and "logits/chosen" in logs[0]


@pytest.mark.parametrize("architecture", ["qwen3", "gemma2"])
def test_orpo_trainer(tmp_path, head_calls, tokenizer, preference_dataset, architecture):
    """Also with Gemma 2's soft-capped head (its mean logit, logged, is not linear in the hidden states)."""
    config = tiny_config(architecture)
    state = random_state(config, 0)

    def build():
        return ORPOTrainer(model=model(config, state), args=args(ORPOConfig, tmp_path, 2, beta=0.2, max_length=64),
                           train_dataset=preference_dataset, processing_class=tokenizer)

    logs = with_and_without_pyprefopt(build, head_calls)
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen", "logits/chosen"} <= logs[0].keys()


def test_kto_trainer(tmp_path, head_calls, qwen3_config, policy_state, ref_state, tokenizer, unpaired_dataset):
    def build():
        return KTOTrainer(model=model(qwen3_config, policy_state), ref_model=model(qwen3_config, ref_state),
                          args=args(KTOConfig, tmp_path, 4, desirable_weight=1.0, undesirable_weight=1.5),
                          train_dataset=unpaired_dataset, processing_class=tokenizer)

    logs = with_and_without_pyprefopt(build, head_calls)
    assert "kl" in logs[0]


def test_sft_trainer(tmp_path, head_calls, qwen3_config, policy_state, tokenizer, preference_dataset):
    dataset = preference_dataset.rename_column("chosen", "completion").remove_columns("rejected")

    def build():
        return SFTTrainer(model=model(qwen3_config, policy_state), args=args(SFTConfig, tmp_path, 2),
                          train_dataset=dataset, processing_class=tokenizer)

    logs = with_and_without_pyprefopt(build, head_calls)
    assert "mean_token_accuracy" in logs[0]


def dpo_with_lora_subset(config, state, dataset, tokenizer, tmp_path):
    """DPOTrainer with LoRA on q_proj/v_proj (non-zero B, so the adapter matters from the first step) and the
    adapter-disabled reference."""
    return DPOTrainer(model=model(config, state), args=args(DPOConfig, tmp_path, 2, beta=0.1), train_dataset=dataset,
                      processing_class=tokenizer,
                      peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))


# Each architecture through the three trainers that use the fused head, with a different way of training each:
# DPO with a LoRA subset and the adapter-disabled reference, KTO fully fine-tuned against a reference model, SFT
# with LoRA on every linear layer. Rows are padded to the longest in each batch.
# Gemma 2's soft-capped head, Cohere's and Granite's scaled ones go through the same trainers.
ARCHITECTURE_CASES = [(arch, trainer) for arch in ("llama", "llama_tied", "qwen2", "gemma2")
                      for trainer in ("dpo", "kto", "sft")]
ARCHITECTURE_CASES += [("cohere", "dpo"), ("granite", "kto"), ("qwen3_moe", "dpo"), ("qwen3_moe", "sft")]


@pytest.mark.parametrize(("architecture", "trainer"), ARCHITECTURE_CASES,
                         ids=[f"{a}-{t}" for a, t in ARCHITECTURE_CASES])
def test_every_architecture_logs_the_same(architecture, trainer, tmp_path, head_calls, tokenizer, preference_dataset,
                                          unpaired_dataset):
    config = tiny_config(architecture)
    policy, reference = random_state(config, 0), random_state(config, 1)

    def build():
        if trainer == "dpo":
            return dpo_with_lora_subset(config, policy, preference_dataset, tokenizer, tmp_path)
        if trainer == "kto":
            return KTOTrainer(model=model(config, policy), ref_model=model(config, reference),
                              args=args(KTOConfig, tmp_path, 4), train_dataset=unpaired_dataset,
                              processing_class=tokenizer)
        dataset = preference_dataset.rename_column("chosen", "completion").remove_columns("rejected")
        return SFTTrainer(model=model(config, policy), args=args(SFTConfig, tmp_path, 2), train_dataset=dataset,
                          processing_class=tokenizer,
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))

    with_and_without_pyprefopt(build, head_calls)


# Rows of one length (4-word prompts, 3-word completions; the tokenizer has a token per word): batches with no
# padding at all, where the matrix above pads every batch.
EQUAL_LENGTH_ROWS = Dataset.from_dict({
    "prompt": ["what is the capital", "tell me a joke", "what color is the", "where did the dog"],
    "chosen": [" paris is big", " the cat sat", " sky is blue", " ran in park"],
    "rejected": [" london is big", " i do not", " grass is green", " did not run"],
})


@pytest.mark.parametrize("trainer", ["dpo", "sft"])
def test_unpadded_batches_log_the_same(trainer, tmp_path, head_calls, tokenizer):
    config = tiny_config("qwen3")
    policy = random_state(config, 0)
    lengths = {len(tokenizer(text)["input_ids"]) for column in ("chosen", "rejected")
               for text in EQUAL_LENGTH_ROWS[column]}
    assert len(lengths) == 1

    def build():
        if trainer == "dpo":
            return dpo_with_lora_subset(config, policy, EQUAL_LENGTH_ROWS, tokenizer, tmp_path)
        dataset = EQUAL_LENGTH_ROWS.rename_column("chosen", "completion").remove_columns("rejected")
        return SFTTrainer(model=model(config, policy), args=args(SFTConfig, tmp_path, 2), train_dataset=dataset,
                          processing_class=tokenizer)

    with_and_without_pyprefopt(build, head_calls)


def mean_token_reward(sampled, vocab_size):
    """A reward function (a completion's mean token id over the vocabulary size: rewards in [0, 1) that seldom
    tie, so every group has advantages) that records the completions it scores in `sampled`: the runs with and
    without pyprefopt must train on the same samples. (RLOO does not scale its advantages: rewards of order 1
    keep its loss, a sum of advantages times ratios that nearly cancels, from rounding to more than the
    tolerance.)"""

    def mean_token(completion_ids, **kwargs):
        sampled.append([list(ids) for ids in completion_ids])
        return [sum(ids) / (len(ids) * vocab_size) for ids in completion_ids]

    return mean_token


# GRPO's default loss (dapo) and two others, its entropy bonus (static, on the high-entropy tokens only, adaptive,
# and through a frozen head under LoRA), and RLOO; each on the plain and the soft-capped (Gemma 2) head, all with
# a KL term to a reference (the saved model, or the adapter disabled).
RL_CASES = {
    "grpo-qwen3": ("grpo", "qwen3", {}),
    "grpo-gemma2": ("grpo", "gemma2", {}),
    "grpo-loss_grpo-qwen3": ("grpo", "qwen3", {"loss_type": "grpo"}),
    "grpo-loss_bnpo-entropy_coef-gemma2": ("grpo", "gemma2", {"loss_type": "bnpo", "entropy_coef": 0.05}),
    "grpo-entropy_coef-top_entropy-qwen3": ("grpo", "qwen3", {"entropy_coef": 0.05, "top_entropy_quantile": 0.5}),
    # The entropy (about 5.2 nats) is under the target: the adaptive coefficient applies from the second step on.
    "grpo-adaptive_entropy-qwen3": ("grpo", "qwen3", {"use_adaptive_entropy": True, "entropy_coef": 0.05,
                                                      "entropy_target": 6.0}),
    "grpo-lora-entropy_coef-gemma2": ("grpo", "gemma2", {"entropy_coef": 0.05, "lora": True}),
    "rloo-qwen3": ("rloo", "qwen3", {}),
    "rloo-gemma2": ("rloo", "gemma2", {}),
}


@pytest.mark.parametrize(("trainer", "architecture", "options"), RL_CASES.values(), ids=RL_CASES.keys())
def test_rl_trainers_log_the_same(trainer, architecture, options, tmp_path, head_calls, tokenizer, prompt_dataset):
    """GRPO and RLOO sample completions (the model's own forward, untouched by the patch) at a temperature of 0.7,
    score them with the fused head at that temperature, log-probs and entropy, and reuse each batch for two steps
    (num_iterations=2: importance ratios and their clipping). The sampled completions are recorded and must be the
    same in both runs; a bias towards EOS makes their lengths vary."""
    options = dict(options)
    lora = options.pop("lora", False)
    config = tiny_config(architecture)
    path = str(tmp_path / "policy")
    model(config, random_state(config, 0)).save_pretrained(path)
    trainer_class, config_class = {"grpo": (GRPOTrainer, GRPOConfig), "rloo": (RLOOTrainer, RLOOConfig)}[trainer]
    runs = []

    def build():
        runs.append([])
        # A learning rate large enough that the policy moves from its reference and its old self within 3 steps.
        return trainer_class(
            model=path, reward_funcs=mean_token_reward(runs[-1], config.vocab_size), train_dataset=prompt_dataset,
            processing_class=tokenizer,
            args=args(config_class, tmp_path, 4, num_generations=4, max_completion_length=8, temperature=0.7,
                      beta=0.05, num_iterations=2, learning_rate=1e-3,
                      generation_kwargs={"sequence_bias": [[[tokenizer.eos_token_id], 3.0]]}, **options),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                   init_lora_weights=False) if lora else None,
        )

    logs = with_and_without_pyprefopt(build, head_calls)
    theirs, ours = runs
    assert ours == theirs
    assert len({len(ids) for batch in theirs for ids in batch}) > 1
    assert logs[0]["grad_norm"] > 0 and logs[0]["entropy"] > 0
    if "entropy_coef" in options:
        assert "policy_loss" in logs[0]


def test_under_autocast_the_head_projects_in_autocast_dtype_exactly(qwen3_config, policy_state, monkeypatch):
    """TRL's configs turn bf16 autocast on by default. Under it TRL's head, like the model's own lm_head, projects
    bf16 operands and rounds the logits to bf16; ours projects the same bf16 operands (not the fp32 head: that
    made the two trainers disagree) and keeps the logits in fp32, so it is exact for those operands and no further
    from the fp32 model's log-probs than TRL's."""
    from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head

    operand_dtypes = []
    real = drop_in.fused_linear_logprobs
    monkeypatch.setattr(drop_in, "fused_linear_logprobs",
                        lambda h, w, *a, **k: operand_dtypes.append((h.dtype, w.dtype)) or real(h, w, *a, **k))
    ours, theirs = model(qwen3_config, policy_state), model(qwen3_config, policy_state)
    drop_in.add_fused_lm_head(ours)
    trl_add_fused_lm_head(theirs)
    input_ids = torch.randint(0, qwen3_config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = input_ids.masked_fill(torch.arange(16) < 5, -100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = ours(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs.double()
        b = theirs(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs.double()
        hidden = ours.model(input_ids=input_ids).last_hidden_state[:, :-1].double()
    assert operand_dtypes == [(torch.bfloat16, torch.bfloat16)]
    weight, targets, scored = ours.lm_head.weight.double(), labels[:, 1:].clamp(min=0)[..., None], labels[:, 1:] != -100

    def truth(h, w):
        return torch.log_softmax(h @ w.T, -1).gather(-1, targets)[..., 0] * scored

    bf16_operands = truth(hidden.bfloat16().double(), weight.bfloat16().double())
    assert (a - bf16_operands).abs().max() < 1e-5
    assert (b - bf16_operands).abs().max() > 1e-4, "TRL's head no longer rounds: tighten this test"
    fp32_model = truth(hidden, weight)
    assert (a - fp32_model).abs().max() <= (b - fp32_model).abs().max()


def test_hf_trainer_sft(tmp_path, head_calls, qwen3_config, policy_state, tokenizer, preference_dataset):
    texts = [p + c for p, c in zip(preference_dataset["prompt"], preference_dataset["chosen"])]
    dataset = Dataset.from_dict(dict(tokenizer(texts)))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def build(trainer_class):
        training_args = TrainingArguments(**common_args(tmp_path, 2), max_steps=STEPS, logging_steps=1,
                                          gradient_accumulation_steps=2, save_strategy="no")
        return trainer_class(model=model(qwen3_config, policy_state), args=training_args, train_dataset=dataset,
                             data_collator=collator)

    theirs = train_logs(lambda: build(Trainer))
    assert not head_calls
    assert_same_logs(train_logs(lambda: build(drop_in.FusedLMHeadTrainer)), theirs)
    assert len(head_calls) >= 2 * STEPS


def test_unsupported_models_are_refused(qwen3_config, policy_state):
    encoder_decoder = model(qwen3_config, policy_state)
    encoder_decoder.config = copy.deepcopy(qwen3_config)  # the fixture's config is shared
    encoder_decoder.config.is_encoder_decoder = True
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        drop_in.add_fused_lm_head(encoder_decoder)
    with pytest.raises(ValueError, match="outputs must be among"):
        drop_in.add_fused_lm_head(model(qwen3_config, policy_state), outputs=("log_probs", "perplexity"))


@pytest.mark.parametrize("architecture", ["gemma2", "cohere", "granite", "qwen3_moe", "qwen3"])
def test_head_applies_the_models_own_logit_transform(architecture):
    """The fused head's loss, log-probs and gradients are the model's own (its forward's logits, soft-capped or
    scaled as its config says, through transformers' cross-entropy, plus an MoE model's router load-balancing loss)
    and TRL's head's."""
    from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head

    config = tiny_config(architecture)
    state = random_state(config, 0)
    ours, theirs, plain = model(config, state), model(config, state), model(config, state)
    drop_in.add_fused_lm_head(ours)
    trl_add_fused_lm_head(theirs)
    input_ids = torch.randint(0, config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    labels = input_ids.masked_fill(torch.arange(11) < 4, -100)
    a = ours(input_ids=input_ids, labels=labels, fused_lm_head=True)
    b = theirs(input_ids=input_ids, labels=labels, fused_lm_head=True)
    own = plain(input_ids=input_ids, labels=labels)
    own_logps = torch.log_softmax(own.logits[:, :-1].double(), -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])
    own_logps = own_logps[..., 0] * (labels[:, 1:] != -100)
    torch.testing.assert_close(a.log_probs.double(), own_logps, rtol=0, atol=2e-6)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.loss, own.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
    assert (a.aux_loss is None) == (b.aux_loss is None) == (architecture != "qwen3_moe")
    if a.aux_loss is not None:
        torch.testing.assert_close(a.aux_loss, own.aux_loss, rtol=1e-6, atol=1e-7)
    params = [dict(m.named_parameters()) for m in (ours, plain)]
    names = ["lm_head.weight" if "lm_head.weight" in params[0] else "model.embed_tokens.weight",
             "model.layers.1.self_attn.o_proj.weight"]
    got = torch.autograd.grad(a.loss, [params[0][n] for n in names])
    want = torch.autograd.grad(own.loss, [params[1][n] for n in names])
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=lambda m: f"grad {name}: {m}")


def test_head_outputs_match_trl_head(qwen3_config, policy_state):
    """The head alone, every output, against TRL's own `add_fused_lm_head`."""
    from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head

    outputs = drop_in.HEAD_OUTPUTS
    ours, theirs = model(qwen3_config, policy_state), model(qwen3_config, policy_state)
    drop_in.add_fused_lm_head(ours, temperature=0.9, outputs=outputs)
    trl_add_fused_lm_head(theirs, temperature=0.9, outputs=outputs)
    input_ids = torch.randint(0, qwen3_config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[0, :4] = -100
    a = ours(input_ids=input_ids, labels=labels, fused_lm_head=True)
    b = theirs(input_ids=input_ids, labels=labels, fused_lm_head=True)
    for name in ("loss", *outputs, "label_mask"):
        x, y = getattr(a, name), getattr(b, name)
        if x.dtype == torch.bool:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # Without fused_lm_head the forward is the model's own.
    assert ours(input_ids=input_ids).logits.shape == (3, 9, qwen3_config.vocab_size)


@pytest.mark.parametrize("architecture", ["qwen3", "gemma2"])
def test_entropy_gradient_matches_trl_head(architecture):
    """GRPO's entropy bonus differentiates the head's entropy: at GRPO's sampling temperature, through Gemma 2's
    soft-cap, its gradient reaches the head and the layers below as through TRL's own head."""
    from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head

    config = tiny_config(architecture)
    state = random_state(config, 0)
    ours, theirs = model(config, state), model(config, state)
    drop_in.add_fused_lm_head(ours, temperature=0.7, outputs=("log_probs", "entropy"))
    trl_add_fused_lm_head(theirs, temperature=0.7, outputs=("log_probs", "entropy"))
    input_ids = torch.randint(0, config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    labels = input_ids.masked_fill(torch.arange(11) < 4, -100)
    upstream = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    names = ["lm_head.weight", "model.layers.1.self_attn.o_proj.weight"]
    grads = []
    for head in (ours, theirs):
        out = head(input_ids=input_ids, labels=labels, fused_lm_head=True)
        params = dict(head.named_parameters())
        grads.append(torch.autograd.grad((out.entropy * upstream).sum(), [params[n] for n in names]))
    for name, g, w in zip(names, *grads):
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=lambda m: f"grad {name}: {m}")
