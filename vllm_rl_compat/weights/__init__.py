"""Weight updates in RL mode: spec, transaction, backends, worker side, HTTP routes."""
