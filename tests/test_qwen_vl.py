"""meteor.compress on transformers' own Qwen2.5-VL and Qwen3-VL (``meteor.adapters.qwen_vl``).

Tiny random configs of the REAL classes (``Qwen2_5_VLForConditionalGeneration`` with windowed and
full-attention vision blocks, ``Qwen3VLForConditionalGeneration`` with deepstack features) and the
REAL processors (``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` around transformers' PIL
``Qwen2VLImageProcessorPil`` and a byte-level BPE ``Qwen2Tokenizer`` with Qwen's special tokens),
fed prompts in Qwen2.5-VL-Instruct's chat format, as a user of the Hub checkpoints would.

transformers 5.25 checks a processor's ``video_processor`` argument against ``VideoProcessorMixin``,
which it only defines when torchvision is installed; this machine has none, so the fixture skips
that one class check (for the None video processor) and nothing else. Videos are therefore given
as tensors in the layout the Qwen video processors produce (random pixels; ``pixel_values_videos``
(t · h · w, C · 2 · p · p), the placeholders as each processor lays them out).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import meteor
from meteor.adapters.qwen_vl import FrameSelection, keeping, selection_report, uncompress
from meteor.adapters.qwen_vl.prompt import shorten, tokens_to_keep
from meteor.adapters.qwen_vl.report import draw_frames, item_frames, selection_table

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
        "<|im_start|>assistant\n")
"""Qwen2.5-VL-Instruct's chat template, rendered: the images come first in the user's turn."""
KINDS = ("qwen2.5-vl", "qwen3-vl")
PATCH = {"qwen2.5-vl": 14, "qwen3-vl": 16}


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer():
    import json as _json

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+")  # Qwen2's pre-tokenizer pattern
    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["You are a helpful assistant. What is in the image? Describe the picture.",
                              "Compare the two images: a red circle and a blue square."] * 5,
                             trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = _json.loads(core.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    return Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          unk_token=None, extra_special_tokens=SPECIALS[1:], padding_side="left")


@pytest.fixture(scope="module")
def processors(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, name, argument):
        if name == "video_processor" and argument is None:  # VideoProcessorMixin needs torchvision
            return None
        return original(self, name, argument)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProcessorMixin, "check_argument_for_proper_class", check)
        return {kind: cls(image_processor=Qwen2VLImageProcessorPil(patch_size=PATCH[kind], min_pixels=32 * 32,
                                                                   max_pixels=160 * 160),
                          tokenizer=tokenizer)
                for kind, cls in (("qwen2.5-vl", Qwen2_5_VLProcessor), ("qwen3-vl", Qwen3VLProcessor))}


def _ids(tokenizer) -> dict:
    return {f"{name}_token_id": tokenizer.convert_tokens_to_ids(token) for name, token in
            (("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>"),
             ("vision_end", "<|vision_end|>"))}


def tiny_model(kind: str, tokenizer):
    """A few-block tower (Qwen2.5-VL: windows of 2 × 2 merged tokens, full attention in blocks 1 and 3;
    Qwen3-VL: deepstack after blocks 1 and 2) and a 2-3 layer LLM with M-RoPE, at random weights."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration)

    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(hidden_size=32, intermediate_size=64, num_heads=2, spatial_merge_size=2, temporal_patch_size=2,
                  out_hidden_size=64, initializer_range=0.2)  # a wide init: peaked attention, clear winners
    torch.manual_seed(0)
    if kind == "qwen2.5-vl":
        config = Qwen2_5_VLConfig(vision_config=dict(vision, depth=4, patch_size=14, window_size=56,
                                                     fullatt_block_indexes=[1, 3], tokens_per_second=2),
                                  text_config=dict(text, num_hidden_layers=2), **_ids(tokenizer))
        return Qwen2_5_VLForConditionalGeneration(config).eval()
    config = Qwen3VLConfig(vision_config=dict(vision, depth=4, patch_size=16, num_position_embeddings=64,
                                              deepstack_visual_indexes=[1, 2]),
                           text_config=dict(text, num_hidden_layers=3, head_dim=16,
                                            rope_parameters=dict(text["rope_parameters"], mrope_interleaved=True)),
                           **_ids(tokenizer))
    return Qwen3VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def models(tokenizer):
    return {kind: tiny_model(kind, tokenizer) for kind in KINDS}


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like test image: smooth colour gradients and a bright square, plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    pixels = torch.stack([x, y, (x + y) / 2]) * 180 + torch.rand(3, height, width, generator=generator) * 40
    top, left = height // 3, width // 4
    pixels[:, top:top + height // 4, left:left + width // 4] = 250
    return Image.fromarray(pixels.clamp(0, 255).byte().permute(1, 2, 0).numpy())


PROMPTS = [(CHAT.format(IMAGE + "What is in the image?"), [(150, 100, 1)]),
           (CHAT.format(IMAGE + IMAGE + "Compare the two images."), [(60, 60, 2), (130, 90, 3)])]
"""(prompt, [(width, height, seed) of each image]): two prompts, three images of different sizes."""


def batch(processor, prompts=PROMPTS):
    texts = [text for text, _ in prompts]
    images = [picture(*size) for _, sizes in prompts for size in sizes]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


@pytest.fixture
def compressed(models):
    """compress() for one test; the model is given back untouched afterwards."""
    used = []

    def make(kind: str, keep=0.25, layer=None):
        used.append(models[kind])
        return meteor.compress(models[kind], keep=keep, layer=layer)

    yield make
    for model in used:
        uncompress(model)


def language_model_inputs(model) -> tuple[list, object]:
    """Record what the language model is called with (the shortened prompt)."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    return seen, handle


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", KINDS)
def test_keeping_every_token_gives_the_unmodified_logits(kind, processors, models, compressed):
    inputs, model = batch(processors[kind]), models[kind]
    with torch.no_grad():
        reference = model(**inputs).logits
        compressed(kind, keep=0.25)
        with keeping(model, 1.0):  # every token, through the hooks: scoring, selection, re-assembly
            every = model(**inputs).logits
        quarter = model(**inputs).logits
        uncompress(model)
        again = model(**inputs).logits
    assert every.shape == reference.shape
    torch.testing.assert_close(every, reference, rtol=0, atol=1e-6)
    assert quarter.shape[1] < reference.shape[1]
    assert not torch.allclose(quarter[:, -1], reference[:, -1], atol=1e-4)  # fewer tokens: another answer
    torch.testing.assert_close(again, reference, rtol=0, atol=0)  # uncompress: the model as transformers built it


def expected_columns(inputs, selections: list[FrameSelection], config) -> torch.Tensor:
    """(B, L) bool: the prompt's real tokens, less the placeholders of the tokens the report says were
    dropped (placeholders are filled image by image, frame by frame, row by row)."""
    ids = inputs["input_ids"]
    keep = inputs["attention_mask"].bool().clone()
    for modality, token in (("image", config.image_token_id), ("video", config.video_token_id)):
        flags = []
        for selection in (s for s in selections if s.modality == modality):
            frame = torch.zeros(selection.grid[0] * selection.grid[1], dtype=torch.bool)
            frame[selection.kept] = True
            flags.append(frame)
        if flags:
            keep[ids == token] &= torch.cat(flags)
    return keep


@pytest.mark.parametrize("kind", KINDS)
def test_kept_tokens_keep_their_full_layout_positions_and_features(kind, processors, models, compressed):
    inputs, model = batch(processors[kind]), models[kind]
    full_positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                   image_grid_thw=inputs["image_grid_thw"],
                                                   attention_mask=inputs["attention_mask"])
    with torch.no_grad():
        features = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
                             .pooler_output)  # (all merged tokens, D), image after image
    compressed(kind, keep=0.25)
    seen, handle = language_model_inputs(model)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    selections = selection_report(model)
    got = seen[-1]

    sizes = [int(t * h * w) // 4 for t, h, w in inputs["image_grid_thw"].tolist()]
    assert [s.grid[0] * s.grid[1] for s in selections] == sizes
    assert [len(s.kept) for s in selections] == [max(1, int(0.25 * n + 0.5)) for n in sizes]
    assert all(s.kept == sorted(s.kept) and len(set(s.kept)) == len(s.kept) for s in selections)  # raster order
    assert [s.row for s in selections] == [0, 1, 1]

    keep = expected_columns(inputs, selections, model.config)
    mask = got["attention_mask"]
    dropped = [sizes[0] - len(selections[0].kept), sum(n - len(s.kept) for n, s in zip(sizes[1:], selections[1:]))]
    assert mask.sum(dim=1).tolist() == [int(inputs["attention_mask"][r].sum()) - dropped[r] for r in range(2)]
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all()  # still left-padded
    image_token = model.config.image_token_id
    kept_flat = torch.cat([torch.tensor(s.kept) + offset for s, offset in
                           zip(selections, [0, sizes[0], sizes[0] + sizes[1]])])
    placeholders = 0
    for row in range(2):
        columns = keep[row].nonzero()[:, 0]  # the full layout's columns the row keeps, in order
        real = mask[row].bool()
        # each kept token sits where it was: its (t, h, w) position is the full layout's
        assert torch.equal(got["position_ids"][-3:, row][:, real], full_positions[:, row, columns])
        images = inputs["input_ids"][row, columns] == image_token
        embeds = got["inputs_embeds"][row][real][images]
        expected = features[kept_flat[placeholders:placeholders + int(images.sum())]]
        torch.testing.assert_close(embeds, expected, rtol=0, atol=1e-6)  # the kept token's own feature
        placeholders += int(images.sum())
    assert placeholders == len(kept_flat)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_generation_equals_one_by_one(kind, processors, models, compressed):
    model, processor = models[kind], processors[kind]
    compressed(kind, keep=0.25)
    settings = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        together = model.generate(**batch(processor), **settings)
        alone = [model.generate(**batch(processor, [prompt]), **settings) for prompt in PROMPTS]
        full = batch(processor)
    new_together = together.sequences[:, full["input_ids"].shape[1]:]
    eos = model.generation_config.eos_token_id
    for row, single in enumerate(alone):
        new_single = single.sequences[0, batch(processor, [PROMPTS[row]])["input_ids"].shape[1]:]
        assert torch.equal(new_together[row, :len(new_single)], new_single)
        assert len(new_single) == 6 or new_single[-1] == eos
        for step in range(len(new_single)):
            torch.testing.assert_close(together.logits[step][row], single.logits[step][0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_beams_and_several_sequences_per_prompt(kind, processors, models, compressed):
    """generate repeats each prompt and its images for beams: the recorded scores follow."""
    model, inputs = models[kind], batch(processors[kind])
    settings = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        reference = model.generate(**inputs, **settings)
        compressed(kind, keep=0.25)
        with keeping(model, 1.0):
            every = model.generate(**inputs, **settings)
        quarter = model.generate(**inputs, **settings)
    assert torch.equal(every, reference)
    assert quarter.shape[0] == 4  # the report is of the rows the model ran: 3 beams per prompt
    assert [s.row for s in selection_report(model)] == [0, 1, 2, 3, 3, 4, 4, 5, 5]


def test_generation_keeps_the_positions_it_would_have_without_compression(processors, models, compressed):
    """Decoding continues from the full layout: the compressed prompt's first new token is placed
    where the uncompressed prompt's would be."""
    model, inputs = models["qwen2.5-vl"], batch(processors["qwen2.5-vl"])
    seen, handle = language_model_inputs(model)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        plain = [s["position_ids"] for s in seen]
        seen.clear()
        compressed("qwen2.5-vl", keep=0.25)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    handle.remove()
    shortened = [s["position_ids"] for s in seen]
    assert shortened[0].shape[-1] < plain[0].shape[-1]
    torch.testing.assert_close(shortened[1][1:], plain[1][1:], rtol=0, atol=0)  # (t, h, w) of the new token
    assert torch.equal(shortened[0][1:, :, -1], plain[0][1:, :, -1])  # the prompt's last token too


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_by_hand_matches_generate(kind, processors, models, compressed):
    """model(...) with the cache, step by step (no position ids given), is generate's second step."""
    model, inputs = models[kind], batch(processors[kind])
    compressed(kind, keep=0.25)
    with torch.no_grad():
        first = model(**inputs, use_cache=True)
        token = first.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
        second = model(input_ids=token, attention_mask=mask, cache=first.cache).logits[:, -1]
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
    torch.testing.assert_close(second, generated.logits[1], rtol=0, atol=1e-5)


def recorded_attention(model, layer: int):
    """Run the tower with an eager attention function that records the softmax weights of block
    ``layer`` (transformers' AttentionInterface): the weights the model itself attends with."""
    from transformers import AttentionInterface

    module = sys.modules[type(model.model.visual.blocks[0].attn).__module__]
    target = model.model.visual.blocks[layer].attn
    weights = []

    def recording(attention, query, key, value, attention_mask, **kwargs):
        output, probabilities = module.eager_attention_forward(attention, query, key, value, attention_mask, **kwargs)
        if attention is target:
            weights.append(probabilities.detach())  # (1, heads, T, T) per attention segment
        return output, probabilities

    AttentionInterface.register("meteor_test_recording", recording)
    return weights


@pytest.mark.parametrize("kind", KINDS)
def test_selection_is_what_the_towers_attention_says(kind, processors, models, compressed):
    from transformers.vision_utils import get_vision_window_index

    model, inputs = models[kind], batch(processors[kind])
    visual = model.model.visual
    layer = 3  # the last full-attention block of both tiny towers
    weights = recorded_attention(model, layer)
    before = visual.config._attn_implementation
    visual.config._attn_implementation = "meteor_test_recording"
    try:
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    finally:
        visual.config._attn_implementation = before
    # Independent of the adapter: attention received = column sums of the softmax over queries and heads,
    # per image, renormalised; a merged token is its 2 × 2 patches (consecutive in the tower's order).
    received = torch.cat([w[0].sum(dim=(0, 1)) / w[0].sum() for w in weights])  # (patches,)
    merged = received.view(-1, 4).sum(-1)
    if kind == "qwen2.5-vl":  # the tower runs in window order: back to raster order
        window_index, _ = get_vision_window_index(inputs["image_grid_thw"], 2, visual.window_size, visual.patch_size)
        merged = merged[torch.argsort(window_index)]
    sizes = [int(t * h * w) // 4 for t, h, w in inputs["image_grid_thw"].tolist()]

    compressed(kind, keep=0.25, layer=layer)
    selections = selection_report(model, inputs)  # the SDPA model: scores from the q/k it computes
    chosen_other_than_first = False
    for selection, reference in zip(selections, merged.split(sizes)):
        torch.testing.assert_close(torch.tensor(selection.scores), reference, rtol=1e-4, atol=1e-6)
        k = len(selection.kept)
        top = torch.sort(reference, descending=True, stable=True).indices[:k].sort().values.tolist()
        assert selection.kept == top
        chosen_other_than_first |= selection.kept != list(range(k))
    assert chosen_other_than_first
    # the same through a forward call, and with another full-attention block the choice is another one
    with torch.no_grad():
        model(**inputs)
    assert [s.kept for s in selection_report(model)] == [s.kept for s in selections]
    compressed(kind, keep=0.25, layer=1)
    assert [s.scores for s in selection_report(model, inputs)] != [s.scores for s in selections]


def video_inputs(kind: str, model, processor, frames: int = 2, grid: tuple[int, int] = (4, 6)) -> dict:
    """An image and a video of ``frames`` temporal patches on a (h, w) patch grid, laid out as the Qwen
    processors do: the image by the processor's image processor, its placeholders expanded; the video
    Qwen2.5-VL's way (one run of placeholders) or Qwen3-VL's (a "<t seconds>" label and a
    vision_start/end pair per frame)."""
    image = processor.image_processor([picture(60, 60, 5)], return_tensors="pt")
    image_tokens = int(image["image_grid_thw"].prod()) // 4
    h, w = grid
    per_frame = h * w // 4
    patch = PATCH[kind]
    if kind == "qwen2.5-vl":
        video = "<|vision_start|>" + "<|video_pad|>" * (frames * per_frame) + "<|vision_end|>"
    else:
        video = "".join(f"<{1.0 * f:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per_frame + "<|vision_end|>"
                        for f in range(frames))
    text = CHAT.format("<|vision_start|>" + "<|image_pad|>" * image_tokens + "<|vision_end|>" + video + "What happens?")
    encoded = processor.tokenizer([text], return_tensors="pt")
    ids = encoded["input_ids"]
    types = torch.zeros_like(ids)
    types[ids == model.config.image_token_id] = 1
    types[ids == model.config.video_token_id] = 2
    generator = torch.Generator().manual_seed(7)
    inputs = dict(input_ids=ids, attention_mask=encoded["attention_mask"], mm_token_type_ids=types,
                  pixel_values=image["pixel_values"], image_grid_thw=image["image_grid_thw"],
                  pixel_values_videos=torch.randn(frames * h * w, 3 * 2 * patch * patch, generator=generator),
                  video_grid_thw=torch.tensor([[frames, h, w]]))
    if kind == "qwen2.5-vl":
        inputs["second_per_grid_ts"] = torch.tensor([1.0])
    return inputs


@pytest.mark.parametrize("kind", KINDS)
def test_video_frames_are_selected_one_by_one(kind, processors, models, compressed):
    model = models[kind]
    inputs = video_inputs(kind, model, processors[kind])
    with torch.no_grad():
        reference = model(**inputs).logits
        full_positions, _ = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
            video_grid_thw=inputs["video_grid_thw"], **({"second_per_grid_ts": inputs["second_per_grid_ts"]}
                                                        if "second_per_grid_ts" in inputs else {}))
        compressed(kind, keep=0.5)
        with keeping(model, 1.0):
            torch.testing.assert_close(model(**inputs).logits, reference, rtol=0, atol=1e-6)
        seen, handle = language_model_inputs(model)
        with keeping(model, [1, 3]):  # one token of the image, three of each video frame
            model(**inputs)
        handle.remove()
    selections = selection_report(model)
    assert [(s.modality, s.item, s.frame, len(s.kept)) for s in selections] == [
        ("image", 0, 0, 1), ("video", 0, 0, 3), ("video", 0, 1, 3)]
    keep = expected_columns(inputs, selections, model.config)[0]
    got = seen[-1]["position_ids"][-3:, 0]
    assert got.shape[-1] == int(keep.sum())
    assert torch.equal(got, full_positions[:, 0, keep.nonzero()[:, 0]])
    video_columns = inputs["input_ids"][0, keep] == model.config.video_token_id
    times = got[0, video_columns]
    assert len(set(times[:3].tolist())) == 1 and len(set(times[3:].tolist())) == 1 and times[3] > times[0]


def test_keep_as_a_count_per_image_and_per_call_lists(processors, models, compressed):
    model, inputs = models["qwen2.5-vl"], batch(processors["qwen2.5-vl"])
    sizes = [int(t * h * w) // 4 for t, h, w in inputs["image_grid_thw"].tolist()]
    compressed("qwen2.5-vl", keep=3)
    with torch.no_grad():
        model(**inputs)
        assert [len(s.kept) for s in selection_report(model)] == [min(3, n) for n in sizes]
        with keeping(model, [0.5, 2, 1.0]):
            model(**inputs)
            assert [len(s.kept) for s in selection_report(model)] == [round(sizes[0] / 2), 2, sizes[2]]
        with keeping(model, 10_000):  # more than an image has: all of it
            model(**inputs)
            assert [len(s.kept) for s in selection_report(model)] == sizes
        meteor.compress(model, keep=0.11)  # again: a new keep for the installed hooks
        model(**inputs)
        assert [len(s.kept) for s in selection_report(model)] == [max(1, int(0.11 * n + 0.5)) for n in sizes]
    assert tokens_to_keep(0.25, 2304) == 576 and tokens_to_keep(0.11, 1728) == 190 and tokens_to_keep(0.01, 4) == 1


def test_threads_keep_their_own_settings_and_reports(processors, models, compressed):
    """A server runs calls side by side: each thread's keeping() and report are its own."""
    import threading

    model, inputs = models["qwen2.5-vl"], batch(processors["qwen2.5-vl"])
    compressed("qwen2.5-vl", keep=0.25)
    reports, errors = {}, []

    def run(keep: int) -> None:
        try:
            with keeping(model, keep), torch.no_grad():
                for _ in range(3):
                    model(**inputs)
                    reports.setdefault(keep, []).append([len(s.kept) for s in selection_report(model)])
        except Exception as error:  # surfaced below, with the thread's keep
            errors.append((keep, error))

    threads = [threading.Thread(target=run, args=(keep,)) for keep in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert reports == {1: [[1, 1, 1]] * 3, 2: [[2, 2, 2]] * 3}
    assert [len(s.kept) for s in selection_report(model)] == []  # this thread ran nothing


def test_shortening_keeps_each_rows_padding_side():
    keep = torch.tensor([[False, True, False, True, True], [True, True, True, True, False]])
    left, right = shorten(keep, right_padded=False), shorten(keep, right_padded=True)
    values = torch.arange(10).view(2, 5)
    assert left.take(values, -1).tolist() == [[-1, 1, 3, 4], [5, 6, 7, 8]]
    assert right.take(values, -1).tolist() == [[1, 3, 4, -1], [5, 6, 7, 8]]
    positions = torch.arange(30).view(3, 2, 5)  # (3, B, L) rows of M-RoPE positions gather alike
    assert left.take(positions, 0)[2].tolist() == [[0, 21, 23, 24], [25, 26, 27, 28]]


def test_right_padded_batches_work_too(processors, models, compressed):
    """A right-padded batch (as in training-style calls): each row's last real logit is its own."""
    model, processor = models["qwen3-vl"], processors["qwen3-vl"]
    compressed("qwen3-vl", keep=0.25)
    processor.tokenizer.padding_side = "right"
    try:
        inputs = batch(processor)
        alone = batch(processor, [PROMPTS[0]])
    finally:
        processor.tokenizer.padding_side = "left"
    with torch.no_grad():
        seen, handle = language_model_inputs(model)
        model(**inputs)
        handle.remove()
        single = model(**alone).logits[0, -1]
        mask = seen[-1]["attention_mask"]
        together = model(**inputs).logits
    last = int(mask[0].sum()) - 1
    assert mask[0, last + 1:].eq(0).all() and mask[0, :last + 1].eq(1).all()
    torch.testing.assert_close(together[0, last], single, rtol=0, atol=1e-5)


def test_unsupported_settings_are_refused_with_the_reason(processors, models, tokenizer, compressed):
    model, inputs = models["qwen2.5-vl"], batch(processors["qwen2.5-vl"])
    with pytest.raises(ValueError, match=r"attends within windows.*full-attention blocks \[1, 3\]"):
        meteor.compress(model, layer=0)
    with pytest.raises(ValueError, match="not a block"):
        meteor.compress(model, layer=7)
    for bad in (0.0, 1.5, 0, True, "half"):
        with pytest.raises(ValueError, match="keep"):
            meteor.compress(model, keep=bad)
    with pytest.raises(TypeError, match="supports transformers' Qwen2_5_VLForConditionalGeneration"):
        meteor.compress(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not compressed"):
        selection_report(model)
    compressed("qwen2.5-vl", keep=0.25)
    with pytest.raises(ValueError, match="is for inference"):
        model(**inputs, labels=inputs["input_ids"])
    with pytest.raises(ValueError, match="3 images and videos"):
        with keeping(model, [0.5, 0.5]):
            model(**inputs)
    no_types = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**no_types)
    embeds = {k: v for k, v in inputs.items() if k != "input_ids"}
    embeds["inputs_embeds"] = model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(ValueError, match="input_ids"):
        model(**embeds)
    with torch.no_grad():
        first = model(**inputs, use_cache=True)
    with pytest.raises(ValueError, match="fresh cache"):
        model(**inputs, cache=first.cache)
    windowless = tiny_model("qwen2.5-vl", tokenizer)
    windowless.model.visual.fullatt_block_indexes = []
    with pytest.raises(ValueError, match="no full-attention block"):
        meteor.compress(windowless)


def test_uncompress_leaves_no_hook_behind(models, compressed):
    model = models["qwen3-vl"]
    modules = list(model.modules())

    def hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules)

    before = hooks()
    compressed("qwen3-vl", keep=0.5)
    assert hooks() > before
    meteor.compress(model, keep=1.0)  # keep=1.0 is uncompress
    assert hooks() == before and not hasattr(model.model, "_meteor_compressor")


@pytest.mark.parametrize("kind", KINDS)
def test_report_and_its_figure(kind, processors, models, compressed, tmp_path):
    processor, model = processors[kind], models[kind]
    inputs = batch(processor)
    compressed(kind, keep=0.25)
    selections = selection_report(model, inputs)
    table = selection_table(selections)
    assert [row["grid"] for row in table] == [list(s.grid) for s in selections]
    assert all(0 < row["mass_kept"] <= 1 and abs(sum(row["scores"]) - 1) < 1e-4 for row in table)
    json.dumps(table)
    # the processor's patches put back into pictures: the processor's own resize of the first image
    frames = item_frames(inputs["pixel_values"], inputs["image_grid_thw"], PATCH[kind], 2, 2)
    resized = processor.image_processor([picture(*PROMPTS[0][1][0])], return_tensors="pt", do_resize=True)
    assert frames[0].shape == (1, 3, int(resized["image_grid_thw"][0, 1]) * PATCH[kind],
                               int(resized["image_grid_thw"][0, 2]) * PATCH[kind])
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    corner = (frames[0][0] * std + mean)[:, :4, :4] * 255  # the gradient's dark top-left corner
    assert corner.mean() < 60
    figure = draw_frames(selections, inputs["pixel_values"], inputs["image_grid_thw"], processor.image_processor,
                         title="kept")
    path = tmp_path / "kept.png"
    figure.savefig(path)
    assert path.stat().st_size > 1000 and len(figure.axes) == 2 * len(selections)


def test_compress_is_a_lazy_attribute_of_the_package():
    code = ("import json, sys, meteor; before = 'transformers' in sys.modules; f = meteor.compress; "
            "print(json.dumps([before, f.__module__, meteor.uncompress.__module__]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [False, "meteor.adapters.qwen_vl", "meteor.adapters.qwen_vl"]


def test_the_benchmark_runs_and_its_prompts_shrink_as_asked(tmp_path):
    """``python -m meteor.bench.qwen_vl --quick``: the real classes at small widths, one 336×224 image."""
    from meteor.bench import qwen_vl as bench

    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--layers", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = results["rows"]
    merged = results["grid_thw"][1] * results["grid_thw"][2] // 4
    assert [r["visual_tokens"] for r in rows.values()] == [merged, round(merged / 4), max(1, int(0.11 * merged + 0.5))]
    assert all(r["prompt_tokens"] == 52 + r["visual_tokens"] for r in rows.values())  # 50 text + vision start/end
    assert all(r["vision_s"] > 0 and r["prefill_s"] > 0 and r["selection_s"] >= 0 for r in rows.values())


QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for part in m['content'] %}"
                      "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
                      "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""Qwen2.5-VL's chat format (ChatML, the image as vision tokens), as its processor's template writes it."""


@pytest.mark.parametrize("kind", KINDS)
def test_explain_draws_what_compress_keeps_and_answers(kind, processors, models, compressed, tmp_path):
    """meteor explain on a Qwen-VL model: the figure and the JSON hold the selection_report of the
    answer it gives, which is the compressed model's greedy answer."""
    import json

    from meteor.adapters.qwen_vl.explain import explain_qwen, format_qwen_explanation

    processor, model = processors[kind], models[kind]
    processor.chat_template = QWEN_CHAT_TEMPLATE
    image = picture(150, 100, 1)
    compressed(kind, keep=0.25)
    result = explain_qwen(model, processor, image, "What is in the image?", tmp_path / "kept.png", keep=0.25,
                          max_new_tokens=4)
    (frame,) = result.frames
    rows, cols = frame["grid"]
    assert len(frame["kept"]) == tokens_to_keep(0.25, rows * cols)
    assert frame["kept"] == meteor.adapters.qwen_vl.selection_report(model)[0].kept
    assert (tmp_path / "kept.png").stat().st_size > 5_000
    assert json.loads((tmp_path / "kept.json").read_text())["frames"][0]["kept"] == frame["kept"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.count(IMAGE) == 1
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        again = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert result.answer == processor.decode(again, skip_special_tokens=True).strip()
    assert format_qwen_explanation(result).startswith(f"answer: {result.answer}")


def test_the_explain_command_tells_a_qwen_folder_from_a_llava_meteor_one(tmp_path, capsys):
    from meteor.adapters.qwen_vl.explain import is_qwen_vl_folder
    from meteor.cli import main
    from meteor.pretrained import save_pretrained
    from meteor.testing import tiny_model as tiny_llava_meteor

    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    model, processor = tiny_llava_meteor()
    save_pretrained(tmp_path / "meteor", model, processor)
    assert is_qwen_vl_folder(tmp_path / "qwen") and not is_qwen_vl_folder(tmp_path / "meteor")
    picture(60, 60, 1).save(tmp_path / "p.png")
    assert main(["explain", "--model", str(tmp_path / "meteor"), "--image", str(tmp_path / "p.png"),
                 "--keep", "0.25"]) == 2
    assert "--keep is for Qwen-VL folders" in capsys.readouterr().err
    assert main(["explain", "--model", str(tmp_path / "qwen"), "--image", str(tmp_path / "p.png"),
                 "--tokens-per-slice", "4"]) == 2
    assert "give --keep" in capsys.readouterr().err
