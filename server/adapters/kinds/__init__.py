"""One module per adapter kind served beside LoRA and the prompt kinds: each holds its config checks,
its file format and its per-row math.

- :mod:`~server.adapters.kinds.bottleneck`: bottleneck adapters (Houlsby, Pfeiffer) in AdapterHub's format.
"""
