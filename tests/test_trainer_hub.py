"""Hub pushes (trainer.push_to_hub, model.push_to_hub) with huggingface_hub's HfApi intercepted.

Trainer uploads through ``transformers.utils.hub.hf_api()``, a shared ``HfApi`` instance, and
``hf_lora.hub.push_adapter`` through its own; patching the two ``HfApi`` methods they call
(``create_repo``, ``upload_folder``) catches both without any network.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import yaml
from conftest import make_llama
from huggingface_hub import HfApi
from trainer_helpers import token_dataset, trainer_args
from transformers import Trainer

from hf_lora import LoRACallback, LoRAConfig, wrap

TOKEN = "hf_testTOKENdoNotLeak0123456789"
BASE_ID = "acme/tiny-llama"


class FakeHub:
    """Records what each upload would send: file names and contents at call time."""

    def __init__(self) -> None:
        self.repos: list[dict] = []
        self.uploads: list[dict] = []

    def install(self, monkeypatch) -> FakeHub:
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.repos.append({"repo_id": repo_id, **kwargs})
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(api, *, folder_path, repo_id, **kwargs):
            ignore = kwargs.get("ignore_patterns") or []
            files = {}
            for root, _, names in os.walk(folder_path):
                for name in names:
                    rel = os.path.relpath(os.path.join(root, name), folder_path)
                    if not any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel.split(os.sep)[0], p) for p in ignore):
                        files[rel] = Path(root, name).read_bytes()
            hub.uploads.append({"repo_id": repo_id, "files": files, "token": kwargs.get("token", api.token), **kwargs})
            if kwargs.get("run_as_future"):
                done: Future = Future()
                done.set_result("commit")
                return done
            return f"https://huggingface.co/{repo_id}/commit/fake"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _named_base():
    base = make_llama()
    base.config._name_or_path = BASE_ID
    return base


def _assert_token_absent(folder: Path) -> None:
    for path in Path(folder).rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), f"token written to {path}"


def test_trainer_push_to_hub_uploads_the_adapter_and_an_adapter_card(tmp_path, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    model = wrap(_named_base(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    args = trainer_args(tmp_path / "run", max_steps=2, eval_strategy="steps", eval_steps=2,
                        hub_model_id="acme/tiny-llama-lora")
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(4), eval_dataset=token_dataset(4, seed=1),
                      callbacks=[LoRACallback()])
    trainer.train()
    trainer.push_to_hub(token=TOKEN)

    assert [r["repo_id"] for r in hub.repos] == ["acme/tiny-llama-lora"]
    (upload,) = hub.uploads
    assert upload["repo_id"] == "acme/tiny-llama-lora" and upload["token"] == TOKEN
    # Trainer's own model.safetensors (adapter-only, wrapper keys) and training_args.bin go too.
    assert set(upload["files"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors",
                                    "model.safetensors", "training_args.bin"}
    card = upload["files"]["README.md"].decode()
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and meta["base_model"] == BASE_ID
    assert {f"base_model:adapter:{BASE_ID}", "hf-lora", "lora", "peft", "generated_from_trainer"} <= set(meta["tags"])
    trainable, total = model.trainable_parameters()
    assert "| r | 4 |" in card and "| target_modules | q_proj, v_proj |" in card
    assert f"| trainable % of base | {100 * trainable / total:.4f} |" in card
    assert "| eval_loss |" in card and "| train_loss |" in card
    assert "## Training procedure" in card  # Trainer's hyperparameter section is kept
    config = yaml.safe_load(upload["files"]["adapter_config.json"])
    assert config["base_model_name_or_path"] == BASE_ID and config["peft_type"] == "LORA"
    _assert_token_absent(tmp_path)


def test_push_during_training_carries_adapter_files_in_last_checkpoint(tmp_path, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    model = wrap(_named_base(), LoRAConfig(r=2, target_modules=["q_proj"]))
    args = trainer_args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2, push_to_hub=True,
                        hub_model_id="acme/live", hub_strategy="checkpoint")
    Trainer(model=model, args=args, train_dataset=token_dataset(4), callbacks=[LoRACallback()]).train()
    by_path = {u.get("path_in_repo"): u for u in hub.uploads}
    adapter = {"adapter_config.json", "adapter_model.safetensors"}
    assert adapter <= set(by_path[None]["files"])
    assert adapter | {"model.safetensors", "optimizer.pt"} <= set(by_path["last-checkpoint"]["files"])


def test_model_push_to_hub_uploads_exactly_the_adapter_folder(monkeypatch):
    hub = FakeHub().install(monkeypatch)
    model = wrap(_named_base(), LoRAConfig(r=2, lora_alpha=8, target_modules=["q_proj"]))
    url = model.push_to_hub("acme/adapter", token=TOKEN, private=True)

    assert url == "https://huggingface.co/acme/adapter/commit/fake"
    assert hub.repos == [{"repo_id": "acme/adapter", "private": True, "exist_ok": True, "repo_type": "model"}]
    (upload,) = hub.uploads
    assert set(upload["files"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert upload["token"] == TOKEN
    meta = _front_matter(upload["files"]["README.md"].decode())
    assert meta["library_name"] == "peft" and meta["base_model"] == BASE_ID
    assert f"base_model:adapter:{BASE_ID}" in meta["tags"]
    assert "| lora_alpha | 8 |" in upload["files"]["README.md"].decode()
    assert all(TOKEN.encode() not in content for content in upload["files"].values())
    trainable, total = model.trainable_parameters()
    assert f"| trainable % of base | {100 * trainable / total:.4f} |" in upload["files"]["README.md"].decode()


def test_card_of_a_frozen_adapter_still_states_its_share_of_the_model():
    from hf_lora.hub import model_card

    model = wrap(_named_base(), LoRAConfig(r=2, target_modules=["q_proj"]))
    trainable, total = model.trainable_parameters()
    model.requires_grad_(False)  # what from_pretrained(is_trainable=False) leaves
    assert f"| trainable % of base | {100 * trainable / total:.4f} |" in model_card(model)


def test_hub_token_in_training_arguments_is_warned_about(tmp_path, caplog):
    model = wrap(make_llama(), LoRAConfig(r=2, target_modules=["q_proj"]))
    args = trainer_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1, hub_token=TOKEN)
    with caplog.at_level(logging.WARNING, logger="hf_lora"):
        trainer = Trainer(model=model, args=args, train_dataset=token_dataset(4), callbacks=[LoRACallback()])
    assert any("hub_token is set" in r.getMessage() and "HF_TOKEN" in r.getMessage() for r in caplog.records)
    trainer.train()
    # What the warning says: Trainer pickles the token into every checkpoint's training_args.bin.
    assert TOKEN.encode() in (tmp_path / "checkpoint-1" / "training_args.bin").read_bytes()
    assert TOKEN.encode() not in (tmp_path / "checkpoint-1" / "adapter_config.json").read_bytes()


def test_pushed_card_loading_snippet_names_the_repo(tmp_path, monkeypatch):
    """The card's from_pretrained line uses the repo id it is pushed to, not a placeholder."""
    import huggingface_hub
    from conftest import make_llama

    from hf_lora import wrap

    cards: list[str] = []

    def fake_upload_folder(self, *, folder_path, **kwargs):
        cards.append((Path(folder_path) / "README.md").read_text())
        return "https://hub.invalid/commit/0"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    wrap(make_llama()).push_to_hub("someone/tiny-adapter")
    assert "LoRAModelWrapper.from_pretrained(base_model, 'someone/tiny-adapter')" in cards[0]
