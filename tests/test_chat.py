"""meteor.serve.streaming (conversations, streamed answers) and `meteor chat`, in process, in a
pseudo-terminal and with piped standard input."""

from __future__ import annotations

import sys

import pytest
import torch

from meteor.serve.chat import ChatSession
from meteor.processing.conversation import ConversationError
from meteor.serve.streaming import AnswerStream, Conversation, Sampling, generate_streamed
from meteor.pretrained import load_pretrained
from talk_helpers import ensure_kernel, noise_image, save_talkative_model, talkative_model


@pytest.fixture(scope="module")
def talker():
    return talkative_model()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_talkative_model(tmp_path_factory.mktemp("chat") / "model")


def greedy(model, processor, ids, images, k=None, max_new_tokens=8):
    """The model's own greedy answer ids for one prompt (no streaming)."""
    tokenizer = processor.tokenizer
    batch = processor.collate([(ids, ids)], images, padding_side="left")
    with torch.no_grad():
        out = model.generate(**batch.image_inputs(), input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             tokens_per_slice=k, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    row = out[0, batch.input_ids.shape[1]:].tolist()
    return row[:row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row


# --- Conversation ---------------------------------------------------------------------------------

def test_a_one_turn_conversation_is_the_processors_generation_prompt(talker):
    model, processor = talker
    image = processor.prepare_image(noise_image(0, (112, 56)))
    conversation = Conversation()
    conversation.ask("What colour is the square?", [image])
    batch = processor.prompts(["What colour is the square?"], [image], tokens_per_slice=2)
    assert conversation.prompt_ids(processor, 2) == batch.input_ids[0].tolist()
    assert conversation.prompt_ids(processor).count(processor.image_token_id) == 4 * image.plan.num_views


def test_turns_merge_images_go_first_and_the_placeholder_is_refused(talker):
    _, processor = talker
    a, b = (processor.prepare_image(noise_image(s)) for s in (1, 2))
    conversation = Conversation()
    conversation.ask("first", [a])
    conversation.ask("more")
    conversation.answer("yes")
    conversation.ask("and this?", [b])
    assert conversation.turns == [("human", "<image>\nfirst\nmore"), ("gpt", "yes"), ("human", "<image>\nand this?")]
    assert conversation.images == [a, b]
    llava = [{"from": r, "value": t} for r, t in conversation.turns] + [{"from": "gpt", "value": ""}]
    assert conversation.prompt_ids(processor) == processor.encode(llava, [a, b], for_generation=True)[0]
    with pytest.raises(ConversationError, match="image placeholder"):
        conversation.ask("look at <image>")
    with pytest.raises(ConversationError, match="end with a user turn"):
        Conversation([("human", "q"), ("gpt", "a")]).prompt_ids(processor)
    with pytest.raises(ConversationError, match="assistant turn"):
        Conversation().answer("hello")


# --- AnswerStream ------------------------------------------------------------------------------------

def _feed(stream, tokenizer, text, end=True):
    pieces = []
    stream.on_text = pieces.append
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        stream.push(token, [tokenizer.eos_token_id])
        if stream.done:
            break
    if end and not stream.done:
        stream.push(tokenizer.eos_token_id, [tokenizer.eos_token_id])
    return pieces


def test_streamed_pieces_join_to_the_answer_without_the_templates_leading_space(talker):
    tokenizer = talker[1].tokenizer
    stream = AnswerStream(tokenizer, 100)
    pieces = _feed(stream, tokenizer, " a red circle, a blue square")
    assert "".join(pieces) == stream.text == "a red circle, a blue square"
    assert stream.finish_reason == "stop" and len(stream.token_ids) > len(pieces) - 1


def test_a_stop_string_ends_the_answer_before_it_and_is_never_streamed(talker):
    tokenizer = talker[1].tokenizer
    stream = AnswerStream(tokenizer, 100, stop=("blue",))
    pieces = _feed(stream, tokenizer, "a red circle, a blue square", end=False)
    assert stream.text == "a red circle, a " and "".join(pieces) == stream.text
    assert stream.finish_reason == "stop"


def test_length_cancel_and_deadline_end_a_row(talker):
    tokenizer = talker[1].tokenizer
    stream = AnswerStream(tokenizer, 3)
    _feed(stream, tokenizer, "a red circle, a blue square", end=False)
    assert stream.finish_reason == "length" and len(stream.token_ids) == 3
    cancelled = AnswerStream(tokenizer, 10)
    cancelled.cancel()
    assert cancelled.check() and cancelled.finish_reason == "cancelled"
    late = AnswerStream(tokenizer, 10, deadline=0.0)
    assert late.check() and late.finish_reason == "timeout"


def test_an_incomplete_utf8_character_is_held_back(talker):
    tokenizer = talker[1].tokenizer
    ids = tokenizer("é", add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        pytest.skip("the tiny BPE learnt 'é' as one token")
    stream = AnswerStream(tokenizer, 10)
    pieces = []
    stream.on_text = pieces.append
    stream.push(ids[0], [tokenizer.eos_token_id])
    assert pieces == []
    for token in ids[1:]:
        stream.push(token, [tokenizer.eos_token_id])
    assert "".join(pieces) == "é"


def test_generate_streamed_gives_the_models_greedy_tokens_per_row_in_one_batch(talker):
    model, processor = talker
    prompts, expected = [], []
    for seed, (size, question, k) in enumerate([((112, 112), "What is in the image?", None),
                                                ((56, 56), "Describe it.", None),
                                                ((168, 112), "How many shapes are there? Answer briefly.", None)]):
        image = processor.prepare_image(noise_image(seed, size))
        conversation = Conversation()
        conversation.ask(question, [image])
        ids = conversation.prompt_ids(processor)
        prompts.append((ids, [image]))
        expected.append(greedy(model, processor, ids, [image], max_new_tokens=6))
    rows = [AnswerStream(processor.tokenizer, n) for n in (6, 3, 6)]
    timing = generate_streamed(model, processor, prompts, rows)
    assert rows[0].token_ids == expected[0] and rows[2].token_ids == expected[2]
    assert rows[1].token_ids == expected[1][:3] and rows[1].finish_reason in ("length", "stop")
    assert timing.started <= timing.prompt_ready <= rows[0].first_token_at <= timing.ended
    assert len({tuple(e) for e in expected}) == 3      # the model's answers do differ


# --- ChatSession ---------------------------------------------------------------------------------------

def test_a_session_answers_two_turns_and_a_new_image_as_the_model_does(talker):
    model, processor = talker
    session = ChatSession(model, processor, max_new_tokens=6)
    first = session.set_image(noise_image(3, (112, 56)))
    pieces = []
    answer1, stats1 = session.ask("What is in the image?", pieces.append)
    assert "".join(pieces) == answer1
    conversation = Conversation()
    conversation.ask("What is in the image?", [first])
    ids = conversation.prompt_ids(processor)
    expected = greedy(model, processor, ids, [first], max_new_tokens=6)
    assert processor.tokenizer.decode(expected, skip_special_tokens=True).lstrip() == answer1
    assert stats1.visual_tokens == 4 * first.plan.num_views == ids.count(processor.image_token_id)
    assert stats1.new_tokens == len(expected) and stats1.tokens_per_slice == 4
    assert 0 <= stats1.encode_seconds <= stats1.first_token_seconds
    assert "visual tokens" in stats1.line() and "first token" in stats1.line()

    second = session.set_image(noise_image(4, (56, 56)))
    answer2, stats2 = session.ask("And this one?")
    conversation.answer(answer1)
    conversation.ask("And this one?", [second])
    ids2 = conversation.prompt_ids(processor)
    assert processor.tokenizer.decode(greedy(model, processor, ids2, [first, second], max_new_tokens=6),
                                      skip_special_tokens=True).lstrip() == answer2
    assert stats2.visual_tokens == 4 * (first.plan.num_views + second.plan.num_views)

    session.reset()
    answer3, _ = session.ask("What is in the image?")   # the current image goes with the new first question
    solo = Conversation()
    solo.ask("What is in the image?", [second])
    assert processor.tokenizer.decode(greedy(model, processor, solo.prompt_ids(processor), [second], max_new_tokens=6),
                                      skip_special_tokens=True).lstrip() == answer3


def test_a_session_runs_at_another_k_and_samples_with_a_seed(talker):
    model, processor = talker
    session = ChatSession(model, processor, tokens_per_slice=2, max_new_tokens=4)
    image = session.set_image(noise_image(5))
    _, stats = session.ask("What is it?")
    assert stats.visual_tokens == 2 * image.plan.num_views and stats.tokens_per_slice == 2
    sampled = [ChatSession(model, processor, max_new_tokens=6, sampling=Sampling(1.0, 1.0, seed=7)).ask("Hello")[0]
               for _ in range(2)]
    assert sampled[0] == sampled[1]


# --- `meteor chat` as a user runs it ----------------------------------------------------------------------

def expected_answers(model_dir, steps, max_new_tokens):
    """What the library says the CLI must print: (question or ('/image', path)) steps."""
    model, processor = load_pretrained(model_dir)
    session = ChatSession(model, processor, max_new_tokens=max_new_tokens)
    answers = []
    for step in steps:
        if isinstance(step, tuple):
            session.set_image(step[1])
        else:
            answers.append(session.ask(step)[0])
    return answers


@pytest.mark.slow
def test_meteor_chat_in_a_pseudo_terminal_two_turns_and_an_image(model_dir, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    ensure_kernel()
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    noise_image(10, (112, 112)).save(first)
    noise_image(11, (56, 112)).save(second)
    steps = [("/image", first), "What is in the image?", "Tell me more.", ("/image", second), "And now?"]
    answers = expected_answers(model_dir, steps, 6)
    child = pexpect.spawn(sys.executable, ["-m", "meteor", "chat", "--model", str(model_dir), "--max-new-tokens", "6"],
                          encoding="utf-8", codec_errors="replace", timeout=120, dimensions=(40, 200))
    try:
        child.expect_exact("you> ")
        transcript = []
        for step in steps:
            if isinstance(step, tuple):
                child.sendline(f"/image {step[1]}")
                child.expect(r"image: .*for the next question")
                child.expect_exact("you> ")
                continue
            child.sendline(step)
            child.expect(r"\[(\d+) visual tokens \(K′=4 per view, (\d+) views\) · encode [\d.]+ s · first token [\d.]+ s")
            transcript.append(child.before)
            child.expect_exact("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    for answer, text in zip(answers, transcript):
        shown = text.replace("\r\n", "\n")
        assert f"meteor> {answer}\n" in shown, (answer, shown)


def test_meteor_chat_reads_one_question_per_line_from_a_pipe(model_dir, tmp_path, monkeypatch, capsys):
    import io

    from meteor.cli import main

    image = tmp_path / "piped.png"
    noise_image(12, (168, 112)).save(image)
    steps = [("/image", image), "What is in the image?", "Where is the square?"]
    answers = expected_answers(model_dir, steps, 5)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {image}\nWhat is in the image?\n\nWhere is the square?\n"))
    assert main(["chat", "--model", str(model_dir), "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert out == "".join(f"{answer}\n" for answer in answers)        # answers alone on standard output
    assert err.count(" visual tokens (K′=4 per view") == 2 and "image: " in err
