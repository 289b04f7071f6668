"""`meteor demo`: the whole method end to end on the embedded tiny default.

No downloads: a tiny CLIP vision tower and a tiny LLaMA (real transformers classes, random
init), a byte-level BPE tokenizer trained on the spot, and a drawn image whose aspect ratio needs
UHD slicing. The demo slices, encodes, compresses, shows which tokens each view kept and why,
computes a supervised loss and its gradients, answers, saves and reloads the model and checks the
reload answers identically. The weights are untrained, so the answer is noise: this shows the
machinery, not accuracy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .cli import parameter_report
from .conversation import IGNORE_INDEX


def demo_image(width: int = 112, height: int = 168, seed: int = 0) -> Image.Image:
    """Coloured shapes on a grey background: with the tiny tower's 56-px base this 2:3 image
    is cut into 6 slices plus the global view, like the paper's 672×1008."""
    generator = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    colours = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (240, 200, 40)]
    for index, colour in enumerate(colours):
        x, y = (torch.rand(2, generator=generator) * torch.tensor([width - 30, height - 30])).tolist()
        box = [x, y, x + 14 + 10 * index, y + 14 + 8 * index]
        (draw.ellipse if index % 2 else draw.rectangle)(box, fill=colour)
    return image


def _grid_picture(rows: int, cols: int, kept: torch.Tensor) -> str:
    marks = ["."] * (rows * cols)
    for index in kept.tolist():
        marks[index] = "#"
    return "\n".join("    " + "".join(marks[r * cols:(r + 1) * cols]) for r in range(rows))


def run_demo(out: str | Path = "meteor-demo", seed: int = 0) -> dict:
    from .modeling import LlavaMeteor
    from .ops import scan_backend
    from .tiny import tiny_model

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, processor = tiny_model(seed=seed)
    model.eval()
    image = demo_image(seed=seed)
    image.save(out / "demo_image.png")
    sliced = processor.prepare_image(image)
    plan = sliced.plan
    print(f"[1/5] image {image.width}×{image.height} → grid {plan.grid[0]} rows × {plan.grid[1]} cols "
          f"= {plan.num_slices} slices of {plan.slice_size[0]}×{plan.slice_size[1]} px + global view "
          f"{plan.global_size[0]}×{plan.global_size[1]} px")

    with torch.no_grad():
        tokens, selections = model.encode_images([sliced], return_selection=True)
    k = model.config.compressor.tokens_per_slice
    patches = sum(s.grid[0] * s.grid[1] for s in selections)
    print(f"[2/5] Top-Down Compression kept {tokens[0].shape[0]} of {patches} visual tokens "
          f"(K={k} per view, {100 * tokens[0].shape[0] / patches:.0f}%), width {tokens[0].shape[1]}; "
          f"selective scan path: {scan_backend(torch.device('cpu'))}")
    for selection in selections:
        name = "global" if selection.is_global else f"slice {selection.view_index + 1}"
        print(f"    {name}: kept {selection.indices.tolist()} (# = kept)")
        print(_grid_picture(*selection.grid, selection.indices))

    conversation = [{"from": "human", "value": "<image>\nWhat colour is the circle?"},
                    {"from": "gpt", "value": "It is green."}]
    ids, labels = processor.encode(conversation, [sliced])
    batch = processor.collate([(ids, labels)], [sliced])
    model.train()
    loss = model(**batch.to_model_kwargs()).loss
    loss.backward()
    grad_norm = sum(p.grad.norm() ** 2 for p in model.compressor.parameters() if p.grad is not None) ** 0.5
    supervised = sum(label != IGNORE_INDEX for label in labels)
    print(f"[3/5] loss {loss.item():.3f} on {supervised} supervised answer tokens of {len(ids)}; "
          f"compressor gradient norm {float(grad_norm):.3g}")

    model.eval()
    prompt = processor(["What colour is the circle?"], [sliced])
    answer_ids = model.generate(**prompt.to_model_kwargs(), max_new_tokens=8, do_sample=False)
    answer = processor.tokenizer.decode(answer_ids[0], skip_special_tokens=True)
    print(f"[4/5] generate (untrained weights, so noise): {answer!r}")

    saved = model.save_pretrained(out / "model", processor, overwrite=True)
    reloaded, reprocessor = LlavaMeteor.from_pretrained(saved)
    reloaded.eval()
    again = reloaded.generate(**reprocessor(["What colour is the circle?"], [sliced]).to_model_kwargs(),
                              max_new_tokens=8, do_sample=False)
    same = torch.equal(answer_ids, again)
    print(f"[5/5] saved to {saved} (safetensors) and reloaded: identical answer = {same}")
    print()
    print(parameter_report())

    summary = {
        "grid": list(plan.grid), "num_slices": plan.num_slices, "kept_tokens": int(tokens[0].shape[0]),
        "patch_tokens": int(patches), "loss": loss.item(), "answer": answer, "reload_identical": same,
        "seconds": round(time.perf_counter() - start, 2),
        "selections": [{"view": s.view_index, "global": s.is_global, "grid": list(s.grid),
                        "kept": s.indices.tolist()} for s in selections],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {out / 'summary.json'} in {summary['seconds']} s")
    if not same:
        raise RuntimeError("the reloaded model answered differently from the saved one")
    return summary
