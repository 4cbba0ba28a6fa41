"""Engine settings enforcement: the RL-mode values of vLLM's engine arguments.

Why: vLLM V1 defaults differ from what an RL trainer needs (raw logprobs,
prefix caching, async scheduling) and each is a separate knob users forget.

What it changes: it wraps ``EngineArgs.create_engine_config`` (the one place
every front end -- ``LLM``, ``AsyncLLM``, ``vllm serve`` -- turns arguments
into a ``VllmConfig``). Before the original runs, it validates the
``rl_compat`` options, checks the user's explicit choices (``strict``), then
sets the enforced fields on the ``EngineArgs`` instance, so vLLM derives every
dependent setting from them. After it runs, it reads the values back from the
final ``VllmConfig`` and raises if vLLM changed any of them.

What it does not modify: any other argument, vLLM's defaults on the class, or
engines started without ``VLLM_RL_COMPAT=1`` (this module is never imported).

Explicit choices: ``EngineArgs`` does not record which fields the user passed,
so a value is taken as the user's choice when it differs from vLLM's own
default (``None`` for prefix caching and async scheduling, ``raw_logprobs``
for the logprobs mode, ``""`` for the worker extension). An explicit value
equal to vLLM's default cannot be told apart and is overridden silently.

Fallback: none; a setting that cannot be enforced fails start-up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from vllm_rl_compat.config import CONFIG_KEY, RLCompatConfig, rl_config_from_additional

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

logger = logging.getLogger("vllm.rl_compat")

WORKER_EXTENSION = "vllm_rl_compat.weights.worker.WeightSyncExtension"


def _is_weight_sync_extension(qualname: Any) -> bool:
    """Whether a worker extension already includes ours (ours or a subclass)."""
    if qualname == WORKER_EXTENSION:
        return True
    if not qualname:
        return False
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from vllm_rl_compat.weights.worker.extension import WeightSyncExtension

    cls = resolve_obj_by_qualname(qualname)
    return isinstance(cls, type) and issubclass(cls, WeightSyncExtension)


@dataclass(frozen=True)
class EnforcedSetting:
    """An engine argument RL mode sets, and how to read it back."""

    arg: str  # EngineArgs field
    fix: str  # RLCompatConfig flag that enables the enforcement
    value: Any  # the value RL mode uses
    unset: Any  # vLLM's default: the user did not choose
    read_final: Callable[["VllmConfig"], Any]
    accepts: Callable[[Any], bool] | None = None  # other values that satisfy it
    when: Callable[[RLCompatConfig], bool] | None = None  # default: the ``fix`` flag

    def applies(self, cfg: RLCompatConfig) -> bool:
        return self.when(cfg) if self.when is not None else bool(getattr(cfg, self.fix))

    def satisfied(self, current: Any) -> bool:
        if self.accepts is not None:
            return self.accepts(current)
        return current == self.value


SETTINGS: tuple[EnforcedSetting, ...] = (
    EnforcedSetting("logprobs_mode", "processed_logprobs", "processed_logprobs",
                    "raw_logprobs", lambda c: c.model_config.logprobs_mode),
    EnforcedSetting("enable_prefix_caching", "disable_prefix_caching", False, None,
                    lambda c: c.cache_config.enable_prefix_caching,
                    when=lambda cfg: cfg.disable_prefix_caching and cfg.prefix_cache == "off"),
    EnforcedSetting("enable_prefix_caching", "prefix_cache", True, None,
                    lambda c: c.cache_config.enable_prefix_caching,
                    when=lambda cfg: cfg.prefix_cache == "versioned"),
    EnforcedSetting("async_scheduling", "disable_async_scheduling", False, None,
                    lambda c: c.scheduler_config.async_scheduling),
    EnforcedSetting("worker_extension_cls", "weight_sync", WORKER_EXTENSION, "",
                    lambda c: c.parallel_config.worker_extension_cls,
                    accepts=_is_weight_sync_extension),
)

# Feature hooks: ``hook(args, cfg) -> str | None`` run after the options are
# validated and before any field changes (a hook that raises leaves ``args``
# untouched; a hook that changes ``args`` must do so last); each returns an
# item for the start-up summary line. The plugin hands them to ``install``.
ArgsHook = Callable[["EngineArgs", RLCompatConfig], "str | None"]
ARGS_HOOKS: list[ArgsHook] = []


def enforced(cfg: RLCompatConfig) -> list[EnforcedSetting]:
    """The settings this configuration enforces."""
    return [s for s in SETTINGS if s.applies(cfg)]


def _conflict_message(s: EnforcedSetting, current: Any, cfg: RLCompatConfig) -> str:
    option = getattr(cfg, s.fix)
    shown = str(option).lower() if isinstance(option, bool) else repr(option)
    return (f"{s.arg}={current!r} was set explicitly, but RL mode "
            f"({CONFIG_KEY}.{s.fix}={shown}) uses {s.arg}={s.value!r}")


def prepare_engine_args(args: "EngineArgs") -> tuple[RLCompatConfig, list[str]]:
    """Validate the options and set the enforced fields on ``args``.

    All checks run before the first field is changed: bad options or a strict
    conflict leave ``args`` exactly as they were. Returns the options and the
    feature hooks' summary items.
    """
    cfg = rl_config_from_additional(args.additional_config)
    todo = [(s, getattr(args, s.arg)) for s in enforced(cfg)
            if not s.satisfied(getattr(args, s.arg))]
    explicit = [(s, cur) for s, cur in todo if cur != s.unset]
    if explicit and cfg.strict:
        raise ValueError("; ".join(_conflict_message(s, cur, cfg) for s, cur in explicit)
                         + f". Remove the argument or set {CONFIG_KEY}.strict=false.")
    for s, cur in explicit:
        if s.arg == "worker_extension_cls":
            raise ValueError(
                f"worker_extension_cls={cur!r} does not include the RL weight-sync "
                f"extension: subclass {WORKER_EXTENSION} or set "
                f"{CONFIG_KEY}.weight_sync=false.")
    # Hooks validate too: they run before any field changes.
    extras = [item for hook in ARGS_HOOKS if (item := hook(args, cfg))]
    for s, cur in todo:
        setattr(args, s.arg, s.value)
    for s, cur in explicit:
        logger.warning("RL mode overrides %s: you set %r, using %r.", s.arg, cur, s.value)
    args.additional_config = {**(args.additional_config or {}), CONFIG_KEY: cfg.to_dict()}
    return cfg, extras


def log_summary(vllm_config: "VllmConfig", cfg: RLCompatConfig, extras: list[str]) -> None:
    """One start-up line with the effective values, read from the final config."""
    values = [f"{s.arg}={s.read_final(vllm_config)!r}" for s in enforced(cfg)]
    off = [fix for fix in dict.fromkeys(s.fix for s in SETTINGS) if getattr(cfg, fix) is False]
    logger.info("RL mode on: %s%s", ", ".join(values + extras),
                f"; switched off: {', '.join(off)}" if off else "")


def verify_vllm_config(vllm_config: "VllmConfig", cfg: RLCompatConfig) -> None:
    """Fail loudly if the final config lost a setting RL mode enforced."""
    wrong = [(s, s.read_final(vllm_config)) for s in enforced(cfg)]
    wrong = [(s, got) for s, got in wrong if not s.satisfied(got)]
    if wrong:
        raise RuntimeError("vLLM changed settings RL mode enforces: " + "; ".join(
            f"{s.arg} is {got!r} in the final VllmConfig, expected {s.value!r}"
            for s, got in wrong))


def install(hooks: list[ArgsHook]) -> None:
    """Wrap ``EngineArgs.create_engine_config``; ``hooks`` are the features' checks."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_rl_compat.patching import patch_method

    ARGS_HOOKS[:] = hooks

    def wrap(original: Any) -> Any:
        def create_engine_config(self: "EngineArgs", *args: Any, **kwargs: Any
                                 ) -> "VllmConfig":
            cfg, extras = prepare_engine_args(self)
            vllm_config = original(self, *args, **kwargs)
            verify_vllm_config(vllm_config, cfg)
            log_summary(vllm_config, cfg, extras)
            return vllm_config
        return create_engine_config

    patch_method(EngineArgs, "create_engine_config", wrap)
