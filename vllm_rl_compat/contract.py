"""Every vLLM internal this package depends on, checked in one place.

Why: RL mode hangs on names vLLM does not promise to keep (``_apply_head``,
``EngineCore._attach_weight_version``, the layerwise-reload internals...).
If a release renames one, RL mode must not quietly serve model-dtype logits
or stale weights: it must fail start-up naming the symbol. Each entry says
what we do with the symbol and why; ``patching.patch_method`` refuses to wrap
a vLLM attribute that is not listed, use sites of the others call ``require``,
and ``check_all`` / ``check_source_tree`` (``vllm-rl-compat contract``) check
the whole list against the installed vLLM or against the sources of another
release (e.g. an unpacked CUDA wheel, read without a GPU).

``use``: ``wrap`` (``patching.patch_method``), ``override`` (a method our
subclass replaces, so vLLM must still call it: ``called_by``), ``subclass``,
``call``, ``import`` (a private module-level name). ``optional`` entries have a
fallback (the fast CPU weight apply falls back to vLLM's layerwise reload).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

PATCH_MARK = "__rl_compat_original__"  # set by ``patching.patch_method`` on its wrappers
# Releases checked: ``check_all`` and a read of what each entry does. vLLM
# 0.33.0's sources pass ``check_source_tree`` too, but a read found semantic
# changes (README, "vLLM 0.33"), so it is not listed.
CHECKED_ON = ("0.32.0",)


class VLLMContractError(RuntimeError):
    """A vLLM symbol RL mode depends on is missing or changed."""


@dataclass(frozen=True)
class Entry:
    target: str  # "module:Qual.name"
    use: str
    why: str
    params: tuple[str, ...] | None = None  # leading parameter names, ``self`` included
    called_by: tuple[str, ...] = ()  # methods of the same class that must call it
    optional: bool = False

    @property
    def module(self) -> str:
        return self.target.split(":")[0]

    @property
    def qualname(self) -> str:
        return self.target.split(":")[1]


_LP = "vllm.model_executor.layers.logits_processor:LogitsProcessor"
_HEAD = "vllm.model_executor.layers.vocab_parallel_embedding:ParallelLMHead"
_RELOAD = "vllm.model_executor.model_loader.reload"
_WT = "vllm.distributed.weight_transfer"
_WORKER = "vllm.v1.worker.gpu_worker:Worker"
_RUNNER = "vllm.v1.worker.cpu_model_runner:CPUModelRunner"
_RL_API = ("init_weight_transfer_engine", "start_weight_update", "update_weights",
           "finish_weight_update", "shutdown_weight_transfer_engine")

ENTRIES: tuple[Entry, ...] = (
    # engine settings
    Entry("vllm.engine.arg_utils:EngineArgs.create_engine_config", "wrap",
          "enforce RL settings before vLLM builds its config", ("self", "usage_context")),
    Entry("vllm.utils.import_utils:resolve_obj_by_qualname", "call",
          "check a user's worker_extension_cls"),
    # fp32 head
    Entry(f"{_LP}._apply_head", "override",
          "the fp32 head replaces the one projection all logits paths use",
          ("self", "lm_head", "hidden_states", "embedding_bias"),
          called_by=("_get_logits", "get_top_tokens", "get_top_k_tokens")),
    Entry("vllm.model_executor.custom_op:op_registry_oot", "import",
          "the fp32 LogitsProcessor is registered out of tree once"),
    Entry(f"{_HEAD}.__init__", "wrap", "start-up checks; fp32 head weights in 'weights' mode"),
    Entry(f"{_HEAD}.tie_weights", "wrap", "a tied head's fp32 shadow",
          ("self", "embed_tokens")),
    Entry(f"{_WORKER}.load_model", "wrap",
          "the start-up probe: the head really returns fp32 logits"),
    # seeded sampling on CPU
    Entry(f"{_RUNNER}._sample", "wrap", "keep CPU generators out of vLLM's offset bookkeeping"),
    Entry(f"{_RUNNER}._bookkeeping_sync", "wrap",
          "keep CPU generators out of vLLM's offset bookkeeping"),
    # weight updates
    *(Entry(f"vllm.entrypoints.llm:LLM.{n}", "wrap", "route LLM's RL API through the transaction")
      for n in _RL_API),
    *(Entry(f"vllm.v1.engine.async_llm:AsyncLLM.{n}", "wrap",
            "route AsyncLLM's RL API through the transaction") for n in _RL_API),
    *(Entry(f"{_WORKER}.{n}", "call", "the worker extension drives vLLM's own worker steps")
      for n in _RL_API),
    *(Entry(f"vllm.v1.engine.async_llm:AsyncLLM.{n}", "wrap",
            "refused while a weight update is open (HTTP 409)")
      for n in ("pause_generation", "resume_generation", "update_weight_version")),
    *(Entry(f"{_WORKER}.{n}", "wrap", "changes weights: refused in RL mode outside the "
            "transaction (which calls reload_weights itself)")
      for n in ("reload_weights", "reset_weights")),
    Entry(f"{_WORKER}.initialize_from_config", "wrap",
          "after the model loads: its load_weights refused outside the transaction"),
    Entry("vllm.v1.engine.core_client:AsyncMPClient.get_output_async", "wrap",
          "delivery barrier: a commit returns once earlier outputs reached their streams",
          ("self",)),
    Entry(f"{_WORKER}.execute_model", "wrap", "engine step times (stall of an update)",
          ("self", "scheduler_output")),
    Entry("vllm.v1.worker.cpu_worker:CPUWorker.compile_or_warm_up_model", "wrap",
          "freeze the CPU worker's GC heap after warm-up (a full collection stalls a step)",
          ("self",)),
    Entry("vllm.utils.gc_utils:freeze_gc_heap", "call", "the freeze vLLM's GPU worker does"),
    Entry("vllm.v1.engine.core:EngineCore._attach_weight_version", "wrap",
          "per-token weight version labels", ("self", "outputs")),
    Entry("vllm.v1.engine.core:EngineCoreProc._process_engine_step", "wrap",
          "commit an overlapped update at the next step boundary", ("self",)),
    Entry("vllm.v1.engine.core:EngineCoreProc.has_work", "wrap",
          "the busy loop keeps turning while a commit waits for staging", ("self",)),
    Entry("vllm.v1.engine.core:EngineCoreProc._invoke_utility_method", "call",
          "a utility returning a Future is answered when it is done (the commit)",
          ("name", "get_result", "output", "enqueue_output")),
    # versioned prefix cache
    Entry("vllm.v1.engine.core:EngineCore.add_request", "wrap",
          "salt each request with the weight version", ("self", "request")),
    Entry("vllm.v1.engine.core:EngineCore.set_weight_version", "wrap",
          "follow the label: re-salt waiting requests, label later KV",
          ("self", "weight_version")),
    Entry("vllm.v1.request:Request.update_block_hashes", "call",
          "recompute a re-salted request's block hashes"),
    # prompt-KV versions per completion
    Entry("vllm.v1.core.sched.scheduler:Scheduler.schedule", "wrap",
          "which version computes each scheduled chunk", ("self",)),
    Entry("vllm.v1.core.sched.scheduler:Scheduler._free_request", "wrap",
          "send a finished request's prompt spans in its kv_transfer_params",
          ("self", "request")),
    Entry("vllm.v1.core.block_pool:BlockPool.cache_full_blocks", "wrap",
          "which version computed each cached block",
          ("self", "request", "blocks", "num_cached_blocks", "num_full_blocks",
           "block_size")),
    Entry("vllm.v1.core.kv_cache_manager:KVCacheManager.get_block_ids", "call",
          "the blocks a new request hit"),
    Entry("vllm.v1.engine.output_processor:RequestState.make_request_output", "wrap",
          "take the prompt spans out of kv_transfer_params",
          ("self", "new_token_ids", "pooling_output", "finish_reason", "stop_reason",
           "kv_transfer_params")),
    Entry("vllm.v1.engine.output_processor:RequestState._new_completion_output", "wrap",
          "prompt spans on the finished CompletionOutput"),
    Entry("vllm.outputs:RequestOutput.add", "wrap",
          "keep the prompt spans when outputs are merged", ("self", "next_output")),
    Entry("vllm.outputs:WeightVersionSpan", "call", "prompt spans in vLLM's span type"),
    Entry(f"{_WT}.base:WeightTransferEngine", "subclass", "our transfer backends"),
    Entry(f"{_WT}.base:TrainerWeightTransferEngine", "subclass", "our trainer-side engines"),
    Entry(f"{_WT}.factory:WeightTransferEngineFactory.register_engine", "call",
          "register our backends"),
    Entry(f"{_WT}.factory:WeightTransferTrainerFactory.register_engine", "call",
          "register our trainer engines"),
    Entry(f"{_WT}.clients:HTTPVLLMWeightSyncClient", "subclass", "the token HTTP client"),
    Entry(f"{_RELOAD}.layerwise:LAYERWISE_INFO", "import", "fast CPU apply", optional=True),
    Entry(f"{_RELOAD}.types:LayerReloadingInfo.restore_metadata", "import",
          "fast CPU apply", optional=True),
    Entry(f"{_RELOAD}.meta:CopyCounter", "import", "fast CPU apply", optional=True),
    Entry(f"{_RELOAD}.sanitize:layer_ref_sentinel", "import", "fast CPU apply", optional=True),
    Entry(f"{_RELOAD}.layerwise:_get_original_loader", "import",
          "fast CPU apply: a recorded weight's loader without the wrapper the layerwise "
          "reload leaves on it", ("tensor",), optional=True),
    # check --layers (parity.capture, an opt-in diagnostic)
    Entry("vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model", "wrap",
          "check --layers: the step's scheduler output (wrapped on one runner instance)",
          ("self", "scheduler_output")),
    Entry("vllm.v1.worker.gpu_input_batch:InputBatch", "call",
          "check --layers: req_ids, num_computed_tokens_cpu, num_prompt_tokens per row"),
    # HTTP
    Entry("vllm.plugins:load_endpoint_plugins", "wrap", "mount the guarded RL routes"),
    *(Entry(f"vllm.entrypoints.rl.online.api_router:{n}", "call", "served behind the token")
      for n in ("pause_generation", "resume_generation", "is_paused",
                "update_weight_version", "weight_info")),
    Entry("vllm.entrypoints.openai.completion.serving:"
          "OpenAIServingCompletion.request_output_to_completion_response", "wrap",
          "weight_versions on completions"),
    Entry("vllm.entrypoints.openai.completion.serving:"
          "OpenAIServingCompletion.completion_stream_generator", "wrap",
          "weight_versions on streamed completions"),
    Entry("vllm.entrypoints.openai.chat_completion.serving:"
          "OpenAIServingChat.chat_completion_full_generator", "wrap",
          "weight_versions on chat completions"),
    Entry("vllm.entrypoints.openai.chat_completion.serving:"
          "OpenAIServingChat.chat_completion_stream_generator", "wrap",
          "weight_versions on streamed chat completions"),
)
_BY_QUALNAME = {e.qualname: e for e in ENTRIES}
_BY_TARGET = {e.target: e for e in ENTRIES}


def entry_for(qualname: str) -> Entry:
    """The entry for ``qualname`` (``"LogitsProcessor._apply_head"``)."""
    try:
        return _BY_QUALNAME[qualname]
    except KeyError:
        raise KeyError(f"{qualname!r} is not in vllm_rl_compat.contract.ENTRIES: list every "
                       f"vLLM internal there before depending on it") from None


def entry_for_patch(owner: Any, name: str) -> Entry | None:
    """The entry for a ``patch_method`` target; ``None`` for non-vLLM owners."""
    module = getattr(owner, "__module__", None) if isinstance(owner, type) else None
    module = module or getattr(owner, "__name__", "")
    if not module.startswith("vllm.") and module != "vllm":
        return None
    prefix = f"{getattr(owner, '__qualname__', None)}." if isinstance(owner, type) else ""
    target = f"{module}:{prefix}{name}"
    if target not in _BY_TARGET:
        raise KeyError(f"{target} is not in vllm_rl_compat.contract.ENTRIES: list every vLLM "
                       f"internal there before patching it")
    return _BY_TARGET[target]


# ------------------------------------------------------------------ runtime
def _version() -> str:
    try:
        import vllm
        return str(vllm.__version__)
    except Exception:  # a broken install is reported by the symbol's own error
        return "unknown"


def _fail(entry: Entry, problem: str) -> VLLMContractError:
    return VLLMContractError(
        f"vllm-rl-compat: vLLM {_version()} {problem}: {entry.target.replace(':', '.')} "
        f"(used for: {entry.why}; checked on vLLM {', '.join(CHECKED_ON)}). RL mode cannot "
        f"run safely with this vLLM; install a checked version or unset VLLM_RL_COMPAT.")


def _lookup(entry: Entry) -> Any:
    try:
        obj = importlib.import_module(entry.module)
    except ImportError as exc:
        raise _fail(entry, f"has no module {entry.module} ({exc})") from exc
    for part in entry.qualname.split("."):
        found = getattr(obj, part, _MISSING)
        if found is _MISSING:  # a dataclass field without default is an annotation only
            fields = getattr(obj, "__dataclass_fields__", {})
            found = fields[part] if part in fields else _MISSING
        if found is _MISSING:
            raise _fail(entry, "has no")
        obj = found
    return getattr(obj, PATCH_MARK, obj)  # check vLLM's own object, not our wrapper


_MISSING = object()


def _check_params(entry: Entry, obj: Any) -> None:
    if entry.params is None:
        return
    try:
        names = list(inspect.signature(obj).parameters)
    except (TypeError, ValueError) as exc:
        raise _fail(entry, f"cannot show the signature of ({exc})") from exc
    if names[:len(entry.params)] != list(entry.params):
        raise _fail(entry, f"changed the parameters to {names} (expected to start with "
                           f"{list(entry.params)})")


def _calls(func_node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
               and n.func.attr == name for n in ast.walk(func_node))


def _check_called_by(entry: Entry) -> None:
    if not entry.called_by:
        return
    owner_entry = Entry(entry.target.rsplit(".", 1)[0], entry.use, entry.why)
    owner = _lookup(owner_entry)
    name = entry.qualname.rsplit(".", 1)[1]
    for caller in entry.called_by:
        method = getattr(owner, caller, None)
        if method is None:
            raise _fail(entry, f"has no {caller} (which must call it) next to")
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
        except (OSError, TypeError) as exc:
            raise _fail(entry, f"hides the source of {caller} ({exc}), which must call") from exc
        if not _calls(tree, name):
            raise _fail(entry, f"no longer calls it from {caller}:")


def require(*qualnames: str) -> list[Any]:
    """Check the named entries against the running vLLM and return their objects.

    Raises ``VLLMContractError`` naming the symbol (use sites let it fail
    start-up, or fall back where the entry is ``optional``).
    """
    return [check(entry_for(q)) for q in qualnames]


def check(entry: Entry) -> Any:
    """Check one entry against the running vLLM (symbol, parameters, callers)."""
    obj = _lookup(entry)
    _check_params(entry, obj)
    _check_called_by(entry)
    return obj


def check_all() -> list[str]:
    """Every entry against the installed vLLM: the problems (empty: all hold)."""
    problems = []
    for entry in ENTRIES:
        try:
            check(entry)
        except VLLMContractError as exc:
            problems.append(str(exc))
    return problems


# ------------------------------------------------------------------ sources
class _Tree:
    """vLLM's sources under ``root`` (the folder holding ``vllm/``), parsed lazily."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._parsed: dict[str, ast.Module | None] = {}
        self._packages: set[str] = set()

    def module(self, name: str) -> ast.Module | None:
        if name not in self._parsed:
            base = self.root.joinpath(*name.split("."))
            path = next((p for p in (base.with_suffix(".py"), base / "__init__.py")
                         if p.is_file()), None)
            if path is not None and path.name == "__init__.py":
                self._packages.add(name)
            self._parsed[name] = ast.parse(path.read_text()) if path else None
        return self._parsed[name]

    def find(self, module: str, name: str, depth: int = 0) -> ast.AST | None:
        """A top-level definition of ``name`` in ``module``, following re-exports."""
        tree = self.module(module)
        if tree is None or depth > 4:
            return None
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and node.name == name:
                return node
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return node
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
                return node
        source = self._imported_from(tree, module, name)
        return self.find(source, name, depth + 1) if source else None

    def _imported_from(self, tree: ast.Module, module: str, name: str) -> str | None:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and any(
                    (a.asname or a.name) == name for a in node.names):
                if node.level == 0:
                    return node.module
                # ``.x`` counts from the module's package (a package is its own)
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if module in self._packages else 0)
                base = parts[:keep]
                return ".".join(base + ([node.module] if node.module else []))
        return None

    def member(self, module: str, cls: ast.ClassDef, name: str, depth: int = 0) -> ast.AST | None:
        """``name`` defined in ``cls`` or one of its bases (followed across modules)."""
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return node
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
                return node
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return node
        if depth > 6:
            return None
        tree = self.module(module)
        for base in cls.bases:
            base_name = base.id if isinstance(base, ast.Name) else None
            if base_name is None:
                continue
            base_module = self._imported_from(tree, module, base_name) or module
            found = self.find(base_module, base_name)
            if isinstance(found, ast.ClassDef):
                hit = self.member(base_module, found, name, depth + 1)
                if hit is not None:
                    return hit
        return None


def _source_problem(tree: _Tree, entry: Entry) -> str | None:
    if tree.module(entry.module) is None:
        return f"no module {entry.module}"
    head, *rest = entry.qualname.split(".")
    node = tree.find(entry.module, head)
    if node is None:
        return "not defined"
    if rest:
        if not isinstance(node, ast.ClassDef):
            return f"{head} is not a class"
        cls, node = node, tree.member(entry.module, node, rest[0])
        if node is None:
            return "not defined"
        for caller in entry.called_by:
            caller_node = tree.member(entry.module, cls, caller)
            if caller_node is None or not _calls(caller_node, rest[0]):
                return f"not called from {caller}"
    if entry.params is not None and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        names = [a.arg for a in (*node.args.posonlyargs, *node.args.args,
                                 *node.args.kwonlyargs)]
        if names[:len(entry.params)] != list(entry.params):
            return f"parameters are {names}, expected to start with {list(entry.params)}"
    return None


def check_source_tree(root: str | Path) -> list[str]:
    """Every entry against the sources under ``root``: the problems, one line each."""
    tree = _Tree(Path(root))
    if tree.module("vllm") is None:
        raise FileNotFoundError(f"{root} holds no vllm/__init__.py")
    return [f"{e.target}: {p}" for e in ENTRIES if (p := _source_problem(tree, e))]


def wrapped_now() -> list[str]:
    """The ``wrap`` entries currently wrapped in this process (their modules
    already imported; nothing is imported here). Empty with RL mode off."""
    import sys

    wrapped = []
    for entry in ENTRIES:
        obj = sys.modules.get(entry.module) if entry.use == "wrap" else None
        for part in entry.qualname.split(".") if obj is not None else ():
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, PATCH_MARK):
            wrapped.append(entry.target)
    return wrapped


def describe(entries: Iterable[Entry] = ENTRIES) -> list[str]:
    """One line per entry, for ``vllm-rl-compat contract --list``."""
    return [f"{e.use:8} {e.target}{' (optional)' if e.optional else ''}: {e.why}"
            for e in entries]
