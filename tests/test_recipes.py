"""recipes/finetune.py: configs, argument parsing, data processing, the tiny recipe end to end, stand-ins."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CONFIGS = sorted((RECIPES / "configs").glob("*.yaml"))
sys.path.insert(0, str(RECIPES))

import finetune
import finetune_data as fd

DATA = RECIPES / "data" / "tiny_instruct"
TINY = RECIPES / "configs" / "tiny-llama-lora.yaml"


@pytest.fixture(scope="module")
def tokenizer():
    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()]
    return fd.train_tokenizer([f"{r['prompt']}\n{r['response']}" for r in rows], 400)


# --- configs and arguments ------------------------------------------------------------------------


def test_the_six_configs_exist_start_with_their_launch_command_and_parse():
    names = {p.name for p in CONFIGS}
    assert names == {"tiny-llama-lora.yaml", "llama-3-8b-lora.yaml", "llama-3-8b-qlora.yaml",
                     "llama-3-8b-lora-embeddings.yaml", "mistral-7b-lora.yaml", "qwen2.5-7b-lora.yaml"}
    for path in CONFIGS:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "recipes/finetune.py" in first and path.name in first, path
        values = yaml.safe_load(path.read_text())
        cpu = ["--bf16", "false"] if values.get("bf16") else []  # TrainingArguments refuses bf16 without a GPU
        model_args, data_args, lora_args, args = finetune.parse_args(["--config", str(path), "--output_dir", "/tmp/x"] + cpu)
        assert model_args.model_name_or_path == values["model_name_or_path"]
        assert lora_args.lora_r == values["lora_r"] and data_args.dataset_name == values["dataset_name"]
        lora_args.to_config([1, 2])  # every config's LoRA settings are valid


def test_command_line_overrides_the_yaml_file():
    model_args, data_args, lora_args, args = finetune.parse_args(
        ["--config", str(TINY), "--lora_r", "4", "--max_steps", "7", "--packing", "true", "--output_dir", "/tmp/o"])
    assert (lora_args.lora_r, args.max_steps, data_args.packing, args.output_dir) == (4, 7, True, "/tmp/o")
    assert lora_args.lora_alpha == 32 and args.learning_rate == 3e-3  # untouched values come from the file


def test_bad_config_values_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: x\ndataset_name: y\nlora_rank: 8\n")
    with pytest.raises(ValueError, match=r"unknown settings \['lora_rank'\].*lora_r"):
        finetune.parse_args(["--config", str(bad)])
    with pytest.raises(ValueError, match="eval_fraction=1.5 is invalid"):
        finetune.parse_args(["--config", str(TINY), "--eval_fraction", "1.5"])
    with pytest.raises(ValueError, match="load_in_4bit and load_in_8bit"):
        finetune.parse_args(["--config", str(TINY), "--load_in_4bit", "--load_in_8bit"])
    with pytest.raises(ValueError, match="--config needs a YAML file"):
        finetune.parse_args(["--config"])


# --- data ---------------------------------------------------------------------------------------------


def test_only_response_tokens_are_targets(tokenizer):
    messages = fd.to_messages({"prompt": "Reverse the word: river", "response": "revir"}, "instruction",
                              "prompt", "response", "messages", "Be brief.")
    out = fd.tokenize_chat(tokenizer, messages, 64)
    targets = [t for t in out["labels"] if t != fd.IGNORE_INDEX]
    assert tokenizer.decode(targets) == "revir</s>"
    first = out["labels"].index(targets[0])
    assert all(t == fd.IGNORE_INDEX for t in out["labels"][:first])
    assert out["input_ids"][first:first + len(targets)] == targets


def test_plain_layout_without_chat_template_and_multi_turn_chat(tokenizer):
    plain = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>", pad_token="<pad>")
    assert plain.chat_template is None
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6"}]
    text = fd.render(plain, messages)
    assert "### Instruction:\nWhat is 2 + 2?" in text and "### Response:\n6</s>" in text
    labels = fd.tokenize_chat(plain, messages, 128)["labels"]
    assert plain.decode([t for t in labels if t != fd.IGNORE_INDEX]) == "4</s>6</s>"


def test_packing_makes_full_blocks_and_keeps_masks_aligned():
    batch = {"input_ids": [[1, 2, 3], [4, 5, 6, 7], [8, 9]], "labels": [[-100, 2, 3], [-100, -100, 6, 7], [8, 9]],
             "attention_mask": [[1] * 3, [1] * 4, [1] * 2]}
    out = fd.pack(batch, 4)
    assert out["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert out["labels"] == [[-100, 2, 3, -100], [-100, 6, 7, 8]]


def test_local_files_of_every_kind_load_and_formats_are_detected(tmp_path):
    import datasets

    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]
    table = datasets.Dataset.from_list(rows)
    table.to_json(str(tmp_path / "d.jsonl"))
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    table.to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        train, evaluation = fd.load_raw(str(tmp_path / name), eval_fraction=0.2)
        assert (len(train), len(evaluation)) == (8, 2) and set(train.column_names) == {"prompt", "response"}
    assert fd.detect_format(["messages"], "prompt", "response", "messages", "text") == "chat"
    assert fd.detect_format(["text", "id"], "prompt", "response", "messages", "text") == "text"
    with pytest.raises(ValueError, match=r"Cannot tell the data format from columns \['a'\]"):
        fd.detect_format(["a"], "prompt", "response", "messages", "text")
    with pytest.raises(ValueError, match="unsupported file type '.xml'"):
        (tmp_path / "d.xml").write_text("<a/>")
        fd.load_raw(str(tmp_path / "d.xml"))
    with pytest.raises(ValueError, match="has no split 'dev'"):
        fd.load_raw(str(tmp_path / "d.jsonl"), eval_split="dev")


def test_text_rows_are_trained_on_every_token(tokenizer):
    out = fd.tokenize_text(tokenizer, "hello world", 64)
    assert out["labels"] == out["input_ids"] and out["input_ids"][-1] == tokenizer.eos_token_id


# --- end to end ------------------------------------------------------------------------------------


def test_tiny_recipe_end_to_end_writes_a_peft_adapter_and_learns(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "recipes/finetune.py", "--config", str(TINY), "--output_dir", str(out), "--max_steps", "40",
           "--exact_match_samples", "8", "--disable_tqdm", "true"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hf-lora recipe report" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 40 and report["world_size"] == 1
    assert report["eval_loss_after"] < report["eval_loss_before"] - 0.5  # it learned something
    assert 0 < report["trainable_percent"] < 100 and report["adapter_bytes"] > 0
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists()  # the adapter only; the built base lives in base_model/

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_lora import LoRAModelWrapper

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), str(out)).eval()
    ours = LoRAModelWrapper.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), str(out))
    ids = torch.randint(0, 400, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    b = [v for k, v in ours.adapter_parameters().items() if k.endswith("lora_B.weight")]
    assert b and all(t.abs().sum() > 0 for t in b)  # trained, not the zero init


def _stand_in(kind: str, folder: Path, tokenizer) -> str:
    """A tiny model of the real config's architecture, saved with a tokenizer, as a local model folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
    config = cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _stand_in_data(folder: Path, values: dict) -> str:
    """Local rows shaped like the real config's Hub dataset (same columns and split names)."""
    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()][:24]
    if "text_column" in values:
        shaped = [{values["text_column"]: f"### Human: {r['prompt']}### Assistant: {r['response']}"} for r in rows]
    elif "prompt_column" in values:
        shaped = [{values["prompt_column"]: r["prompt"], values["response_column"]: r["response"], "input": ""}
                  for r in rows]
    elif values.get("new_special_tokens"):  # ShareGPT turns whose answers use the new tokens
        start, end = values["new_special_tokens"]
        shaped = [{values["messages_column"]: [{"from": "human", "value": r["prompt"]},
                                               {"from": "gpt", "value": f"{start}{r['response']}{end}"}]} for r in rows]
    else:
        shaped = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
                  for r in rows]
    folder.mkdir()
    for split in {values.get("train_split", "train"), values.get("eval_split") or "unused"}:
        with open(folder / f"{split}.jsonl", "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in shaped)
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("name,kind", [
    ("llama-3-8b-lora.yaml", "llama"), ("llama-3-8b-qlora.yaml", "llama"),
    ("llama-3-8b-lora-embeddings.yaml", "llama"), ("mistral-7b-lora.yaml", "mistral"), ("qwen2.5-7b-lora.yaml", "qwen2"),
])
def test_real_configs_run_on_tiny_stand_ins(tmp_path, tokenizer, name, kind):
    path = RECIPES / "configs" / name
    values = yaml.safe_load(path.read_text())
    model = _stand_in(kind, tmp_path / "model", tokenizer)
    data = _stand_in_data(tmp_path / "data", values)
    overrides = ["--model_name_or_path", model, "--dataset_name", data, "--output_dir", str(tmp_path / "out"),
                 "--max_steps", "2", "--max_seq_length", "64", "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
                 "--bf16", "false", "--use_cpu", "true", "--disable_tqdm", "true", "--dtype", "float32",
                 "--lora_r", "4", "--max_eval_samples", "8"]
    if values.get("load_in_4bit"):  # bitsandbytes CPU 4-bit; paged optimizers need CUDA
        overrides += ["--bnb_4bit_compute_dtype", "float32", "--optim", "adamw_torch"]
    report = finetune.main(["--config", str(path)] + overrides)
    out = tmp_path / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    assert report["steps"] == 2 and (out / "adapter_model.safetensors").stat().st_size > 0
    assert config["peft_type"] == "LORA" and config["r"] == 4
    if values.get("train_new_token_rows"):
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(values["new_special_tokens"])
        # only the new rows, of the embedding and of the untied output layer (else lm_head rows stay random)
        assert config["trainable_token_indices"] == {"model.embed_tokens": ids, "lm_head": ids}
        assert min(ids) >= len(tokenizer)
    if values.get("load_in_4bit"):
        assert report["trainable_percent"] < 100


def test_accelerate_configs_are_valid_for_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"single_gpu.yaml": "NO", "multi_gpu.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP",
                "deepspeed_zero3.yaml": "DEEPSPEED"}
    for name, kind in expected.items():
        path = RECIPES / "accelerate" / name
        assert path.read_text().startswith("# accelerate launch --config_file recipes/accelerate/" + name)
        assert str(load_config_from_file(str(path)).distributed_type).endswith(kind), name
    assert yaml.safe_load((RECIPES / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]["fsdp_version"] == 2
    assert yaml.safe_load((RECIPES / "accelerate" / "deepspeed_zero3.yaml").read_text())["deepspeed_config"]["zero_stage"] == 3


def test_sharded_runs_gather_the_adapter_and_refuse_empty_tensors(tmp_path, monkeypatch):
    """FSDP/ZeRO-3 paths without GPUs: the backends are faked, the recipe's own logic is real."""
    from types import SimpleNamespace

    import finetune_model as fm
    from conftest import make_llama

    from hf_lora import LoRAConfig, wrap

    args = SimpleNamespace(fsdp="", deepspeed=None, should_save=True)
    assert fm.callbacks(args)[0].save_adapter is True
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert fm.is_sharded(args) and fm.callbacks(args)[0].save_adapter is False  # no per-checkpoint export of shards

    model = wrap(make_llama(), LoRAConfig(r=2, init_lora_weights=False))
    full = {f"base_model.{k}": v.detach().clone() for k, v in model.adapter_parameters().items()}
    accelerator = SimpleNamespace(is_main_process=True, get_state_dict=lambda _: full)
    trainer = SimpleNamespace(model=model, model_wrapped=model, accelerator=accelerator, args=args,
                              is_deepspeed_enabled=False, is_fsdp_enabled=True)
    fm.save_adapter(trainer, str(tmp_path / "a"))
    from hf_lora import LoRAModelWrapper

    loaded = LoRAModelWrapper.from_pretrained(make_llama(), str(tmp_path / "a"))
    for key, value in loaded.adapter_parameters().items():
        assert torch.equal(value, full[f"base_model.{key}"])
    first = next(iter(full))
    full[first] = torch.empty(0)  # what an ungathered ZeRO-3 placeholder looks like
    with pytest.raises(RuntimeError, match="is empty after gathering"):
        fm.save_adapter(trainer, str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def test_resume_flag_values():
    assert finetune._resume_value("true") is True and finetune._resume_value("False") is None
    assert finetune._resume_value(None) is None and finetune._resume_value("out/checkpoint-8") == "out/checkpoint-8"
