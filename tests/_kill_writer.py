"""Helper process for tests/test_reliability.py: forks writers that the test kills with SIGKILL.

Protocol on stdin/stdout, one line each:
  ``fork <version>`` -> forks a writer that saves the adapter with every tensor filled with
  ``version``, ``version + 1``, ... in an endless loop; answers ``pid <pid>``.
  ``reap <pid>``     -> waits for the (killed) writer; answers ``reaped <signal>``.
  ``quit``.
Startup builds the model once and saves version 0, so there is always a previous adapter, then
answers ``ready <seconds per save>``. Forking a warm process makes each kill cost milliseconds
instead of a fresh interpreter; torch runs single-threaded so forking is safe.
"""

from __future__ import annotations

import os
import sys
import time

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_llama  # noqa: E402

from hf_lora import LoRAConfig, wrap  # noqa: E402


def _fill(model, value: float) -> None:
    with torch.no_grad():
        for param in model.adapter_parameters().values():
            param.fill_(value)


def main() -> None:
    folder = sys.argv[1]
    model = wrap(make_llama(seed=0, hidden_size=128, intermediate_size=256),
                 LoRAConfig(r=64, lora_alpha=16, target_modules=["attention", "mlp"]))
    _fill(model, 0.0)
    start = time.perf_counter()
    model.save_pretrained(folder)
    print(f"ready {time.perf_counter() - start:.6f}", flush=True)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "fork":
            pid = os.fork()
            if pid == 0:
                sys.stdin.close()
                version = int(argument)
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
