"""Research script (docs/demo-learning.md): can the tiny demo CLIP learn to read? (not part of the package)

    python3 experiments/clip_reading.py --root /tmp/demo5 --out /tmp/s6/clip_spell [--spell] [--letters]
    python3 experiments/clip_probe.py --root /tmp/s6/clip_spell_root --radius 1

Trains the demo's CLIP (``full_config().clip``, foils and region–phrase loss, on ROOT's
``clip_corpus``) with the variants below, saves it to OUT and makes OUT_root (ROOT's world with this
CLIP) for ``clip_probe.py`` and ``stage2_cached.py``.

- ``--spell``: the text tower reads every quoted text letter by letter ('the word "C A T"'), so a
  word or number is composed of characters the image side can learn one by one, instead of being one
  BPE token among a thousand.
- ``--letters``: each character of each text is one more region (its slice of the text's box, in
  proportion to the character's share of the text) with the phrase 'the letter "C"'.
"""
import argparse, dataclasses, json, os, re
from pathlib import Path

import torch
from transformers import AutoTokenizer

import meteor.clip_pretrain as cp
from meteor.demo.config import full_config
from meteor.world.captions import foil_caption, item_phrases

ap = argparse.ArgumentParser()
ap.add_argument("--root", default="/tmp/demo5")
ap.add_argument("--out", required=True)
ap.add_argument("--spell", action="store_true")
ap.add_argument("--letters", action="store_true")
ap.add_argument("--epochs", type=int, default=None)
ap.add_argument("--region-weight", type=float, default=None)
ap.add_argument("--images", type=int, default=0,
                help="a CLIP corpus of this many unsliced scenes (generated into OUT_corpus) instead of ROOT's")
a = ap.parse_args()
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
root, out = Path(a.root), Path(a.out)
config = full_config().clip
if a.epochs:
    config = dataclasses.replace(config, epochs=a.epochs)
if a.region_weight is not None:
    config = dataclasses.replace(config, region_weight=a.region_weight)

QUOTED = re.compile(r'"([^"]+)"')


def spell(text: str) -> str:
    return QUOTED.sub(lambda m: '" ' + " ".join(m.group(1)) + '"', text)


if a.spell:
    original = cp._encode_captions
    cp._encode_captions = lambda tokenizer, captions, max_tokens: original(
        tokenizer, [spell(c) for c in captions], max_tokens)


def regions(record):
    listed = item_phrases(record["meta"])
    if a.letters:
        for t in record["meta"]["texts"]:
            l, top, r, b = t["bbox"]
            n = len(t["text"])
            for k, ch in enumerate(t["text"]):
                box = (round(l + (r - l) * k / n), top, round(l + (r - l) * (k + 1) / n), b)
                listed.append((box, f'the {"digit" if ch.isdigit() else "letter"} "{ch}"'))
    return listed


tokenizer = AutoTokenizer.from_pretrained(root / "language_model")
corpus = root / "clip_corpus"
if a.images:
    from meteor.world import generate_world
    world = full_config().world
    corpus = Path(str(out) + "_corpus")
    generate_world(corpus, dataclasses.replace(world, n_train_images=a.images, n_test_images=1, slice_mix=(0,)),
                   overwrite=True)
records = json.loads((corpus / "stage1.json").read_text())
summary = cp.pretrain_clip(records, corpus / "images", tokenizer, out, config,
                           foil=foil_caption, regions=regions)
print({k: v for k, v in summary.items() if k != "config"})
probe_root = Path(str(out) + "_root")
probe_root.mkdir(exist_ok=True)
for name, target in (("world", root / "world"), ("language_model", root / "language_model"), ("clip", out)):
    if not (probe_root / name).exists():
        os.symlink(target.resolve(), probe_root / name)
