"""What every process of an update shares, and no engine state.

``spec`` (what an update must contain, checked before anything changes),
``proof`` (the front end's signature on each worker step), ``versions``
(labels and the per-token spans on outputs), ``registry`` (our backend names
in vLLM's weight-transfer factories), ``broadcast`` (the gloo group and its
wire format: sender and receiver of one format in one file) and ``shm``
(same-host tensors as a safetensors file).
"""
