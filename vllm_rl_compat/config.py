"""The ``rl_compat`` options: one table, one parser, one place to read them.

Users configure RL mode through vLLM's free-form ``additional_config``
(``LLM(additional_config={"rl_compat": {...}})`` or
``--additional-config '{"rl_compat": {...}}'``). vLLM does not validate that
dict, so this module does: unknown keys, wrong types and bad values raise one
``ValueError`` naming the key, the value and what is accepted, before any
engine setting is touched. The dataclass fields (``OPTIONS``) are the single source of the
README's configuration reference (a test checks they agree).
"""

from __future__ import annotations

import json
from dataclasses import Field, dataclass, field, fields
from typing import Any, Mapping

CONFIG_KEY = "rl_compat"

FP32_HEAD_MODES = ("compute", "weights", "off")
FP32_HEAD_IMPLS = ("auto", "triton", "brgemm", "blocked", "torch")
PREFIX_CACHE_MODES = ("off", "versioned")
WEIGHT_STAGING_MODES = ("auto", "overlapped", "in_pause")


def _opt(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field carrying its documentation (the README table's source)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class RLCompatConfig:
    """Validated RL-mode options (defaults: all four fixes on)."""

    strict: bool = _opt(
        False, "Raise instead of overriding when you explicitly set an engine "
        "argument that RL mode changes.")
    processed_logprobs: bool = _opt(
        True, "Fix 1: `logprobs_mode=processed_logprobs`, the logprobs of the "
        "distribution the sampler drew from (after temperature, top-k, top-p).")
    disable_prefix_caching: bool = _opt(
        True, "Fix 2: prefix caching off, so no request reuses KV computed "
        "before a weight update.")
    prefix_cache: str = _opt(
        "off", "Prefix caching in RL mode: `off` (`disable_prefix_caching` decides; "
        "default off) or `versioned`: caching on, every block keyed by the weight "
        "version its request was admitted under, so requests share prompt KV "
        "within a version and never across an update (needs `weight_sync`).",
        PREFIX_CACHE_MODES)
    disable_async_scheduling: bool = _opt(
        True, "Fix 2: async scheduling off, so weight updates land at a step "
        "boundary.")
    weight_sync: bool = _opt(
        True, "Fix 3: every weight update (vLLM's RL calls, `WeightSync`, the HTTP "
        "routes) is one transaction at a pause boundary; installs the worker "
        "extension `vllm_rl_compat.weights.worker.WeightSyncExtension` and, "
        "unless you set one, `weight_transfer_config={\"backend\": \"rl_compat_gloo\"}`.")
    weight_staging: str = _opt(
        "auto", "How our weight backends stage an update: `overlapped` receives, "
        "validates and prepares it (on CPU: new packed oneDNN handles) beside the "
        "live weights while the engine keeps decoding, then swaps pointers between "
        "two engine steps (on an `AsyncLLM` without a pause; an offline `LLM` pauses "
        "for the swap) (one extra copy of the weights, until the swap or, with "
        "`weight_staging_keep`, between updates too; refused when it does not "
        "fit); `in_pause` does all of it inside the pause (nothing held "
        "while decoding); "
        "`auto`: overlapped where the model and memory allow (CPU, unquantized), "
        "else in the pause.", WEIGHT_STAGING_MODES)
    weight_staging_keep: bool = _opt(
        True, "Overlapped staging keeps its copy of the weights between updates "
        "(a double buffer: the next update loads into the memory the last swap "
        "freed, with no shadow to build, allocation or fresh pages to fault in; "
        "staging took half the time in our CPU runs); `false` frees it at each "
        "swap (nothing held between updates).")
    weight_staging_max_gib: float = _opt(
        0.0, "Most extra memory overlapped staging may hold, in GiB (`0`: what the "
        "machine and its cgroup have available).")
    weight_update_lease_s: float = _opt(
        0.0, "An open weight update (start called, finish not yet) that goes this "
        "many seconds without a call or progress is aborted as a failed update: "
        "staging dropped, our pause released, the next call told why (a trainer "
        "that died mid-update cannot leave generation paused). `0`: sized for the "
        "model, 120 s + 60 s per GiB of weights.")
    fp32_head: str = _opt(
        "compute", "Fix 4: lm_head in fp32. `compute`: fp32 logits from "
        "model-dtype weights, no fp32 weight copy; `weights`: the head weight "
        "is held in fp32; `off`: model-dtype head.", FP32_HEAD_MODES)
    fp32_head_impl: str = _opt(
        "auto", "Projection implementation: `auto` (on CUDA cuBLAS "
        "`torch.mm(out_dtype=float32)` when activations and weight share a dtype, "
        "else the Triton kernel; on CPU, for bf16 weights, oneDNN's bf16 brgemm where the CPU has AMX, else "
        "the `blocked` kernel; the chunked torch path for fp32 weights), "
        "`triton`, `brgemm`, `blocked`, `torch`.", FP32_HEAD_IMPLS)
    weight_version_start: int = _opt(
        0, "Weight version reported before the first update; each successful "
        "update adds one.")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "RLCompatConfig":
        """Validate ``raw`` completely, then build the config (all or nothing)."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ValueError(
                f"additional_config[{CONFIG_KEY!r}] must be a dict of options, "
                f"got {type(raw).__name__}: {raw!r}"
            )
        cfg = cls(**{key: _validate(key, value) for key, value in raw.items()})
        if cfg.prefix_cache == "versioned" and not cfg.weight_sync:
            raise ValueError(
                f"{CONFIG_KEY}.prefix_cache='versioned' keys the cache by weight version, "
                f"which comes from weight updates: it needs {CONFIG_KEY}.weight_sync=true "
                f"(got false).")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Annotations are strings under `from __future__ import annotations`.
_TYPES = {"bool": bool, "int": int, "str": str, "float": (int, float)}
OPTIONS: dict[str, Field] = {f.name: f for f in fields(RLCompatConfig)}


def _validate(key: str, value: Any) -> Any:
    opt = OPTIONS.get(key)
    if opt is None:
        raise ValueError(
            f"Unknown option {CONFIG_KEY}.{key}={value!r}; accepted options: "
            f"{', '.join(OPTIONS)}."
        )
    # bool is a subclass of int: reject True for an int option explicitly.
    kind = _TYPES[opt.type]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ValueError(
            f"Option {CONFIG_KEY}.{key} must be of type {opt.type}, "
            f"got {type(value).__name__}: {value!r}."
        )
    if opt.type == "float":
        if not value >= 0:
            raise ValueError(f"Option {CONFIG_KEY}.{key}={value!r} must be >= 0.")
        value = float(value)
    choices = opt.metadata["choices"]
    if choices is not None and value not in choices:
        raise ValueError(
            f"Option {CONFIG_KEY}.{key}={value!r} is not valid; accepted values: "
            f"{', '.join(map(repr, choices))}."
        )
    return value


def rl_config_from_additional(additional_config: Any) -> RLCompatConfig:
    """Read the options from a ``VllmConfig.additional_config`` (or EngineArgs')."""
    raw = None
    if isinstance(additional_config, Mapping):
        raw = additional_config.get(CONFIG_KEY)
    return RLCompatConfig.from_dict(raw)


def current_rl_config() -> RLCompatConfig:
    """Options of the engine being built in this process (workers, engine core).

    Reads ``get_current_vllm_config()``, which vLLM sets while it constructs the
    model and workers.
    """
    from vllm.config import get_current_vllm_config

    return rl_config_from_additional(get_current_vllm_config().additional_config)


def options_markdown() -> str:
    """The README's configuration table, generated from the dataclass fields."""
    rows = ["| option | type | default | accepted | what it does |",
            "|---|---|---|---|---|"]
    for opt in OPTIONS.values():
        choices = opt.metadata["choices"]
        accepted = ", ".join(f"`{c}`" for c in choices) if choices else opt.type
        default = json.dumps(opt.default)
        rows.append(f"| `{opt.name}` | {opt.type} | `{default}` | {accepted} "
                    f"| {opt.metadata['help']} |")
    return "\n".join(rows)
