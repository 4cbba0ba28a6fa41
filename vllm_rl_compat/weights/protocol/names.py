"""The names one process uses to reach another during an update.

Written once here so that a rename cannot leave two processes speaking past
each other: the front end and the engine core call the workers' step method,
the front end calls the engine core's commit utilities, and the engine core
hands prompt-KV versions to the front end under an output key.
"""

WORKER_METHOD = "rl_compat_txn"  # WeightSyncExtension method every worker step runs
COMMIT_METHOD = "rl_compat_commit"  # engine-core utility: commit between two steps
COMMIT_CANCEL = "rl_compat_commit_cancel"  # ... and the one that stops a waiting commit
PROMPT_KV_KEY = "rl_compat_prompt_weight_versions"  # kv_transfer_params key (engine core -> front end)
