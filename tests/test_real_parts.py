"""LLaVA-Meteor made of real pretrained parts, through the whole tool.

The parts are what ``meteor weights --real`` makes from installed packages (tests/test_real_weights.py
checks them against their sources): DINOv2 ViT-S/14 (``Dinov2Model``) as the vision tower and
SmolLM2-135M-Instruct (``LlamaForCausalLM`` with its ChatML tokenizer and chat template) as the
language model, and scikit-image's photographs. ``meteor.pretrained.build`` joins them with a freshly
initialised Top-Down Compression (K = 16 per view, UHD slicing at 224 px, DINOv2's pre-training side)
and the model is saved as a folder, as a user would save one. Then each entry point runs on that
folder as a user runs it and is held to the transformers class's answer on the same prompt, greedily:
``meteor explain`` (the CLI), training-free CLS Top-K (``load_pretrained(compressor_overrides=...)``),
``meteor chat`` (a real process reading a pipe), ``meteor serve`` (a real server process asked with
the official ``openai`` client) and vLLM's offline engine with the package's plugin (in the
``.venv-vllm`` environment ``make vllm-env`` builds, as tests/test_vllm.py runs it). The compressor is
untrained, so answers about images are not meaningful: what is checked is that every path computes
the same thing as the reference, and that SmolLM2 inside the model still answers a text question
("Paris"). The visual expert is checked against transformers' own eager attention of the real tower.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from meteor.adapters.real_weights import cached_real_weights
from meteor.model.configuration import CompressorConfig, MeteorConfig
from meteor.model.vision import VisionTower
from meteor.pretrained import build, load_pretrained, save_pretrained

pytestmark = pytest.mark.real

K, BASE = 16, 224
CAPITAL = "What is the capital of France?"
ANIMAL = "What animal is this?"
MAX_TOKENS = 12


@pytest.fixture(scope="session")
def real():
    return cached_real_weights(log=print)


@pytest.fixture(scope="session")
def meteor(real, tmp_path_factory):
    """The model built from the parts, saved, and loaded back from its folder (what every entry point
    reads)."""
    torch.manual_seed(0)
    config = MeteorConfig(compressor=CompressorConfig(tokens_per_slice=K))        # template "auto"
    model, processor = build(real.dinov2, real.smollm2, real.smollm2, config, base_size=BASE)
    folder = save_pretrained(tmp_path_factory.mktemp("real-meteor") / "dinov2-smollm2", model, processor)
    del model
    model, processor = load_pretrained(folder)
    return SimpleNamespace(folder=folder, model=model.eval(), processor=processor)


@pytest.fixture(scope="module")
def eager_dinov2(real):
    from transformers import AutoModel

    return AutoModel.from_pretrained(real.dinov2, attn_implementation="eager").eval()


def eager_reference(eager, views: torch.Tensor, layer: int = -2):
    """transformers' own eager forward of the real tower: hidden_states[layer] without the CLS
    token, and the CLS row of the attention producing it, averaged over heads, CLS→CLS dropped,
    renormalised (Eq. 3)."""
    with torch.no_grad():
        out = eager(pixel_values=views, output_hidden_states=True, output_attentions=True)
    row = out.attentions[layer].mean(dim=1)[:, 0, 1:]
    return out.hidden_states[layer][:, 1:], row / row.sum(-1, keepdim=True)


def generate(meteor, messages, max_new_tokens: int = MAX_TOKENS, tokens_per_slice: int | None = None,
             model=None) -> tuple[list[int], list[int], str]:
    """The transformers class's greedy answer to a chat: (prompt ids, new ids up to and with the end
    of turn, their text)."""
    processor = meteor.processor
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           processor_kwargs={"tokens_per_slice": tokens_per_slice})
    with torch.no_grad():
        out = (model or meteor.model).generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = processor.tokenizer.eos_token_id
    if eos in new:
        new = new[:new.index(eos) + 1]
    return inputs["input_ids"][0].tolist(), new, processor.tokenizer.decode(new, skip_special_tokens=True)


def ask(text: str, *images: Path) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "path": str(path)} for path in images),
                                         {"type": "text", "text": text}]}]


# --- the tower -----------------------------------------------------------------------------------------------

def test_the_real_dinov2_tower_computes_transformers_eager_tokens_and_cls_attention(real, meteor, eager_dinov2):
    """Every view size of a sliced photograph (non-square slices, the position table interpolated from
    37×37), and the native 518-px square (the table as is), with SDPA in the tower."""
    tower = VisionTower.from_pretrained(real.dinov2)
    assert tower.config._attn_implementation == "sdpa" and tower.image_size == 518 and tower.num_prefix == 1
    sliced = meteor.processor.prepare_image(real.photo("chelsea"))
    assert sliced.plan.num_slices >= 2
    sizes = {tuple(view.shape[-2:]) for view in sliced.views()}
    assert any(h != w for h, w in sizes)
    views = [torch.stack([v for v in sliced.views() if tuple(v.shape[-2:]) == size]) for size in sorted(sizes)]
    with Image.open(real.photo("coffee")) as photo:
        views.append(meteor.processor.image_processor.prepare(photo.resize((518, 518))).global_view[None])
    for batch in views:
        out = tower(batch)
        tokens, row = eager_reference(eager_dinov2, batch)
        rows, cols = batch.shape[-2] // 14, batch.shape[-1] // 14
        assert out.grid == (rows, cols) and out.patch_tokens.shape == (len(batch), rows * cols, 384)
        torch.testing.assert_close(out.patch_tokens, tokens, rtol=1e-4, atol=2e-4)
        torch.testing.assert_close(out.cls_attention, row, rtol=1e-4, atol=1e-6)
    # the model's own tower (inside the saved and reloaded folder) computes the same
    inside = meteor.model.model.tower(views[0])
    torch.testing.assert_close(inside.cls_attention, tower(views[0]).cls_attention, rtol=0, atol=0)


# --- the model built from the parts -------------------------------------------------------------------------

def test_the_model_is_the_two_parts_with_smollm2s_own_chat_template(real, meteor):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model, processor = meteor.model, meteor.processor
    config = model.config
    assert config.vision_config.model_type == "dinov2" and config.text_config.model_type == "llama"
    assert (config.compressor["vision_width"], config.compressor["text_width"]) == (384, 576)
    assert processor.config.template == "chat_template" and config.template == "chat_template"   # "auto" resolved
    smollm2 = AutoTokenizer.from_pretrained(real.smollm2)
    assert processor.chat_template == smollm2.chat_template
    assert (meteor.folder / "chat_template.jinja").read_text() == smollm2.chat_template
    # <image> is added after SmolLM2's 49152 ids; the embeddings stay tied and unchanged
    assert processor.image_token_id == config.image_token_id == 49152 == len(smollm2)
    assert processor.tokenizer.pad_token_id == processor.tokenizer.eos_token_id == 2       # <|im_end|>
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with safe_open(str(real.smollm2 / "model.safetensors"), "pt") as saved:
        assert torch.equal(model.get_input_embeddings().weight, saved.get_tensor("model.embed_tokens.weight"))
        assert torch.equal(model.language_model.layers[29].mlp.down_proj.weight,
                           saved.get_tensor("model.layers.29.mlp.down_proj.weight"))
    with safe_open(str(real.dinov2 / "model.safetensors"), "pt") as saved:
        assert torch.equal(model.vision_tower.embeddings.position_embeddings,
                           saved.get_tensor("embeddings.position_embeddings"))
    assert processor.base_size == BASE and processor.image_mean == (0.485, 0.456, 0.406)
    # transformers' Auto class reads the folder as the same model
    auto = AutoModelForImageTextToText.from_pretrained(meteor.folder)
    assert type(auto) is type(model) and type(auto.model.vision_tower).__name__ == "Dinov2Model"


def collapse_layouts(processor, ids: list[int], images) -> list[int]:
    """``ids`` with each image's laid-out ids (visual tokens and separators) back to one <image> id."""
    out, queue, position = [], list(images), 0
    while position < len(ids):
        if ids[position] == processor.image_token_id:
            layout = processor.image_layout(queue.pop(0))
            assert ids[position:position + len(layout)] == layout
            out.append(processor.image_token_id)
            position += len(layout)
        else:
            out.append(ids[position])
            position += 1
    assert not queue
    return out


def test_the_chat_template_round_trips_with_images(real, meteor):
    from transformers import AutoTokenizer

    processor = meteor.processor
    chelsea, astronaut = real.photo("chelsea"), real.photo("astronaut")
    messages = [*ask("What is in this picture?", chelsea), {"role": "assistant", "content": "A cat."},
                *ask("And in this one?", astronaut)]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    # SmolLM2's own template, each image as "<image>\n" at the start of its message
    smollm2 = AutoTokenizer.from_pretrained(real.smollm2)
    plain = [{"role": "user", "content": "<image>\nWhat is in this picture?"}, {"role": "assistant", "content": "A cat."},
             {"role": "user", "content": "<image>\nAnd in this one?"}]
    assert text == smollm2.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM") \
        and text.endswith("<|im_start|>user\n<image>\nAnd in this one?<|im_end|>\n<|im_start|>assistant\n")
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = inputs["input_ids"][0].tolist()
    prepared = [processor.prepare_image(chelsea), processor.prepare_image(astronaut)]
    assert ids.count(processor.image_token_id) == sum(processor.num_image_tokens(image) for image in prepared)
    assert processor.tokenizer.decode(collapse_layouts(processor, ids, prepared)) == text       # nothing lost
    with Image.open(chelsea) as one, Image.open(astronaut) as two:
        again = processor(images=[one.convert("RGB"), two.convert("RGB")], text=text)
    assert again["input_ids"][0].tolist() == ids
    torch.testing.assert_close(again["pixel_values"], inputs["pixel_values"], rtol=0, atol=0)
    # training: only the assistant's answer and its end of turn are supervised
    conversation = [{"from": "human", "value": "<image>\nWhat is in this picture?"}, {"from": "gpt", "value": "A cat."}]
    train_ids, labels = processor.encode(conversation, prepared[:1])
    supervised = [token for token, label in zip(train_ids, labels) if label != -100]
    assert processor.tokenizer.decode(supervised).strip() == "A cat.<|im_end|>"
    # the reloaded processor renders as the built one
    _, reloaded = load_pretrained(meteor.folder)
    assert reloaded.apply_chat_template(messages, add_generation_prompt=True) == text


def test_smollm2_inside_the_model_still_answers_paris(meteor):
    _, _, answer = generate(meteor, [{"role": "user", "content": CAPITAL}])
    assert "Paris" in answer, answer


# --- meteor explain, training-free CLS Top-K -----------------------------------------------------------------

def test_meteor_explain_draws_dinov2s_cls_attention_on_a_photograph(real, meteor, eager_dinov2, tmp_path, capsys):
    from meteor.cli import main

    out = tmp_path / "chelsea.png"
    photo = real.photo("chelsea")
    assert main(["explain", "--model", str(meteor.folder), "--image", str(photo), "--question", ANIMAL,
                 "--out", str(out), "--max-new-tokens", str(MAX_TOKENS)]) == 0
    printed = capsys.readouterr().out
    with Image.open(out) as figure:
        assert figure.format == "PNG" and figure.size[0] > 400
    report = json.loads(out.with_suffix(".json").read_text())
    sliced = meteor.processor.prepare_image(photo)
    assert len(report["views"]) == sliced.plan.num_views and report["tokens_per_slice"] == K
    for view, pixels in zip(report["views"], sliced.views()):
        _, row = eager_reference(eager_dinov2, pixels[None])
        torch.testing.assert_close(torch.tensor(view["visual_scores"]), row[0], rtol=0, atol=2e-6)
        assert len(view["kept"]) == K
    _, _, answer = generate(meteor, ask(ANIMAL, photo))
    assert report["answer"] == answer and f"answer: {answer}" in printed


def test_training_free_cls_top_k_keeps_the_tokens_dinov2s_cls_attends_to_most(real, meteor, eager_dinov2):
    model, processor = load_pretrained(meteor.folder, compressor_overrides={"projector": "cls_topk"})
    assert model.config.compressor["projector"] == "cls_topk" and processor.config.compressor.projector == "cls_topk"
    torch.testing.assert_close(model.compressor.mlp.state_dict(), meteor.model.compressor.mlp.state_dict(), rtol=0,
                               atol=0)
    photo = real.photo("astronaut")
    sliced = processor.prepare_image(photo)
    tokens, selections = model.encode_images(**processor.image_inputs([sliced]), return_selection=True)
    assert len(selections) == sliced.plan.num_views
    per_view = tokens[0].split(K)
    for selection, pixels, got in zip(selections, sliced.views(), per_view):
        features, row = eager_reference(eager_dinov2, pixels[None])
        expected = torch.topk(row[0], K).indices.sort().values
        assert selection.indices.tolist() == expected.tolist()
        with torch.no_grad():
            torch.testing.assert_close(got, model.compressor.mlp(features[0, expected]), rtol=1e-4, atol=1e-4)
    _, new, _ = generate(meteor, ask(ANIMAL, photo), model=model)
    assert len(new) >= 1


# --- meteor chat, meteor serve -------------------------------------------------------------------------------

def test_meteor_chat_answers_in_a_real_process(real, meteor):
    """``meteor chat`` as a user pipes questions into it: a text question, then an image and a
    question about it (the second turn sees the first)."""
    photo = real.photo("chelsea")
    lines = f"{CAPITAL}\n/image {photo}\n{ANIMAL}\n"
    run = subprocess.run([sys.executable, "-m", "meteor", "chat", "--model", str(meteor.folder), "--max-new-tokens",
                          str(MAX_TOKENS)], input=lines, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    first = generate(meteor, [{"role": "user", "content": CAPITAL}])[2]
    second = generate(meteor, [{"role": "user", "content": CAPITAL}, {"role": "assistant", "content": first},
                               *ask(ANIMAL, photo)])[2]
    assert run.stdout.splitlines() == [first.strip(), second.strip()], run.stderr[-3000:]
    assert "Paris" in first
    assert "template chat_template, trained K=16" in run.stderr and " visual tokens (K′=16 per view" in run.stderr


def test_meteor_serve_answers_the_openai_client(real, meteor, tmp_path):
    import base64

    import openai
    from talk_helpers import meteor_server

    photo = real.photo("motorcycle")
    url = "data:image/png;base64," + base64.b64encode(photo.read_bytes()).decode()
    with meteor_server(meteor.folder, ["--no-ui"], log=tmp_path / "serve.log", timeout=600) as (base, _, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == [meteor.folder.name]
        text = client.chat.completions.create(model=meteor.folder.name, messages=[{"role": "user", "content": CAPITAL}],
                                              max_tokens=MAX_TOKENS, temperature=0)
        seen = client.chat.completions.create(
            model=meteor.folder.name, max_tokens=MAX_TOKENS, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": "Describe the image."}]}])
    ids, new, answer = generate(meteor, [{"role": "user", "content": CAPITAL}])
    assert text.choices[0].message.content == answer.strip() and "Paris" in answer
    assert (text.usage.prompt_tokens, text.usage.completion_tokens) == (len(ids), len(new))
    ids, new, answer = generate(meteor, ask("Describe the image.", photo))
    assert seen.choices[0].message.content == answer.strip()
    assert (seen.usage.prompt_tokens, seen.usage.completion_tokens) == (len(ids), len(new))
    assert seen.usage.visual_tokens == ids.count(meteor.processor.image_token_id) > K


# --- vLLM --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_vllm_answers_as_the_transformers_class(real, meteor, tmp_path):
    """One engine start (``vllm.LLM`` on the folder, the plugin found through its entry point), three
    prompts in one batch: text only, a sliced photograph, another photograph at K′ = 4."""
    from test_vllm import ROOT, VLLM_PYTHON, vllm_env

    if not VLLM_PYTHON.is_file():
        pytest.fail(f"vLLM's virtual environment is missing ({VLLM_PYTHON}): create it with `make vllm-env`")
    cases = [("text_only", [], None, CAPITAL), ("chelsea", ["chelsea"], None, ANIMAL),
             ("astronaut_k4", ["astronaut"], 4, "Describe the image.")]
    job, expected = [], {}
    for name, photos, k, question in cases:
        paths = [real.photo(photo) for photo in photos]
        messages = ask(question, *paths) if paths else [{"role": "user", "content": question}]
        prompt = meteor.processor.apply_chat_template(messages, add_generation_prompt=True)
        job.append({"name": name, "prompt": prompt, "images": [str(p) for p in paths],
                    "mm_processor_kwargs": {} if k is None else {"tokens_per_slice": k}})
        expected[name] = generate(meteor, messages, tokens_per_slice=k)
    (tmp_path / "job.json").write_text(json.dumps({"folder": str(meteor.folder), "max_tokens": MAX_TOKENS,
                                                   "cases": job}))
    started = time.perf_counter()
    run = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_engine.py"), str(tmp_path / "job.json"),
                          str(tmp_path / "result.json")], env=vllm_env(), capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-6000:]
    result = json.loads((tmp_path / "result.json").read_text())
    print(f"vLLM on the real parts: {time.perf_counter() - started:.0f} s in all, {result['seconds']}")
    for name, *_ in cases:
        prompt_ids, new, answer = expected[name]
        got = result["cases"][name]
        assert got["prompt_token_ids"] == prompt_ids, f"{name}: the prompt was laid out differently"
        assert got["token_ids"] == new, (f"{name}: vLLM answered {got['token_ids']}, transformers {new} "
                                         f"({answer!r})")
    assert "Paris" in expected["text_only"][2]
