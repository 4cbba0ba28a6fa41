"""``vllm-rl-compat check --online``: the mismatch over a short, real RL run.

The static report (``parity``) scores one fixed policy, so it cannot show the
two fixes that exist for what happens while weights change (runtime defaults
that reuse KV of older weights, and the pause-boundary weight update). Here
each row is a short GRPO-style run on the report's model: an engine keeps
generating while an in-process trainer steps, and every optimizer step's
weights go to the running engine with requests in flight.

Files, one role each: ``task`` (prompts, reward), ``stats`` (per-step
metrics, pure), ``trainer`` (the trainer process's model, optimizer and
version history), ``push`` (how a row's weights reach its engine), ``row``
(one row's process: engine or reference sampler plus trainer), ``command``
(options, rows in child processes, output files).
"""
