"""Contrastive pre-training of a tiny ``transformers.CLIPModel`` on image-caption records.

The demo's vision tower is trained here, not downloaded: a CLIP whose CLS token has learnt to
attend to what captions talk about, so the visual expert (CLS attention, Eq. 3) means something.

The text tower's pooled output is the hidden state at the end-of-text token. transformers'
``CLIPTextTransformer`` has two pooling rules: with ``eos_token_id == 2`` (the value of configs
written before transformers PR #24773) it takes the position of the *largest token id* in each row
(OpenAI's vocabulary put end-of-text last), otherwise the first position equal to
``eos_token_id``. Our LLaMA-style tokenizer's ``</s>`` is id 2, which would trigger the legacy
rule and pool on whatever word has the largest BPE id. So the text tower gets its own end token,
one id past the tokenizer's vocabulary (never produced by the tokenizer), appended to every
caption, and ``text_config.eos_token_id`` is set to it: pooling then takes exactly that position.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from meteor.processing.images import load_image
from meteor.train.schedule import warmup_cosine

DONE_FILE = "clip_pretrain.json"


@dataclass(frozen=True)
class ClipPretrainConfig:
    """A tiny CLIP and its contrastive training run."""

    image_size: int = 112
    """Side of the square training images and of the vision tower's native view."""
    patch_size: int = 14
    vision_width: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    projection_dim: int = 64
    max_text_tokens: int = 96
    """Captions are cut to this many tokens (the end token included)."""
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    region_weight: float = 1.0
    """Weight of the region–phrase loss when ``pretrain_clip`` is given ``regions`` (see there)."""
    region_layer: int = -2
    """``hidden_states`` index whose patch tokens the region–phrase loss trains: the penultimate
    layer, the one LLaVA-style models (and ``MeteorConfig.feature_layer``) read."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"need epochs ≥ 1 and batch_size ≥ 2 (contrastive), got {self.epochs}, "
                             f"{self.batch_size}")
        if self.region_weight < 0:
            raise ValueError(f"region_weight must be ≥ 0 (0 turns the region–phrase loss off), got "
                             f"{self.region_weight}")
        if not -self.vision_layers <= self.region_layer <= self.vision_layers or self.region_layer == 0:
            raise ValueError(f"region_layer must index one of the {self.vision_layers} encoder layers' "
                             f"outputs (1..{self.vision_layers} or -1..-{self.vision_layers}), got {self.region_layer}")


def tiny_clip_model(config: ClipPretrainConfig, tokenizer) -> Any:
    """A randomly initialised ``CLIPModel`` whose text tower pools on its own end token
    (``len(tokenizer)``, see the module docstring)."""
    from transformers import CLIPConfig, CLIPModel

    end_id = len(tokenizer)
    text = dict(vocab_size=end_id + 1, hidden_size=config.text_width, intermediate_size=2 * config.text_width,
                num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
                max_position_embeddings=config.max_text_tokens, eos_token_id=end_id,
                bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                projection_dim=config.projection_dim)
    vision = dict(hidden_size=config.vision_width, intermediate_size=2 * config.vision_width,
                  num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
                  image_size=config.image_size, patch_size=config.patch_size,
                  projection_dim=config.projection_dim)
    clip_config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.projection_dim)
    if clip_config.text_config.eos_token_id == 2:
        raise AssertionError("the CLIP text tower would use transformers' legacy argmax pooling")
    return CLIPModel(clip_config)


def caption_ids(tokenizer, captions: Sequence[str], max_tokens: int) -> torch.Tensor:
    """(B, T) caption ids, each ending with the text tower's end token, right-padded with pad."""
    end_id, pad_id = len(tokenizer), tokenizer.pad_token_id
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens - 1] + [end_id]
            for text in captions]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])


def _encode_captions(tokenizer, captions: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = caption_ids(tokenizer, captions, max_tokens)
    return ids, (ids != tokenizer.pad_token_id) | (ids == len(tokenizer))


def _join_texts(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor],
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack two (ids, mask) caption batches, right-padding the narrower one."""
    width = max(first[0].shape[1], second[0].shape[1])
    pad = lambda t, value: F.pad(t, (0, width - t.shape[1]), value=value)
    return (torch.cat([pad(first[0], pad_id), pad(second[0], pad_id)]),
            torch.cat([pad(first[1], False), pad(second[1], False)]))


def square_pixels(path: str | Path, size: int) -> torch.Tensor:
    """(3, size, size) CLIP-normalised pixels of the whole image resized to a square."""
    image = load_image(path).convert("RGB").resize((size, size), resample=3)  # bicubic
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    pixels = pixels.permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


Box = tuple[int, int, int, int]


def patch_weights(boxes: Sequence[Box], image_size: tuple[int, int], side: int, patch: int) -> torch.Tensor:
    """(R, G²) weights that average a square view's G×G patch tokens over each box: the image
    (``image_size`` = (w, h)) is resized to ``side``², and a patch's weight is the area of the
    box it covers, normalised per box. Every box gets at least its centre patch, however small."""
    (width, height), grid = image_size, side // patch
    edges = torch.arange(grid + 1, dtype=torch.float64) * patch
    rows = []
    for left, top, right, bottom in boxes:
        sx, sy = side / width, side / height
        l, r, t, b = left * sx, right * sx, top * sy, bottom * sy
        across = (torch.minimum(edges[1:], torch.tensor(r)) - torch.maximum(edges[:-1], torch.tensor(l))).clamp(min=0)
        down = (torch.minimum(edges[1:], torch.tensor(b)) - torch.maximum(edges[:-1], torch.tensor(t))).clamp(min=0)
        weight = down[:, None] * across[None, :]
        if weight.sum() <= 0:                               # a degenerate box: its centre's patch
            weight[min(grid - 1, int((t + b) / 2 // patch)), min(grid - 1, int((l + r) / 2 // patch))] = 1
        rows.append((weight / weight.sum()).flatten())
    return torch.stack(rows).float() if rows else torch.zeros(0, grid * grid)


def pretrain_clip(records: Sequence[dict], image_folder: str | Path, tokenizer, out_dir: str | Path,
                  config: ClipPretrainConfig = ClipPretrainConfig(),
                  progress: Callable[[str], None] = print,
                  foil: Callable[[str, random.Random], str | None] | None = None,
                  regions: Callable[[dict], Sequence[tuple[Box, str]]] | None = None) -> dict[str, Any]:
    """Train a tiny CLIP with the symmetric InfoNCE loss on LLaVA caption records (``image`` and
    the first ``gpt`` turn) and save it as a ``CLIPModel`` folder (loadable by
    ``VisionTower.from_pretrained``). Returns the run summary (also in ``clip_pretrain.json``),
    including the final retrieval accuracy on the training batches.

    ``foil(caption, rng)`` (optional) returns a hard negative: the caption with one detail made
    false. Each batch's foils join its captions on the text side, so every image must also tell its
    caption from its own foil (the image→text loss runs over captions and foils; the text→image
    loss over real captions only). Without foils, a tiny CLIP matches captions by colour alone and
    its patch tokens do not encode shape (docs/demo-findings.md).

    ``regions(record)`` (optional, with ``config.region_weight`` > 0) lists the record's items as
    (box in image pixels, phrase), e.g. ``meteor.demo.world.captions.item_phrases`` of its ``meta``. It
    adds a region–phrase contrastive loss (RegionCLIP-style) on the patch tokens of
    ``config.region_layer``: each item's tokens, averaged over its box (``patch_weights``) and put
    through a small training-only head, must pick the item's phrase among the batch's phrases and
    their foils. The image-level loss alone teaches the pooled output what a caption says, not
    which patches hold it; the compressor and the LLM read the patch tokens."""
    from transformers import CLIPModel

    out = Path(out_dir)
    torch.manual_seed(config.seed)
    model: CLIPModel = tiny_clip_model(config, tokenizer)
    captions = [next(t["value"] for t in r["conversations"] if t["from"] == "gpt") for r in records]
    started = time.perf_counter()
    images = torch.stack([square_pixels(Path(image_folder) / r["image"], config.image_size) for r in records])
    texts, attention = _encode_captions(tokenizer, captions, config.max_text_tokens)
    foil_rng = random.Random(config.seed)
    n = len(records)
    use_regions = regions is not None and config.region_weight > 0
    if use_regions:
        items, weights = _record_regions(records, regions, config)
        head = torch.nn.Sequential(torch.nn.LayerNorm(config.vision_width),
                                   torch.nn.Linear(config.vision_width, config.projection_dim, bias=False))
    parameters = list(model.parameters()) + (list(head.parameters()) if use_regions else [])
    steps_per_epoch = max(1, n // config.batch_size)
    total = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup, decay_during_warmup=True))
    generator = torch.Generator().manual_seed(config.seed)
    log, step = [], 0
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        hits = seen = region_hits = region_seen = 0
        for b in range(steps_per_epoch):
            index = order[b * config.batch_size:(b + 1) * config.batch_size]
            batch_texts, batch_attention = texts[index], attention[index]
            foils = [foil(captions[i], foil_rng) for i in index.tolist()] if foil is not None else []
            foils = [f for f in foils if f is not None]
            if foils:
                batch_texts, batch_attention = _join_texts(
                    (batch_texts, batch_attention), _encode_captions(tokenizer, foils, config.max_text_tokens),
                    tokenizer.pad_token_id)
            out_ = model(input_ids=batch_texts, attention_mask=batch_attention.long(), pixel_values=images[index],
                         output_hidden_states=use_regions)
            logits = out_.logits_per_image                                      # (B, B + foils)
            target = torch.arange(len(index))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :len(index)].T, target)) / 2
            logits = logits[:, :len(index)]
            entry = {}
            if use_regions:
                patches = out_.vision_model_output.hidden_states[config.region_layer][:, 1:]
                region_loss, correct, count = _region_loss(
                    model, head, tokenizer, config, patches, [items[i] for i in index.tolist()],
                    [weights[i] for i in index.tolist()], foil, foil_rng)
                loss = loss + config.region_weight * region_loss
                region_hits, region_seen = region_hits + correct, region_seen + count
                entry = {"region_loss": region_loss.item()}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            hits += int((logits.argmax(-1) == target).sum())
            seen += len(index)
            log.append({"step": step, "epoch": epoch + 1, "loss": loss.item(), **entry})
        regions_note = (f", region→phrase accuracy {region_hits / max(region_seen, 1):.2f}"
                        if use_regions else "")
        progress(f"    CLIP epoch {epoch + 1}/{config.epochs}: loss {log[-1]['loss']:.3f}, "
                 f"image→caption accuracy in batch {hits / max(seen, 1):.2f}{regions_note}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    summary = {"config": asdict(config), "records": n, "steps": total, "final_loss": log[-1]["loss"],
               "final_batch_retrieval": hits / max(seen, 1),
               "final_region_accuracy": region_hits / region_seen if use_regions and region_seen else None,
               "seconds": round(time.perf_counter() - started, 1),
               "text_end_token_id": len(tokenizer)}
    (out / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    (out / DONE_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _record_regions(records: Sequence[dict], regions: Callable[[dict], Sequence[tuple[Box, str]]],
                    config: ClipPretrainConfig) -> tuple[list[list[str]], list[torch.Tensor]]:
    """Per record: its region phrases and their (R, G²) patch weights."""
    phrases, weights = [], []
    for k, record in enumerate(records):
        meta = record.get("meta")
        size = meta.get("size") if isinstance(meta, dict) else None
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and min(size) > 0):
            raise ValueError(f"record {k} ({record.get('id', '?')}) has no meta.size [width, height]: the "
                             "region–phrase loss needs each image's size and item boxes (meteor.demo.world "
                             "records carry them); pass regions=None to train without it")
        listed = list(regions(record))
        phrases.append([phrase for _, phrase in listed])
        weights.append(patch_weights([box for box, _ in listed], tuple(size), config.image_size, config.patch_size))
    return phrases, weights


def _region_loss(model, head, tokenizer, config: ClipPretrainConfig, patches: torch.Tensor,
                 phrases: list[list[str]], weights: list[torch.Tensor], foil, rng: random.Random
                 ) -> tuple[torch.Tensor, int, int]:
    """The region–phrase InfoNCE of one batch (regions → the batch's distinct phrases and foils),
    with the number of regions whose own phrase scored highest and the number of regions."""
    pooled = torch.cat([w @ tokens for w, tokens in zip(weights, patches)])            # (R, D)
    wanted = [phrase for row in phrases for phrase in row]
    if not wanted:
        return patches.sum() * 0, 0, 0
    negatives = [foil(phrase, rng) for phrase in wanted] if foil is not None else []
    vocabulary = list(dict.fromkeys(wanted + [f for f in negatives if f is not None]))
    index = {phrase: k for k, phrase in enumerate(vocabulary)}
    ids, mask = _encode_captions(tokenizer, vocabulary, config.max_text_tokens)
    text = model.text_projection(model.text_model(input_ids=ids, attention_mask=mask.long()).pooler_output)
    logits = model.logit_scale.exp() * F.normalize(head(pooled), dim=-1) @ F.normalize(text, dim=-1).T
    target = torch.tensor([index[phrase] for phrase in wanted])
    correct = int((logits.argmax(-1) == target).sum())
    return F.cross_entropy(logits, target), correct, len(wanted)
