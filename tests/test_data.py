"""LLaVA records: a sample whose labels cannot be aligned is skipped and named; a run of nothing but
skipped records stops before its first step."""

import json

import pytest

from meteor.train.data import LlavaDataset, RecordError, SkipReport
from meteor.testing import tiny_llava_data
from meteor.train import TrainConfig, TrainConfigError, train
from meteor.pretrained import save_pretrained


def test_a_sample_whose_answer_cannot_be_aligned_is_skipped_and_named(tiny):
    _, processor = tiny
    processor.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        records = [{"id": "glued", "conversations": [{"from": "human", "value": "What colo"},
                                                     {"from": "gpt", "value": "ur is it"}]},
                   {"id": "fine", "conversations": [{"from": "human", "value": "What colour is it?"},
                                                    {"from": "gpt", "value": " red"}]}]
        dataset = LlavaDataset(records, None, processor, template="chat_template")
        with pytest.raises(RecordError, match="record 'glued': tokenization mismatch: an answer boundary"):
            dataset.encode(0)
        report = SkipReport()
        try:
            dataset.encode(0)
        except RecordError as err:
            report.add(err)
        assert report.counts == {"tokenization mismatch": 1} and "glued" in report.summary()
        assert dataset.encode(1).record_id == "fine"
    finally:
        processor.tokenizer.chat_template = None


def test_a_run_whose_every_record_is_skipped_stops_before_any_step(tiny, tmp_path):
    """Two malformed records: the run used to fail at its first step with 'element 0 of tensors
    does not require grad'."""
    model, processor = tiny
    save_pretrained(tmp_path / "base", model, processor)
    records = json.loads(tiny_llava_data(tmp_path / "data", 2).read_text())
    records[0]["conversations"] = [{"from": "human", "value": "<image>\nhi"}]
    records[1]["image"] = "images/missing.png"
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))
    config = TrainConfig(stage=1, data=str(data), image_folder=str(tmp_path / "data"), model=str(tmp_path / "base"),
                         output_dir=str(tmp_path / "run"), global_batch_size=2, per_device_batch_size=2, max_steps=1)
    with pytest.raises(TrainConfigError, match=r"every record of .*bad.json would be skipped \(2 of 2\)") as caught:
        train(config)
    message = str(caught.value)
    assert "record 'tiny-0': malformed conversation" in message and "record 'tiny-1': missing image" in message
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_split_turns_gives_each_question_its_own_record_with_the_image():
    from meteor.train.data import split_turns

    record = {"id": "a", "image": "x.png", "meta": {"size": [1, 1]}, "questions": [{"q": 1}, {"q": 2}],
              "conversations": [{"from": "human", "value": "<image>\nFirst?"}, {"from": "gpt", "value": "1"},
                                {"from": "human", "value": "Second?"}, {"from": "gpt", "value": "2"}]}
    text_only = {"id": "b", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello"}]}
    first, second, kept = split_turns([record, text_only])
    assert first["id"] == "a#0" and second["id"] == "a#1" and kept is text_only
    assert [t["value"] for t in first["conversations"]] == ["<image>\nFirst?", "1"]
    assert [t["value"] for t in second["conversations"]] == ["<image>\nSecond?", "2"]
    assert first["image"] == second["image"] == "x.png" and second["meta"] == record["meta"]
    assert first["questions"] == [{"q": 1}] and second["questions"] == [{"q": 2}]
    assert record["conversations"][2]["value"] == "Second?"          # the input is not modified
