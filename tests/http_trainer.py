"""A trainer process that uses nothing but vLLM's trainer API (not collected).

Usage: ``python http_trainer.py BASE_URL MASTER_PORT WORLD_SIZE MODEL_DIR`` with
the control token in ``VLLM_RL_COMPAT_CONTROL_TOKEN``. Connects to the server's
workers with ``rl_compat_gloo``, sends the model folder's tensors once, exits.
"""

from __future__ import annotations

import sys


class StateSource:
    """A ``WeightSource`` over a state dict."""

    def __init__(self, state):
        self.state = state

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.state.items()]

    def __iter__(self):
        return iter(list(self.state.items()))


def main() -> None:
    base_url, port, world_size, model_dir = sys.argv[1:5]
    from safetensors.torch import load_file
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from vllm_rl_compat.weights.protocol.spec import safetensors_files
    from vllm_rl_compat.weights.trainer.client import TokenHTTPClient
    from vllm_rl_compat.weights.trainer.senders import RLCompatGlooTrainerInitInfo

    state = {}
    for f in safetensors_files(model_dir):
        state.update(load_file(str(f)))
    info = RLCompatGlooTrainerInitInfo(master_address="127.0.0.1", master_port=int(port),
                                       world_size=int(world_size), rank=0, timeout=60)
    sender = WeightTransferTrainerFactory.trainer_init(
        info, client=TokenHTTPClient(base_url), source=StateSource(state))
    sender.send_weights()
    sender.shutdown()
    print("TRAINER-SENT", flush=True)


if __name__ == "__main__":
    main()
