"""The twelve official-benchmark runners on tiny benchmarks written in their real file formats.

The tiny model's answers are noise, so the end-to-end tests check the pipeline (files in, predictions
JSONL, resume, scores.json, the files for official servers) and the scoring tests inject answers of
known correctness.
"""

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from meteor.eval import PAPER_BENCHMARKS, EvalConfig, build_runner, read_jsonl
from meteor.eval.official import BenchmarkFileError, MMVetRunner, OpenAIGrader
from meteor.eval.official.mmmu_open import eval_open, parse_open_response
from meteor.eval.official.mmvet import GRADING_PROMPT, grading_prompt, read_grade
from meteor.eval.official.summary import TABLE1_COLUMNS, collect_headlines, write_table1
from meteor.eval.metrics import (anls, evalai_normalize, exact_match, extract_choice, mmbench_can_infer, pope_scores,
                                 relaxed_accuracy, textvqa_accuracy, vqa_accuracy)
from meteor.pretrained import save_pretrained

from chat_endpoint import chat_endpoint

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


# --- tiny benchmarks in their real formats ----------------------------------------------------------
def _image(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56 + 28 * (shade % 2), 56), (shade * 40 % 255, 90, 160)).save(path)


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _dump(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


def _llava(root: Path, texts, image_name=lambda i: f"img{i}.png", extra=lambda i: {}) -> Path:
    for i in range(len(texts)):
        _image(root / "images" / image_name(i), i)
    return _jsonl(root / "questions.jsonl", [{"question_id": i, "image": image_name(i), "text": text, **extra(i)}
                                             for i, text in enumerate(texts)])


def make_textvqa(root):
    questions = [f"what is written on sign {i}?\nReference OCR token: stop, go{SHORT}" for i in range(4)]
    data = _llava(root, questions)
    ann = _dump(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"image_id": f"img{i}", "question": f"What is written on sign {i}?", "answers": ["stop"] * 10}
        for i in range(4)]})
    return data, root / "images", ann


def make_gqa(root):
    data = _llava(root, [f"Is the shape {i} red?{SHORT}" for i in range(4)])
    ann = _dump(root / "testdev_balanced_questions.json",
                {str(i): {"answer": "yes" if i % 2 else "no", "imageId": f"img{i}"} for i in range(4)})
    return data, root / "images", ann


def make_vqav2(root):
    data = _llava(root, [f"How many shapes are there in {i}?{SHORT}" for i in range(4)])
    ann = _dump(root / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": i, "answers": [{"answer": "2", "answer_id": k} for k in range(10)]} for i in range(4)]})
    return data, root / "images", ann


def make_vizwiz(root):
    data = _llava(root, [f"What is this {i}?\nWhen the provided information is insufficient, respond with "
                         f"'Unanswerable'.{SHORT}" for i in range(4)],
                  image_name=lambda i: f"VizWiz_val_{i:08d}.jpg")
    ann = _dump(root / "val.json", [{"image": f"VizWiz_val_{i:08d}.jpg", "question": "What is this?",
                                     "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10,
                                     "answerable": 0} for i in range(4)])
    return data, root / "images", ann


def make_pope(root):
    categories = ["adversarial", "adversarial", "random", "random"]
    data = _llava(root, [f"Is there a cat in the image?{SHORT}"] * 4, extra=lambda i: {"category": categories[i]})
    labels = root / "pope_labels"
    labels.mkdir()
    for category, ids, answers in (("adversarial", (0, 1), ("yes", "no")), ("random", (2, 3), ("no", "yes"))):
        _jsonl(labels / f"coco_pope_{category}.json",
               [{"question_id": k + 1, "image": f"img{i}.png", "text": "Is there a cat in the image?", "label": a}
                for k, (i, a) in enumerate(zip(ids, answers))])
    return data, root / "images", labels


def make_seed(root):
    options = "\nA. red\nB. blue\nC. green\nD. grey"
    data = _llava(root, [f"What colour is the square?{options}{LETTER}"] * 4,
                  extra=lambda i: {"question_id": f"{100 + i}", "category": "Instance Attributes"})
    ann = _dump(root / "SEED-Bench.json", {"question_type": {"Instance Attributes": 2}, "questions": [
        {"question_id": f"{100 + i}", "answer": "ABCD"[i], "question_type_id": 2, "data_type": "image",
         "data_id": f"img{i}.png"} for i in range(4)] + [
        {"question_id": "9000", "answer": "A", "question_type_id": 10, "data_type": "video", "data_id": "v.mp4"}]})
    return data, root / "images", ann


def make_mmvet(root):
    data = _llava(root, [f"Describe shape {i}." for i in range(3)])
    ann = _dump(root / "mm-vet.json", {f"v1_{i}": {"imagename": f"img{i}.png", "question": f"Describe shape {i}.",
                                                   "answer": "a square<OR>a box", "capability": ["rec", "spat"][:1 + i % 2]}
                                       for i in range(3)})
    return data, root / "images", ann


def _b64_png(shade: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (shade, 80, 80)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def make_mmbench(root):
    path = root / "mmbench_dev_20230712.tsv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                         "l2-category", "comment", "split"])
        writer.writerow([7, "What colour is the square?", "nan", "red", "blue", "green", "grey", "B",
                         "attribute_recognition", _b64_png(40), "s", "l2", "nan", "dev"])
        writer.writerow([9, "Which shape is it?", "The image shows one shape.", "square", "circle", "", "", "A",
                         "shape", _b64_png(200), "s", "l2", "nan", "dev"])
    return path, None, None


def make_mmmu(root):
    for i in range(3):
        _image(root / "images" / f"validation_Art_{i + 1}_1.png", i)
    records = [
        {"id": "validation_Art_1", "question": "<image 1> Which colour dominates?", "options": "['red', 'blue']",
         "answer": "B", "question_type": "multiple-choice", "image_1": "validation_Art_1_1.png"},
        {"id": "validation_Art_2", "question": "<image 1> How many shapes?", "options": "[]", "answer": "2",
         "question_type": "open", "image_1": "validation_Art_2_1.png"},
        {"id": "validation_Art_Theory_3", "question": "<image 1> Which style?",
         "options": ["cubism", "baroque", "gothic"], "answer": "A", "question_type": "multiple-choice",
         "image_1": "validation_Art_3_1.png"}]
    folder = root / "mmmu"
    folder.mkdir()
    _jsonl(folder / "Art.jsonl", records[:2])
    _jsonl(folder / "Art_Theory.jsonl", records[2:])
    return folder, root / "images", None


def make_docvqa(root, image_field="image", name="val_v1.0.json"):
    for i in range(3):
        _image(root / "images" / "documents" / f"doc{i}.png", i)
    data = _dump(root / name, {"dataset_name": "docvqa", "dataset_split": "val", "data": [
        {"questionId": 50 + i, "question": f"What is the title of page {i}?", image_field: f"documents/doc{i}.png",
         "docId": i, "answers": ["annual report", "the annual report"]} for i in range(3)]})
    return data, root / "images", None


def make_infovqa(root):
    return make_docvqa(root, "image_local_name", "infographicsVQA_val_v1.0_withQT.json")


def make_chartqa(root):
    test = root / "test"
    for split, n in (("human", 2), ("augmented", 2)):
        names = [f"{split}{i}.png" for i in range(n)]
        for i, name in enumerate(names):
            _image(test / "png" / name, i)
        _dump(test / f"test_{split}.json", [{"imgname": name, "query": f"What is the value of bar {i}?",
                                            "label": "45"} for i, name in enumerate(names)])
    return test, test, None


MAKERS = {"textvqa": make_textvqa, "docvqa": make_docvqa, "chartqa": make_chartqa, "infovqa": make_infovqa,
          "gqa": make_gqa, "vqav2": make_vqav2, "vizwiz": make_vizwiz, "mmbench": make_mmbench, "mmvet": make_mmvet,
          "mmmu": make_mmmu, "pope": make_pope, "seed": make_seed}


class SimulatedCrash(RuntimeError):
    pass


def _stable(scores):
    return {k: v for k, v in scores.items() if k not in ("seconds", "answered_now", "files")}


# --- each benchmark's headline recomputed from its prediction rows and the answers its maker wrote ----
def _percent_mean(values) -> float:
    values = [float(v) for v in values]
    return round(100 * sum(values) / len(values), 2)


def _pope_headline(rows) -> float:
    labels = {0: "yes", 1: "no", 2: "no", 3: "yes"}       # make_pope's label files, by question
    f1 = []
    for category in ("adversarial", "random"):
        own = [r for r in rows if r["category"] == category]
        f1.append(pope_scores([r["prediction"] for r in own], [labels[r["question_id"]] for r in own])["f1"])
    return round(100 * sum(f1) / len(f1), 2)


def _mmbench_headline(rows) -> float:
    """Circular: a question is right only if the rules read the right letter from every variant
    (no judge configured, so an unreadable answer is wrong)."""
    right_option = {7: "blue", 9: "square"}               # make_mmbench's answers B and A, as option texts
    groups = {}
    for r in rows:
        assert r["options"][r["answer"]] == right_option[r["group"]]   # the answer letter moves with its option
        groups.setdefault(r["group"], []).append(mmbench_can_infer(r["prediction"], r["options"]) == r["answer"])
    assert sorted(map(len, groups.values())) == [2, 4]    # one variant per option
    return _percent_mean(all(hits) for hits in groups.values())


def _mmmu_headline(rows) -> float:
    def right(r):
        if r["question_type"] == "multiple-choice":
            return extract_choice(r["prediction"], r["options"], "mmmu") == r["answer"]
        return eval_open(r["answer"], parse_open_response(r["prediction"]))
    assert {r["question_id"]: r["answer"] for r in rows} == {
        "validation_Art_1": "B", "validation_Art_2": ["2"], "validation_Art_Theory_3": "A"}
    return _percent_mean(map(right, rows))


def _chartqa_headline(rows) -> float:
    splits = {}
    for r in rows:
        splits.setdefault(r["split"], []).append(relaxed_accuracy(r["prediction"], "45"))
    assert sorted(splits) == ["augmented", "human"]
    return round(sum(100 * sum(v) / len(v) for v in splits.values()) / len(splits), 2)


DOCUMENT_ANSWERS = ["annual report", "the annual report"]
EXPECTED_HEADLINES = {
    "textvqa": lambda rows: _percent_mean(textvqa_accuracy(r["prediction"], ["stop"] * 10) for r in rows),
    "docvqa": lambda rows: _percent_mean(anls(r["prediction"], DOCUMENT_ANSWERS) for r in rows),
    "chartqa": _chartqa_headline,
    "infovqa": lambda rows: _percent_mean(anls(r["prediction"], DOCUMENT_ANSWERS) for r in rows),
    "gqa": lambda rows: _percent_mean(exact_match(r["prediction"], "yes" if r["question_id"] % 2 else "no")
                                      for r in rows),
    "vqav2": lambda rows: _percent_mean(vqa_accuracy(evalai_normalize(r["prediction"]), ["2"] * 10) for r in rows),
    "vizwiz": lambda rows: _percent_mean(vqa_accuracy(evalai_normalize(r["prediction"]), ["unanswerable"] * 10)
                                         for r in rows),
    "mmbench": _mmbench_headline,
    "mmvet": lambda rows: None,                           # needs grading: no grader given
    "mmmu": _mmmu_headline,
    "pope": _pope_headline,
    "seed": lambda rows: _percent_mean(r["prediction"] == "ABCD"[int(r["question_id"]) - 100] for r in rows),
}


# --- end to end ------------------------------------------------------------------------------------
def test_every_benchmark_has_a_runner_and_a_table1_column():
    assert list(PAPER_BENCHMARKS) == [benchmark for _, benchmark in TABLE1_COLUMNS]


@pytest.mark.parametrize("name", list(MAKERS))
def test_runner_end_to_end_and_an_interrupted_run_resumes_to_the_same_scores(name, tiny, tmp_path):
    benchmark = name   # (a parameter called "benchmark" would clash with pytest-benchmark's fixture)
    model, processor = tiny
    data, images, annotations = MAKERS[benchmark](tmp_path)
    config = EvalConfig(batch_size=2, max_new_tokens=3)

    whole = build_runner(benchmark, config, annotations).run(model, processor, data, images, tmp_path / "whole")

    interrupted = build_runner(benchmark, config, annotations)
    real_generate, calls = interrupted.generate, []

    def stop_at_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise SimulatedCrash("the machine went down")
        return real_generate(*args)

    interrupted.generate = stop_at_second_batch
    with pytest.raises(SimulatedCrash):
        interrupted.run(model, processor, data, images, tmp_path / "resumed")
    assert len(read_jsonl(tmp_path / "resumed" / "predictions.jsonl")) == 2   # the first batch was kept
    resumed = build_runner(benchmark, config, annotations).run(model, processor, data, images, tmp_path / "resumed")

    assert resumed["answered_now"] == whole["questions"] - 2
    assert _stable(resumed) == _stable(whole)
    rows = read_jsonl(tmp_path / "whole" / "predictions.jsonl")
    assert len(rows) == whole["questions"] and all(isinstance(r["prediction"], str) for r in rows)
    assert all(r["benchmark"] == benchmark for r in rows)
    written = json.loads((tmp_path / "whole" / "scores.json").read_text())
    assert written["benchmark"] == benchmark and written["headline"] == whole["headline"]
    expected = EXPECTED_HEADLINES[benchmark](rows)
    if expected is None:
        assert whole["headline"] is None and whole["status"] == "needs grading"
    else:
        assert whole["headline"] == pytest.approx(expected, abs=1e-9)
    for path in whole.get("files", {}).values():
        assert Path(path).is_file()


def test_files_for_the_official_servers_and_evaluators(tiny, tmp_path):
    model, processor = tiny
    config = EvalConfig(batch_size=4, max_new_tokens=3)
    data, images, _ = make_vqav2(tmp_path / "vqav2")
    scores = build_runner("vqav2", config).run(model, processor, data, images, tmp_path / "out_vqav2")
    assert scores["headline"] is None and "EvalAI" in scores["status"]
    upload = json.loads((tmp_path / "out_vqav2" / "vqav2_submission.json").read_text())
    assert [row["question_id"] for row in upload] == [0, 1, 2, 3] and set(upload[0]) == {"question_id", "answer"}
    test2015 = _jsonl(tmp_path / "llava_vqav2_mscoco_test2015.jsonl",
                      [{"question_id": i, "image": f"img{i}.png", "text": "?"} for i in range(6)])
    scores = build_runner("vqav2", config, test2015).run(model, processor, data, images, tmp_path / "out_vqav2")
    assert scores["headline"] is None and scores["answered_now"] == 0
    upload = json.loads((tmp_path / "out_vqav2" / "vqav2_submission.json").read_text())
    assert [row["question_id"] for row in upload] == list(range(6)) and upload[5]["answer"] == ""

    data, images, _ = make_mmvet(tmp_path / "mmvet")
    scores = build_runner("mmvet", config).run(model, processor, data, images, tmp_path / "out_mmvet")
    assert scores["status"] == "needs grading"
    results = json.loads((tmp_path / "out_mmvet" / "mmvet_results.json").read_text())
    assert sorted(results) == ["v1_0", "v1_1", "v1_2"] and all(isinstance(v, str) for v in results.values())


# --- scoring with answers of known correctness ---------------------------------------------------------
def _rows(benchmark, root, predictions, annotations_too=True):
    data, _, annotations = MAKERS[benchmark](root)
    runner = build_runner(benchmark, EvalConfig(), annotations if annotations_too else None)
    questions = runner.load_questions(data)
    rows = [{**{k: v for k, v in q.items() if k != "meta"}, "prediction": p} for q, p in zip(questions, predictions)]
    return runner, rows


@pytest.mark.parametrize("name, predictions, headline", [
    ("textvqa", ["Stop.", "stop", "go", "STOP"], 75.0),
    ("gqa", ["no", "Yes.", "yes", "yes"], 75.0),
    ("vqav2", ["two", "2", "3", "2."], 75.0),
    ("vizwiz", ["Unanswerable", "unanswerable", "cat", "Unanswerable."], 75.0),
    ("seed", ["A", "B", "C", "A"], 75.0),
    ("docvqa", ["Annual report", "annual reprt", "nothing"], 100 * (1 + (1 - 1 / 13)) / 3),
    ("infovqa", ["annual report", "x", "x"], 100 / 3),
    ("chartqa", ["44", "50", "45", "0.45"], 50.0),          # human: 1/2, augmented: 1/2
])
def test_scores_of_known_answers(name, predictions, headline, tmp_path):
    runner, rows = _rows(name, tmp_path, predictions)
    assert runner.score(rows)["headline"] == pytest.approx(headline, abs=0.01)


def test_textvqa_accepts_llavas_image_ids_repeated_as_question_ids(tmp_path):
    _, images, annotations = make_textvqa(tmp_path)
    data = _jsonl(tmp_path / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": "img0", "image": "img0.png", "text": f"what is written on sign 0?{SHORT}"},
        {"question_id": "img0", "image": "img0.png", "text": f"what is written on sign 1?{SHORT}"},
        {"question_id": "img2", "image": "img2.png", "text": f"what is written on sign 2?{SHORT}"}])
    runner = build_runner("textvqa", EvalConfig(), annotations)
    questions = runner.load_questions(data)
    assert [q["question_id"] for q in questions] == ["img0#0", "img0#1", "img2"]


def test_pope_scores_per_category_and_mean_f1(tmp_path):
    # labels: adversarial yes, no; random no, yes
    runner, rows = _rows("pope", tmp_path, ["Yes, there is.", "No.", "yes", "Yes"])
    scores = runner.score(rows)
    assert scores["categories"]["adversarial"]["f1"] == 1.0
    assert scores["categories"]["random"]["accuracy"] == 0.5 and scores["categories"]["random"]["f1"] == pytest.approx(2 / 3)
    assert scores["headline"] == pytest.approx(100 * (1 + 2 / 3) / 2, abs=0.01)


def test_mmbench_circular_evaluation_counts_a_question_only_if_every_rotation_is_right(tmp_path):
    data, _, _ = make_mmbench(tmp_path)
    runner = build_runner("mmbench")
    questions = runner.load_questions(data)
    assert [q["question_id"] for q in questions] == [7, 1_000_007, 2_000_007, 3_000_007, 9, 1_000_009]
    assert questions[0]["question"].endswith("\nA. red\nB. blue\nC. green\nD. grey")
    assert questions[1]["options"]["A"] == "blue" and questions[1]["answer"] == "A"   # rotated with its text
    assert questions[4]["question"].startswith("The image shows one shape.\nWhich shape is it?")
    assert runner.prompt(questions[0]).endswith(LETTER)
    right = [f"{q['answer']}." for q in questions]
    rows = [{**{k: v for k, v in q.items() if k != "meta"}, "prediction": p} for q, p in zip(questions, right)]
    assert runner.score(rows)["headline"] == 100.0
    rows[2]["prediction"] = "A"                     # one rotation of question 7 wrong: 7 fails, 9 holds
    scores = runner.score(rows)
    assert scores["headline"] == 50.0 and scores["vanilla_accuracy"] == 1.0
    assert scores["categories"] == {"attribute_recognition": 0.0, "shape": 1.0}


def test_mmbench_tsv_with_circular_copies_is_not_rotated_again(tmp_path):
    path = tmp_path / "circular.tsv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["index", "question", "A", "B", "answer", "image"])
        writer.writerow([3, "Q?", "x", "y", "A", _b64_png(1)])
        writer.writerow([1_000_003, "Q?", "y", "x", "B", _b64_png(1)])
    questions = build_runner("mmbench").load_questions(path)
    assert [(q["question_id"], q["group"]) for q in questions] == [(3, 3), (1_000_003, 3)]


def test_mmmu_prompts_and_scoring(tmp_path):
    runner, rows = _rows("mmmu", tmp_path, ["(B) blue", "There are 2 shapes.", "C"])
    # MMMU's construct_prompt with mmmu/configs/llava1.5.yaml: "{}\n{}\nAnswer …" once YAML has folded
    # the format's blank lines; the options list ends in its own "\n".
    assert rows[0]["question"] == ("<image 1> Which colour dominates?\n(A) red\n(B) blue\n\n"
                                   "Answer with the option's letter from the given choices directly.")
    assert rows[1]["question"] == "<image 1> How many shapes?\nAnswer the question using a single word or phrase."
    assert runner.prompt(rows[0]) == rows[0]["question"]   # sent as built, nothing appended
    assert [r["subject"] for r in rows] == ["Art", "Art", "Art_Theory"]
    scores = runner.score(rows)
    assert scores["headline"] == pytest.approx(200 / 3, abs=0.01)
    assert scores["subjects"]["Art"]["accuracy"] == 1.0 and scores["subjects"]["Art_Theory"]["accuracy"] == 0.0


def test_mmmu_open_answer_parsing_follows_the_official_rules():
    assert eval_open("2", parse_open_response("The answer is 2.0"))
    assert eval_open("1,000", parse_open_response("so the total is 1000 dollars"))
    assert eval_open(["cat", "kitten"], parse_open_response("I think it is a kitten"))
    assert not eval_open("3", parse_open_response("It is 2."))
    assert not eval_open("a", parse_open_response("banana"))   # one letter must stand at a word edge


def test_mmvet_grading_with_a_pluggable_grader_and_the_official_prompt(tmp_path):
    data, _, annotations = make_mmvet(tmp_path)
    prompts = []

    def grader(prompt, temperature):
        prompts.append((prompt, temperature))
        return "oops" if len(prompts) == 1 else "0.5"    # the first reply is unreadable: retried

    runner = MMVetRunner(EvalConfig(), annotations, grader)
    questions = runner.load_questions(data)
    rows = [{**{k: v for k, v in q.items() if k != "meta"}, "prediction": "a square"} for q in questions]
    with pytest.raises(ValueError, match=r"carry no grades: score the rows that runner.grade\(rows, out_dir\)"):
        runner.score(rows)                               # the grader is asked in grade, never in score
    assert prompts == []
    scores = runner.score(runner.grade(rows, None))
    assert scores["headline"] == 50.0 and scores["capabilities"] == {"rec": 50.0, "spat": 50.0}
    assert [t for _, t in prompts[:2]] == [0.0, 0.2]
    assert prompts[0][0] == GRADING_PROMPT + "\nDescribe shape 0. | a square <OR> a box | a square | "
    assert read_grade("0.7 because") == 0.7 and read_grade("1.5") is None and read_grade("n/a") is None


def test_mmvet_grade_caches_the_grades_and_score_writes_nothing(tmp_path, monkeypatch):
    data, _, annotations = make_mmvet(tmp_path)
    calls = []

    def grader(prompt, temperature):
        calls.append(prompt)
        return "0.7"

    runner = MMVetRunner(EvalConfig(), annotations, grader)
    rows = [{**{k: v for k, v in q.items() if k != "meta"}, "prediction": "a box"} for q in runner.load_questions(data)]
    out = tmp_path / "out"
    out.mkdir()
    graded = runner.grade(rows, out)
    assert len(calls) == 3 and [r["grade"] for r in graded] == [0.7] * 3
    assert [r["capability"] for r in graded] == [["rec"], ["rec", "spat"], ["rec"]]
    assert len(read_jsonl(out / "mmvet_grades.jsonl")) == 3

    monkeypatch.chdir(out)                              # a relative write would land here
    before = {path: path.read_bytes() for path in sorted(tmp_path.rglob("*")) if path.is_file()}
    first, second = runner.score(graded), runner.score(graded)
    assert first == second == {"headline": 70.0, "total": pytest.approx(70.0),
                               "capabilities": {"rec": 70.0, "spat": 70.0}}
    assert {path: path.read_bytes() for path in sorted(tmp_path.rglob("*")) if path.is_file()} == before
    assert MMVetRunner(EvalConfig(), annotations, grader).grade(rows, out) == graded and len(calls) == 3
    with pytest.raises(ValueError, match=r"1 of 3 MM-Vet rows carry no grade \(the first: question 2\)"):
        runner.score([*graded[:2], rows[2]])


def test_openai_grader_calls_a_chat_completions_endpoint(monkeypatch):
    with chat_endpoint(lambda body: "0.8") as (base_url, received):
        monkeypatch.setenv("MY_GRADER_KEY", "secret")
        grader = OpenAIGrader(base_url, "judge-1", "MY_GRADER_KEY")
        assert grader(grading_prompt("Q?", "A", "A"), 0.0) == "0.8"
    (seen,) = received
    assert seen["path"] == "/v1/chat/completions" and seen["auth"] == "Bearer secret"
    assert seen["model"] == "judge-1" and seen["messages"][0]["role"] == "user"
    monkeypatch.delenv("MY_GRADER_KEY")
    with pytest.raises(RuntimeError, match="MY_GRADER_KEY"):
        grader("p", 0.0)


# --- bad input -------------------------------------------------------------------------------------------
def test_a_missing_image_names_the_line_and_keeps_earlier_predictions(tiny, tmp_path):
    model, processor = tiny
    data, images, annotations = make_gqa(tmp_path)
    config = EvalConfig(batch_size=2, max_new_tokens=2)
    runner = build_runner("gqa", config, annotations)
    runner.run(model, processor, data, images, tmp_path / "out")
    before = (tmp_path / "out" / "predictions.jsonl").read_text()
    lines = data.read_text().splitlines()
    lines.append(json.dumps({"question_id": 99, "image": "gone.png", "text": "Is it?"}))
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(FileNotFoundError, match=r"missing images: 1 of the 1 questions to answer .*questions\.jsonl "
                                                r"line 5\):\n  \S*questions\.jsonl:5: question 99: \S*gone\.png\n"
                                                r"Point --image-folder at"):
        build_runner("gqa", config, annotations).run(model, processor, data, images, tmp_path / "out")
    assert (tmp_path / "out" / "predictions.jsonl").read_text() == before


def test_an_unreadable_image_mid_run_names_its_line_and_keeps_the_finished_batches(tiny, tmp_path):
    model, processor = tiny
    data, images, annotations = make_gqa(tmp_path)
    (images / "img3.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"questions\.jsonl:4: question 3: "):
        build_runner("gqa", EvalConfig(batch_size=2, max_new_tokens=2), annotations).run(
            model, processor, data, images, tmp_path / "out")
    assert [row["question_id"] for row in read_jsonl(tmp_path / "out" / "predictions.jsonl")] == [0, 1]


def test_mmmu_reads_the_hugging_face_parquet_files(tmp_path):
    import pyarrow
    import pyarrow.parquet as parquet

    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (9, 9, 9)).save(buffer, format="PNG")
    table = pyarrow.Table.from_pylist([{
        "id": "validation_Music_1", "question": "<image 1> Which clef?", "options": "['treble', 'bass']",
        "answer": "A", "question_type": "multiple-choice", "image_1": {"bytes": buffer.getvalue(), "path": None}}])
    parquet.write_table(table, tmp_path / "validation-00000-of-00001.parquet")
    (question,) = build_runner("mmmu").load_questions(tmp_path)
    assert question["image"] is None and question["meta"]["image_bytes"] == buffer.getvalue()
    assert question["options"] == {"A": "treble", "B": "bass"} and question["subject"] == "Music"


@pytest.mark.parametrize("line, message", [
    ("", "questions.jsonl:2: empty line"),
    ("{not json", "questions.jsonl:2: not valid JSON"),
    ('["a list"]', "questions.jsonl:2: a JSON list, not an object"),
    ('{"question_id": 5, "image": "a.png"}', r"questions.jsonl:2: lacks \['text'\]"),
])
def test_bad_question_lines_name_the_file_and_line(line, message, tmp_path):
    data, _, _ = make_gqa(tmp_path)
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[0], line, *lines[1:]]) + "\n")
    with pytest.raises(BenchmarkFileError, match=message):
        build_runner("gqa").load_questions(data)


def test_an_annotation_file_of_another_benchmark_is_refused(tiny, tmp_path):
    model, processor = tiny
    data, images, _ = make_textvqa(tmp_path / "textvqa")
    _, _, gqa_annotations = make_gqa(tmp_path / "gqa")
    with pytest.raises(BenchmarkFileError, match='holds no "data" list'):
        build_runner("textvqa", EvalConfig(), gqa_annotations).run(model, processor, data, images, tmp_path / "o")
    _, _, vqav2_annotations = make_vqav2(tmp_path / "vqav2")
    with pytest.raises(BenchmarkFileError, match="is not testdev_balanced_questions.json"):
        build_runner("gqa", EvalConfig(), vqav2_annotations).annotation_data()


def test_a_predictions_folder_of_another_benchmark_is_refused(tiny, tmp_path):
    model, processor = tiny
    config = EvalConfig(batch_size=4, max_new_tokens=2)
    data, images, annotations = make_gqa(tmp_path / "gqa")
    build_runner("gqa", config, annotations).run(model, processor, data, images, tmp_path / "out")
    before = (tmp_path / "out" / "predictions.jsonl").read_text()
    data, images, annotations = make_vqav2(tmp_path / "vqav2")
    with pytest.raises(BenchmarkFileError, match=r"predictions.jsonl:1: this prediction is for benchmark 'gqa'"):
        build_runner("vqav2", config, annotations).run(model, processor, data, images, tmp_path / "out")
    assert (tmp_path / "out" / "predictions.jsonl").read_text() == before


def test_pope_labels_that_do_not_match_the_questions_are_refused(tmp_path):
    runner, rows = _rows("pope", tmp_path, ["yes"] * 4)
    rows[0]["image"] = "other.png"
    with pytest.raises(BenchmarkFileError, match=r"coco_pope_adversarial.json:1: labels image 'img0.png'"):
        runner.score(rows)


def test_answers_unknown_to_the_annotations_name_the_question(tmp_path):
    runner, rows = _rows("seed", tmp_path, ["A"] * 4)
    rows[0]["question_id"] = "424242"
    with pytest.raises(BenchmarkFileError, match="424242"):
        runner.score(rows)


# --- Table 1 -----------------------------------------------------------------------------------------------
def test_table1_layout_from_several_scores_files(tmp_path):
    def scores(run, benchmark, headline):
        folder = tmp_path / run / benchmark
        folder.mkdir(parents=True)
        (folder / "scores.json").write_text(json.dumps({"benchmark": benchmark, "headline": headline}))

    for benchmark in PAPER_BENCHMARKS:
        scores("full", benchmark, 50.0)
    scores("part", "gqa", 60.0)
    scores("part", "mmvet", None)        # needs grading
    scores("part", "world", 99.0)        # not a Table-1 column
    text = write_table1({"Meteor-full": [tmp_path / "full"], "Meteor-part": [tmp_path / "part"]},
                        tmp_path / "table1.md")
    lines = text.splitlines()
    assert lines[0] == ("| Model | VQAT | VQAD | QAC | VQAI | GQA | VQAv2 | VizWiz | MMB | MMVet | MMMU | POPE "
                        "| SEED | Avg |")
    assert lines[2] == "| Meteor-full | " + " | ".join(["50.0"] * 12) + " | 50.0 |"
    assert lines[3] == "| Meteor-part | – | – | – | – | 60.0 | – | – | – | – | – | – | – | 60.0* |"
    assert (tmp_path / "table1.md").read_text() == text
    scores("dup", "gqa", 1.0)
    with pytest.raises(ValueError, match="scored twice"):
        collect_headlines([tmp_path / "part", tmp_path / "dup"])


@pytest.mark.slow
def test_meteor_eval_and_table_through_the_real_entry_point(tiny, tmp_path):
    import subprocess
    import sys

    model, processor = tiny
    save_pretrained(tmp_path / "model", model, processor)
    data, images, annotations = make_pope(tmp_path / "pope")
    command = [sys.executable, "-m", "meteor", "eval", "--benchmark", "pope", "--model", str(tmp_path / "model"),
               "--data", str(data), "--annotations", str(annotations), "--image-folder", str(images),
               "--out", str(tmp_path / "out"), "--max-new-tokens", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["benchmark"] == "pope" and scores["questions"] == len(read_jsonl(data))
    table = subprocess.run([sys.executable, "-m", "meteor", "table", "--row", f"tiny={tmp_path / 'out'}",
                            "--out", str(tmp_path / "table1.md")], capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr[-2000:]
    assert scores["headline"] == pytest.approx(_pope_headline(read_jsonl(tmp_path / "out" / "predictions.jsonl")),
                                               abs=1e-9)
    lines = (tmp_path / "table1.md").read_text().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    tiny_row = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert tiny_row[0] == "tiny" and tiny_row[header.index("POPE")] == f"{scores['headline']:.1f}"
    assert tiny_row[1:-1] == [f"{scores['headline']:.1f}" if name == "POPE" else "–" for name in header[1:-1]]
    assert tiny_row[-1] == f"{scores['headline']:.1f}*"   # averaged over the one benchmark present
    bad = subprocess.run([sys.executable, "-m", "meteor", "table", "--row", "nofolders"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "NAME=FOLDER" in bad.stderr
