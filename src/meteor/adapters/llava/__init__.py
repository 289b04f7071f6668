"""Bring your own LLaVA: read existing checkpoints, convert them, export back to transformers.

* ``weights``: a checkpoint folder's tensors by name (safetensors directly; ``.bin`` only through
  ``torch.load(weights_only=True)``; a file that needs pickle is refused with how to convert it);
* ``llava``: what a llava-hf (``LlavaForConditionalGeneration``) or original LLaVA-1.5
  (``LlavaLlamaForCausalLM``) folder is (``inspect_llava``, config files only) and its parts
  (``load_llava``);
* ``convert``: those parts as a LLaVA-Meteor model (``from_llava``, ``meteor convert --from-llava``),
  LLaVA's projector as the initial weights of Meteor's projector MLP;
* ``export``: a Meteor model's language model, vision tower and tokenizer as folders plain
  transformers loads;
* ``commands``: the functions behind ``meteor convert --from-llava`` / ``--upgrade`` / ``--export``.
"""

from meteor.adapters.llava.commands import convert_llava, export_model, upgrade_model
from meteor.adapters.llava.convert import from_llava, load_projector_mlp, meteor_config_for, read_llava_for_meteor
from meteor.adapters.llava.export import export_components
from meteor.adapters.llava.checkpoint import LlavaParts, LlavaSource, UnsupportedCheckpoint, inspect_llava, load_llava
from meteor.adapters.llava.weights import CheckpointWeights, PickleCheckpointError

__all__ = ["CheckpointWeights", "LlavaParts", "LlavaSource", "PickleCheckpointError", "UnsupportedCheckpoint",
           "convert_llava", "export_components", "export_model", "from_llava", "upgrade_model", "inspect_llava", "load_llava",
           "load_projector_mlp", "meteor_config_for", "read_llava_for_meteor"]
