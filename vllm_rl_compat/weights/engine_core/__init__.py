"""The engine-core process: the step boundary where an update lands.

``labels`` is the one reader of the engine core's version label and the hook
point for a version change; ``commit`` swaps an overlapped update in between
two steps; ``kv_versions`` records which version computed each prompt's KV.
"""
