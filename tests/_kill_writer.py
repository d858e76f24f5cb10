"""Helper process for tests/test_reliability.py: forks writers that the test kills with SIGKILL.

Usage: ``_kill_writer.py FOLDER [save|merge]``. Protocol on stdin/stdout, one line each:
  ``fork <version>`` -> forks a writer and answers ``pid <pid>``. ``save`` mode: the writer
  saves the adapter to FOLDER with every tensor filled with ``version``, ``version + 1``, ...
  in an endless loop. ``merge`` mode: it runs ``hf-lora merge``'s ``merge_adapter`` into
  ``FOLDER/out/m<version>``, ``m<version + 1>``, ... in an endless loop.
  ``reap <pid>``     -> waits for the (killed) writer; answers ``reaped <signal>``.
  ``quit``.
Startup builds the model once and saves version 0, so there is always a previous adapter (merge
mode: saves a sharded base and an adapter under FOLDER), then answers ``ready <seconds>``. Forking a warm process makes each kill cost milliseconds
instead of a fresh interpreter; torch runs on one OpenMP thread so forking is safe.
"""

from __future__ import annotations

import os
import sys
import time

# One OpenMP thread before torch loads: a forked child would hang in its first matmul waiting for
# the parent's OpenMP worker threads, which fork does not copy.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_llama

from hf_lora import LoRAConfig, wrap


def _fill(model, value: float) -> None:
    with torch.no_grad():
        for param in model.adapter_parameters().values():
            param.fill_(value)


def _prepare_merge(folder: str) -> tuple[str, str]:
    root = os.path.abspath(folder)
    make_llama(seed=0).save_pretrained(os.path.join(root, "base"), max_shard_size="150KB")  # several shards
    torch.manual_seed(1)
    wrap(make_llama(seed=0),
         LoRAConfig(r=8, target_modules=["attention", "mlp"], init_lora_weights=False)).save_pretrained(
        os.path.join(root, "adapter"))
    return os.path.join(root, "base"), os.path.join(root, "adapter")


def _merge_forever(folder: str, base: str, adapter: str, version: int) -> None:
    from hf_lora.merge import merge_adapter

    while True:
        merge_adapter(base, adapter, os.path.join(folder, "out", f"m{version}"))
        version += 1


def main() -> None:
    folder, mode = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "save")
    model = wrap(make_llama(seed=0, hidden_size=128, intermediate_size=256),
                 LoRAConfig(r=64, lora_alpha=16, target_modules=["attention", "mlp"]))
    start = time.perf_counter()
    if mode == "merge":
        # No merge here: a matmul before fork leaves thread-pool state that hangs the child's first
        # matmul. The test makes the reference merge itself.
        base, adapter = _prepare_merge(folder)
        import hf_lora.merge  # noqa: F401  (imported before forking: each writer starts warm)
    else:
        _fill(model, 0.0)
        model.save_pretrained(folder)
    print(f"ready {time.perf_counter() - start:.6f}", flush=True)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "fork":
            pid = os.fork()
            if pid == 0:
                sys.stdin.close()
                version = int(argument)
                if mode == "merge":
                    _merge_forever(folder, base, adapter, version)
                while True:
                    _fill(model, float(version))
                    model.save_pretrained(folder)
                    version += 1
            print(f"pid {pid}", flush=True)
        elif command == "reap":
            _, status = os.waitpid(int(argument), 0)
            print(f"reaped {os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1}", flush=True)
        elif command == "quit":
            return


if __name__ == "__main__":
    main()
