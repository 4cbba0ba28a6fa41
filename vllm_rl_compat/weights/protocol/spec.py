"""What a weight update must contain, and the checks that run before anything changes.

Runs in any process (front end and workers); holds no engine state.

An update must contain exactly the tensor names of the model's own checkpoint
(the safetensors files vLLM loaded the model from, read at start-up), with the
checkpoint's shapes (full, unsharded: each tensor-parallel rank shards it like
at load time). The dtype must be the dtype of the engine parameter the tensor
loads into (found through the model's ``hf_to_vllm_mapper`` and
``packed_modules_mapping``; the model dtype when no parameter matches), or the
dtype the checkpoint itself holds: an fp32 checkpoint served in bf16 (the usual
trainer output) is accepted and rounded by the parameter's own weight loader,
exactly as vLLM's initial load rounds it. Nothing else is cast, so an fp32 head
parameter gets the trainer's fp32 values unrounded. Partial updates are refused:
vLLM's layerwise reload would build a layer that got only some of its tensors
from uninitialised memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

# Error listing: at most this many entries per kind of problem.
_MAX_LISTED = 8


class WeightUpdateError(RuntimeError):
    """An update was rejected or failed before anything was applied.

    The model is unchanged and the engine has resumed serving.
    """


class WeightSyncCorruptedError(RuntimeError):
    """Applying a validated update failed part-way: the model is undefined.

    This should not happen (everything that can be checked is checked before
    the first parameter changes); if it does, restart the engine or apply a
    complete update that succeeds.
    """


@dataclass
class WeightSpec:
    """What an update must contain: checkpoint name -> (shape, dtype)."""

    entries: dict[str, tuple[tuple[int, ...], Any]]
    # checkpoint name -> parameter name, for parameters whose dtype is not the
    # model dtype (re-copied exactly after the reload; see weights.worker.extension).
    exact_names: dict[str, str] = field(default_factory=dict)
    tied_embeddings: bool = False
    # checkpoint name -> the dtype the start-up checkpoint holds, where it
    # differs from the parameter's (accepted too, rounded by the loader).
    checkpoint_dtypes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"entries": {n: (list(s), _dtype_name(d)) for n, (s, d) in self.entries.items()},
                "exact_names": dict(self.exact_names), "tied": self.tied_embeddings,
                "checkpoint_dtypes": {n: _dtype_name(d)
                                      for n, d in self.checkpoint_dtypes.items()}}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "WeightSpec":
        import torch

        return cls({n: (tuple(s), getattr(torch, d)) for n, (s, d) in raw["entries"].items()},
                   dict(raw["exact_names"]), bool(raw["tied"]),
                   {n: getattr(torch, d) for n, d in raw.get("checkpoint_dtypes", {}).items()})

    @property
    def total_bytes(self) -> int:
        return sum(_numel(s) * d.itemsize for s, d in self.entries.values())

    @property
    def largest_bytes(self) -> int:
        """The largest single tensor of an update (never read off the live model:
        on CPU vLLM empties the weight of every linear it packs)."""
        return max((_numel(s) * d.itemsize for s, d in self.entries.values()), default=0)

    def _dtype_ok(self, name: str, dtype: Any) -> bool:
        return dtype == self.entries[name][1] or dtype == self.checkpoint_dtypes.get(name)

    def validate(self, items: Iterable[tuple[str, Any, Any]], *, complete: bool = True,
                 seen: set[str] | None = None) -> None:
        """Check ``(name, shape, dtype)`` triples; raise naming every problem.

        ``complete=False`` checks one chunk of an update sent in several
        (names in ``seen`` were in earlier chunks); ``complete=True`` also
        requires every name of the spec.
        """
        seen = set() if seen is None else seen
        dup, unknown, shape_bad, dtype_bad = [], [], [], []
        for name, shape, dtype in items:
            if name in seen:
                dup.append(name)
                continue
            seen.add(name)
            want = self.entries.get(name)
            if want is None:
                unknown.append(name)
                continue
            if tuple(shape) != tuple(want[0]):
                shape_bad.append(f"{name}: got shape {list(shape)}, expected {list(want[0])}")
            if not self._dtype_ok(name, dtype):
                dtype_bad.append(f"{name}: got dtype {_dtype_name(dtype)}, expected "
                                 f"{self._dtypes_text(name)} (cast it before sending; "
                                 f"nothing else is converted)")
        missing = [n for n in self.entries if n not in seen] if complete else []
        self._raise_problems(unknown, missing, dup, shape_bad, dtype_bad)

    def _dtypes_text(self, name: str) -> str:
        text = _dtype_name(self.entries[name][1])
        if name in self.checkpoint_dtypes:
            text += f" or {_dtype_name(self.checkpoint_dtypes[name])} (the checkpoint's)"
        return text

    def _raise_problems(self, unknown: list[str], missing: list[str], dup: list[str],
                        shape_bad: list[str], dtype_bad: list[str]) -> None:
        problems = []
        for title, names in (("unknown names", unknown), ("missing names", missing),
                             ("duplicate names", dup), ("wrong shapes", shape_bad),
                             ("wrong dtypes", dtype_bad)):
            if names:
                listed = "; ".join(names[:_MAX_LISTED])
                more = f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
                problems.append(f"{len(names)} {title}: {listed}{more}")
        if any(n.startswith("lm_head.") for n in unknown) and self.tied_embeddings:
            problems.append("hint: this model ties lm_head to the input embedding; "
                            "send only the embedding (drop lm_head.*)")
        if problems:
            raise WeightUpdateError("weight update rejected, model unchanged: "
                                    + " | ".join(problems))

def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32",
                       "F64": "float64", "I8": "int8", "U8": "uint8", "I16": "int16",
                       "I32": "int32", "I64": "int64", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """A ``.safetensors`` file, or every one in a folder (the index's when present)."""
    import json

    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise WeightUpdateError(f"weights path {str(p)!r} is neither a file nor a folder")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [p / n for n in names]
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise WeightUpdateError(f"no .safetensors files in {str(p)!r}")
    return files


def safetensors_header_spec(path: str | os.PathLike
                            ) -> tuple[list[str], list[tuple[str, tuple[int, ...], Any]]]:
    """Files and ``(name, shape, dtype)`` of every tensor, from headers only.

    Read with Python's own I/O, which releases the GIL while it waits: a file
    whose bytes do not come (a stalled network mount, a pipe) then blocks only
    the staging thread, never the worker's engine thread (safetensors' reader
    holds the GIL in its ``open``)."""
    files = safetensors_files(path)
    entries = []
    for file in files:
        try:
            entries.extend(_header_entries(file))
        except WeightUpdateError:
            raise
        except Exception as exc:  # corrupt header, short file, ...
            raise WeightUpdateError(f"cannot read safetensors file {str(file)!r}: {exc}") from exc
    return [str(f) for f in files], entries


_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def _header_entries(file: Path) -> list[tuple[str, tuple[int, ...], Any]]:
    import json

    import torch

    with open(file, "rb") as f:
        size = f.read(8)
        if len(size) != 8:
            raise ValueError("shorter than a safetensors header")
        length = int.from_bytes(size, "little")
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"header length {length} is over {_MAX_HEADER_BYTES} bytes")
        raw = f.read(length)
    if len(raw) != length:
        raise ValueError(f"header cut short ({len(raw)} of {length} bytes)")
    header = json.loads(raw)
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        kind = info["dtype"]
        dtype = getattr(torch, _SAFETENSORS_DTYPES.get(kind, kind.lower()), kind)
        out.append((name, tuple(int(d) for d in info["shape"]), dtype))
    return out


def _checkpoint_dir(model_config: Any) -> Path:
    path = Path(model_config.model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_config.model, revision=model_config.revision,
                                  allow_patterns=["*.safetensors", "*.json"],
                                  local_files_only=True))


def model_weight_spec(vllm_config: Any, model: Any) -> WeightSpec:
    """The update spec of a loaded model (worker side, once per worker).

    Names and shapes: the model's original safetensors checkpoint (what vLLM's
    loader accepted at start-up). Dtypes: the parameter each name loads into,
    and the checkpoint's own where it differs.
    """
    model_config = vllm_config.model_config
    if model_config.quantization is not None:
        raise WeightUpdateError(
            f"weight updates of quantized models ({model_config.quantization}) are not "
            f"supported: the checkpoint format differs from the trainer's tensors")
    _, header = safetensors_header_spec(_checkpoint_dir(model_config))
    params = dict(model.named_parameters())
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    model_dtype = model_config.dtype
    entries, exact, stored = {}, {}, {}
    for name, shape, file_dtype in header:
        param_name = _resolve_param(name, params, mapper, packed)
        dtype = model_dtype
        if param_name is not None and params[param_name].dtype.is_floating_point:
            dtype = params[param_name].dtype
            if dtype != model_dtype:
                exact[name] = param_name
        entries[name] = (shape, dtype)
        if file_dtype != dtype and getattr(file_dtype, "is_floating_point", False):
            stored[name] = file_dtype
    tied = bool(getattr(model_config.hf_text_config, "tie_word_embeddings", False))
    return WeightSpec(entries, exact, tied, stored)


def _resolve_param(name: str, params: Mapping[str, Any], mapper: Any,
                   packed: Mapping[str, list[str]]) -> str | None:
    """The vLLM parameter a checkpoint tensor loads into, if it can be named."""
    candidates = [name]
    if mapper is not None:
        mapped = mapper._map_name(name) if hasattr(mapper, "_map_name") else None
        if mapped:
            candidates.insert(0, mapped)
    for cand in list(candidates):
        for fused, parts in packed.items():
            for part in parts:
                if f".{part}." in cand:
                    candidates.append(cand.replace(f".{part}.", f".{fused}."))
    return next((c for c in candidates if c in params), None)


def as_named_tensors(weights: Any) -> list[tuple[str, Any]]:
    """``Mapping[str, Tensor]`` or iterable of ``(name, tensor)`` -> list of pairs."""
    import torch

    pairs = list(weights.items() if isinstance(weights, Mapping) else weights)
    bad = [repr(n) for n, t in pairs if not isinstance(n, str) or not isinstance(t, torch.Tensor)]
    if bad:
        raise WeightUpdateError(f"weights must map str names to torch.Tensor; bad entries: "
                                f"{', '.join(bad[:_MAX_LISTED])}")
    return pairs
