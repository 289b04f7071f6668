"""Tiny configurations of the real Hugging Face classes, for tests (and the embedded demo's LLaMA),
and the small data files the tests feed them.

Nothing here is a stand-in: a `CLIPVisionModel`, a `LlamaForCausalLM` and a byte-level BPE
tokenizer trained with `tokenizers`, only small enough to run on two CPU cores in seconds; the
data are real files in the formats the library reads (LLaVA's JSON, the synthetic world's test
split), drawn here so that the library's tests need nothing of the demo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from meteor.model.configuration import CompressorConfig, MeteorConfig
from meteor.processing.conversation import VICUNA_SYSTEM

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

_BASE_CORPUS = [
    VICUNA_SYSTEM,
    "USER: ASSISTANT: What is in the image? Describe the image. How many shapes are there?",
    "a red circle, a blue square, a green triangle, a yellow star, a purple hexagon.",
    "Is there a cat in the image? Yes. No. The answer is 0 1 2 3 4 5 6 7 8 9 10.",
    "What colour is the shape on the left? It is orange. Which word is written? Answer with the letter.",
    "A. B. C. D. top bottom left right above below next to the text reads",
]


def tiny_tokenizer(texts: Iterable[str] = (), vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts` plus a small built-in corpus, wrapped as a
    `PreTrainedTokenizerFast` with LLaMA-style special tokens and `<image>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(list(_BASE_CORPUS) + list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   extra_special_tokens=["<image>"])


def tiny_clip_vision_config(**overrides):
    """A 4-layer CLIP ViT with 14-px patches at a 56-px base (a 4×4 patch grid per view)."""
    from transformers import CLIPVisionConfig

    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  image_size=56, patch_size=14, projection_dim=32)
    values.update(overrides)
    return CLIPVisionConfig(**values)


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_meteor_config(**compressor_overrides) -> MeteorConfig:
    """K = 4 of the 16 tokens per view, the paper's 6-slice cap, a small Mamba state."""
    values = dict(tokens_per_slice=4, d_state=8, expand=2)
    values.update(compressor_overrides)
    return MeteorConfig(compressor=CompressorConfig(**values), max_slices=6)


def tiny_model(config: MeteorConfig | None = None, seed: int = 0, texts: Iterable[str] = ()):
    """A randomly initialised tiny LLaVA-Meteor and its processor."""
    import torch
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from meteor.model.vision import VisionTower
    from meteor.pretrained import build

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(texts)
    vision = VisionTower.from_model(CLIPVisionModel(tiny_clip_vision_config()))
    language_model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    return build(vision, language_model, tokenizer, config or tiny_meteor_config())


_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 40)}


def tiny_llava_data(folder, count: int = 24, seed: int = 0, caption: bool = False, meta: bool = False):
    """A small LLaVA-format dataset of drawn images (sizes from 1 view to 6 slices + global at the
    tiny tower's 56-px base): "What colour is the square?" → the square's colour, or, with
    `caption`, LLaVA-Pretrain-style caption records. With `meta`, each record also carries its scene
    as the synthetic world writes it (``Scene.to_meta``'s fields), as scene distillation needs.
    Returns the JSON file's path."""
    import json
    import random
    from pathlib import Path

    from PIL import Image, ImageDraw

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes = [(56, 56), (112, 56), (56, 112), (112, 112), (112, 168), (168, 112)]
    records = []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        colour = rng.choice(sorted(_COLOURS))
        image = Image.new("RGB", (width, height), (128, 128, 128))
        side = rng.randint(20, 40)
        left, top = rng.randint(0, width - side), rng.randint(0, height - side)
        ImageDraw.Draw(image).rectangle([left, top, left + side, top + side], fill=_COLOURS[colour])
        name = f"images/{index:04d}.png"
        image.save(folder / name)
        if caption:
            turns = [{"from": "human", "value": "<image>\n"},
                     {"from": "gpt", "value": f"a {colour} square on grey"}]
        else:
            turns = [{"from": "human", "value": "<image>\nWhat colour is the square?"},
                     {"from": "gpt", "value": colour}]
        record = {"id": f"tiny-{index}", "image": name, "conversations": turns}
        if meta:
            record["meta"] = {"size": [width, height], "texts": [], "objects": [
                {"shape": "square", "colour": colour, "size": "medium",
                 "bbox": [left, top, left + side, top + side]}]}
        records.append(record)
    path = folder / (("captions" if caption else "instruct") + ("_meta" if meta else "") + ".json")
    path.write_text(json.dumps(records, indent=1))
    return path


_POSITIONS = ("left", "right")


@dataclass
class TinyWorldSplit:
    """Where ``tiny_world_split`` wrote its files (named as the demo's ``WorldManifest`` names them)."""

    test_path: Path
    """``test.jsonl``: one question per line."""
    image_folder: Path
    """The folder the rows' ``image`` paths are relative to."""
    questions: int
    """How many questions ``test.jsonl`` holds."""


def tiny_world_split(folder, images: int = 3, seed: int = 0):
    """A small test split in the synthetic world's format, the file ``meteor.eval.WorldRunner`` reads
    (``test.jsonl`` beside ``images/``, as ``meteor demo`` writes it), drawn here without the demo:
    per image, one to three coloured squares on grey (sizes from one view to a sliced image at the
    tiny tower's 56-px base) and four questions about them, a "colour", a "count", an "exist" and a
    "position" one, with the answers the drawing gives. The rows carry the fields the runner needs
    (``question_id``, ``image_id``, ``image``, ``question_type``, ``question``, ``answer``), each
    image's questions together, images in order. Returns a ``TinyWorldSplit``."""
    import json
    import random

    from PIL import Image, ImageDraw

    folder = Path(folder)
    (folder / "images" / "test").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes = [(56, 56), (112, 56), (84, 112)]
    rows = []
    for index in range(images):
        width, height = sizes[index % len(sizes)]
        colour = rng.choice(sorted(_COLOURS))
        count = rng.randint(1, 3)
        half = rng.choice(_POSITIONS)           # the half of the image the squares are drawn in
        picture = Image.new("RGB", (width, height), (128, 128, 128))
        draw = ImageDraw.Draw(picture)
        side = min(width // 2, height) // 3
        for n in range(count):
            left = (0 if half == "left" else width // 2) + rng.randint(0, width // 2 - side)
            top = n * (height // count) + rng.randint(0, height // count - side)
            draw.rectangle([left, top, left + side - 1, top + side - 1], fill=_COLOURS[colour])
        image_id = f"test-{index:06d}"
        name = f"test/{index:06d}.png"
        picture.save(folder / "images" / name)
        other = rng.choice(sorted(set(_COLOURS) - {colour}))
        asked = rng.choice([colour, other])
        questions = [("colour", "What colour are the squares?", colour),
                     ("count", "How many squares are there?", str(count)),
                     ("exist", f"Is there a {asked} square in the image?", "yes" if asked == colour else "no"),
                     ("position", "Are the squares on the left or on the right?", half)]
        rows += [{"question_id": f"{image_id}-q{n}", "image_id": image_id, "image": name, "question_type": kind,
                  "question": question, "answer": answer}
                 for n, (kind, question, answer) in enumerate(questions)]
    test_path = folder / "test.jsonl"
    test_path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return TinyWorldSplit(test_path, folder / "images", len(rows))

