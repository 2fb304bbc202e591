"""`python -m pyprefopt.merge` end to end on tiny models made here: a 16-bit and a bitsandbytes NF4 base
(quantised by transformers on CPU), a PEFT LoRA adapter with random factors, PEFT's own merge as the
oracle; plus atomicity, bad inputs and the streaming merge's peak memory."""

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from pyprefopt import merge
from pyprefopt.safetensors_io import StreamingWriter, read_header

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]
ROOT = Path(__file__).resolve().parent.parent


def tiny_config():
    # in/out features that are not multiples of the NF4 block (64) nor of 16 where the model allows.
    return Qwen3Config(vocab_size=203, hidden_size=80, intermediate_size=136, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=20, tie_word_embeddings=False)


def save_tokenizer(path):
    vocab = {f"t{i}": i for i in range(200)} | {"<unk>": 200}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    base16 = root / "base16"
    Qwen3ForCausalLM(tiny_config()).to(torch.bfloat16).save_pretrained(base16)
    save_tokenizer(base16)
    paths = {"base16": base16}
    for double_quant in (True, False):
        quantised = AutoModelForCausalLM.from_pretrained(
            base16, device_map="cpu",
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=double_quant,
                                                   bnb_4bit_compute_dtype=torch.float32))
        name = f"base4_{'nested' if double_quant else 'plain'}"
        quantised.save_pretrained(root / name)
        save_tokenizer(root / name)
        paths[name] = root / name
        paths[f"{name}_fp32"] = dequantised_state(quantised)
    for name, kwargs in {
        "adapter": dict(target_modules=TARGETS),
        "adapter_rslora_patterns": dict(target_modules=TARGETS, use_rslora=True, rank_pattern={"v_proj": 4},
                                        alpha_pattern={"down_proj": 5}),
        "adapter_lm_head_saved": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    }.items():
        torch.manual_seed(1)
        model = get_peft_model(Qwen3ForCausalLM(tiny_config()),
                               LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, **kwargs))
        if "modules_to_save" in kwargs:
            with torch.no_grad():
                for p in model.base_model.model.lm_head.modules_to_save.parameters():
                    p.normal_()
        model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def dequantised_state(quantised):
    """The NF4 model's state dict with every 4-bit weight decoded by bitsandbytes in fp32.

    Decoded as one flat row: bitsandbytes 0.50's native CPU dequantize of a 2-D [m, n] weight restarts
    blocks at every row, which is wrong when n is not a multiple of the blocksize (quantisation runs
    blocks over the flat weight): a 40x80 N(0, 1) weight comes back with errors of 2.0 (0.4 flat)."""
    state = {}
    for name, module in quantised.named_modules():
        weight = getattr(module, "weight", None)
        if weight is not None and hasattr(weight, "quant_state"):
            quant_state = copy.copy(weight.quant_state)
            quant_state.dtype = torch.float32
            quant_state.shape = torch.Size([weight.quant_state.shape.numel()])
            decoded = bnbf.dequantize_4bit(weight.data, quant_state)
            state[f"{name}.weight"] = decoded.view(weight.quant_state.shape)
    for name, tensor in quantised.state_dict().items():
        if name.endswith(".weight") and name not in state and tensor.is_floating_point():
            state[name] = tensor.float()
    return state


def peft_merged_logits(base_state, adapter_dir, input_ids):
    model = Qwen3ForCausalLM(tiny_config()).float()
    missing, unexpected = model.load_state_dict(base_state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    with torch.no_grad():
        return merged(input_ids).logits


def our_logits(out_dir, input_ids):
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    assert not hasattr(model.config, "quantization_config")
    with torch.no_grad():
        return model(input_ids).logits


def run_cli(*args, timeout=None):
    return subprocess.run([sys.executable, "-m", "pyprefopt.merge", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


INPUT_IDS = torch.tensor([[5, 17, 99, 3, 150, 42, 7, 201], [0, 1, 2, 3, 4, 5, 6, 7]])


@pytest.mark.parametrize("base", ["base4_nested", "base4_plain", "base16"])
@pytest.mark.parametrize("adapter", ["adapter", "adapter_rslora_patterns", "adapter_lm_head_saved"])
def test_merge_matches_peft_merge_and_unload(checkpoints, tmp_path, base, adapter):
    out = tmp_path / "merged"
    merge.merge_adapter(checkpoints[base], checkpoints[adapter], out, dtype=torch.float32, progress=False)
    if base == "base16":
        base_model = AutoModelForCausalLM.from_pretrained(checkpoints[base])
        base_state = {k: v.float() for k, v in base_model.state_dict().items()}
    else:
        base_state = checkpoints[f"{base}_fp32"]
    expected = peft_merged_logits(base_state, checkpoints[adapter], INPUT_IDS)
    torch.testing.assert_close(our_logits(out, INPUT_IDS), expected, rtol=1e-5, atol=1e-5)
    # Tokenizer and generation config come along; the config loses its quantisation.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (checkpoints[base] / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_16bit_output_is_the_fp32_merge_rounded_once(checkpoints, tmp_path, dtype, name):
    exact, rounded = tmp_path / "fp32", tmp_path / name
    assert run_cli("--base", checkpoints["base4_nested"], "--adapter", checkpoints["adapter"], "--out", exact,
                   "--dtype", "fp32").returncode == 0
    result = run_cli("--base", checkpoints["base4_nested"], "--adapter", checkpoints["adapter"], "--out", rounded,
                     "--dtype", name)
    assert result.returncode == 0, result.stderr
    with safe_open(exact / "model.safetensors", "pt") as f32, safe_open(rounded / "model.safetensors", "pt") as f16:
        assert set(f32.keys()) == set(f16.keys())
        for key in f32.keys():
            want, got = f32.get_tensor(key), f16.get_tensor(key)
            assert got.dtype == dtype
            # Within one ulp of the output dtype (nearest rounding of the same fp32 value is exact; the
            # ulp allows a last-bit difference between two fp32 summation orders).
            ulp = torch.finfo(dtype).eps * want.abs().clamp(min=torch.finfo(dtype).tiny)
            assert ((got.float() - want).abs() <= ulp).all(), key


def test_sharded_base_and_output(checkpoints, tmp_path):
    base = tmp_path / "base_sharded"
    AutoModelForCausalLM.from_pretrained(checkpoints["base16"]).save_pretrained(base, max_shard_size="40KB")
    assert (base / "model.safetensors.index.json").exists()
    out = tmp_path / "merged"
    result = run_cli("--base", base, "--adapter", checkpoints["adapter"], "--out", out, "--dtype", "fp32",
                     "--max-shard-size", "100KiB")
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert index["metadata"]["total_size"] == sum(
        math.prod(e.shape) * e.dtype.itemsize for s in shards for e in read_header(out / s)[0].values())
    single = tmp_path / "single"
    merge.merge_adapter(checkpoints["base16"], checkpoints["adapter"], single, dtype=torch.float32, progress=False)
    torch.testing.assert_close(our_logits(out, INPUT_IDS), our_logits(single, INPUT_IDS), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# Atomicity and bad inputs


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_failure_mid_write_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    real, calls = merge._produce, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(merge, "_produce", failing)
    out = tmp_path / "merged"
    with pytest.raises(OSError, match="disk full"):
        merge.merge_adapter(checkpoints["base4_nested"], checkpoints["adapter"], out, progress=False)
    assert not out.exists() and leftovers(tmp_path) == []
    # An existing OUT survives a failed --overwrite untouched.
    out.mkdir()
    (out / "keep.txt").write_text("old model")
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        merge.merge_adapter(checkpoints["base4_nested"], checkpoints["adapter"], out, overwrite=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(tmp_path) == []


def test_overwrite_replaces_existing_output(checkpoints, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    result = run_cli("--base", checkpoints["base16"], "--adapter", checkpoints["adapter"], "--out", out)
    assert result.returncode == 2 and "exists; pass --overwrite" in result.stderr
    result = run_cli("--base", checkpoints["base16"], "--adapter", checkpoints["adapter"], "--out", out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == []


def copy_dir(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def rewrite_adapter(src, dst, edit):
    """A copy of the adapter at `src` whose tensors pass through `edit(dict) -> dict`."""
    copy_dir(src, dst)
    with safe_open(src / "adapter_model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(edit(tensors), dst / "adapter_model.safetensors")
    return dst


def bad_inputs(checkpoints, tmp_path):
    """(name, base, adapter, expected error fragment) for each kind of bad input."""
    adapter = checkpoints["adapter"]
    cases = []
    other = tmp_path / "other_arch"
    rewrite_adapter(adapter, other, lambda t: {k.replace("self_attn.q_proj", "attention.wq"): v for k, v in t.items()})
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(
        json.dumps({**config, "target_modules": ["wq", "v_proj", "gate_proj", "down_proj"]}))
    cases.append(("other-architecture", checkpoints["base16"], other, "does not have"))
    torch.manual_seed(2)
    wide = get_peft_model(Qwen3ForCausalLM(Qwen3Config(**{**tiny_config().to_dict(), "hidden_size": 96})),
                          LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    wide.save_pretrained(tmp_path / "wide")
    cases.append(("shape-mismatch", checkpoints["base4_nested"], tmp_path / "wide", "do not fit the base weight"))
    missing = rewrite_adapter(adapter, tmp_path / "missing_B",
                              lambda t: {k: v for k, v in t.items() if "layers.1.mlp.down_proj.lora_B" not in k})
    cases.append(("missing-key", checkpoints["base16"], missing, "has lora_A but not the other"))
    nan = rewrite_adapter(adapter, tmp_path / "nan",
                          lambda t: {k: v.fill_(float("nan")) if "layers.0.self_attn.v_proj.lora_A" in k else v
                                     for k, v in t.items()})
    cases.append(("nan-adapter", checkpoints["base16"], nan, "NaN or inf"))
    bad_json = copy_dir(adapter, tmp_path / "bad_json")
    (bad_json / "adapter_config.json").write_text('{"r": 8, "lora_alpha": ')
    cases.append(("corrupt-json", checkpoints["base16"], bad_json, "not valid JSON"))
    truncated = copy_dir(checkpoints["base4_nested"], tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    cases.append(("truncated-safetensors", truncated, adapter, "past the end of the file"))
    garbage = copy_dir(checkpoints["base16"], tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    cases.append(("garbage-safetensors", garbage, adapter, "not valid JSON"))
    fp4 = copy_dir(checkpoints["base4_nested"], tmp_path / "fp4")
    config = json.loads((fp4 / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    (fp4 / "config.json").write_text(json.dumps(config))
    cases.append(("fp4-base", fp4, adapter, "unsupported 4-bit quant type 'fp4'"))
    dora = copy_dir(adapter, tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    cases.append(("dora", checkpoints["base16"], dora, "DoRA"))
    rank = copy_dir(adapter, tmp_path / "rank")
    (rank / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    cases.append(("rank-disagrees-with-config", checkpoints["base16"], rank, "config says r=4"))
    cases.append(("not-a-directory", tmp_path / "nowhere", adapter, "is not a directory"))
    return cases


def test_bad_inputs_get_a_clear_error_and_write_nothing(checkpoints, tmp_path):
    cases = bad_inputs(checkpoints, tmp_path)
    for name, base, adapter, fragment in cases:
        out = tmp_path / f"out_{name}"
        result = run_cli("--base", base, "--adapter", adapter, "--out", out)
        assert result.returncode == 2, (name, result.stderr)
        assert result.stderr.startswith("error: ") and fragment in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr, name
        assert not out.exists(), name
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------------
# Untrusted inputs: the adapter's regexes, symlinks, permissions and leftovers of a killed merge

PEFT_STYLE_CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["self_attn.q_proj", "mlp.down_proj", "lm_head", "layers.1.mlp.up_proj"]),
    dict(target_modules="q_proj"),
    dict(target_modules=r".*\.q_proj"),
    dict(target_modules=r"model\.layers\.\d+\.self_attn\.(q|v)_proj"),
    dict(target_modules=r".*\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"),
    dict(target_modules=r".*layers\.1\..*"),
    dict(target_modules=TARGETS,
         rank_pattern={"v_proj": 4, r"layers\.1\.mlp\..*": 2, "^model.layers.0.self_attn.q_proj": 3},
         alpha_pattern={r"self_attn\.(q|k)_proj": 7, "mlp.down_proj": 9, "gate_proj|up_proj": 5}),
    # The first matching key wins, even where a later one is more specific.
    dict(target_modules=TARGETS, rank_pattern={"gate_proj": 6, "model.layers.0.mlp.gate_proj": 2},
         alpha_pattern={r".*": 3, "q_proj": 11}),
]


@pytest.mark.parametrize("fields", PEFT_STYLE_CONFIGS, ids=lambda fields: json.dumps(fields))
def test_module_settings_match_peft(fields):
    names = [name for name, _ in Qwen3ForCausalLM(tiny_config()).named_modules() if name]
    peft_config = LoraConfig(r=8, lora_alpha=16, **fields)
    settings = merge.module_settings({"r": 8, "lora_alpha": 16, **fields}, names, Path("adapter_config.json"))
    for name in names:
        assert settings[name].targeted == bool(check_target_module_exists(peft_config, name)), name
        rank_key = get_pattern_key(peft_config.rank_pattern.keys(), name)
        alpha_key = get_pattern_key(peft_config.alpha_pattern.keys(), name)
        assert settings[name].r == peft_config.rank_pattern.get(rank_key, 8), name
        assert settings[name].lora_alpha == peft_config.alpha_pattern.get(alpha_key, 16), name


@pytest.mark.parametrize(("fields", "names"), [
    (dict(target_modules="([a-z_.0-9]+)+!"), ["model.layers.0.self_attn.q_proj"]),
    (dict(rank_pattern={"(a+)+$": 8}), [f"model.layers.0.{'a' * 40}!"]),
    (dict(alpha_pattern={".*" * 13 + "!": 8}), ["model.layers.0.self_attn.q_proj"]),
], ids=["nested", "exponential in the name", "polynomial"])
def test_hostile_patterns_fail_within_seconds(fields, names):
    start = time.monotonic()
    with pytest.raises(merge.MergeError, match="takes over 1 s to match"):
        merge.module_settings({"r": 8, "lora_alpha": 16, "target_modules": None, **fields}, names,
                              Path("adapter_config.json"))
    assert time.monotonic() - start < 10


def hub_cache_snapshot(src, repo):
    """`src` laid out like the Hugging Face hub cache: snapshots/REV/NAME -> ../../blobs/HASH."""
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(src.iterdir())):
        (repo / "blobs" / f"blob{i}").write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    return snapshot


def test_links_that_stay_inside_an_input_are_followed(checkpoints, tmp_path):
    plain = tmp_path / "plain"
    merge.merge_adapter(checkpoints["base16"], checkpoints["adapter"], plain, progress=False)
    base = hub_cache_snapshot(checkpoints["base16"], tmp_path / "hub" / "models--tiny--base")
    adapter = hub_cache_snapshot(checkpoints["adapter"], tmp_path / "hub" / "models--tiny--adapter")
    adapter_with_vocab = copy_dir(checkpoints["adapter"], tmp_path / "adapter")
    (adapter_with_vocab / "vocab.txt").symlink_to("README.md")
    linked = merge.merge_adapter(base, adapter, tmp_path / "linked", progress=False)
    assert (linked / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    with_vocab = merge.merge_adapter(base, adapter_with_vocab, tmp_path / "with_vocab", progress=False)
    assert (with_vocab / "vocab.txt").read_bytes() == (adapter_with_vocab / "README.md").read_bytes()


def test_outputs_get_the_users_umask(checkpoints, tmp_path):
    previous = os.umask(0o027)
    try:
        out = merge.merge_adapter(checkpoints["base16"], checkpoints["adapter"], tmp_path / "merged", progress=False)
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o750
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o640 for p in out.iterdir()}


def test_a_killed_merges_staging_is_removed_on_the_next_start(checkpoints, tmp_path):
    out = tmp_path / "merged"
    # What a merge into `out` killed mid-write leaves: its staging directory; and, killed while --overwrite
    # deleted the old model it had moved aside, that directory.
    stale = [tmp_path / ".pyprefopt-tmp-merge-merged-k3j9x_2a", tmp_path / ".pyprefopt-old-merge-merged-0a1b2c3d"]
    # Not ours to delete: another OUT's staging, a look-alike in another directory, a user's hidden directory.
    kept = [tmp_path / ".pyprefopt-tmp-merge-merged-2-k3j9x_2a", tmp_path / ".pyprefopt-tmp-merge-other-k3j9x_2a",
            tmp_path / "sub" / ".pyprefopt-tmp-merge-merged-k3j9x_2a", tmp_path / ".merged"]
    for path in stale + kept:
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"half written")
    out.mkdir()
    merge.merge_adapter(checkpoints["base16"], checkpoints["adapter"], out, overwrite=True, progress=False)
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in kept)


def test_a_moved_aside_model_is_kept_while_it_is_the_only_copy(checkpoints, tmp_path):
    """A kill between --overwrite's two renames leaves OUT missing and its old model moved aside."""
    moved_aside = tmp_path / ".pyprefopt-old-merge-merged-0a1b2c3d"
    (moved_aside / "merged").mkdir(parents=True)
    merge.merge_adapter(checkpoints["base16"], checkpoints["adapter"], tmp_path / "merged", progress=False)
    assert (moved_aside / "merged").is_dir()


# ----------------------------------------------------------------------------------------------------
# Peak memory


def write_big_checkpoint(path, n_layers, out_features, in_features):
    """A base of `n_layers` bf16 [out, in] projections, written by the streaming writer (no dict of all)."""
    path.mkdir()
    layout = [(f"model.layers.{i}.proj.weight", torch.bfloat16, (out_features, in_features)) for i in range(n_layers)]
    writer = StreamingWriter(path / "model.safetensors", layout)
    g = torch.Generator().manual_seed(0)
    for name, dtype, shape in layout:
        writer.write(name, torch.randn(shape, generator=g).to(dtype))
    writer.close()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))


def test_streaming_merge_peak_memory_is_a_few_tensors(tmp_path):
    n_layers, out_features, in_features, r = 8, 2048, 4096, 16
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    write_big_checkpoint(base, n_layers, out_features, in_features)
    adapter.mkdir()
    g = torch.Generator().manual_seed(1)
    save_file({f"base_model.model.model.layers.{i}.proj.lora_{p}.weight": torch.randn(shape, generator=g)
               for i in range(n_layers) for p, shape in (("A", (r, in_features)), ("B", (out_features, r)))},
              adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["proj"]}))
    # The peak is measured in a fresh process from after its imports (bench/resident_memory.py's high-water mark), run
    # from the repository root, where `bench` is a package.
    script = textwrap.dedent(f"""
        import torch
        from pyprefopt import merge
        from bench.resident_memory import peak_rss_mib, reset_peak_rss, rss_mib
        before = rss_mib()
        reset_peak_rss()
        merge.merge_adapter({str(base)!r}, {str(adapter)!r}, {str(tmp_path / 'out')!r}, torch.bfloat16, progress=False)
        print(peak_rss_mib() - before)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    peak = float(result.stdout.split()[-1]) * 2**20
    tensor_bytes = out_features * in_features * 2
    model_bytes = n_layers * tensor_bytes
    assert peak <= 3 * tensor_bytes, (
        f"peak {peak / 2**20:.0f} MiB > 3 x the largest tensor ({tensor_bytes / 2**20:.0f} MiB)")
    assert peak < model_bytes / 2, f"peak {peak / 2**20:.0f} MiB: not streaming a {model_bytes / 2**20:.0f} MiB model"
