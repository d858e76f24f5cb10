"""Child process for tests/test_reliability.py: a tiny Trainer run that may pause inside a save.

Arguments: tests_dir output_dir resume(0/1) pause_step [pause_train_step] (0: never). With
pause_step it stops inside the save of that step, after weights, optimizer and RNG state but
before trainer_state.json; with pause_train_step it stops right after that optimizer step,
between two checkpoints. Either way it writes output_dir/PAUSED and sleeps until the test kills it.
"""
import os
import sys
import time

import torch

torch.set_num_threads(1)
tests_dir, out, resume, pause_step = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
pause_train_step = int(sys.argv[5]) if len(sys.argv) > 5 else 0
sys.path.insert(0, tests_dir)
from conftest import make_llama
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_lora import LoRAConfig, SkipIncompleteCheckpoints, wrap

if pause_step:
    original = Trainer._save_rng_state

    def pausing(self, output_dir):  # after weights + optimizer, before trainer_state.json
        original(self, output_dir)
        if self.state.global_step == pause_step:
            _pause()

    Trainer._save_rng_state = pausing



def _pause() -> None:
    open(os.path.join(out, "PAUSED"), "w").close()
    time.sleep(600)


class PauseAfterStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == pause_train_step:
            _pause()


generator = torch.Generator().manual_seed(0)
ids = torch.randint(0, 256, (32, 16), generator=generator)
data = [{"input_ids": row, "labels": row} for row in ids]
model = wrap(make_llama(seed=0), LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["attention"]))
args = TrainingArguments(
    output_dir=out, max_steps=8, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
    logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
)
trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[SkipIncompleteCheckpoints(), PauseAfterStep()])
trainer.train(resume_from_checkpoint=True if resume else None)
model.save_pretrained(os.path.join(out, "final"))
print("DONE", trainer.state.global_step, flush=True)
