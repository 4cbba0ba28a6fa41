"""Switch, options and settings enforcement without starting an engine.

These run vLLM's real ``EngineArgs`` through the real plugin; they stop
before an engine starts because the errors they check come first.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import pytest
from kernel_support import blocked_expected, brgemm_expected

from conftest import ENGINE_KWARGS, run_engine_subprocess
from vllm_rl_compat import envs, plugin
from vllm_rl_compat.config import RLCompatConfig, options_markdown

README = (Path(__file__).parents[1] / "README.md").read_text()


@pytest.mark.parametrize("raw,needle", [
    ({"fp32_heads": "compute"}, "Unknown option rl_compat.fp32_heads='compute'"),
    ({"strict": "yes"}, "rl_compat.strict must be of type bool, got str: 'yes'"),
    ({"weight_version_start": 1.5}, "rl_compat.weight_version_start must be of type int"),
    ({"weight_version_start": True}, "rl_compat.weight_version_start must be of type int"),
    ({"weight_staging": "background"}, "rl_compat.weight_staging='background' is not valid"),
    ({"weight_staging_max_gib": -1}, "rl_compat.weight_staging_max_gib=-1 must be >= 0"),
    ({"weight_staging_max_gib": "2"}, "rl_compat.weight_staging_max_gib must be of type float"),
    ({"fp32_head": "fp16"}, "rl_compat.fp32_head='fp16' is not valid; accepted values: "
                            "'compute', 'weights', 'off'"),
    ([("strict", True)], "additional_config['rl_compat'] must be a dict"),
    ({"prefix_cache": "on"}, "rl_compat.prefix_cache='on' is not valid; accepted values: "
                             "'off', 'versioned'"),
    ({"prefix_cache": "versioned", "weight_sync": False},
     "rl_compat.prefix_cache='versioned' keys the cache by weight version, which comes "
     "from weight updates: it needs rl_compat.weight_sync=true"),
])
def test_bad_options_name_key_and_value(raw, needle) -> None:
    with pytest.raises(ValueError) as err:
        RLCompatConfig.from_dict(raw)
    assert needle in str(err.value)


def test_defaults_turn_every_fix_on() -> None:
    cfg = RLCompatConfig.from_dict({})
    assert (cfg.processed_logprobs, cfg.disable_prefix_caching, cfg.disable_async_scheduling,
            cfg.weight_sync, cfg.fp32_head) == (True, True, True, True, "compute")


def test_readme_documents_every_option_and_variable() -> None:
    assert options_markdown() in README
    for name in envs.environment_variables:
        assert f"`{name}`" in README


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_bad_switch_value_fails_register(monkeypatch, value) -> None:
    monkeypatch.setenv("VLLM_RL_COMPAT", value)
    with pytest.raises(ValueError, match=f"VLLM_RL_COMPAT='{value}' is not valid: accepted "
                                         "values are '0'"):
        plugin.register()


@pytest.mark.engine
def test_bad_switch_value_fails_engine_start(tiny_model) -> None:
    request = {"model": tiny_model("llama-untied"), "engine_kwargs": ENGINE_KWARGS}
    with pytest.raises(AssertionError, match="VLLM_RL_COMPAT='on' is not valid"):
        run_engine_subprocess(request, {"VLLM_RL_COMPAT": "on"})


def _args(tiny_model, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=tiny_model("llama-untied"), **{**ENGINE_KWARGS, **kwargs})


def _create_fails(args, match: str) -> None:
    """``create_engine_config`` raises and leaves every argument as it was."""
    before = copy.deepcopy(vars(args))
    with pytest.raises(ValueError, match=match):
        args.create_engine_config()
    assert vars(args) == before


def test_unknown_option_fails_before_any_change(tiny_model) -> None:
    args = _args(tiny_model, additional_config={"rl_compat": {"fp32": True}})
    _create_fails(args, r"Unknown option rl_compat\.fp32=True; accepted options: strict")


def test_strict_rejects_explicit_conflicts(tiny_model) -> None:
    args = _args(tiny_model, logprobs_mode="raw_logits", enable_prefix_caching=True,
                 additional_config={"rl_compat": {"strict": True}})
    _create_fails(args, r"logprobs_mode='raw_logits' was set explicitly, but RL mode "
                        r"\(rl_compat\.processed_logprobs=true\) uses "
                        r"logprobs_mode='processed_logprobs'; enable_prefix_caching=True")


def test_strict_through_llm_front_end(tiny_model) -> None:
    from vllm import LLM

    with pytest.raises(ValueError, match="enable_prefix_caching=True was set explicitly"):
        LLM(model=tiny_model("llama-untied"), logprobs_mode="raw_logprobs",
            enable_prefix_caching=True, additional_config={"rl_compat": {"strict": True}},
            **ENGINE_KWARGS)


def test_foreign_worker_extension_is_rejected(tiny_model) -> None:
    args = _args(tiny_model, worker_extension_cls="collections.OrderedDict")
    _create_fails(args, r"worker_extension_cls='collections\.OrderedDict' does not include "
                        r"the RL weight-sync extension")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_override_logs_one_warning_per_explicit_setting(tiny_model) -> None:
    # vLLM's first logging set-up in a process (inside create_engine_config)
    # resets the handlers of vllm.* loggers: let it happen before attaching.
    _args(tiny_model).create_engine_config()
    args = _args(tiny_model, logprobs_mode="raw_logits", enable_prefix_caching=True,
                 async_scheduling=True)
    handler = _Records()
    logging.getLogger("vllm.rl_compat").addHandler(handler)
    config = args.create_engine_config()
    assert handler.messages[:3] == [
        "RL mode overrides logprobs_mode: you set 'raw_logits', using 'processed_logprobs'.",
        "RL mode overrides enable_prefix_caching: you set True, using False.",
        "RL mode overrides async_scheduling: you set True, using False.",
    ]
    assert handler.messages[3].startswith("RL mode on: logprobs_mode='processed_logprobs', "
                                          "enable_prefix_caching=False, async_scheduling=False")
    assert (config.model_config.logprobs_mode, config.cache_config.enable_prefix_caching,
            config.scheduler_config.async_scheduling) == ("processed_logprobs", False, False)


def test_switched_off_fix_leaves_setting_alone(tiny_model) -> None:
    args = _args(tiny_model, enable_prefix_caching=True,
                 additional_config={"rl_compat": {"disable_prefix_caching": False,
                                                  "processed_logprobs": False}})
    config = args.create_engine_config()
    assert config.cache_config.enable_prefix_caching is True
    assert config.model_config.logprobs_mode == "raw_logprobs"
    assert config.scheduler_config.async_scheduling is False


def test_versioned_prefix_cache_turns_caching_on(tiny_model) -> None:
    args = _args(tiny_model, additional_config={"rl_compat": {"prefix_cache": "versioned"}})
    assert args.create_engine_config().cache_config.enable_prefix_caching is True
    args = _args(tiny_model, enable_prefix_caching=False,
                 additional_config={"rl_compat": {"prefix_cache": "versioned", "strict": True}})
    _create_fails(args, r"enable_prefix_caching=False was set explicitly, but RL mode "
                        r"\(rl_compat\.prefix_cache='versioned'\) uses enable_prefix_caching=True")


def test_switch_reaches_ray_workers(monkeypatch) -> None:
    """vLLM copies VLLM_* variables to its Ray actors; ours must be among them."""
    from vllm.ray.ray_env import get_env_vars_to_copy

    monkeypatch.setenv("VLLM_RL_COMPAT", "1")
    assert "VLLM_RL_COMPAT" in get_env_vars_to_copy(destination="test")


def test_info_command(capsys) -> None:
    from vllm_rl_compat import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "plugin: discovered (entry point vllm.general_plugins:rl_compat)" in out
    assert "switch VLLM_RL_COMPAT: on (RL mode)" in out
    assert "logprobs_mode = 'processed_logprobs'" in out
    for route, expected in (("brgemm", brgemm_expected()), ("blocked", blocked_expected())):
        line = next(ln for ln in out.splitlines() if ln.startswith(f"CPU fp32 head kernel {route} "))
        assert (": ready (" in line) == expected, line
        assert expected or ": unavailable: " in line, line
    # the CPU weight layout of each linear kind, per dtype (weights.cpu_layout)
    for dtype in ("bfloat16", "float32"):
        line = next(ln for ln in out.splitlines() if ln.startswith(f"  {dtype}: "))
        for kind in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            assert re.search(rf"{kind} (onednn|sgl|F\.linear|zentorch|other)\b", line), line
        assert "-> weight updates: " in line, line


def test_head_dtype_conflict_fails_before_any_change(tiny_model) -> None:
    args = _args(tiny_model, enable_prefix_caching=True,
                 hf_overrides={"head_dtype": "bfloat16"})
    _create_fails(args, r"hf_overrides head_dtype='bfloat16' conflicts with "
                        r"rl_compat\.fp32_head='compute'")


@pytest.mark.parametrize("backend", ["nccl", "ipc"])
def test_cuda_only_backend_fails_start_on_cpu(tiny_model, backend) -> None:
    """vLLM's nccl route is a silent no-op on a CPU engine: RL mode refuses it
    at start-up, naming it and the backends that work here."""
    args = _args(tiny_model, weight_transfer_config={"backend": backend})
    _create_fails(args, rf"weight_transfer_config.backend='{backend}' cannot run on the "
                        rf"cpu platform.*rl_compat_gloo, rl_compat_tensors, rl_compat_files")


def test_overlapped_staging_off_cpu_fails_start(tiny_model, monkeypatch) -> None:
    """Overlapped staging exists for CPU engines only: elsewhere start-up
    refuses it (not the first update). The platform is the one thing faked."""
    from vllm.platforms import current_platform

    args = _args(tiny_model, additional_config={"rl_compat": {"weight_staging": "overlapped"}})
    assert args.create_engine_config() is not None  # this CPU engine: accepted
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self: True)
    args = _args(tiny_model, additional_config={"rl_compat": {"weight_staging": "overlapped"}})
    _create_fails(args, r"rl_compat\.weight_staging='overlapped' cannot run on the .* "
                        r"platform: overlapped staging is built for CPU engines")


def test_default_backend_is_ours(tiny_model) -> None:
    args = _args(tiny_model)
    config = args.create_engine_config()
    assert config.weight_transfer_config.backend == "rl_compat_gloo"


@pytest.mark.parametrize("env_token, api_key, want", [
    ("ctl", ["user-key"], "ctl"),      # the control token, never the users' key
    (None, ["user-key"], None),        # an inference key alone mounts nothing
    (None, None, None),                # neither: routes not mounted
])
def test_control_routes_token_choice(monkeypatch, env_token, api_key, want) -> None:
    """Which token guards the RL routes, and that without one none is mounted."""
    from argparse import Namespace

    from fastapi import FastAPI

    from vllm_rl_compat.weights.frontend import http

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    if env_token is None:
        monkeypatch.delenv(http.TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(http.TOKEN_ENV, env_token)
    args = Namespace(api_key=api_key, additional_config=None)
    assert http.control_token(args) == want
    app = FastAPI()
    app.state.args = args
    handler = _Records()
    logging.getLogger("vllm.rl_compat").addHandler(handler)
    try:
        http.RLCompatEndpoints().attach_router(app)
    finally:
        logging.getLogger("vllm.rl_compat").removeHandler(handler)
    paths = {getattr(r, "path", None) for r in app.routes}
    assert ("/start_weight_update" in paths) == (want is not None)
    assert any("NOT mounted" in m for m in handler.messages) == (want is None)
    assert any("not a control key" in m for m in handler.messages) == (
        want is None and api_key is not None)
    for secret in (want, *(api_key or [])):
        assert not any(secret and secret in m for m in handler.messages)  # never logged
