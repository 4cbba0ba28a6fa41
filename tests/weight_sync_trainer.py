"""A trainer process for the broadcast tests (run as a script, not collected).

Usage: ``python weight_sync_trainer.py HOST PORT NUM_RECEIVERS MODEL_DIR MODE
TIMEOUT CHUNK_BYTES`` with the group's secret in ``TEST_TRAINER_SECRET``. Joins the group, sends the model folder's state dict
once, and exits; prints ``TRAINER-READY`` just before it joins. ``MODE``: ``ok``; ``die:K`` (the process exits hard after K
data chunks, i.e. mid-transfer); ``stall:K`` (sleeps after K data chunks, so
the receivers time out); ``badname`` (sends an extra tensor).
"""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    host, port, receivers, model_dir, mode, timeout, chunk = sys.argv[1:8]
    import torch
    from safetensors.torch import load_file

    from vllm_rl_compat.weights.protocol.broadcast import BroadcastError, TrainerBroadcaster
    from vllm_rl_compat.weights.protocol.spec import safetensors_files

    state = {}
    for f in safetensors_files(model_dir):
        state.update(load_file(str(f)))
    if mode == "badname":
        state["model.layers.0.mlp.bogus.weight"] = torch.zeros(4, dtype=torch.bfloat16)
    # Start-up (imports, reading the model) is done: the test may start the
    # join now, so a short group timeout measures the transfer, not Python.
    print("TRAINER-READY", flush=True)
    bc = TrainerBroadcaster(host, int(port), int(receivers), timeout=float(timeout),
                            chunk_bytes=int(chunk), secret=os.environ["TEST_TRAINER_SECRET"])
    if mode.startswith(("die:", "stall:")):
        action, k = mode.split(":")
        original = bc.group.broadcast
        calls = {"n": 0}

        def broadcast(tensor, root=0):
            calls["n"] += 1
            # 2 metadata broadcasts (size, payload) come first, then data chunks.
            if calls["n"] > 2 + int(k):
                if action == "die":
                    os._exit(3)
                time.sleep(3600)
            original(tensor, root)

        bc.group.broadcast = broadcast
    try:
        bc.send(state)
    except BroadcastError as exc:
        print(f"TRAINER-ERROR {exc}", flush=True)
        sys.exit(2)
    print("TRAINER-SENT", flush=True)
    bc.close()


if __name__ == "__main__":
    main()
