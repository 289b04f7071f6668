"""Real tokenizer shapes, built inside the tests: the prompt is the LLM's own format token for token.

Tokenizers (tiny vocabularies, the real classes and file layouts):
- ``vicuna-legacy`` / ``vicuna``: a sentencepiece ``tokenizer.model`` (BPE, byte fallback, dummy
  prefix, split digits: LLaMA's trainer settings) with ``tokenizer_config.json`` and
  ``special_tokens_map.json`` shaped as lmsys' vicuna-7b-v1.5 ships them (``LlamaTokenizer``,
  ``add_bos_token`` true, ``<s>``/``</s>``/``<unk>`` as non-normalised AddedTokens, no pad token in
  the config and ``<unk>`` as pad in the map, no chat template, ``model_max_length`` 4096), with
  ``legacy`` true (as the issue reports lmsys' folder) and false. transformers 5 has no
  sentencepiece-backed LlamaTokenizer any more: it converts ``tokenizer.model`` when loading, which
  is what a user gets; ``_slow_llama_pieces`` reproduces transformers 4's slow LlamaTokenizer with
  the sentencepiece library as the reference Vicuna was trained with.
- ``vicuna-legacy-fast`` / ``vicuna-fast``: their fast conversion, a ``tokenizer.json`` folder.
- ``llama3``: byte-level BPE with LLaMA-3's split pattern, special tokens and Meta-Llama-3-8B-
  Instruct's chat template; ``qwen2``: ``Qwen2Tokenizer`` with Qwen2-7B-Instruct's chat template;
  ``mistral``: the sentencepiece folder with Mistral-7B-Instruct-v0.2's chat template.
- ``demo-bpe``: the demo's byte-level BPE (``meteor.testing.tiny_tokenizer``).
"""

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from meteor.model.configuration import MeteorConfig
from meteor.processing.conversation import IGNORE_INDEX, VICUNA_SYSTEM
from meteor.testing import tiny_clip_vision_config, tiny_llama_config, tiny_meteor_config, tiny_tokenizer
from meteor.processing.processor import LlavaMeteorProcessor, build_processor
from meteor.model.vision import VisionTower
from meteor.pretrained import save_pretrained
from meteor.pretrained import load_pretrained
from meteor.pretrained import build

import sentencepiece as spm

SENTENCES = [VICUNA_SYSTEM, "USER: What is in the image? ASSISTANT: a red circle, a blue square.",
             "USER: How many shapes are there? ASSISTANT: There are 3 shapes.",
             "What colour is the square? red green blue yellow. Describe the image.",
             "The answer is 0 1 2 3 4 5 6 7 8 9 10. Hello world, this is a test of the tokenizer."]

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
    "are supported!') }}{% endif %}{% endfor %}")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
END_OF_ANSWER = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>"}   # the others end answers with </s>
KINDS = ("vicuna-legacy", "vicuna", "vicuna-legacy-fast", "vicuna-fast", "llama3", "qwen2", "mistral", "demo-bpe")
SPM_KINDS = {"vicuna-legacy": True, "vicuna": False}


# --- building the tokenizer folders ------------------------------------------------------------------
def _added(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False}


def vicuna_folder(folder: Path, legacy: bool, chat_template: str | None = None) -> Path:
    """A Vicuna v1.5-shaped tokenizer folder (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 10), model_prefix=str(folder / "tokenizer"), vocab_size=420,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": _added("<s>"),
              "clean_up_tokenization_spaces": False, "eos_token": _added("</s>"), "legacy": legacy,
              "model_max_length": 4096, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
              "tokenizer_class": "LlamaTokenizer", "unk_token": _added("<unk>")}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": _added("<s>"), "eos_token": _added("</s>"), "pad_token": "<unk>",
         "unk_token": _added("<unk>")}, indent=2) + "\n")
    return folder


def _byte_level_bpe(split: str, specials: list[str], nfc: bool = False):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    if nfc:
        core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(SENTENCES * 10, trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return core


def llama3_folder(folder: Path) -> Path:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    core = _byte_level_bpe(LLAMA3_SPLIT, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                          "<|end_header_id|>", "<|eot_id|>"])
    bos = core.token_to_id("<|begin_of_text|>")
    core.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                            chat_template=LLAMA3_TEMPLATE).save_pretrained(folder)
    return folder


def qwen2_folder(folder: Path) -> Path:
    from transformers import Qwen2Tokenizer

    core = _byte_level_bpe(QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], nfc=True)
    model = json.loads(core.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                   unk_token=None, extra_special_tokens=["<|im_start|>", "<|im_end|>"],
                   chat_template=QWEN2_TEMPLATE).save_pretrained(folder)
    return folder


def build_folder(kind: str, root: Path) -> Path:
    from transformers import AutoTokenizer

    folder = root / kind
    if kind in SPM_KINDS:
        return vicuna_folder(folder, SPM_KINDS[kind])
    if kind.endswith("-fast"):
        AutoTokenizer.from_pretrained(build_folder(kind[:-len("-fast")], root)).save_pretrained(folder)
        return folder
    if kind == "llama3":
        return llama3_folder(folder)
    if kind == "qwen2":
        return qwen2_folder(folder)
    if kind == "mistral":
        return vicuna_folder(folder, legacy=False, chat_template=MISTRAL_TEMPLATE)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {kind: build_folder(kind, root / "built") for kind in KINDS}


def _processor(folder: Path) -> LlavaMeteorProcessor:
    from transformers import AutoTokenizer

    return build_processor(AutoTokenizer.from_pretrained(folder), tiny_meteor_config(), patch_size=14, base_size=56)


def _image(processor, width=112, height=168):
    return processor.prepare_image(Image.new("RGB", (width, height), (90, 120, 200)))


# --- references -----------------------------------------------------------------------------------
QUESTIONS = ("<image>\nWhat is in the image?", "How many shapes are there?")
ANSWERS = ("a red circle, a blue square.", "There are 3 shapes.")


def _conversation(with_image: bool = True) -> list[dict]:
    first = QUESTIONS[0] if with_image else QUESTIONS[0].replace("<image>\n", "")
    return [{"from": "human", "value": first}, {"from": "gpt", "value": ANSWERS[0]},
            {"from": "human", "value": QUESTIONS[1]}, {"from": "gpt", "value": ANSWERS[1]}]


def _fastchat_vicuna(conversation, eos: str, generation: bool = False) -> str:
    """FastChat's vicuna_v1.1 rendering (SeparatorStyle.ADD_COLON_TWO, sep " ", sep2 "</s>"):
    system + sep, then "ROLE: message" + sep or sep2 per message, "ASSISTANT:" for the reply."""
    text = VICUNA_SYSTEM + " "
    for index, turn in enumerate(conversation):
        role = "USER" if turn["from"] == "human" else "ASSISTANT"
        text += f"{role}: {turn['value']}" + (" " if index % 2 == 0 else eos)
    return text + ("ASSISTANT:" if generation else "")


def _whole_string_ids(tokenizer, conversation, template: str, generation: bool = False) -> list[int]:
    """The ids the LLM's own tooling gives the conversation (FastChat's ``tokenizer(prompt)`` for
    vicuna_v1, ``apply_chat_template`` for chat templates), with BOS where the tokenizer has one."""
    if template == "chat_template":
        messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                    for t in conversation]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = _fastchat_vicuna(conversation, tokenizer.eos_token, generation)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(text, add_special_tokens=False)["input_ids"]


def _collapse_layouts(processor, ids: list[int], images) -> list[int]:
    """Each image's layout, which must stand whole where its placeholder was, back to the one
    placeholder it replaced."""
    out, position, queue = [], 0, list(images)
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


def _slow_llama_pieces(model_file: Path, text: str, legacy: bool, specials: list[str]) -> list[str]:
    """transformers 4's sentencepiece LlamaTokenizer.tokenize, with BOS: the text is split at
    special tokens and each piece encoded by sentencepiece; legacy encodes every piece with its own
    dummy prefix, non-legacy only the first (the model without dummy prefix, and the unk trick for
    pieces that start with a space)."""
    from sentencepiece import sentencepiece_model_pb2

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    if not legacy:
        proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False
        sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        text = "▁" + text.replace("▁", " ")
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    pieces = []
    for chunk in re.split(pattern, text):
        if chunk in specials:
            pieces.append(chunk)
        elif chunk and (legacy or not chunk.startswith(("▁", " "))):
            pieces += sp.encode(chunk, out_type=str)
        elif chunk:
            unk = len(sp.encode("<unk>"))
            pieces += sp.encode("<unk>" + chunk, out_type=str)[unk:]
    if not legacy and len(pieces) > 1 and pieces[0] == "▁" and pieces[1] in specials:
        pieces = pieces[1:]
    return ["<s>"] + pieces


def _templates(kind: str) -> list[str]:
    has_own = kind in END_OF_ANSWER or kind == "mistral"
    return ["vicuna_v1", "chat_template"] if has_own else ["vicuna_v1"]


CASES = [(kind, template) for kind in KINDS for template in _templates(kind)]


# --- the checks, for every tokenizer ---------------------------------------------------------------
@pytest.mark.parametrize("kind,template", CASES)
def test_conversation_ids_are_the_whole_string_ids(folders, kind, template):
    processor = _processor(folders[kind])
    tokenizer = processor.tokenizer
    text_only = _conversation(with_image=False)
    ids, _ = processor.encode(text_only, [], template)
    assert ids == _whole_string_ids(tokenizer, text_only, template)
    prompt, _ = processor.encode(text_only, [], template, for_generation=True)
    assert prompt == _whole_string_ids(tokenizer, text_only[:-1], template, generation=True)
    if kind in SPM_KINDS and template == "vicuna_v1":   # FastChat's own call, and the slow tokenizer
        text = _fastchat_vicuna(text_only, "</s>")
        assert ids == tokenizer(text)["input_ids"]
        slow = _slow_llama_pieces(folders[kind] / "tokenizer.model", text, SPM_KINDS[kind], ["<s>", "</s>", "<unk>"])
        assert tokenizer.convert_ids_to_tokens(ids) == slow
    # With an image: the text around the layout is the whole string's, the image one placeholder.
    image = _image(processor)
    with_image, _ = processor.encode(_conversation(), [image], template)
    assert _collapse_layouts(processor, with_image, [image]) == _whole_string_ids(tokenizer, _conversation(), template)


@pytest.mark.parametrize("kind", SPM_KINDS)
def test_llava_shaped_prompts_are_the_slow_tokenizers(folders, kind):
    """On LLaVA's shapes ("<image>\\n" first) the ids are those of transformers 4's slow
    LlamaTokenizer, which Vicuna and LLaVA were trained with. (transformers 5's conversion of a
    legacy tokenizer differs from it where text after a special token starts with a space, e.g.
    "<image> Hi": the slow one gives "▁ ▁H", the converted one "▁H".)"""
    processor = _processor(folders[kind])
    specials = ["<s>", "</s>", "<unk>", "<image>"]
    for template, conversation in (("vicuna_v1", _conversation()), ("plain", _conversation()[:2])):
        image = _image(processor, 56, 56)
        ids, _ = processor.encode(conversation, [image], template)
        collapsed = _collapse_layouts(processor, ids, [image])
        text = (_fastchat_vicuna(conversation, "</s>") if template == "vicuna_v1"
                else f"<image>\n{ANSWERS[0]}</s>")
        slow = _slow_llama_pieces(folders[kind] / "tokenizer.model", text, SPM_KINDS[kind], specials)
        assert processor.tokenizer.convert_ids_to_tokens(collapsed) == slow


@pytest.mark.parametrize("kind", KINDS)
def test_the_image_layout_holds_only_image_and_separator_ids(folders, kind):
    processor = _processor(folders[kind])
    tokenizer = processor.tokenizer
    # The separators as they read inside text: "," and the newline, with no dummy-prefix piece.
    newline = "<0x0A>" if kind in SPM_KINDS or kind.startswith(("vicuna", "mistral")) else "Ċ"
    assert tokenizer.convert_ids_to_tokens(processor.slice_separator_ids) == [","]
    assert tokenizer.convert_ids_to_tokens(processor.row_separator_ids) == [newline]
    image = _image(processor)
    rows, cols = image.plan.grid
    k = processor.config.compressor.tokens_per_slice
    ids, labels = processor.encode(_conversation(), [image], "vicuna_v1")
    first = ids.index(processor.image_token_id)
    last = len(ids) - ids[::-1].index(processor.image_token_id)
    layout = ids[first:last]
    assert layout == processor.image_layout(image)
    row = ([processor.image_token_id] * k + processor.slice_separator_ids) * (cols - 1) + [processor.image_token_id] * k
    assert layout == (row + processor.row_separator_ids) * rows + [processor.image_token_id] * k
    assert all(label == IGNORE_INDEX for label in labels[first:last])


@pytest.mark.parametrize("kind", KINDS)
def test_ids_are_identical_after_save_pretrained_and_from_pretrained(folders, kind, tmp_path):
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(folders[kind])
    vision = VisionTower.from_model(CLIPVisionModel(tiny_clip_vision_config()))
    language_model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    model, processor = build(vision, language_model, folders[kind], tiny_meteor_config())
    template = _templates(kind)[-1]
    photo = Image.new("RGB", (112, 168), (200, 60, 60))

    def encodings(proc):
        image = proc.prepare_image(photo)
        return ([proc.encode(_conversation(), [image], t) for t in ("vicuna_v1", template)]
                + [proc.encode(_conversation()[:2], [image], "plain")]
                + [proc.prompts(["What is in the image?", "Describe it."], [photo, None], template).input_ids.tolist()])

    before = encodings(processor)
    folder = save_pretrained(tmp_path / "saved", model, processor)
    for source in sorted(folders[kind].iterdir()):   # the user's files, as they are
        assert (folder / source.name).read_bytes() == source.read_bytes(), source.name
    _, reloaded = load_pretrained(folder)
    assert encodings(reloaded) == before
    assert reloaded.image_token_id == processor.image_token_id
    if kind != "demo-bpe":   # the placeholder is added after the LLM's vocabulary, as it was in training
        assert processor.image_token_id == len(tokenizer)


@pytest.mark.parametrize("kind,template", CASES + [(kind, "plain") for kind in KINDS])
def test_labels_cover_exactly_the_answers_and_their_end_tokens(folders, kind, template):
    processor = _processor(folders[kind])
    tokenizer = processor.tokenizer
    conversation = _conversation() if template != "plain" else _conversation()[:2]
    ids, labels = processor.encode(conversation, [_image(processor)], template)
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    end = END_OF_ANSWER.get(kind, tokenizer.eos_token) if template == "chat_template" else tokenizer.eos_token
    answers = ANSWERS[:len(runs)]
    assert len(runs) == len(conversation) // 2
    for run, answer in zip(runs, answers):
        assert run[-1] == tokenizer.convert_tokens_to_ids(end)
        assert tokenizer.decode(run).strip() == answer + end
    masked = [token for token, label in zip(ids, labels) if label == IGNORE_INDEX]
    assert tokenizer.decode([t for t in masked if t != processor.image_token_id]).count(ANSWERS[0]) == 0


# --- end to end with the sentencepiece tokenizer ----------------------------------------------------
OPENAI_CLIP_PREPROCESSOR = {   # openai/clip-vit-large-patch14-336's, at the tiny tower's 56-px side
    "crop_size": 56, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 56}


@pytest.mark.slow
def test_train_save_load_evaluate_with_a_vicuna_shaped_sentencepiece_folder(tmp_path):
    """Both stages through ``meteor.train.train`` from a Vicuna-shaped folder (sentencepiece
    tokenizer, legacy, + a tiny LlamaForCausalLM) and a CLIP folder with OpenAI's preprocessor
    config; the saved model holds the user's tokenizer files and prompts exactly as the tokenizer
    it was trained with; the world benchmark runs on it."""
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

    from meteor.testing import tiny_llava_data
    from meteor.eval import EvalConfig, evaluate
    from meteor.train import TrainConfig, train

    torch.manual_seed(0)
    vicuna = vicuna_folder(tmp_path / "vicuna-7b-v1.5", legacy=True)
    tokenizer_files = {path.name: path.read_bytes() for path in vicuna.iterdir()}
    LlamaForCausalLM(tiny_llama_config(len(AutoTokenizer.from_pretrained(vicuna)))).save_pretrained(vicuna)
    clip = tmp_path / "clip-vit-large-patch14-336"
    CLIPVisionModel(tiny_clip_vision_config()).save_pretrained(clip)
    (clip / "preprocessor_config.json").write_text(json.dumps(OPENAI_CLIP_PREPROCESSOR))
    captions = tiny_llava_data(tmp_path / "data", 16, seed=2, caption=True)
    instruct = tiny_llava_data(tmp_path / "data", 16, seed=2)
    (tmp_path / "meteor.json").write_text(tiny_meteor_config().to_json())
    common = dict(image_folder=str(tmp_path / "data"), vision=str(clip), language_model=str(vicuna),
                  meteor_config=str(tmp_path / "meteor.json"), global_batch_size=8,
                  per_device_batch_size=4, learning_rate=1e-3, save_every=100)
    stage1 = train(TrainConfig(stage=1, data=str(captions), output_dir=str(tmp_path / "s1"), max_steps=2, **common))
    stage2 = train(TrainConfig(stage=2, data=str(instruct), output_dir=str(tmp_path / "s2"), max_steps=2,
                               compressor_from=str(tmp_path / "s1"), **common))
    assert stage1.skipped.total == stage2.skipped.total == 0
    for name, content in tokenizer_files.items():
        assert (stage2.model_dir / name).read_bytes() == content, name

    model, processor = load_pretrained(stage2.model_dir)
    trained = build_processor(AutoTokenizer.from_pretrained(vicuna), model.meteor_config, patch_size=14, base_size=56)
    photo = tmp_path / "data" / "images" / "0004.png"
    question = ["What colour is the square?"]
    assert processor.prompts(question, [photo]).input_ids.tolist() == trained.prompts(question, [photo]).input_ids.tolist()
    records = json.loads(instruct.read_text())
    assert processor.encode(records[0]["conversations"], [processor.prepare_image(tmp_path / "data" / records[0]["image"])]) == \
        trained.encode(records[0]["conversations"], [trained.prepare_image(tmp_path / "data" / records[0]["image"])])

    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"question_id": r["id"], "question": "What colour is the square?",
                                        "answer": r["conversations"][1]["value"], "question_type": "colour",
                                        "image": r["image"]}) + "\n" for r in records[:4]))
    scores = evaluate("world", str(stage2.model_dir), str(test), str(tmp_path / "data"), str(tmp_path / "eval"),
                      EvalConfig(batch_size=2, max_new_tokens=3))
    assert scores["accuracy"]["all"]["questions"] == 4
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == 4
