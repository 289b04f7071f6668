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
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .images import load_image

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
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"need epochs ≥ 1 and batch_size ≥ 2 (contrastive), got {self.epochs}, "
                             f"{self.batch_size}")


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


def pretrain_clip(records: Sequence[dict], image_folder: str | Path, tokenizer, out_dir: str | Path,
                  config: ClipPretrainConfig = ClipPretrainConfig(),
                  progress: Callable[[str], None] = print,
                  foil: Callable[[str, random.Random], str | None] | None = None) -> dict[str, Any]:
    """Train a tiny CLIP with the symmetric InfoNCE loss on LLaVA caption records (``image`` and
    the first ``gpt`` turn) and save it as a ``CLIPModel`` folder (loadable by
    ``VisionTower.from_pretrained``). Returns the run summary (also in ``clip_pretrain.json``),
    including the final retrieval accuracy on the training batches.

    ``foil(caption, rng)`` (optional) returns a hard negative: the caption with one detail made
    false. Each batch's foils join its captions on the text side, so every image must also tell its
    caption from its own foil (the image→text loss runs over captions and foils; the text→image
    loss over real captions only). Without foils, a tiny CLIP matches captions by colour alone and
    its patch tokens do not encode shape (docs/demo-learning.md)."""
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
    steps_per_epoch = max(1, n // config.batch_size)
    total = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / total))))
    generator = torch.Generator().manual_seed(config.seed)
    log, step = [], 0
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        hits = seen = 0
        for b in range(steps_per_epoch):
            index = order[b * config.batch_size:(b + 1) * config.batch_size]
            batch_texts, batch_attention = texts[index], attention[index]
            foils = [foil(captions[i], foil_rng) for i in index.tolist()] if foil is not None else []
            foils = [f for f in foils if f is not None]
            if foils:
                batch_texts, batch_attention = _join_texts(
                    (batch_texts, batch_attention), _encode_captions(tokenizer, foils, config.max_text_tokens),
                    tokenizer.pad_token_id)
            out_ = model(input_ids=batch_texts, attention_mask=batch_attention.long(), pixel_values=images[index])
            logits = out_.logits_per_image                                      # (B, B + foils)
            target = torch.arange(len(index))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :len(index)].T, target)) / 2
            logits = logits[:, :len(index)]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            hits += int((logits.argmax(-1) == target).sum())
            seen += len(index)
            log.append({"step": step, "epoch": epoch + 1, "loss": loss.item()})
        progress(f"    CLIP epoch {epoch + 1}/{config.epochs}: loss {log[-1]['loss']:.3f}, "
                 f"image→caption accuracy in batch {hits / max(seen, 1):.2f}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    summary = {"config": asdict(config), "records": n, "steps": total, "final_loss": log[-1]["loss"],
               "final_batch_retrieval": hits / max(seen, 1), "seconds": round(time.perf_counter() - started, 1),
               "text_end_token_id": len(tokenizer)}
    (out / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    (out / DONE_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
