"""Templates rendered as the LLMs' own tooling renders them, and labels aligned by construction."""

import pytest

from meteor.processing.conversation import (IGNORE_INDEX, VICUNA_SYSTEM, ConversationError, Rendered, TokenizationMismatch,
                                 Turn, parse_turns, render, resolve_template, tokenize)
from meteor.testing import tiny_tokenizer

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _turns(*texts):
    return parse_turns([{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)])


def _spans(rendered):
    return [rendered.text[start:end] for start, end in rendered.answers]


def test_vicuna_v1_is_fastchats_rendering(tokenizer):
    """FastChat's vicuna_v1.1 (ADD_COLON_TWO, sep " ", sep2 "</s>"): system + sep, then
    "USER: q" + sep and "ASSISTANT: a" + sep2 per round; LLaVA's preprocess_v1 supervises each
    answer (with the space that merges into its first token) and its "</s>"."""
    rendered = render(_turns("<image>\nWhat is it?", "a red circle", "And?", "blue"), "vicuna_v1", tokenizer)
    assert rendered.text == (f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: a red circle</s>"
                             f"USER: And? ASSISTANT: blue</s>")
    assert _spans(rendered) == [" a red circle</s>", " blue</s>"] and rendered.bos
    prompt = render(_turns("<image>\nWhat is it?", "a red circle")[:1], "vicuna_v1", tokenizer)
    assert prompt.text == f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:" and prompt.answers == ()


def test_plain_is_the_image_then_the_caption(tokenizer):
    rendered = render(_turns("<image>\nDescribe the image briefly.", "a red square"), "plain", tokenizer)
    assert rendered.text == "<image>\na red square</s>" and _spans(rendered) == ["a red square</s>"]
    assert render(_turns("<image>", "x")[:1], "plain", tokenizer).text == "<image>\n"


def test_chat_template_supervises_each_answer_and_its_end_token_only(tokenizer):
    own = tiny_tokenizer()
    own.chat_template = QWEN2_TEMPLATE
    rendered = render(_turns("<image>\nWhat is it?", "a red circle", "And?", "blue"), "chat_template", own)
    assert rendered.text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                             "<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\na red circle<|im_end|>\n"
                             "<|im_start|>user\nAnd?<|im_end|>\n<|im_start|>assistant\nblue<|im_end|>\n")
    assert _spans(rendered) == ["a red circle<|im_end|>", "blue<|im_end|>"] and not rendered.bos
    prompt = render(_turns("What is it?", "x")[:1], "chat_template", own)
    assert prompt.text.endswith("<|im_start|>user\nWhat is it?<|im_end|>\n<|im_start|>assistant\n")


def test_auto_picks_the_tokenizers_own_template(tokenizer):
    own = tiny_tokenizer()
    own.chat_template = QWEN2_TEMPLATE
    assert resolve_template("auto", own) == "chat_template"
    assert resolve_template("auto", tokenizer) == "vicuna_v1"
    with pytest.raises(ConversationError, match="has none; use vicuna_v1"):
        resolve_template("chat_template", tokenizer)
    with pytest.raises(ConversationError, match="unknown template 'llama2'"):
        resolve_template("llama2", tokenizer)


def test_a_template_that_rewrites_earlier_turns_is_refused():
    """(As Qwen3's drops the reasoning of earlier answers: an answer rendered alone is not the one
    in the whole conversation.)"""
    rewriting = tiny_tokenizer()
    rewriting.chat_template = ("{% for m in messages %}{% if loop.last or m['role'] == 'user' %}"
                               "{{ m['content'] }}{% else %}…{% endif %}\n{% endfor %}")
    with pytest.raises(ConversationError, match="rewrites earlier turns"):
        render(_turns("q1", "a1", "q2", "a2"), "chat_template", rewriting)


def test_labels_are_the_answer_tokens_of_the_whole_string(tokenizer):
    rendered = render(_turns("What is it?", "a red circle", "And?", "blue"), "vicuna_v1", tokenizer)
    ids, labels = tokenize(tokenizer, rendered)
    assert ids == [tokenizer.bos_token_id] + tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
    supervised = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == " a red circle</s> blue</s>"
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))


def test_an_answer_boundary_inside_a_token_is_a_mismatch_not_shifted_labels(tokenizer):
    """"colo" + "ur": the whole string has the token "Ġcolour", which no boundary can split."""
    glued = tiny_tokenizer()
    glued.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TokenizationMismatch, match="'What colo' \\| 'ur is it'"):
        tokenize(glued, render(_turns("What colo", "ur is it"), "chat_template", glued))
    with pytest.raises(TokenizationMismatch, match="no token of its own"):
        tokenize(tokenizer, Rendered("What is it?", ((11, 11),), True))


def test_a_generation_prompt_ending_in_a_space_keeps_the_space_with_the_answer(tokenizer):
    """"ASSISTANT: " + "red": in the whole string the space merges into "Ġred", so the answer's
    span starts before it and the generation prompt ends with "ASSISTANT:", as in vicuna_v1."""
    spaced = tiny_tokenizer()
    spaced.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
                            "{% else %}ASSISTANT: {{ m['content'] }}</s>{% endif %}{% endfor %}"
                            "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
    rendered = render(_turns("What colour?", "red"), "chat_template", spaced)
    assert _spans(rendered) == [" red</s>"]
    ids, labels = tokenize(spaced, rendered)
    assert spaced.convert_ids_to_tokens([t for t, label in zip(ids, labels) if label != IGNORE_INDEX]) == ["Ġred", "</s>"]
    assert render(_turns("What colour?", "red")[:1], "chat_template", spaced).text == "USER: What colour? ASSISTANT:"


@pytest.mark.parametrize("template", ["vicuna_v1", "plain"])
def test_the_jinja_templates_render_what_render_renders(template):
    """chat_template.jinja of a saved model (what vLLM's chat endpoint and tokenizer.apply_chat_template
    render with) gives the prompt text ``render`` gives, images as "<image>\\n" before the text."""
    import jinja2

    from meteor.processing.conversation import CHAT_TEMPLATES
    from meteor.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    jinja = jinja2.Environment().from_string(CHAT_TEMPLATES[template])
    chats = [([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
              [Turn("human", "<image>\nWhat is it?")]),
             ([{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Both?"}]},
               {"role": "assistant", "content": "two cats"}, {"role": "user", "content": "And  now?"}],
              [Turn("human", "<image>\n<image>\nBoth?"), Turn("gpt", "two cats"), Turn("human", "And  now?")])]
    if template == "plain":
        chats = [([{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "a red cat"}],
                  [Turn("human", "<image>\n"), Turn("gpt", "a red cat")])]
    for messages, turns in chats:
        generation = turns[-1].role == "human"
        text = jinja.render(messages=messages, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                            add_generation_prompt=generation)
        assert text == tokenizer.bos_token + render(turns, template, tokenizer).text
