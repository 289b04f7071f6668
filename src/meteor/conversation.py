"""Conversation templates and assistant-only supervision.

A conversation is tokenised segment by segment and the ids are concatenated, so the labels are
aligned with the ids by construction: there is no re-tokenisation of the whole string that could
drift (LLaVA's silent "tokenization mismatch"). Generation prompts are built by the same code,
so training and inference see the same token boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, get_args

IGNORE_INDEX = -100
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
Template = Literal["plain", "vicuna_v1"]
TEMPLATES: tuple[str, ...] = get_args(Template)


class ConversationError(ValueError):
    """A malformed conversation; the message says which turn and why."""


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


def segments(turns: Sequence[Turn], template: str) -> list[tuple[str, bool]]:
    """The conversation as (text, supervised) pieces in order; end-of-sequence tokens are added
    by `encode_segments` after each supervised piece.

    plain: the image prompt then the caption (LLaVA's stage-1 format; only the caption is
    supervised, any text in the human turn beyond the image is dropped as LLaVA does).
    vicuna_v1: "SYSTEM USER: … ASSISTANT: …</s>USER: …".
    Turns ending with a human turn give a generation prompt (ending with "ASSISTANT:")."""
    if template == "plain":
        human, answer = turns[0], (turns[1] if len(turns) > 1 else None)
        image_part = human.text if "<image>" not in human.text else "<image>"
        pieces = [(image_part + "\n", False)]
        if answer is not None:
            pieces.append((answer.text, True))
        return pieces
    if template == "vicuna_v1":
        pieces = [(VICUNA_SYSTEM + " ", False)]
        for turn in turns:
            if turn.role == "human":
                pieces.append((f"USER: {turn.text} ASSISTANT:", False))
            else:
                pieces.append((" " + turn.text, True))
        return pieces
    raise ConversationError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}")


def encode_segments(tokenizer, pieces: Sequence[tuple[str, bool]], expand=lambda text: text,
                    add_eos: bool = True) -> tuple[list[int], list[int]]:
    """Tokenise the pieces; returns (input_ids, labels) with IGNORE_INDEX on unsupervised tokens.

    `expand` rewrites a piece's text before tokenising (the processor replaces each <image> with
    the image's visual-token layout). The first piece gets the tokenizer's BOS if it has one."""
    input_ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, supervised in pieces:
        ids = tokenizer(expand(text), add_special_tokens=False)["input_ids"]
        if supervised and add_eos:
            ids = ids + [tokenizer.eos_token_id]
        input_ids.extend(ids)
        labels.extend(ids if supervised else [IGNORE_INDEX] * len(ids))
    return input_ids, labels
