"""The front-end process (``LLM`` / ``AsyncLLM`` / the API server): owns the update.

``transaction`` is the state machine; ``drive`` runs its steps on an engine;
``native`` routes vLLM's own RL calls onto it, ``sync`` is ``WeightSync`` /
``AsyncWeightSync``, ``http`` the token-guarded routes; ``delivery``,
``openai_versions`` and ``kv_versions_output`` carry versions onto outputs;
``settings`` picks the backend at engine-argument time.
"""
