"""MMBench's GPT-judge stage (``evaluation.official.mmbench_judge``) against a real OpenAI-compatible
HTTP endpoint served from the test: the official prompt goes over the wire, scripted replies come
back, and the circular verdicts say which stage decided each question."""

import base64
import csv
import io
import json

import pytest
from PIL import Image

from meteor.eval import EvalConfig, build_runner, read_jsonl
from meteor.eval.official import OpenAIGrader
from meteor.eval.official.mmbench_judge import (JUDGE_ATTEMPTS, ask_judge, judge_prompt, read_judge_reply)
from meteor.eval.metrics import mmbench_can_infer

from chat_endpoint import chat_endpoint

# --- a tiny MMBench TSV and the model's answers ---------------------------------------------------------
QUESTIONS = [  # index, question, options, answer
    (7, "What colour is the sky?", ["red", "blue", "green", "grey"], "B"),
    (9, "Which shape is it?", ["square", "circle"], "A"),
    (11, "Which animal is it?", ["cat", "dog"], "A"),
    (13, "Which fruit is it?", ["apple", "pear"], "A"),
    (15, "What shines at day?", ["sun", "moon"], "A"),
    (17, "Is it big?", ["yes", "no"], "A"),
]
# Per question, the answer to each rotation (rotation k shows the options shifted by k).
ANSWERS = {
    7: ["B", "It is the colour of the sky", "D.", "the sky colour"],   # two need the judge, who gets them right
    9: ["A", "round thing"],                    # rotation 1 (circle, square; answer B): the judge says A, wrong
    11: ["unclear thing", "B"],                 # the judge never gives a readable reply: failed
    13: ["B", "hmm"],                           # the rule reads a wrong letter: decided, "hmm" never judged
    15: ["purple", "B"],                        # the judge says Z ("none of the options"): wrong
    17: ["A", "(B)"],                           # both read by the rule, both right
}
REPLIES = {  # the scripted judge, by the answer quoted in its prompt
    "It is the colour of the sky": "A",
    "the sky colour": "C",
    "round thing": "A",
    "unclear thing": "unclear",
    "purple": "Z",
}


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (30, 120, 200)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path):
    image = _png()
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
        for index, question, options, answer in QUESTIONS:
            writer.writerow([index, question, "nan", *(options + [""] * (4 - len(options))), answer, "demo", image])
    return path


def prediction_rows(runner, tsv):
    """The prediction rows a finished run would have written: ANSWERS, per rotation."""
    rows = []
    for question in runner.load_questions(tsv):
        row = {k: v for k, v in question.items() if k != "meta"}
        rows.append({**row, "prediction": ANSWERS[row["group"]][row["round"]]})
    return rows


def write_predictions(runner, tsv, out):
    """The predictions file a finished run would have left (so ``run`` only scores)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in prediction_rows(runner, tsv)))


def files_under(root):
    """Every file under ``root`` with its bytes: equal before and after means nothing was written."""
    return {path: path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


# --- the endpoint ------------------------------------------------------------------------------------
@pytest.fixture
def endpoint(monkeypatch):
    """A local /v1/chat/completions answering from REPLIES; yields (base_url, requests received)."""
    def reply(body):
        prompt = body["messages"][-1]["content"]
        quoted = prompt.rsplit("\nAnswer: ", 1)[1].split("\nYour output: ")[0]
        return REPLIES.get(quoted, "no idea")

    monkeypatch.setenv("JUDGE_KEY", "k-123")
    with chat_endpoint(reply) as served:
        yield served


def _prompts_for(received, answer):
    return [r for r in received if f"\nAnswer: {answer}\nYour output: " in r["messages"][-1]["content"]]


# --- tests -----------------------------------------------------------------------------------------------
def test_the_official_judge_prompt_and_reply_rule():
    prompt = judge_prompt("Which shape is it?", {"A": "circle", "B": "square"}, "round thing")
    assert prompt.startswith("You are an AI assistant who will help me to match an answer with several options "
                             "of a single-choice question. ")
    assert "If the meaning of all options are significantly different from the answer, output Z. " in prompt
    # VLMEvalKit appends "?" to the question even when it has one, and build_option_str's header.
    assert prompt.endswith("Example 3: \nQuestion: Which shape is it??\nOptions: There are several options: \n"
                           "A. circle\nB. square\n\nAnswer: round thing\nYour output: ")
    options = {"A": "circle", "B": "square"}
    assert read_judge_reply("B", options) == "B"
    assert read_judge_reply("Z", options) == "Z"                      # a decision: none of the options
    assert read_judge_reply("A or B", options) is None               # two letters: unreadable, asked again
    assert read_judge_reply("Failed to obtain answer via API", options) is None
    assert mmbench_can_infer("Sorry, I can't help with images of people yet.", options) == "Z"


def test_ask_judge_retries_an_unreadable_reply_three_times_at_temperature_zero():
    calls = []

    def judge(prompt, temperature):
        calls.append(temperature)
        return ["hmm", "A and B", "B"][len(calls) - 1] if len(calls) <= 3 else "A"

    call = ask_judge(judge, "Q", {"A": "x", "B": "y"}, "y-ish")
    assert call.letter == "B" and call.replies == ["hmm", "A and B", "B"] and calls == [0.0, 0.0, 0.0]
    calls.clear()
    never = ask_judge(lambda prompt, temperature: calls.append(1) or "no idea", "Q", {"A": "x", "B": "y"}, "?")
    assert never.letter is None and len(calls) == JUDGE_ATTEMPTS == 3


def test_circular_scoring_with_a_judge_behind_a_real_http_endpoint(endpoint, tiny, tmp_path):
    base_url, received = endpoint
    model, processor = tiny
    tsv = write_tsv(tmp_path / "mmbench_dev.tsv")
    grader = OpenAIGrader(base_url, "judge-model", "JUDGE_KEY")
    runner = build_runner("mmbench", EvalConfig(batch_size=4), grader=grader)
    write_predictions(runner, tsv, tmp_path / "out")

    scores = runner.run(model, processor, tsv, None, tmp_path / "out")

    assert scores["answered_now"] == 0 and scores["groups"] == 6
    assert scores["stages"] == {"rule": 2, "judge": 3, "failed": 1, "unjudged": 0}
    assert scores["headline"] == pytest.approx(100 * 2 / 6, abs=0.01)     # questions 7 and 17
    assert scores["lower_bound"] is True                                 # question 11's judge failed
    # Vanilla (first rotations): 7 "B", 9 "A", 13 "B" (wrong), 15 judged Z (wrong), 17 "A", 11 failed.
    assert scores["vanilla_accuracy"] == pytest.approx(3 / 6)

    verdicts = {v["index"]: v for v in read_jsonl(tmp_path / "out" / "mmbench_verdicts.jsonl")}
    assert {i: (v["hit"], v["stage"]) for i, v in verdicts.items()} == {
        7: (True, "judge"), 9: (False, "judge"), 11: (False, "failed"), 13: (False, "rule"),
        15: (False, "judge"), 17: (True, "rule")}
    assert [(v["read_as"], v["stage"]) for v in verdicts[7]["variants"]] == [
        ("B", "rule"), ("A", "judge"), ("D", "rule"), ("C", "judge")]
    assert [(v["read_as"], v["stage"]) for v in verdicts[9]["variants"]] == [("A", "rule"), ("A", "judge")]
    assert [(v["read_as"], v["stage"]) for v in verdicts[11]["variants"]] == [(None, "failed"), ("B", "rule")]
    assert [(v["read_as"], v["stage"]) for v in verdicts[13]["variants"]] == [("B", "rule"), (None, "skipped")]
    assert verdicts[15]["variants"][0] == {"question_id": 15, "prediction": "purple", "answer": "A",
                                           "read_as": "Z", "stage": "judge"}

    # What went over the wire: the official prompt of the rotated variant, temperature 0, the key.
    assert {r["path"] for r in received} == {"/v1/chat/completions"}
    assert {r["auth"] for r in received} == {"Bearer k-123"}
    assert {r["model"] for r in received} == {"judge-model"} and {r["temperature"] for r in received} == {0.0}
    assert {r["max_tokens"] for r in received} == {1024} and grader.max_tokens == 3   # the user's grader untouched
    (round_thing,) = _prompts_for(received, "round thing")
    assert round_thing["messages"][-1]["content"] == judge_prompt(
        "Which shape is it?", {"A": "circle", "B": "square"}, "round thing")
    assert len(_prompts_for(received, "unclear thing")) == 3                # three attempts, then failed
    assert _prompts_for(received, "hmm") == []                             # decided by the rule before
    assert len(received) == 2 + 1 + 3 + 1                                   # 7 (two), 9, 11 (three), 15

    # The replies are cached: scoring again asks the endpoint nothing and gives the same scores.
    cached = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert cached["stages"] == scores["stages"] and cached["files"]["mmbench_verdicts"].endswith("verdicts.jsonl")
    again = build_runner("mmbench", EvalConfig(batch_size=4), grader=grader).run(
        model, processor, tsv, None, tmp_path / "out")
    assert len(received) == 7 and again["headline"] == scores["headline"] and again["stages"] == scores["stages"]


def test_without_a_judge_the_judge_stage_is_counted_wrong_and_reported(tiny, tmp_path, capsys):
    model, processor = tiny
    tsv = write_tsv(tmp_path / "mmbench_dev.tsv")
    runner = build_runner("mmbench", EvalConfig(batch_size=4))
    write_predictions(runner, tsv, tmp_path / "out")

    scores = runner.run(model, processor, tsv, None, tmp_path / "out")

    assert scores["stages"] == {"rule": 2, "judge": 0, "failed": 0, "unjudged": 4}
    assert scores["headline"] == pytest.approx(100 / 6, abs=0.01) and scores["lower_bound"] is True
    assert "4 of 6 questions needed MMBench's GPT judge" in scores["note"]
    assert "4 of 6 questions needed MMBench's GPT judge" in capsys.readouterr().err
    saved = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert saved["stages"]["unjudged"] == 4 and saved["lower_bound"] is True
    verdicts = {v["index"]: v for v in read_jsonl(tmp_path / "out" / "mmbench_verdicts.jsonl")}
    assert [v["stage"] for v in verdicts[7]["variants"]] == ["rule", "unjudged", "rule", "unjudged"]
    assert (verdicts[13]["stage"], verdicts[17]["stage"]) == ("rule", "rule")


def test_score_is_pure_the_judge_is_asked_only_by_grade_and_write_outputs_writes_the_verdicts(tmp_path, monkeypatch):
    tsv = write_tsv(tmp_path / "mmbench_dev.tsv")
    asked = []

    def judge(prompt, temperature):
        quoted = prompt.rsplit("\nAnswer: ", 1)[1].split("\nYour output: ")[0]
        asked.append(quoted)
        return REPLIES.get(quoted, "no idea")

    runner = build_runner("mmbench", grader=judge)
    rows = prediction_rows(runner, tsv)
    out = tmp_path / "out"
    out.mkdir()
    graded = runner.grade(rows, out)
    assert len(asked) == 7 and len(read_jsonl(out / "mmbench_judge.jsonl")) == 5   # "unclear thing" thrice
    assert {r["question_id"]: r["judge_letter"] for r in graded if "judge_letter" in r} == {
        1_000_007: "A", 3_000_007: "C", 1_000_009: "A", 11: None, 15: "Z"}

    monkeypatch.chdir(tmp_path / "out")                 # a relative write would land here
    before = files_under(tmp_path)
    first, second = runner.score(graded), runner.score(graded)
    assert first == second and files_under(tmp_path) == before and len(asked) == 7
    assert first["stages"] == {"rule": 2, "judge": 3, "failed": 1, "unjudged": 0}
    with pytest.raises(ValueError, match="carries no judge verdict .*runner.grade\\(rows, out_dir\\)"):
        runner.score(rows)                               # the raw predictions: the judge's part is missing

    again = build_runner("mmbench", grader=judge).grade(rows, out)
    assert again == graded and len(asked) == 7          # every reply came from the cache
    written = runner.write_outputs(graded, out)
    verdicts = {v["index"]: v["stage"] for v in read_jsonl(written["mmbench_verdicts"])}
    assert verdicts == {7: "judge", 9: "judge", 11: "failed", 13: "rule", 15: "judge", 17: "rule"}


def test_without_a_judge_score_is_pure_too_and_grade_changes_nothing(tmp_path, monkeypatch):
    tsv = write_tsv(tmp_path / "mmbench_dev.tsv")
    runner = build_runner("mmbench")
    rows = prediction_rows(runner, tsv)
    assert runner.grade(rows, tmp_path) == rows
    monkeypatch.chdir(tmp_path)
    before = files_under(tmp_path)
    assert runner.score(rows) == runner.score(rows) and files_under(tmp_path) == before
    assert runner.score(rows)["stages"]["unjudged"] == 4


def test_a_grader_is_refused_by_benchmarks_that_do_not_use_one():
    with pytest.raises(ValueError, match="only used by mmbench and mmvet, not by gqa"):
        build_runner("gqa", grader=lambda prompt, temperature: "A")
