"""README's "Reference recipes": every row's command, read from README.md, runs as written on a tiny random model of
the card's architecture (its hub id replaced by a local checkpoint), with the test data of the method's kind for
`<your data>`, two steps and (where the command names none) an output directory appended; its outputs have the
card's form. Also: the flags those commands need (--warmup-steps, --adapter) refuse bad input with one line.

Every command runs in the test's own working directory, so the relative output directories a row names (the SFT
run the DPO command starts from) land there.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen3Config

from pyprefopt import checkpoint, losses, train
from pyprefopt import data as D
from tests.cli_fixtures import assert_refused_before_writing, data_dir, one_thread_and_private_cache  # noqa: F401
from tests.tiny_models import gemma3n_config, qwen_config, save_as_multimodal_gemma3n, save_tiny_model

README = Path(__file__).resolve().parent.parent / "README.md"
PROGRAM = ["python", "-m", "pyprefopt.train"]
DATA = "<your data>"
OVERRIDES = ["--max-steps", "2"]


# The cards' hub models, each as a tiny model of its architecture. Gemma-3n's MLP is made big enough (2^16 weights)
# for --load-in-4bit to quantise it, so the QLoRA recipe's adapters sit on NF4 layers.
TINY_MODELS = {
    "Qwen/Qwen3-1.7B": qwen_config(Qwen3Config),
    "Qwen/Qwen2.5-1.5B-Instruct": qwen_config(Qwen2Config),
    "google/gemma-3n-E4B": partial(gemma3n_config, hidden_size=128, intermediate_size=512),
}

# What each card asks of each of its runs, checked in the run's arguments (run_args.json) and its adapter_config.json.
DEFAULT_LORA = {"lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.0, "target_modules": "all-linear"}
QWEN25_LORA = {"lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
CARDS = {
    "Qwen3-1.7B IPO": [{"method": "ipo", **DEFAULT_LORA}],
    "Qwen3-1.7B CPO": [{"method": "cpo", **DEFAULT_LORA}],
    "Qwen3-1.7B KTO (Arabic)": [{"method": "kto", **DEFAULT_LORA}],
    "Qwen2.5-1.5B-Instruct LoRA SFT, then DPO from its adapter": [
        {"method": "sft", **QWEN25_LORA, "recompute_mlp": True}, {"method": "dpo", **QWEN25_LORA}],
    "Gemma-3n-E4B QLoRA SFT, merged to 16-bit": [{
        "method": "sft", "load_in_4bit": True, "lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0,
        "target_modules": ["down_proj", "gate_proj", "up_proj"], "optim": "adamw_8bit", "lr": 2e-5,
        "weight_decay": 0.01, "warmup_steps": 10, "lr_scheduler": "linear", "seed": 3407, "batch_size": 2,
        "grad_accum": 4, "merge": True}],
}
LORA_FIELDS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
               "target_modules": "target_modules"}


def readme_recipes() -> dict[str, list[str]]:
    """{card: its commands} from README.md's "Reference recipes" table (a row's commands are joined by `&&`)."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^### Reference recipes\n(.*?)(?=^#)", text, re.S | re.M)
    assert section, "README lost its Reference recipes section"
    rows = [line for line in section.group(1).splitlines() if line.startswith("|")]
    assert rows[0] == "| card | command |", rows[0]
    recipes = {}
    for row in rows[2:]:
        card, cell = (c.strip() for c in row.strip().strip("|").split("|"))
        command = re.fullmatch(r"`([^`]+)`", cell)
        assert command, f"{card}: the command cell is not one code span: {cell}"
        recipes[card] = [c.strip() for c in command.group(1).split("&&")]
    return recipes


RECIPES = readme_recipes()


def command_arguments(command: str) -> list[str]:
    """A README command's arguments after `python -m pyprefopt.train`, with `<your data>` as DATA."""
    return shlex.split(command.replace(DATA, "DATA"))[len(PROGRAM):]


def test_the_table_has_one_row_per_card_and_every_command_names_a_hub_model_and_the_data_placeholder():
    assert list(RECIPES) == list(CARDS)
    for card, commands in RECIPES.items():
        assert len(commands) == len(CARDS[card]), card
        for command in commands:
            argv = shlex.split(command.replace(DATA, "DATA"))
            assert argv[:3] == PROGRAM and argv[argv.index("--model") + 1] in TINY_MODELS, command
            assert argv[argv.index("--data") + 1] == "DATA", command


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, data_dir):
    """{hub id: the directory of its tiny stand-in}."""
    root = tmp_path_factory.mktemp("models")
    return {hub_id: save_tiny_model(root / hub_id.replace("/", "--"), data_dir, make)
            for hub_id, make in TINY_MODELS.items()}


def run_command(command: str, tiny_models, data_dir, workdir: Path, index: int, capsys) -> tuple[Path, str]:
    """Run one README command in-process from `workdir`: the hub model and `<your data>` replaced, OVERRIDES and
    (unless the command names one) an --output-dir appended. (the run's output directory, its stderr)."""
    argv = command_arguments(command)
    method = argv[argv.index("--method") + 1]
    argv[argv.index("--data") + 1] = str(data_dir / losses.METHODS[method].data_format)
    model = argv.index("--model") + 1
    argv[model] = str(tiny_models[argv[model]])
    argv += OVERRIDES
    if "--output-dir" not in argv:
        argv += ["--output-dir", f"run-{index}"]
    capsys.readouterr()
    status = train.main(argv)
    err = capsys.readouterr().err
    assert status == 0, err
    return workdir / argv[argv.index("--output-dir") + 1], err


def check_card_form(out: Path, card: dict, base_dir: Path):
    """The run's arguments are the card's, and its adapter is the card's and loads in PEFT on the tiny base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_args = json.loads((out / checkpoint.RUN_ARGS_FILE).read_text(encoding="utf-8"))
    assert {k: run_args[k] for k in card if k != "target_modules"} == \
        {k: v for k, v in card.items() if k != "target_modules"}
    config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    targets = config["target_modules"]
    config["target_modules"] = sorted(targets) if isinstance(targets, list) else targets
    assert {name: config[field] for name, field in LORA_FIELDS.items()} == \
        {name: card[name] for name in LORA_FIELDS}
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    wrapped = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
                       if card["target_modules"] == "all-linear" else set(card["target_modules"]))
    return model


@pytest.mark.parametrize("card", [c for c in CARDS if c.startswith("Qwen3")])
def test_a_qwen3_card_trains_as_written(card, tiny_models, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (command,) = RECIPES[card]
    out, _ = run_command(command, tiny_models, data_dir, tmp_path, 0, capsys)
    check_card_form(out, CARDS[card][0], tiny_models["Qwen/Qwen3-1.7B"])


def sequence_logps(model, data_dir, tokenizer, method="dpo"):
    """Summed completion log-probs [N, 2] (chosen, rejected) of the held-out pairs, from the model's own logits."""
    _, rows, source = D.load_splits(str(data_dir / losses.METHODS[method].data_format), method, None, 0)
    data = D.tokenize(D.normalise_rows(rows, method, source), method, tokenizer, 512, source, None)
    columns = []
    for which in range(2):
        input_ids, labels, _ = train.collate_rows(data, list(range(len(data))), which, tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits.double()
        mask = labels != D.IGNORE_INDEX
        token_logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        columns.append((token_logps * mask).sum(-1))
    return torch.stack(columns, 1)


def test_the_qwen25_sft_then_dpo_card_continues_from_the_sft_adapter(tiny_models, data_dir, tmp_path, monkeypatch,
                                                                     capsys):
    """The DPO run starts from the SFT adapter, its reference the base with the adapter disabled (TRL's with a
    PEFT model): its held-out metrics at step 0 are those of PEFT's model of the SFT adapter, and its rewards are
    not the zeros a fresh adapter starts at."""
    from transformers import AutoTokenizer

    monkeypatch.chdir(tmp_path)
    card = "Qwen2.5-1.5B-Instruct LoRA SFT, then DPO from its adapter"
    base_dir = tiny_models["Qwen/Qwen2.5-1.5B-Instruct"]
    (sft_out, _), (dpo_out, _) = [run_command(command, tiny_models, data_dir, tmp_path, i, capsys)
                                  for i, command in enumerate(RECIPES[card])]
    sft_model = check_card_form(sft_out, CARDS[card][0], base_dir)
    check_card_form(dpo_out, CARDS[card][1], base_dir)
    assert json.loads((dpo_out / checkpoint.RUN_ARGS_FILE).read_text(encoding="utf-8"))["adapter"] == str(
        sft_out.relative_to(tmp_path))

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    sft_model.eval()
    policy = sequence_logps(sft_model, data_dir, tokenizer)
    with sft_model.disable_adapter():
        reference = sequence_logps(sft_model, data_dir, tokenizer)
    beta = json.loads((dpo_out / checkpoint.RUN_ARGS_FILE).read_text(encoding="utf-8"))["beta"]
    rewards = beta * (policy - reference).mean(0)
    step0 = json.loads((dpo_out / train.METRICS_FILE).read_text(encoding="utf-8").splitlines()[0])
    assert step0["step"] == 0
    got = torch.tensor([step0["eval_logps/chosen"], step0["eval_logps/rejected"], step0["eval_rewards/chosen"],
                        step0["eval_rewards/rejected"]], dtype=torch.float64)
    want = torch.cat([policy.mean(0), rewards])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert rewards.abs().min() > 1e-3


# Run in a fresh interpreter where neither peft nor bitsandbytes can be imported: a None in sys.modules makes `import`
# raise ImportError and importlib.util.find_spec (transformers' availability check) return None, as if neither were
# installed. Set before anything else is imported, and checked again at the end (nothing replaced them).
LOAD_MERGED_STANDALONE = """
import sys
sys.modules["peft"] = sys.modules["bitsandbytes"] = None
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

merged, inputs, outputs, part = sys.argv[1:]
if part == "whole":
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
else:  # a multimodal model's language model alone (its towers are not built)
    config = AutoConfig.from_pretrained(merged).get_text_config()
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(merged, config=config, dtype=torch.float32)
with torch.no_grad():
    logits = model(input_ids=load_file(inputs)["input_ids"]).logits
save_file({"logits": logits.contiguous()}, outputs)
print(type(model).__name__)
assert sys.modules["peft"] is None and sys.modules["bitsandbytes"] is None
"""


def test_the_gemma3n_qlora_card_trains_and_merges_into_a_standalone_16bit_model(tiny_models, data_dir, tmp_path,
                                                                                monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    card = "Gemma-3n-E4B QLoRA SFT, merged to 16-bit"
    base_dir = tiny_models["google/gemma-3n-E4B"]
    (command,) = RECIPES[card]
    out, err = run_command(command, tiny_models, data_dir, tmp_path, 0, capsys)
    model = check_card_form(out, CARDS[card][0], base_dir)
    # QLoRA: the MLP layers the adapter wraps were NF4 (only others are listed as left 16-bit).
    kept = next(line for line in err.splitlines() if line.startswith("--load-in-4bit: "))
    assert "mlp" not in kept, kept
    # --warmup-steps counts steps: the linear warmup's second step runs at 1/10 of --lr.
    records = [json.loads(line) for line in (out / train.METRICS_FILE).read_text(encoding="utf-8").splitlines()]
    assert [r["learning_rate"] for r in records if "loss" in r] == pytest.approx([0.0, 2e-6], rel=1e-12)

    check_merged_model(out / "merged", model, tmp_path, "whole")


def check_merged_model(merged: Path, model, tmp_path: Path, part: str):
    """`merged` is a standalone 16-bit model whose (`part`: "whole" or "language model") logits, in a process with
    neither PEFT nor bitsandbytes, are those of `model`, PEFT's model of the base and the adapter."""
    assert not (merged / "adapter_config.json").exists()
    assert "quantization_config" not in json.loads((merged / "config.json").read_text(encoding="utf-8"))
    for shard in merged.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys()), shard

    input_ids = torch.randint(2, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": input_ids}, tmp_path / "inputs.safetensors")
    result = subprocess.run([sys.executable, "-c", LOAD_MERGED_STANDALONE, str(merged),
                             str(tmp_path / "inputs.safetensors"), str(tmp_path / "logits.safetensors"), part],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["Gemma3nForCausalLM"]
    got = load_file(tmp_path / "logits.safetensors")["logits"]

    # base + adapter through PEFT on the 16-bit base (the merge's input): exactly, and with the merged weights rounded
    # to bf16 once, as the merge rounds them. Against the rounded one the only freedom is a weight whose fp32 sum
    # lies within fp32 rounding of a bf16 halfway point and rounds the other way (one bf16 ulp on isolated weights):
    # orders of magnitude below the 1e-2 that rounding every weight to bf16 moves these logits (checked), hence 1e-3.
    # With the card's learning rate (2e-5, warming up over 10 steps) two steps leave the adapter's update below bf16's
    # resolution; tests/test_merge.py checks the merge of adapters that move the rounded weights.
    model.eval()
    with torch.no_grad():
        exact = model(input_ids=input_ids).logits
        rounded_model = model.merge_and_unload()
        for param in rounded_model.parameters():
            param.copy_(param.to(torch.bfloat16))
        rounded = rounded_model(input_ids=input_ids).logits
    rounding = (rounded - exact).abs().max()
    assert rounding > 1e-2
    torch.testing.assert_close(got, rounded, rtol=0, atol=1e-3)
    assert (got - exact).abs().max() <= rounding + 1e-3


def test_the_gemma3n_card_on_a_multimodal_checkpoint_trains_the_language_model_and_merges_the_whole(
        tiny_models, data_dir, tmp_path, monkeypatch, capsys):
    """google/gemma-3n-E4B is multimodal: vision and audio towers beside the language model, all of which
    AutoModelForCausalLM would build (the vision tower with timm). The card's command trains the language model alone,
    saves the adapter under the names PEFT gives its tensors in the whole model, and merges it into the whole
    checkpoint: the towers kept, the language model that of PEFT's base + adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pyprefopt.safetensors_io import checkpoint_tensor_names

    monkeypatch.chdir(tmp_path)
    card = "Gemma-3n-E4B QLoRA SFT, merged to 16-bit"
    text_dir = tiny_models["google/gemma-3n-E4B"]
    base_dir = save_as_multimodal_gemma3n(text_dir, tmp_path / "gemma-3n-multimodal")
    (command,) = RECIPES[card]
    out, err = run_command(command, {"google/gemma-3n-E4B": base_dir}, data_dir, tmp_path, 0, capsys)
    assert "a multimodal checkpoint; its language model is trained alone (Gemma3nForCausalLM)" in err

    base_tensors = load_file(base_dir / "model.safetensors")
    adapter = load_file(out / "adapter_model.safetensors")
    modules = {key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for key in adapter}
    assert modules and all(m.startswith("model.language_model.") and f"{m}.weight" in base_tensors for m in modules)

    merged = out / "merged"
    assert json.loads((merged / "config.json").read_text(encoding="utf-8"))["model_type"] == "gemma3n"
    assert set(checkpoint_tensor_names(merged)) == set(base_tensors)
    merged_tensors = {name: t for shard in merged.glob("*.safetensors") for name, t in load_file(shard).items()}
    for name in ("model.vision_tower.timm_model.conv_stem.conv.weight",
                 "model.audio_tower.subsample_conv_projection.conv_0.conv.weight"):
        assert torch.equal(merged_tensors[name], base_tensors[name].bfloat16()), name

    # PEFT's model of base + adapter on the language model alone: the same weights, the adapter's keys named as
    # in the text checkpoint.
    text_adapter = tmp_path / "text-adapter"
    text_adapter.mkdir()
    (text_adapter / "adapter_config.json").write_bytes((out / "adapter_config.json").read_bytes())
    save_file({key.replace("model.language_model.", "model.", 1): t for key, t in adapter.items()},
              text_adapter / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32),
                                      text_adapter)
    check_merged_model(merged, model, tmp_path, "language model")


# ------------------------------------------------------------------------------------------ bad input


def _sft_run(tmp_path, data_dir):
    """A finished SFT LoRA run of the embedded default model (built for the SFT data's text), for --adapter."""
    out = tmp_path / "sft"
    assert train.main(["--method", "sft", "--data", str(data_dir / "sft"), "--output-dir", str(out), "--max-steps",
                       "1", "--lora-r", "4", "--target-modules", "q_proj,v_proj"]) == 0
    return out


def _adapter_of_no_named_base_for_gemma3n(tmp_path, data_dir):
    """The SFT run's adapter with no base named (as some PEFT adapters are), given to a Gemma-3n."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    sft = _sft_run(tmp_path, data_dir)
    config = json.loads((sft / "adapter_config.json").read_text(encoding="utf-8"))
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    (adapter / "adapter_model.safetensors").write_bytes((sft / "adapter_model.safetensors").read_bytes())
    return ["--adapter", str(adapter), "--model", str(save_tiny_model(tmp_path / "gemma3n", data_dir, gemma3n_config))]


BAD_INPUTS = [
    ("warmup steps and ratio", lambda tmp, d: ["--warmup-steps", "3", "--warmup-ratio", "0.1"],
     "--warmup-steps and --warmup-ratio both set the warmup"),
    ("negative warmup steps", lambda tmp, d: ["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    ("adapter with full", lambda tmp, d: ["--adapter", str(tmp), "--full"], "--adapter continues a LoRA adapter"),
    ("adapter directory missing", lambda tmp, d: ["--adapter", str(tmp / "none")], "no such directory"),
    ("adapter directory without an adapter", lambda tmp, d: ["--adapter", str(tmp)],
     "holds no LoRA adapter (no adapter_config.json and no adapter_model.safetensors)"),
    ("adapter rank given and different", lambda tmp, d: ["--adapter", str(_sft_run(tmp, d)), "--lora-r", "8"],
     "--lora-r 8 differs from the --adapter's 4"),
    # The embedded default is built for each data set's text: the DPO data's is another model than the SFT data's.
    ("adapter trained on another model", lambda tmp, d: ["--adapter", str(_sft_run(tmp, d))],
     "was trained on "),
    ("adapter whose layers do not fit the model", _adapter_of_no_named_base_for_gemma3n,
     "does not fit --model"),
]


@pytest.mark.parametrize(("setup", "expected"), [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_to_the_new_flags_is_one_error_line_and_nothing_written(setup, expected, data_dir, tmp_path, capsys):
    extra = setup(tmp_path, data_dir)
    argv = ["--method", "dpo", "--data", str(data_dir / "preference"), "--output-dir", str(tmp_path / "run"),
            "--max-steps", "1", *extra]
    assert_refused_before_writing(argv, tmp_path, capsys, expected)


def test_resume_compares_the_adapter_and_the_warmup(data_dir, tmp_path, capsys):
    """--resume continues the same run: the adapter it started from (and so the LoRA options it set) and the warmup
    are compared with the run's like every other option; the same command resumes."""
    sft = _sft_run(tmp_path, data_dir)
    common = ["--method", "dpo", "--data", str(data_dir / "preference"), "--output-dir", str(tmp_path / "run"),
              "--max-steps", "2", "--save-every", "1", "--model", str(json.loads(
                  (sft / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"])]
    argv = [*common, "--adapter", str(sft), "--warmup-steps", "1"]
    assert train.main(argv) == 0
    for changed, expected in ((common, f"--adapter was {str(sft)!r}, now None"),
                              ([*common, "--adapter", str(sft)], "--warmup-steps was 1, now None")):
        capsys.readouterr()
        assert train.main([*changed, "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert train.main([*argv, "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().err
