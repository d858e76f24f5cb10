"""Real 2-process DDP on CPU (gloo) through `accelerate launch`, then `hf-lora merge` of its adapter.

`accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (its CPU
multi-process path needs mpirun), so the test launches through torchrun with ``--multi_gpu``
and lets the recipe's ``use_cpu: true`` pick the CPU and the gloo backend. The report's world
size, backend and epoch fraction prove two ranks shared the data.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_writes_one_trained_adapter_that_merges(tmp_path):
    out = tmp_path / "ddp"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = accelerate + ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                        "recipes/finetune.py", "--config", "recipes/configs/tiny-llama-lora.yaml",
                        "--output_dir", str(out), "--max_steps", "4", "--exact_match_samples", "0", "--disable_tqdm", "true"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["distributed_backend"] == "gloo" and report["steps"] == 4
    # 4 steps x 2 ranks x 16 sequences of 457: twice the epoch fraction one process would reach.
    assert report["epoch"] == pytest.approx(4 * 2 * 16 / 480, abs=0.02)
    assert result.stdout.count("hf-lora recipe report") == 1  # only rank 0 reports (and writes)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
        assert all(handle.get_tensor(k).abs().sum() > 0 for k in keys if ".lora_B." in k)

    from transformers import AutoModelForCausalLM

    from hf_lora import LoRAModelWrapper
    from hf_lora.cli import main as cli

    merged = tmp_path / "merged"
    assert cli(["merge", str(out / "base_model"), str(out), str(merged)]) == 0
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(merged)!r}).eval()\n"
        "assert not any(n.startswith('hf_lora') for n in sys.modules)\n"
        f"torch.save(m(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits.detach(), {str(tmp_path / 'l.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)
    wrapped = LoRAModelWrapper.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), str(out))
    with torch.no_grad():
        expected = wrapped(input_ids=ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "l.pt"), expected, rtol=1e-5, atol=1e-5)
