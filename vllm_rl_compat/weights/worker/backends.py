"""Our transports as vLLM weight-transfer engines (worker side, worker process).

Registered with ``WeightTransferEngineFactory`` under three names, one per
way the bytes arrive; each engine accepts every source in ``update_info``
(``{"source": "gloo"}``, ``{"source": "files", "path": ...}``), the name only
picks the default, so ``WeightSync`` works whichever is configured:

* ``rl_compat_gloo``: a broadcast from the trainer over a private gloo group
  (CPU engines, and across hosts); joined by ``init_weight_transfer_engine``
  with the group's secret (``weights.broadcast``);
* ``rl_compat_tensors``: same-host tensors, written by the sender to a
  safetensors file in shared memory (``weights.shm``);
* ``rl_compat_files``: a safetensors file or folder.

Unlike vLLM's engines, these never touch a parameter while receiving: every
chunk is validated against the model's spec (``weights.spec``) and read into
staging (files too: the bytes validated are the bytes applied). Two ways:

* in the pause (``take_staged``): the chunk is received inside the RPC; the
  worker extension (``weights.worker``) applies it at the finish step;
* overlapped (``begin_overlapped``): the RPC hands the chunk to a staging
  thread and returns, so the engine keeps stepping while it is received,
  validated and loaded into a shadow of the model (``weights.staging``);
  ``poll`` reports progress and errors, ``check_complete`` prepares the
  packed state, and the finish step only swaps (``take_stage``). Opt-in
  (``VLLM_RL_COMPAT_COPY_PLAN=1``): the first overlapped update of a worker
  records how vLLM's loader writes the shadow, later ones replay that record
  (``weights.copy_plan``).

Every method that changes state refuses calls that do not come from the front
end's transaction (``authorized``), so dev mode's ``/collective_rpc`` cannot
drive them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from vllm_rl_compat.weights.protocol.registry import BACKENDS

logger = logging.getLogger("vllm.rl_compat")

SOURCES = ("gloo", "files")
CANCEL_WAIT_S = 2.0  # how long an abort waits for the staging thread's next check


@dataclass
class RLCompatInitInfo(WeightTransferInitInfo):
    """Worker-side init: where the trainer's broadcast group is (gloo only)."""

    master_address: str = ""
    master_port: int = 0
    # trainer + every worker of every data-parallel engine:
    # 1 + data_parallel_size * tensor_parallel_size * pipeline_parallel_size
    world_size: int = 0
    rank_offset: int = 1  # group rank of the first engine's first worker
    secret: str = field(default="", repr=False)  # never printed
    timeout: float = 60.0


@dataclass
class RLCompatUpdateInfo(WeightTransferUpdateInfo):
    """One chunk: where its bytes come from."""

    source: str = ""
    path: str = ""


def worker_group_rank(parallel_config: Any, rank_offset: int) -> int:
    """This worker's rank in the trainer's broadcast group (``group_rank``).

    Every engine's worker ``r`` of data-parallel engine ``i`` gets
    ``rank_offset + i * world_size + r`` (vLLM's own NCCL weight transfer uses
    the same numbering; ``engine_layout`` for ``external_launcher``).
    """
    from vllm_rl_compat.weights.protocol.broadcast import engine_layout, group_rank

    pc = parallel_config
    dp_index, _ = engine_layout(pc)
    return group_rank(rank_offset, dp_index, pc.world_size, pc.rank)


@dataclass
class _Overlap:
    """One overlapped update: its shadow and what each chunk delivered."""

    stage: Any = None  # weights.staging.StagedWeights, built by the staging thread
    entries: list[tuple[str, tuple[int, ...], Any]] = field(default_factory=list)
    plan: Any = None  # weights.copy_plan.CopyPlan: replay it
    recorder: Any = None  # weights.copy_plan.PlanRecorder: load and record
    misfits: int = 0  # tensors the plan did not fit (loaded by vLLM)
    prepared: bool = False  # complete, validated and prepared: ready to swap
    keep: bool = False  # keep the stage after the swap for the next update
    load_seconds: float = 0.0  # staging thread time loading the shadow (all chunks)
    cancelled: bool = False  # aborted: its work stops at the next check

    def check(self) -> None:
        """Staging thread, between tensors: stop the work of an aborted update."""
        if self.cancelled:
            from vllm_rl_compat.weights.worker.staging import Cancelled

            raise Cancelled("this weight update was aborted; its staging stopped")

    @property
    def via(self) -> str:
        """How the shadow is loaded: ``plan``, ``recording`` or ``load_weights``."""
        return "plan" if self.plan else "recording" if self.recorder else "load_weights"

    def load(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Staging thread: load one chunk into the shadow, the plan's way
        (timed: reading or receiving the bytes included)."""
        items = self.track(items)
        start = time.perf_counter()
        try:
            if self.plan is not None:
                self.misfits += self.stage.replay(self.plan, items)
            elif self.recorder is not None:
                with self.recorder:
                    self.stage.load(self.recorder.track(items))
            else:
                self.stage.load(items)
        finally:
            self.load_seconds += time.perf_counter() - start

    def seen(self) -> set[str]:
        return {name for name, _, _ in self.entries}

    def track(self, items: Iterable[tuple[str, torch.Tensor]]
              ) -> Iterator[tuple[str, torch.Tensor]]:
        """``items``, each recorded as it passes (for the completeness check)."""
        for name, tensor in items:
            self.check()
            self.entries.append((name, tuple(tensor.shape), tensor.dtype))
            yield name, tensor


class RLCompatWeightTransferEngine(
        WeightTransferEngine[RLCompatInitInfo, RLCompatUpdateInfo]):
    """Receive and validate into staging; the worker extension applies it."""

    init_info_cls = RLCompatInitInfo
    update_info_cls = RLCompatUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config: Any, vllm_config: Any, device: torch.device,
                 model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.default_source = BACKENDS.get(config.backend, "gloo")
        self.authorized = False  # set by the worker extension for one step
        self._spec: Any = None
        self._group: Any = None
        self._staged: list[tuple[str, torch.Tensor]] = []
        self._overlap: _Overlap | None = None
        self._job: Any = None  # weights.staging.StagingJob, made on first use
        self._plan: Any = None  # CopyPlan once recorded, or why it cannot be
        self._kept: Any = None  # StagedWeights of the last swap (weight_staging_keep)
        self._keepable: bool | None = None  # this model's stage can be kept (None: unchecked)
        # every parameter is written by an update (None: unchecked; str: why not)
        self._covered: bool | str | None = None

    @property
    def spec(self) -> Any:
        if self._spec is None:
            from vllm_rl_compat.weights.protocol.spec import model_weight_spec

            self._spec = model_weight_spec(self.vllm_config, self.model)
        return self._spec

    def _require_authorized(self, call: str) -> None:
        if not self.authorized:
            raise PermissionError(
                f"{call} refused: vllm-rl-compat weight backends only run inside a "
                f"weight-update transaction opened by the front end (LLM / AsyncLLM "
                f"/ the RL HTTP routes), not through /collective_rpc")

    # ---------------------------------------------------------- connect
    def init_transfer_engine(self, init_info: RLCompatInitInfo) -> None:
        self._require_authorized("init_weight_transfer_engine")
        self.shutdown()
        if not init_info.master_address:
            return  # files and shared memory need no connection
        from vllm_rl_compat.weights.protocol.broadcast import join_group
        from vllm_rl_compat.weights.worker.staging import off_compute_cpus

        rank = worker_group_rank(self.parallel_config, int(init_info.rank_offset))
        with off_compute_cpus():  # gloo's threads start here and inherit it
            self._group = join_group(init_info.master_address, int(init_info.master_port),
                                     rank=rank, world_size=int(init_info.world_size),
                                     timeout=float(init_info.timeout),
                                     secret=init_info.secret)

    def shutdown(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            group.close()

    # ----------------------------------------------------------- stage
    def start_weight_update(self) -> None:
        self._require_authorized("start_weight_update")
        self._staged, self._overlap = [], None  # a kept stage stays for this update

    def parse_update_info(self, update_dict: dict[str, Any]) -> RLCompatUpdateInfo:
        info = super().parse_update_info(update_dict or {})
        info.source = info.source or self.default_source
        if info.source not in SOURCES:
            raise ValueError(f"update_info.source={info.source!r} is not one of "
                             f"{', '.join(SOURCES)}")
        if info.source == "files" and not info.path:
            raise ValueError("update_info.path is required for source 'files'")
        return info

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class synchronises an accelerator, which a CPU engine lacks.
        self.receive_weights(self.parse_update_info(update_info))

    def begin_overlapped(self, model: torch.nn.Module, plan: Any, explicit: bool,
                         max_gib: float, copy_plan: bool = False,
                         keep: bool = False) -> dict[str, Any]:
        """Stage this update beside the live weights (``weights.staging``) if the
        model qualifies (``plan``) and the extra copy fits; else say why (or
        raise, when overlapped staging was asked for explicitly). With
        ``copy_plan`` (opt-in), the first such update records how vLLM loads
        it and later ones replay that (``weights.copy_plan``). With ``keep``,
        the stage is kept after the swap and the next update loads into it;
        without, a kept one is freed."""
        from vllm_rl_compat.weights.protocol.spec import WeightUpdateError
        from vllm_rl_compat.weights.worker import staging

        reason = None if plan is not None else (
            "it is built for unquantized models on the CPU platform (the fast CPU apply's "
            "plan, which this engine does not qualify for: see the log line 'weight "
            "updates use vLLM's layerwise reload')")
        if isinstance(self._covered, str):
            reason = self._covered
        if self._job is not None and self._job.busy():
            raise WeightUpdateError(
                "the staging thread still runs an aborted update's work (blocked in a "
                "receive or a read that has not returned: a stalled sender, whose bytes it "
                "would otherwise consume); model unchanged; retry once it has stopped "
                "(rl_compat_staging reports busy=False), or reconnect the trainer")
        if not keep:
            self._kept = None
        if reason is None:
            held = self._kept.held_bytes() if self._kept is not None else 0
            needed = max(0, self.spec.total_bytes - held)
            try:
                staging.check_fits(staging.staging_bytes(needed, self.spec.largest_bytes),
                                   max_gib)
            except staging.StagingMemoryError as exc:
                reason = str(exc)
        if reason is not None:
            if explicit:
                raise WeightUpdateError(f"weight_staging='overlapped' refused: {reason}")
            logger.info("this weight update is staged in the pause: %s", reason)
            return {"overlapped": False, "why": reason}
        if self._job is None:
            self._job = staging.StagingJob()
        overlap = self._overlap = _Overlap(keep=keep)
        # The shadow is built by the staging thread too (10-30 ms of Python and
        # allocation here, which the next step would otherwise wait for).
        self._job.submit(lambda: self._build(overlap, model, plan, copy_plan))
        return {"overlapped": True}

    def _build(self, overlap: _Overlap, model: torch.nn.Module, plan: Any,
               copy_plan: bool) -> None:
        """Staging thread: the shadow, and whether its chunks record or replay."""
        from vllm_rl_compat.weights.worker import staging
        from vllm_rl_compat.weights.worker.copy_plan import CopyPlan, PlanRecorder

        overlap.check()
        stage, self._kept = self._kept, None
        if stage is not None:
            stage.reuse()
        else:
            stage = staging.build(model, plan)
            if self._covered is None:
                stage.poison()  # checked once, at the first complete update
        overlap.stage = stage
        if not copy_plan or isinstance(self._plan, str):
            return
        if isinstance(self._plan, CopyPlan) and self._plan.matches(stage.slots):
            overlap.plan = self._plan
        else:
            overlap.recorder = PlanRecorder(stage.slots, set(stage.fillings))

    def staging_state(self) -> dict[str, bool]:
        """``held``: an update's shadow is allocated; ``busy``: the staging
        thread works; ``kept``: a swapped stage is kept for the next update."""
        busy = self._job is not None and self._job.busy()
        return {"held": self._overlap is not None, "busy": busy,
                "kept": self._kept is not None}

    def poll(self) -> dict[str, bool]:
        """``done``: the staging thread finished everything handed to it (raises
        its error: the transaction then aborts, the live model untouched);
        ``prepared``: and the update is complete and prepared, so the finish
        needs no ``check`` step (``_complete`` ran after the last chunk)."""
        done = self._job is None or self._job.done()
        return {"done": done, "prepared": done and self._overlap is not None
                and self._overlap.prepared}

    def receive_weights(self, update_info: RLCompatUpdateInfo) -> None:
        self._require_authorized("update_weights")
        overlap = self._overlap
        if overlap is not None:
            self._job.submit(lambda: self._stage_chunk(overlap, update_info))
            return
        seen = {name for name, _ in self._staged}
        if update_info.source == "gloo":
            items = self._receive_broadcast(seen)
        else:
            items = self._read_files(update_info.path, seen)
        self._staged.extend(items)

    def _stage_chunk(self, overlap: _Overlap, update_info: RLCompatUpdateInfo) -> None:
        """Staging thread: receive / read, validate, load into the shadow."""
        overlap.check()
        seen = overlap.seen()
        items: Iterable[tuple[str, torch.Tensor]]
        if update_info.source == "gloo":
            items = self._receive_broadcast(seen)
        else:
            items = self._stream_files(update_info.path, seen, overlap.check)
        overlap.load(items)
        if overlap.seen() >= set(self.spec.entries):  # every name: finish it now
            self._complete(overlap)

    def _receive_broadcast(self, seen: set[str]) -> list[tuple[str, torch.Tensor]]:
        if self._group is None:
            raise RuntimeError("No trainer connected: call init_weight_transfer_engine "
                               "with the trainer's address and secret first")
        from vllm_rl_compat.weights.protocol.broadcast import receive_update

        try:
            return receive_update(self._group, lambda entries: self.spec.validate(
                entries, complete=False, seen=set(seen)))
        except Exception:
            self.shutdown()  # a failed transfer leaves the group in an unknown state
            raise

    def _read_files(self, path: str, seen: set[str]) -> list[tuple[str, torch.Tensor]]:
        return list(self._stream_files(path, seen))

    def _stream_files(self, path: str, seen: set[str],
                      check: Callable[[], None] = lambda: None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
        """Validate every header first, then yield the tensors one by one
        (``check`` before each file: an aborted update reads no further)."""
        from safetensors import safe_open

        from vllm_rl_compat.weights.protocol.spec import WeightUpdateError, safetensors_header_spec

        files, entries = safetensors_header_spec(path)
        self.spec.validate(entries, complete=False, seen=set(seen))
        for file in files:
            check()
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except Exception as exc:  # truncated file, changed under us, ...
                raise WeightUpdateError(f"cannot read safetensors file {file!r}, model "
                                        f"unchanged: {exc}") from exc

    # ----------------------------------------------------------- finish
    def check_complete(self) -> None:
        """Every name of the spec staged exactly once (before anyone applies);
        overlapped: then build the packed state, in the staging thread (done
        already when the last chunk completed the update)."""
        overlap = self._overlap
        if overlap is None:
            self.spec.validate(((n, tuple(t.shape), t.dtype) for n, t in self._staged))
        elif not overlap.prepared:
            self._job.submit(lambda: self._complete(overlap))

    def _complete(self, overlap: _Overlap) -> None:
        """Staging thread: validate the whole update, prepare the swap; the
        first overlapped update also leaves its recorded copy plan."""
        if overlap.prepared:
            return
        overlap.check()
        self.spec.validate(overlap.entries)
        if self._covered is None:
            self._check_coverage(overlap.stage)
        overlap.stage.prepare()
        if overlap.keep and self._keepable is None:  # once: the model's processing
            refused = overlap.stage.captured_by_derived_state()
            self._keepable = refused is None
            if refused is not None:
                logger.info("weight_staging_keep does not apply to this model, its "
                            "staging copy is freed at each swap: %s", refused)
        overlap.prepared = True
        if overlap.recorder is not None:
            self._plan = overlap.recorder.finish()
            if isinstance(self._plan, str):
                logger.info("overlapped weight updates keep running vLLM's load_weights: "
                            "its writes cannot be replayed (%s)", self._plan)
        elif overlap.misfits:
            logger.info("%d tensors of this update differ in dtype or layout from the "
                        "recorded copy plan; vLLM's load_weights loaded them",
                        overlap.misfits)

    def _check_coverage(self, stage: Any) -> None:
        """Refuse a staged update that leaves a parameter the model reads
        unwritten (it would be swapped in uninitialised); later updates of
        this engine then stage in the pause, which loads in place."""
        from vllm_rl_compat.weights.protocol.spec import WeightUpdateError

        missing = stage.unwritten()
        if not missing:
            self._covered = True
            return
        self._covered = (f"parameters no checkpoint tensor writes through the model's "
                         f"loader: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        raise WeightUpdateError(f"overlapped weight staging refused: {self._covered}; they "
                                f"would be swapped in uninitialised; model unchanged (later "
                                f"updates stage in the pause, which loads in place)")

    @property
    def overlapped(self) -> bool:
        return self._overlap is not None

    def take_staged(self) -> list[tuple[str, torch.Tensor]]:
        """The update staged for the pause; a kept stage is freed (the live
        model changes outside its swap, and in_pause holds no extra copy)."""
        staged, self._staged, self._kept = self._staged, [], None
        return staged

    def swap_stage(self) -> dict[str, Any]:
        """Engine thread, between steps: install the prepared shadow of an
        overlapped update (``StagedWeights.swap``), keep it for the next one
        if asked and safe; how it was loaded (``_Overlap.via``, seconds)."""
        if self._job is not None and not self._job.done():
            raise RuntimeError("the staging thread has not finished")
        overlap, self._overlap = self._overlap, None
        keep = overlap.keep and bool(self._keepable)
        overlap.stage.swap(exchange=keep)
        if keep:
            self._kept = overlap.stage
        return {"via": overlap.via, "load_seconds": overlap.load_seconds,
                "kept": self._kept is not None}

    def drop(self) -> bool:
        """Abort: forget staged bytes, free a kept stage, stop the staging
        thread's work between two tensors (waiting ``CANCEL_WAIT_S`` for it).
        ``False`` when it still runs (blocked in a receive or a read): the next
        overlapped start is refused until it stops (``begin_overlapped``)."""
        if self._overlap is not None:
            self._overlap.cancelled = True
        self._staged, self._overlap, self._kept = [], None, None
        return self._job is None or self._job.cancel(CANCEL_WAIT_S)

    def finish_weight_update(self) -> None:
        self._require_authorized("finish_weight_update")

