"""One module per adapter kind served beside LoRA and the prompt kinds (as PEFT's ``tuners/``):
each holds its config checks, its file format and its per-row math.

- :mod:`~server.adapters.kinds.bottleneck`: bottleneck adapters (Houlsby, Pfeiffer) in AdapterHub's format.
- :mod:`~server.adapters.kinds.dora`: DoRA (``LoraConfig(use_dora=True)``): a LoRA row plus one
  per-row scale of the projection output.
- :mod:`~server.adapters.kinds.ia3`: IA3: per-row scales of attention outputs and feed-forward inputs.
- :mod:`~server.adapters.kinds.ln_tuning`: LayerNorm tuning: per-row RMSNorm weights.

DoRA, IA3 and LN tuning share the row-vector interface of :mod:`server.adapters.kinds.base`.
"""

from server.adapters.kinds.base import (
    BaseWeights,
    RowVectorKind,
    VectorKey,
    row_vector_kind,
)

__all__ = ["BaseWeights", "RowVectorKind", "VectorKey", "row_vector_kind"]
