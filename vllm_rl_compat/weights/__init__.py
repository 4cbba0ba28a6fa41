"""Weight updates in RL mode: one transaction across three processes.

The update is one state machine. The front end's ``Transaction``
(``frontend/transaction.py``) owns it; the engine core
(``engine_core/commit.py``) and every worker (``worker/extension.py``) run
only the steps it signs (``protocol/proof.py``), each carrying the update's
id, once and in order (the extension admits each step once). One sub-package
per process, so the layout is the table's columns:

* ``protocol/``: what every process shares (spec, proofs, version labels,
  backend names, the broadcast's wire format);
* ``frontend/``: the ``LLM`` / ``AsyncLLM`` / API-server process;
* ``engine_core/``: the engine-core process (label, commit, prompt-KV versions);
* ``worker/``: the worker processes (extension, backends, staging, apply);
* ``trainer/``: the trainer process (vLLM's trainer API, clients).

======================  =======================  ==========================  ==============================
state                   front end holds          engine core                 each worker holds
======================  =======================  ==========================  ==============================
closed                  version; nothing else    serving, label = version    live weights (+ kept stage)
open, overlapped        id, lease watch          serving                     shadow filled by its staging
                                                                             thread
open, in the pause      id, lease, our pause     paused (keep mode)          received tensors, validated
committing (AsyncLLM)   id, commit in flight     ``_Commit``: waits for      staging done -> swap, between
                                                 staging, then swap + label  two steps
applying (pause)        id, our pause            paused                      apply, fp32 head, then label
======================  =======================  ==========================  ==============================

Events and who may fire them (every step under the engine's one lock,
``Transaction.step_lock`` / ``async_lock``):

* caller (vLLM's RL calls, ``WeightSync``, the HTTP routes): ``start``
  (closed -> open, returns the update's id; the workers answer whether they
  stage overlapped, and if the ranks disagree the front end sends
  ``in_pause`` so none does; a caller that passes the id back with the later
  steps, ``update_id=``, is refused when it is no longer the open update),
  ``update:N`` (open), ``finish`` (open -> committing / applying -> closed,
  version + 1), ``abort`` (open -> closed: staging dropped, our pause
  released; a step still waiting stops first: ``Transaction.cancelled``).
* front end: ``poll:K`` / ``check`` (open), the lease (open -> closed, as an
  abort, after ``rl_compat.weight_update_lease_s`` without progress).
* engine core: ``poll:cK`` / ``check`` / ``finish`` of its commit; a cancel
  (abort, lease) ends a commit that has not applied.

Refused while an update is open (``TransactionStateError``, HTTP 409, the
update named): a second ``start``, ``init`` / ``shutdown``,
``pause_generation``, ``resume_generation``, ``update_weight_version``.
Refused in RL mode outside a step: vLLM's ``reload_weights`` /
``reset_weights`` worker methods and the live model's ``load_weights`` (what
RL frameworks' worker extensions call). The first overlapped update checks
that it writes every parameter (``worker.staging.StagedWeights.unwritten``).
A failure before the apply leaves the
model unchanged (our backends stage every byte first; vLLM's ``nccl`` /
``ipc`` stream into the live weights, and the error says so); a failure
during the apply is ``WeightSyncCorruptedError``. A commit returns only once
the outputs sent before it are delivered (``frontend/delivery.py``).
"""
