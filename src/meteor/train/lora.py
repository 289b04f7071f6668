"""LoRA on the language model through peft (LLaVA's recipe: rank 128, alpha 256)."""

from __future__ import annotations

from torch import nn

from meteor.train.args import TrainConfigError

# The LLaMA family's linear layers; other causal LMs fall back to every nn.Linear but the head.
_LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _targets(language_model: nn.Module) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, module in language_model.named_modules()
             if isinstance(module, nn.Linear)}
    llama = [name for name in _LLAMA_TARGETS if name in names]
    return llama or sorted(names - {"lm_head"})


def add_lora(model, rank: int, alpha: int) -> list[nn.Parameter]:
    """Wrap the model's decoder (``model.model.language_model``) with peft's LoRA adapters in place;
    returns their parameters."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise TrainConfigError("--lora needs peft: pip install peft") from err
    decoder = model.model.language_model
    # FEATURE_EXTRACTION: the decoder without its head, called with inputs_embeds as the model calls it
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.05, bias="none",
                        target_modules=_targets(decoder), task_type="FEATURE_EXTRACTION")
    model.model.language_model = get_peft_model(decoder, config)
    return [p for name, p in model.model.language_model.named_parameters() if "lora_" in name and p.requires_grad]


def merge_lora(model) -> None:
    """Fold the adapters into the base weights so the saved model is the plain decoder again."""
    if hasattr(model.model.language_model, "merge_and_unload"):
        model.model.language_model = model.model.language_model.merge_and_unload()
