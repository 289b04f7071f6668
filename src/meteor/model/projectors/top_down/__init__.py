"""Top-Down Compression, the paper's projector (§3): Flash Global Fusion (top), then Visual-Native
Selection (down), then LLaVA-1.5's MLP to the LLM's width.

* ``fusion``: Flash Global Fusion (§3.2, Eq. 1-2): local-to-single, the instruction token, the scan;
* ``mamba``: the bidirectional Mamba-1 block it runs (the selective scan itself is ``meteor.model.ops``);
* ``selection``: Visual-Native Selection (§3.3, Eq. 3-6), as pure functions and a module;
* ``compression``: ``TopDownCompression``, the three put together.
"""

from meteor.model.projectors.top_down.compression import TopDownCompression

__all__ = ["TopDownCompression"]
