"""The shared runner loop (``evaluation.base``): per-runner answer lengths, the benchmark named in
every prediction row, every missing image reported before any generation; and the instruction
suffix that LLaVA's question files may already carry (POPE)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from meteor.eval import BENCHMARKS, EvalConfig, WorldRunner, build_runner, read_jsonl
from meteor.eval.base import describe_sources

SHORT = "Answer the question using a single word or phrase."


class GenerateSpy:
    """The real ``generate``, recording the keyword arguments of each call."""

    def __init__(self, model):
        self.model, self.real, self.calls = model, model.generate, []

    def __enter__(self):
        def generate(*args, **kwargs):
            self.calls.append(kwargs)
            return self.real(*args, **kwargs)

        self.model.generate = generate
        return self

    def __exit__(self, *exc):
        del self.model.generate   # the instance attribute goes; the class method is back


def _gqa(root: Path, n: int) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (56, 56), (20 * i, 90, 160)).save(images / f"img{i}.png")
    data = root / "llava_gqa_testdev_balanced.jsonl"
    data.write_text("".join(json.dumps({"question_id": i, "image": f"img{i}.png", "text": f"Is shape {i} red?"})
                            + "\n" for i in range(n)))
    return data, images


# --- max_new_tokens -------------------------------------------------------------------------------------
def test_each_runner_has_its_own_default_answer_length_and_the_config_overrides_it():
    assert EvalConfig().max_new_tokens is None
    assert WorldRunner().max_new_tokens == 8
    assert build_runner("gqa").max_new_tokens == 128          # model_vqa_loader.py's default
    assert build_runner("mmbench").max_new_tokens == 128      # model_vqa_mmbench.py's
    assert build_runner("mmvet").max_new_tokens == 1024       # model_vqa.py's, for long answers
    assert build_runner("mmvet", EvalConfig(max_new_tokens=7)).max_new_tokens == 7
    assert WorldRunner(EvalConfig(max_new_tokens=3)).max_new_tokens == 3
    # The class attributes hold the defaults LLaVA's scripts use.
    assert BENCHMARKS["mmvet"].default_max_new_tokens == 1024
    assert BENCHMARKS["pope"].default_max_new_tokens == 128
    with pytest.raises(ValueError, match="max_new_tokens must be ≥ 1 or None"):
        EvalConfig(max_new_tokens=0)


def test_generate_gets_the_runners_default_and_scores_record_it(world_split, tiny, tmp_path):
    model, processor = tiny
    with GenerateSpy(model) as spy:
        scores = WorldRunner(EvalConfig(batch_size=6, limit=6)).run(
            model, processor, world_split.test_path, world_split.image_folder, tmp_path / "world_out")
    assert [call["max_new_tokens"] for call in spy.calls] == [8]
    assert scores["max_new_tokens"] == 8
    data, images = _gqa(tmp_path / "gqa", 2)
    with GenerateSpy(model) as spy:
        scores = build_runner("gqa", EvalConfig(batch_size=2, max_new_tokens=2)).run(
            model, processor, data, images, tmp_path / "gqa_out")
    assert [call["max_new_tokens"] for call in spy.calls] == [2] and scores["max_new_tokens"] == 2


# --- the benchmark in every prediction row ------------------------------------------------------------------
def test_every_prediction_row_names_its_benchmark_and_another_benchmarks_folder_is_refused(world_split, tiny, tmp_path):
    model, processor = tiny
    config = EvalConfig(batch_size=6, max_new_tokens=2, limit=6)
    WorldRunner(config).run(model, processor, world_split.test_path, world_split.image_folder, tmp_path / "out")
    rows = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert len(rows) == 6 and {row["benchmark"] for row in rows} == {"world"}

    data, images = _gqa(tmp_path / "gqa", 2)
    build_runner("gqa", config).run(model, processor, data, images, tmp_path / "gqa_out")
    before = (tmp_path / "gqa_out" / "predictions.jsonl").read_text()
    assert {row["benchmark"] for row in read_jsonl(tmp_path / "gqa_out" / "predictions.jsonl")} == {"gqa"}
    with pytest.raises(ValueError, match=r"predictions.jsonl:1: this prediction is for benchmark 'gqa', not 'world'"):
        WorldRunner(config).run(model, processor, world_split.test_path, world_split.image_folder, tmp_path / "gqa_out")
    assert (tmp_path / "gqa_out" / "predictions.jsonl").read_text() == before


# --- missing images ---------------------------------------------------------------------------------------
def test_every_missing_image_is_reported_before_any_generation(tiny, tmp_path):
    model, processor = tiny
    data, images = _gqa(tmp_path, 10)
    for i in (1, 2, 3, 5, 6, 7, 8):
        (images / f"img{i}.png").unlink()
    with GenerateSpy(model) as spy, pytest.raises(FileNotFoundError) as caught:
        build_runner("gqa", EvalConfig(batch_size=4)).run(model, processor, data, images, tmp_path / "out")
    message = str(caught.value)
    assert spy.calls == [] and not (tmp_path / "out" / "predictions.jsonl").exists()
    assert message.startswith(f"missing images: 7 of the 10 questions to answer name an image file that is not "
                              f"under {images} ({data} lines 2-4, 6-9):\n")
    listed = [line.strip() for line in message.splitlines()[1:6]]
    assert listed == [f"{data}:{i + 1}: question {i}: {images / f'img{i}.png'}" for i in (1, 2, 3, 5, 6)]
    assert message.splitlines()[6] == "  … and 2 more"
    assert "Point --image-folder at the folder the question file's image paths are relative to" in message


def test_missing_images_of_a_world_file_are_located_by_line_and_finished_questions_need_none(world_split, tiny, tmp_path):
    model, processor = tiny
    config = EvalConfig(batch_size=4, max_new_tokens=2)
    questions = read_jsonl(world_split.test_path)
    WorldRunner(EvalConfig(batch_size=4, max_new_tokens=2, limit=4)).run(   # the first 4 are answered
        model, processor, world_split.test_path, world_split.image_folder, tmp_path / "out")
    gone = questions[-1]["image"]
    lines = [n for n, q in enumerate(questions, start=1) if q["image"] == gone]
    assert lines[0] > 4
    (world_split.image_folder / gone).unlink()
    with pytest.raises(FileNotFoundError, match=rf"missing images: {len(lines)} of the {len(questions) - 4} "
                                                rf"questions.*test\.jsonl lines {lines[0]}-{lines[-1]}\)"):
        WorldRunner(config).run(model, processor, world_split.test_path, world_split.image_folder, tmp_path / "out")
    # Once those questions are answered, their image is no longer needed: resuming checks only the rest.
    done = [{**q, "benchmark": "world", "prediction": "yes"} for q in questions if q["image"] == gone]
    with (tmp_path / "out" / "predictions.jsonl").open("a") as sink:
        sink.write("".join(json.dumps(row) + "\n" for row in done))
    scores = WorldRunner(config).run(model, processor, world_split.test_path, world_split.image_folder, tmp_path / "out")
    assert scores["answered_now"] == len(questions) - 4 - len(lines) and scores["questions"] == len(questions)


def test_describe_sources_groups_files_and_compresses_numbers():
    assert describe_sources(["q.jsonl:2", "q.jsonl:3", "q.jsonl:4", "q.jsonl:9", "b.json:record 1",
                             "b.json:record 2", "q.jsonl:11"]) == "q.jsonl lines 2-4, 9, 11; b.json records 1-2"
    assert describe_sources(["a/x.jsonl:5"]) == "a/x.jsonl line 5"


# --- POPE: LLaVA's question file already carries the instruction -------------------------------------------
def test_pope_appends_the_instruction_only_when_the_question_lacks_it(tmp_path):
    # Line 1 of LLaVA's playground/data/eval/pope/llava_pope_test.jsonl (github.com/haotian-liu/LLaVA), and the
    # same question as a hand-made file would hold it, without the instruction.
    llava_line = {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
                  "text": f"Is there a snowboard in the image?\n{SHORT}", "category": "adversarial"}
    bare_line = {**llava_line, "question_id": 2, "text": "Is there a snowboard in the image?"}
    data = tmp_path / "llava_pope_test.jsonl"
    data.write_text(json.dumps(llava_line) + "\n" + json.dumps(bare_line) + "\n")
    runner = build_runner("pope")
    prompts = [runner.prompt(q) for q in runner.load_questions(data)]
    assert prompts == [f"Is there a snowboard in the image?\n{SHORT}"] * 2
    assert prompts[0].count(SHORT) == 1
