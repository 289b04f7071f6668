"""Conversation templates in the LLM's own chat format, and assistant-only supervision.

A conversation is rendered to one string exactly as the LLM's format writes it (vicuna_v1 as
FastChat renders it, or the tokenizer's own chat template), with one image placeholder per image,
and that string is tokenised as a whole: the ids are the ones the LLM was trained on, token for
token. Tokenising piece by piece would not be: a sentencepiece tokenizer gives every piece a
dummy-prefix "▁" of its own.

The supervised parts are character spans of that string (each answer and its end token). Each
span boundary becomes a token index by tokenising the prefix up to it and checking that those ids
begin the whole string's ids (cumulative tokenisation with a check). A boundary inside a token (a
merge across it) cannot be aligned: `TokenizationMismatch` names it, and the data loader skips and
counts the sample by id instead of training on shifted labels (LLaVA's silent "tokenization
mismatch"). Generation prompts are rendered by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, get_args

from meteor.model.configuration import IGNORE_INDEX, Template

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES: tuple[str, ...] = get_args(Template)
"""plain: the image, then the caption (stage 1). vicuna_v1: FastChat's Vicuna v1.1 format (stage 2).
chat_template: the tokenizer's own (``apply_chat_template``: LLaMA-3, Qwen2, Mistral, …). auto:
chat_template when the tokenizer has one, vicuna_v1 otherwise."""


# The conversation templates as Jinja, for tools that render prompts themselves (vLLM's chat
# endpoint, tokenizer.apply_chat_template): the same text as ``render`` gives (tests/test_conversation.py).
# Message content is a string, or a list of parts ({"type": "image"} / {"type": "text", "text"});
# images come first, each as "<image>\n", as LLaVA trains.
_CONTENT = ("{%- macro content(m) -%}{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
            "{%- for part in m['content'] if part['type'] in ['image', 'image_url'] -%}{{ '<image>\\n' }}{%- endfor -%}"
            "{%- for part in m['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
            "{%- endif -%}{%- endmacro -%}")
# Literal text goes through {{ '...' }} so the whitespace control of the tags around it cannot eat its
# spaces and newlines.
CHAT_TEMPLATES = {
    "vicuna_v1": _CONTENT + (
        "{{- bos_token + 'A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user\\'s questions. ' -}}"
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ 'USER: ' + content(m) + ' ' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + content(m) + eos_token }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"),
    "plain": _CONTENT + (
        "{{- bos_token -}}{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
        "{%- if '<image>' in content(m) -%}{{ '<image>\\n' }}{%- else -%}{{ content(m) + '\\n' }}{%- endif -%}"
        "{%- elif m['role'] == 'assistant' -%}{{ content(m) + eos_token }}{%- endif -%}{%- endfor -%}"),
}


class ConversationError(ValueError):
    """A malformed conversation; the message says which turn and why."""


class TokenizationMismatch(ConversationError):
    """An answer's boundary falls inside a token, so its labels cannot be aligned with the ids."""


@dataclass(frozen=True)
class Turn:
    role: str   # "human" or "gpt" (LLaVA's names)
    text: str


def parse_turns(conversations: Sequence[dict]) -> list[Turn]:
    """LLaVA's [{"from": "human"|"gpt", "value": str}, …] → turns, validated: human first, then
    alternating, ending with gpt. (A leading gpt turn is dropped, as LLaVA does.)"""
    turns = []
    for position, message in enumerate(conversations):
        if not isinstance(message, dict) or "from" not in message or "value" not in message:
            raise ConversationError(f"turn {position} must be an object with 'from' and 'value', got {message!r}")
        role = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}.get(message["from"])
        if role is None:
            raise ConversationError(f"turn {position} has unknown speaker {message['from']!r}; use 'human' or 'gpt'")
        if not isinstance(message["value"], str):
            raise ConversationError(f"turn {position}'s 'value' must be a string")
        turns.append(Turn(role, message["value"]))
    if turns and turns[0].role == "gpt":
        turns = turns[1:]
    if len(turns) < 2:
        raise ConversationError("a conversation needs at least one human turn and one gpt answer")
    for position, turn in enumerate(turns):
        expected = "human" if position % 2 == 0 else "gpt"
        if turn.role != expected:
            raise ConversationError(f"turn {position} is from {turn.role} but {expected} was expected: "
                                    f"turns must alternate human, gpt, human, …")
    if turns[-1].role != "gpt":
        raise ConversationError("the last turn must be the gpt answer")
    return turns


@dataclass(frozen=True)
class Rendered:
    """A conversation as the LLM reads it."""
    text: str
    """The whole prompt, with one image placeholder per image."""
    answers: tuple[tuple[int, int], ...]
    """Supervised character spans [start, end) of ``text``: each answer and its end token."""
    bos: bool
    """Whether the tokenizer's BOS goes first (a chat template writes its own)."""


def resolve_template(template: str, tokenizer) -> str:
    """``auto`` → chat_template when the tokenizer has one, else vicuna_v1; others are checked."""
    if template not in TEMPLATES:
        raise ConversationError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
    own = getattr(tokenizer, "chat_template", None)
    has_own = bool(own)
    if template == "auto":
        # a template of ours that a saved model folder gave the tokenizer (chat_template.jinja) is not
        # the tokenizer's own: such a model answers in the template it records
        return "chat_template" if has_own and own not in CHAT_TEMPLATES.values() else "vicuna_v1"
    if template == "chat_template" and not has_own:
        raise ConversationError(f"template 'chat_template' needs a tokenizer with a chat template, and "
                                f"{type(tokenizer).__name__} ({tokenizer.name_or_path or 'built in memory'}) "
                                f"has none; use vicuna_v1 (or auto, which falls back to it)")
    return template


def render(turns: Sequence[Turn], template: str, tokenizer, image_token: str = "<image>") -> Rendered:
    """The conversation in ``template`` (see TEMPLATES). Turns that end with a human turn give a
    generation prompt (nothing supervised)."""
    template = resolve_template(template, tokenizer)
    if template == "plain":
        return _render_plain(turns, tokenizer.eos_token, image_token)
    if template == "vicuna_v1":
        return _render_vicuna(turns, tokenizer.eos_token)
    return _render_chat_template(turns, tokenizer)


def _render_plain(turns: Sequence[Turn], eos: str, image_token: str) -> Rendered:
    """LLaVA's stage-1 format: the image, a newline, the caption and EOS; only the caption and EOS
    are supervised. Any text in the human turn beyond the image is dropped, as LLaVA does."""
    human = turns[0]
    text = (image_token if image_token in human.text else human.text) + "\n"
    if len(turns) < 2:
        return Rendered(text, (), True)
    start = len(text)
    text += turns[1].text + eos
    return Rendered(text, ((start, len(text)),), True)


def _render_vicuna(turns: Sequence[Turn], eos: str) -> Rendered:
    """FastChat's vicuna_v1.1 (LLaVA's conv_vicuna_v1): ``SYSTEM USER: q ASSISTANT: a</s>USER: q2
    ASSISTANT:`` (sep " " after the system message and each user turn, sep2 EOS after each answer).
    As LLaVA's preprocess_v1 does, the answer is supervised with the space before it (it merges into
    the answer's first token) and its EOS."""
    text = VICUNA_SYSTEM + " "
    answers = []
    for turn in turns:
        if turn.role == "human":
            text += f"USER: {turn.text} "
        else:
            text += "ASSISTANT:"
            start = len(text)
            text += f" {turn.text}{eos}"
            answers.append((start, len(text)))
    if turns[-1].role == "human":
        text += "ASSISTANT:"
    return Rendered(text, tuple(answers), True)


def _render_chat_template(turns: Sequence[Turn], tokenizer) -> Rendered:
    """The tokenizer's own chat template. Answer i's span runs from the end of the prompt rendered
    with the turns before it and the generation prompt, to the end of the prompt rendered with it,
    less trailing white space (so Qwen's "<|im_end|>" is supervised, the newline after it is not).
    A generation prompt that ends with spaces ("ASSISTANT: ") loses them, and an answer's span
    starts before them: in the whole string they merge into the answer's first token, as in
    vicuna_v1, so the model is prompted as it was trained."""
    messages = [{"role": "user" if turn.role == "human" else "assistant", "content": turn.text}
                for turn in turns]

    def apply(upto: int, generation: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                             add_generation_prompt=generation)

    if turns[-1].role == "human":
        return Rendered(apply(len(messages), True).rstrip(" "), (), False)
    text = apply(len(messages), False)
    answers = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = apply(index, True), apply(index + 1, False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ConversationError(
                f"the chat template of {tokenizer.name_or_path or type(tokenizer).__name__} renders turn "
                f"{index} differently once later turns follow (it rewrites earlier turns), so its answers "
                f"cannot be located in the whole conversation; use vicuna_v1")
        start = len(before.rstrip(" "))
        answers.append((start, max(start, len(through.rstrip()))))
    return Rendered(text, tuple(answers), False)


def tokenize(tokenizer, rendered: Rendered) -> tuple[list[int], list[int]]:
    """The whole string's ids (BOS first where ``rendered.bos`` and the tokenizer has one) and
    labels: the ids inside the answer spans, IGNORE_INDEX elsewhere."""
    bos = [tokenizer.bos_token_id] if rendered.bos and tokenizer.bos_token_id is not None else []

    def ids_of(text: str) -> list[int]:
        return bos + tokenizer(text, add_special_tokens=False)["input_ids"]

    input_ids = ids_of(rendered.text)
    labels = [IGNORE_INDEX] * len(input_ids)

    def token_index(position: int) -> int:
        prefix = ids_of(rendered.text[:position])
        if input_ids[:len(prefix)] != prefix:
            around = f"{rendered.text[max(0, position - 24):position]!r} | {rendered.text[position:position + 24]!r}"
            raise TokenizationMismatch(f"an answer boundary ({around}) falls inside a token: the text "
                                       f"before it tokenises differently alone than in the whole prompt")
        return len(prefix)

    for start, end in rendered.answers:
        first, last = token_index(start), token_index(end)
        if first >= last:
            raise TokenizationMismatch(f"the answer at characters {start}-{end} has no token of its own")
        labels[first:last] = input_ids[first:last]
    return input_ids, labels
