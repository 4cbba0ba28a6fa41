"""``vllm-rl-compat check``: measure the train-inference logprob mismatch.

``metrics`` (pure statistics), ``reference`` (the trainer's teacher-forced
logprobs), ``rollout`` (one engine run per subprocess), ``report`` (rows,
table, files) and ``command`` (CLI arguments).
"""
