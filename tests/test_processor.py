"""The processor: image layouts as ids, separator ids, the prompt's text, and saving the tokenizer."""

import pytest
from PIL import Image

from meteor.model.configuration import MeteorConfig
from meteor.processing.conversation import IGNORE_INDEX
from meteor.testing import tiny_meteor_config, tiny_tokenizer
from meteor.processing.processor import build_processor
from meteor.processing.tokenizer import separator_ids


def _processor(tokenizer=None, **compressor):
    return build_processor(tokenizer or tiny_tokenizer(), tiny_meteor_config(**compressor), patch_size=14,
                           base_size=56)


def _image(processor, width, height):
    return processor.prepare_image(Image.new("RGB", (width, height), (10, 200, 30)))


def test_separator_ids_are_those_inside_running_text():
    tokenizer = tiny_tokenizer()
    assert tokenizer.convert_ids_to_tokens(separator_ids(tokenizer, ",")) == [","]
    assert tokenizer.convert_ids_to_tokens(separator_ids(tokenizer, "\n")) == ["Ċ"]
    assert separator_ids(tokenizer, "") == []


def test_a_separator_that_merges_with_the_text_before_it_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.train_from_iterator(["a,", "image,", "The answer is x,"] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    glued = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    with pytest.raises(ValueError, match="separator ',' no stable ids"):
        separator_ids(glued, ",")


@pytest.mark.parametrize("size,k", [((56, 56), 4), ((112, 168), 4), ((168, 112), 2), ((112, 168), None)])
def test_the_layout_is_the_spatial_schema_in_ids(size, k):
    processor = _processor(tokens_per_slice=k)
    image = _image(processor, *size)
    rows, cols = image.plan.grid
    counts = [r * c for r, c in image.plan.view_patches] if k is None else [k] * (image.plan.num_slices + 1)
    img, comma, newline = processor.image_token_id, processor.slice_separator_ids, processor.row_separator_ids
    expected = []
    for row in range(rows):
        for col in range(cols):
            expected += (comma if col else []) + [img] * counts[row * cols + col]
        expected += newline
    assert processor.image_layout(image) == expected + [img] * counts[-1]
    assert processor.image_layout(image).count(img) == processor.num_image_tokens(image)


def test_each_placeholder_becomes_its_images_layout_and_nothing_else():
    processor = _processor()
    first, second = _image(processor, 112, 168), _image(processor, 56, 56)
    conversation = [{"from": "human", "value": "<image>\nCompare with <image>."}, {"from": "gpt", "value": "same"}]
    ids, labels = processor.encode(conversation, [first, second])
    img = processor.image_token_id
    at = ids.index(img)
    assert ids[at:at + len(processor.image_layout(first))] == processor.image_layout(first)
    at = ids.index(img, at + len(processor.image_layout(first)))
    assert ids[at:at + len(processor.image_layout(second))] == processor.image_layout(second)
    assert ids.count(img) == processor.num_image_tokens(first) + processor.num_image_tokens(second)
    assert all(label == IGNORE_INDEX for token, label in zip(ids, labels) if token == processor.image_token_id)


def test_a_template_that_drops_the_users_text_is_a_clear_error():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    processor = _processor(tokenizer)
    conversation = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    with pytest.raises(ValueError, match="holds 0 <image> token\\(s\\) for 1 image"):
        processor.encode(conversation, [_image(processor, 56, 56)], "chat_template")


def test_a_tokenizer_without_an_end_of_sequence_token_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.train_from_iterator(["a b c"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    with pytest.raises(ValueError, match="has no end-of-sequence token, which ends every answer"):
        build_processor(tokenizer, MeteorConfig())


def test_a_tokenizer_from_a_folder_is_saved_as_its_files(tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "source")
    (tmp_path / "source" / "tokenizer_config.json").write_text(
        (tmp_path / "source" / "tokenizer_config.json").read_text().replace("{", '{\n  "note": "kept as is",', 1))
    processor = _processor(AutoTokenizer.from_pretrained(tmp_path / "source"))
    processor.save_tokenizer(tmp_path / "saved")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "saved" / name).read_bytes() == (tmp_path / "source" / name).read_bytes()


def test_a_tokenizer_changed_after_loading_is_saved_with_its_changes(tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "source")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "source")
    tokenizer.add_tokens(["zebra"])
    processor = _processor(tokenizer)
    processor.save_tokenizer(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert again.convert_tokens_to_ids("zebra") == tokenizer.convert_tokens_to_ids("zebra")


def test_a_tokenizer_that_would_come_back_different_is_refused(tmp_path, monkeypatch):
    processor = _processor()
    other = tiny_tokenizer(["zebra crossing " * 20])
    monkeypatch.setattr(processor.tokenizer, "save_pretrained", other.save_pretrained)
    with pytest.raises(ValueError, match="cannot be saved so that it tokenises as it does now"):
        processor.save_tokenizer(tmp_path / "saved")
