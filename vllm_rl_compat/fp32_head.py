"""fp32 lm_head: exact fp32 logits in RL mode (option ``rl_compat.fp32_head``).

Why: the trainer computes the final projection in fp32, so a model-dtype head
in the engine adds one bf16 rounding to every rollout logit (about 2**-9
relative), which shows up in every importance ratio. vLLM's own
``hf_overrides={"head_dtype": "float32"}`` fixes the numbers but, off CUDA,
casts the whole V x H weight to fp32 on every step, cannot hold fp32 master
weights, and is one more knob users forget.

What it changes (worker processes only, installed by ``plugin._register_once``):

* ``LogitsProcessor`` is replaced (``PluggableLayer.register_oot``) by
  ``FP32HeadLogitsProcessor``, which overrides ``_apply_head`` -- the single
  projection used by ``forward`` (logits, TP gather, vocab-padding strip,
  soft-cap, scale), ``get_top_tokens`` and ``get_top_k_tokens``. The logits
  are fp32 from there on, so soft-cap, scale and the TP gather run in fp32.
* Modes: ``compute`` (default) projects the model-dtype weight with
  ``vllm_rl_compat.ops.fp32_linear``: exact products, fp32 accumulation, no
  persistent fp32 copy. ``weights`` additionally makes the head parameter
  fp32 *before* weights load (``ParallelLMHead.__init__``), so an fp32 head
  from a checkpoint or a trainer is used unrounded; a tied head keeps sharing
  the model-dtype embedding parameter (names, loading and memory of the
  embedding are unchanged) and gets an fp32 shadow copy that the embedding's
  weight loader fills with the same unrounded tensor on every load.
  ``off`` is stock vLLM (including a user's ``head_dtype``).
* Start-up: ``contract.require`` checks (by source) that vLLM still calls
  ``_apply_head`` from those paths, and ``Worker.load_model`` is wrapped so
  that, once the model is loaded, ``probe_head`` runs two hidden states
  through ``compute_logits`` and fails start-up unless the fp32 head was
  called and returned fp32 logits; on CUDA it then compiles every Triton
  launch configuration the head can need (``ops.fp32_linear_triton.precompile``),
  so nothing compiles while serving.
* Front end: ``head_dtype_hook`` (an engine-settings hook, installed by the plugin)
  checks ``hf_overrides["head_dtype"]`` against the mode before vLLM builds
  its config.

What it does not modify: the model body, the embedding lookup, the sampler,
vLLM's own oneDNN handle for the head (still built, unused in ``compute`` and
``weights``), engines with ``fp32_head="off"`` or without ``VLLM_RL_COMPAT=1``.

Transient memory (``compute``) beyond the fp32 logits: on CPU with a bf16
weight (``ops/fp32_linear_cpu``) a packed copy of 64 token rows (64 x H x 2
bytes) and one 256 x 64 fp32 tile per thread (brgemm, AMX), or an fp32 copy of
the token rows and one 128 KiB fp32 weight block per thread (blocked); on the chunked torch
fallback one fp32 chunk of 4096 vocabulary rows (4096 x H x 4 bytes, 9.4 MB
for H=576) plus one fp32 copy of the hidden states; on CUDA none. ``weights`` holds V x H x 4 bytes
(plus the same again in vLLM's oneDNN handle on CPU for an untied head).

Fallbacks: a quantized head fails start-up with ``QuantizedHeadError`` (no
silent fallback). ``weights`` on a model that projects through its input
embedding module directly (e.g. Gemma 2: no ``ParallelLMHead``) logs a
warning once and computes fp32 logits from the model-dtype weight
(``compute``). ``refresh_head(model)`` is the one function that brings
derived state (the tied fp32 shadow) in line after a weight update.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, Callable

import torch

from vllm_rl_compat.config import (
    CONFIG_KEY,
    RLCompatConfig,
    current_rl_config,
    rl_config_from_additional,
)

if TYPE_CHECKING:
    from vllm.engine.arg_utils import EngineArgs

logger = logging.getLogger("vllm.rl_compat")

SHADOW_ATTR = "rl_compat_fp32_weight"  # module.__dict__ key of a tied head's fp32 copy


class QuantizedHeadError(ValueError):
    """The head is quantized: an fp32 head from its weights is not supported."""


# ---------------------------------------------------------------- decisions


def check_head_supported(quant_method: Any, mode: str, where: str = "lm_head") -> None:
    """Raise ``QuantizedHeadError`` unless ``quant_method`` keeps a plain weight."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
    )

    if isinstance(quant_method, (UnquantizedEmbeddingMethod, UnquantizedLinearMethod)):
        return
    raise QuantizedHeadError(
        f"{CONFIG_KEY}.fp32_head={mode!r} needs an unquantized lm_head, but {where} "
        f"uses {type(quant_method).__name__}. Exclude the lm_head from quantization "
        f"or set additional_config={{'{CONFIG_KEY}': {{'fp32_head': 'off'}}}}.")


def select_impl(device_type: str, preference: str, mode: str = "compute") -> str:
    """The ``fp32_linear`` implementation for a device: one decision point.

    CUDA: ``auto`` stays ``auto``, decided per call from the dtypes
    (``fp32_linear.cuda_auto_route``): cuBLAS ``torch.mm(out_dtype=float32)``
    when activations and weight share a dtype (``compute`` mode: what vLLM
    itself runs for ``head_dtype="float32"``; IEEE-pinned for fp32), the
    Triton kernel for mixed dtypes (``weights`` mode: bf16 activations x fp32
    weight, which cuBLAS cannot do exactly on tensor cores). ``triton`` and
    ``torch`` force one of the two. CPU: ``auto`` keeps
    the choice per call inside ``fp32_linear`` -- for a bf16 weight oneDNN's
    bf16 brgemm where the CPU has it (AMX), else the ``blocked`` kernel (both
    built here, at model construction, so a first-time compile happens at
    start-up); the chunked torch path for an fp32 weight (``weights`` mode) or
    where no kernel is available. ``brgemm`` / ``blocked`` insist on that
    kernel, ``torch`` on the chunked path.
    """
    from vllm_rl_compat.ops import fp32_linear_cpu

    def bad(why: str) -> ValueError:
        return ValueError(f"{CONFIG_KEY}.fp32_head_impl={preference!r} {why}; use 'auto' or "
                          f"'torch'.")

    cpu_routes = fp32_linear_cpu.ROUTES
    if device_type == "cuda":
        if preference in cpu_routes:
            raise bad("is a CPU kernel, this engine runs on 'cuda'")
        return preference
    if preference == "triton":
        raise bad(f"needs a CUDA device, this engine runs on {device_type!r}")
    if preference in cpu_routes and mode == "weights":
        raise bad(f"takes bf16 weights, but {CONFIG_KEY}.fp32_head='weights' holds fp32 weights")
    if preference in cpu_routes and not fp32_linear_cpu.available(preference):
        raise bad(f"is unavailable here: {fp32_linear_cpu.unavailable_reason(preference)}")
    if preference == "auto":
        for route in cpu_routes:  # build now; each call falls back if a route is unavailable
            fp32_linear_cpu.available(route)
    return preference


def check_head_dtype(head_dtype: torch.dtype | None, model_dtype: torch.dtype,
                     mode: str) -> None:
    """An fp32 head mode accepts ``head_dtype`` unset/model dtype or float32."""
    if mode == "off" or head_dtype in (None, model_dtype, torch.float32):
        return
    raise ValueError(
        f"hf_overrides head_dtype={head_dtype} conflicts with {CONFIG_KEY}.fp32_head="
        f"{mode!r} (fp32 logits); drop head_dtype or set {CONFIG_KEY}.fp32_head='off'.")


# ---------------------------------------------------------------- projection


def head_weight(lm_head: torch.nn.Module) -> torch.Tensor:
    """The weight the fp32 projection reads: a tied head's fp32 shadow, else ``weight``."""
    shadow = lm_head.__dict__.get(SHADOW_ATTR)
    return shadow if shadow is not None else lm_head.weight


def project_fp32(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 impl: str) -> torch.Tensor:
    """fp32 ``hidden @ weight.T (+ bias)`` for any leading shape of ``hidden``."""
    from vllm_rl_compat.ops import fp32_linear

    flat = hidden.reshape(-1, hidden.shape[-1])
    logits = fp32_linear(flat, weight, bias, impl=impl)
    return logits.reshape(*hidden.shape[:-1], weight.shape[0])


def _logits_processor_class() -> type:
    """Build the subclass lazily: vLLM must not be imported at module import."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.platforms import current_platform

    class FP32HeadLogitsProcessor(LogitsProcessor):
        """``LogitsProcessor`` whose head projection returns exact fp32 logits."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            cfg = current_rl_config()
            self.rl_mode = cfg.fp32_head
            self.rl_impl = None
            self.rl_apply_head_calls = 0  # read by the start-up probe
            if self.rl_mode != "off":
                self.rl_impl = select_impl(current_platform.device_type, cfg.fp32_head_impl,
                                           self.rl_mode)
                model_config = _model_config()
                if model_config is not None:
                    check_head_dtype(self.head_dtype, model_config.dtype, self.rl_mode)

        def _apply_head(self, lm_head: torch.nn.Module, hidden_states: torch.Tensor,
                        embedding_bias: torch.Tensor | None) -> torch.Tensor:
            if self.rl_mode == "off":
                return super()._apply_head(lm_head, hidden_states, embedding_bias)
            self.rl_apply_head_calls += 1
            check_head_supported(lm_head.quant_method, self.rl_mode)
            if self.rl_mode == "weights":
                _warn_if_not_fp32(lm_head)
            weight = head_weight(lm_head)
            return project_fp32(hidden_states, weight, embedding_bias, self.rl_impl)

        def extra_repr(self) -> str:
            return super().extra_repr() + f", fp32_head={self.rl_mode}, impl={self.rl_impl}"

    return FP32HeadLogitsProcessor


def _model_config() -> Any:
    from vllm.config import get_current_vllm_config

    return get_current_vllm_config().model_config


@functools.lru_cache(maxsize=None)
def _warn_weights_fallback(kind: str) -> None:
    logger.warning(
        "%s.fp32_head='weights': this model projects through its %s, which holds the "
        "model dtype; logits are fp32 computed from the model-dtype weight "
        "(as in 'compute').", CONFIG_KEY, kind)


def _warn_if_not_fp32(lm_head: torch.nn.Module) -> None:
    if head_weight(lm_head).dtype != torch.float32:
        _warn_weights_fallback(type(lm_head).__name__)


# ---------------------------------------------------------------- fp32 weights


def _fp32_parameter(old: torch.nn.Parameter) -> torch.nn.Parameter:
    """An fp32 parameter with ``old``'s shape, device and loader attributes."""
    new = torch.nn.Parameter(torch.empty_like(old, dtype=torch.float32), requires_grad=False)
    for key, value in vars(old).items():
        setattr(new, key, value)
    return new


def make_head_fp32(head: torch.nn.Module) -> None:
    """Hold ``head.weight`` (and ``head.bias``) in fp32 before weights load."""
    head.weight = _fp32_parameter(head.weight)
    if getattr(head, "bias", None) is not None:
        head.bias = _fp32_parameter(head.bias)


def _load_shadow(head: torch.nn.Module, loaded_weight: torch.Tensor) -> None:
    """Copy the unrounded checkpoint tensor into the head's fp32 shadow (TP-sharded)."""
    shadow = head.__dict__[SHADOW_ATTR]
    head.weight_loader(shadow, loaded_weight)


def tie_fp32_shadow(head: torch.nn.Module, embed: torch.nn.Module,
                    fp32_param: torch.nn.Parameter) -> None:
    """Keep ``fp32_param`` as the head's fp32 shadow, filled on every embedding load.

    The embedding parameter's ``weight_loader`` is wrapped: it loads the
    embedding as before (rounded to the model dtype), then the same tensor into
    the shadow without rounding. vLLM's layerwise reload keeps a parameter's
    loader and calls it, so the shadow follows reloads too.
    """
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    head.__dict__[SHADOW_ATTR] = fp32_param
    embed_param = embed.weight
    base: Callable[..., Any] = getattr(embed_param, "weight_loader", default_weight_loader)
    if getattr(base, "_rl_compat_head", None) is not None:
        return
    embed_param.weight_loader = _shadow_filling_loader(base, head)


def staged_shadow_loader(loader: Callable[..., Any], head: torch.nn.Module
                         ) -> Callable[..., Any]:
    """``loader`` (from ``tie_fp32_shadow``) re-targeted at another head: overlapped
    staging (``weights.staging``) fills a staged head's shadow, not the live one."""
    return _shadow_filling_loader(loader._rl_compat_base, head)  # type: ignore[attr-defined]


def _shadow_filling_loader(base: Callable[..., Any], head: torch.nn.Module
                           ) -> Callable[..., Any]:
    # The first argument must be called ``param``: vLLM's layerwise reload
    # binds loader calls by signature and swaps ``arguments["param"]`` for the
    # materialised tensor when it replays them.
    def weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, *args: Any,
                      **kwargs: Any) -> Any:
        result = base(param, loaded_weight, *args, **kwargs)
        if not loaded_weight.is_meta:
            _load_shadow(head, loaded_weight)
        return result

    weight_loader._rl_compat_base = base  # type: ignore[attr-defined]
    weight_loader._rl_compat_head = head  # type: ignore[attr-defined]
    return weight_loader


def refresh_head(model: torch.nn.Module) -> None:
    """Bring the head's derived state in line with the model's current weights.

    Call after every weight update (idempotent). The only derived state is the
    fp32 shadow of a tied head in ``weights`` mode; it is normally filled by the
    embedding's loader. If the embedding changed some other way (its values no
    longer equal the shadow rounded to the model dtype), the shadow is rebuilt
    from the embedding -- consistent but rounded -- and a warning says so.
    Cost when nothing changed: one read-only comparison of the head.
    """
    for module in model.modules():
        shadow = module.__dict__.get(SHADOW_ATTR)
        if shadow is None:
            continue
        embed = module.weight
        with torch.no_grad():
            if torch.equal(shadow.to(embed.dtype), embed):
                continue
            shadow.copy_(embed)
        logger.warning(
            "%s.fp32_head='weights': the tied embedding changed without its weight "
            "loader; the fp32 head was rebuilt from the %s embedding (rounded).",
            CONFIG_KEY, embed.dtype)


# ---------------------------------------------------------------- patches


def _on_head_created(head: torch.nn.Module) -> None:
    """``ParallelLMHead.__init__`` epilogue: start-up checks and fp32 weights."""
    cfg = current_rl_config()
    if cfg.fp32_head == "off":
        return
    check_head_supported(head.quant_method, cfg.fp32_head, getattr(head, "prefix", "lm_head"))
    if cfg.fp32_head == "weights" and head.weight.dtype != torch.float32:
        make_head_fp32(head)
        head.__dict__["_rl_compat_own_fp32"] = True


def _wrap_head_init(original: Callable[..., Any]) -> Callable[..., Any]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _on_head_created(self)
    return __init__


def _wrap_tie_weights(original: Callable[..., Any]) -> Callable[..., Any]:
    def tie_weights(self: Any, embed_tokens: torch.nn.Module) -> Any:
        own = self.weight if self.__dict__.get("_rl_compat_own_fp32") else None
        result = original(self, embed_tokens)
        if own is not None and self.weight is not own:
            tie_fp32_shadow(self, embed_tokens, own)
        return result
    return tie_weights


def probe_head(model: torch.nn.Module, model_dtype: torch.dtype, hidden_size: int) -> None:
    """Start-up proof that the logits path really runs the fp32 head.

    Two hidden states through ``model.compute_logits`` (vLLM's own entry to
    the logits path): our ``_apply_head`` must have been called, and the
    logits must be fp32 and not all model-dtype values. Raises
    ``RuntimeError`` otherwise, so a vLLM that stopped calling the hook fails
    start-up instead of serving rounded logits. TP ranks that get no logits
    (gathered to rank 0) check only the call.
    """
    processors = [m for m in model.modules() if hasattr(m, "rl_apply_head_calls")]
    if not processors or not hasattr(model, "compute_logits"):
        raise RuntimeError(f"{CONFIG_KEY}.fp32_head: {type(model).__name__} has no fp32 "
                           f"LogitsProcessor; the fp32 head is not in its logits path")
    if all(p.rl_mode == "off" for p in processors):
        return
    before = sum(p.rl_apply_head_calls for p in processors)
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(2, hidden_size, generator=gen).to(device=device, dtype=model_dtype)
    with torch.no_grad():
        logits = model.compute_logits(hidden)
    if sum(p.rl_apply_head_calls for p in processors) == before:
        raise RuntimeError(f"{CONFIG_KEY}.fp32_head: {type(model).__name__}.compute_logits "
                           f"did not call the fp32 head (vLLM's logits path changed)")
    if logits is not None and logits.dtype != torch.float32:
        raise RuntimeError(f"{CONFIG_KEY}.fp32_head: the logits path returned "
                           f"{logits.dtype} logits, not fp32")
    # A 16-bit model's bypassed head gives fp32 logits that hold only 16-bit
    # values. An fp32 model's logits always pass that test (rounding to fp32
    # is the identity): for it the call and the fp32 dtype are the proof.
    if logits is not None and model_dtype != torch.float32 and torch.equal(
            logits, logits.to(model_dtype).to(torch.float32)):
        raise RuntimeError(f"{CONFIG_KEY}.fp32_head: the logits path returned "
                           f"{logits.dtype} logits rounded to {model_dtype}, not fp32")
    if model_dtype == torch.float32:
        logger.info("%s.fp32_head: fp32 model; start-up probe checked that the logits "
                    "path calls the fp32 head and returns fp32 logits (the rounding "
                    "check applies to 16-bit models only)", CONFIG_KEY)
    if device.type == "cuda":
        _precompile(model, model_dtype, {p.rl_impl for p in processors})


def _precompile(model: torch.nn.Module, model_dtype: torch.dtype, impls: set[Any]) -> None:
    """CUDA: compile every Triton launch the head can need now, not mid-serving."""
    from vllm_rl_compat.ops.fp32_linear import cuda_auto_route
    from vllm_rl_compat.ops.fp32_linear_triton import precompile

    head = getattr(model, "lm_head", None)
    if head is None or not hasattr(head, "weight"):
        return
    weight = head_weight(head)
    if "triton" in impls or ("auto" in impls
                             and cuda_auto_route(model_dtype, weight.dtype) == "triton"):
        precompile(weight.device, model_dtype, weight.dtype, weight.shape[1], weight.shape[0],
                   has_bias=False)


def _wrap_load_model(original: Callable[..., Any]) -> Callable[..., Any]:
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        config = self.vllm_config
        if rl_config_from_additional(config.additional_config).fp32_head != "off":
            from vllm.config import set_current_vllm_config

            with set_current_vllm_config(config):
                probe_head(self.model_runner.get_model(), config.model_config.dtype,
                           config.model_config.get_hidden_size())
        return result
    return load_model


def _patch_worker(module: Any) -> None:
    from vllm_rl_compat.patching import patch_method

    patch_method(module.Worker, "load_model", _wrap_load_model)


def _patch_parallel_lm_head() -> None:
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    from vllm_rl_compat.patching import patch_method

    patch_method(ParallelLMHead, "__init__", _wrap_head_init)
    patch_method(ParallelLMHead, "tie_weights", _wrap_tie_weights)


def head_dtype_hook(args: "EngineArgs", cfg: RLCompatConfig) -> str | None:
    """Front-end check of ``hf_overrides["head_dtype"]`` against ``fp32_head``.

    ``float32`` is served by this module (vLLM's native path is not used);
    another explicit value with an fp32 mode is a start-up error.
    """
    overrides = args.hf_overrides if isinstance(args.hf_overrides, dict) else {}
    requested = overrides.get("head_dtype")
    item = f"fp32_head={cfg.fp32_head!r}"
    if requested is None:
        return item
    if cfg.fp32_head == "off":
        return item + f" (vLLM head_dtype={requested!r})"
    if str(requested).lower().replace("torch.", "") not in ("float32", "float"):
        raise ValueError(
            f"hf_overrides head_dtype={requested!r} conflicts with {CONFIG_KEY}.fp32_head="
            f"{cfg.fp32_head!r}, which gives fp32 logits; drop head_dtype or set "
            f"{CONFIG_KEY}.fp32_head='off'.")
    return item + " (serves head_dtype='float32')"


def install() -> None:
    """Register the fp32 head in this process (idempotent)."""
    from vllm_rl_compat.contract import require
    from vllm_rl_compat.patching import when_imported

    # The override below is only reached while vLLM calls ``_apply_head`` from
    # every logits path: checked here (by source), probed at load (by a call).
    require("LogitsProcessor._apply_head")
    (op_registry_oot,) = require("op_registry_oot")
    if "LogitsProcessor" not in op_registry_oot:  # vLLM's registry is the idempotency check
        from vllm.model_executor.layers.logits_processor import LogitsProcessor

        LogitsProcessor.register_oot(_logits_processor_class())
    _patch_parallel_lm_head()
    when_imported("vllm.v1.worker.gpu_worker", _patch_worker)
