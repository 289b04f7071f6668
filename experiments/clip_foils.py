"""Research script (docs/demo-learning.md): does a tiny CLIP tell a caption from its foil?

    python3 experiments/clip_foils.py CLIP_FOLDER WORLD_FOLDER [TOKENIZER_FOLDER]

For the first 300 stage-1 records of WORLD_FOLDER (use an unsliced world the CLIP never saw, e.g.
one generated with another seed and ``slice_mix=(0,)``), makes one foil of each kind (a shape,
colour, size, count word, plural shape or written text swapped; ``foil_caption``) and reports how
often the image scores its true caption above the foil. 0.5 is chance. Not part of the package.
"""
import json, random, sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPModel

from meteor.clip_pretrain import caption_ids, square_pixels
from meteor.world.captions import _foil_kinds, foil_caption

torch.set_num_threads(1)
clip = CLIPModel.from_pretrained(sys.argv[1]).eval()
world = Path(sys.argv[2])
tok = AutoTokenizer.from_pretrained(sys.argv[3] if len(sys.argv) > 3 else "meteor-demo/language_model")
records = json.loads((world / "stage1.json").read_text())[:300]
kinds = _foil_kinds()


def features(output):
    return F.normalize(getattr(output, "pooler_output", output), dim=-1)


def kind_of(caption, foil):
    changed = [b for a, b in zip(caption.split(), foil.split()) if a != b]
    word = changed[-1].strip(".,") if changed else ""
    if word.startswith('"'):
        return "text"
    return next((k for k, values in kinds.items() if word.lower() in values), None)


rng, wins = random.Random(5), defaultdict(list)
with torch.no_grad():
    for record in records:
        caption = next(t["value"] for t in record["conversations"] if t["from"] == "gpt")
        image = features(clip.get_image_features(pixel_values=square_pixels(world / "images" / record["image"], 112)[None]))
        for kind in ("shape", "plural", "colour", "size", "count", "text"):
            foil = next((f for f in (foil_caption(caption, rng) for _ in range(30)) if f and kind_of(caption, f) == kind), None)
            if foil is None:
                continue
            ids = caption_ids(tok, [caption, foil], 96)
            mask = (ids != tok.pad_token_id) | (ids == len(tok))
            text = features(clip.get_text_features(input_ids=ids, attention_mask=mask.long()))
            scores = (image @ text.T)[0]
            wins[kind].append(bool(scores[0] > scores[1]))
print(" ".join(f"{k} {sum(v) / len(v):.2f} (n {len(v)})" for k, v in wins.items()))
