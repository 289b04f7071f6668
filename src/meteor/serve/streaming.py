"""Talking to a model: conversations with images, and answers streamed token by token.

Shared by ``meteor chat``, the server of ``meteor serve`` (its batching worker and web UI) and
``meteor explain``:

- ``Conversation``: the turns and images of one dialogue, rendered into the model's template
  (``MeteorConfig.template``) by the processor, each image where its ``<image>`` tag is.
- ``AnswerStream``: one answer being generated: the tokens so far, the text a client may already
  be shown (an incomplete UTF-8 character, a possible start of a stop string and the leading white
  space the template leaves are held back), why it ended, and when each token came.
- ``generate_streamed``: one left-padded batch of prompts through the model's ``generate``
  (transformers' ``GenerationMixin``, with its KV cache) with a streamer that feeds each row's ``AnswerStream`` and a stopping criterion that ends each row on
  its own (end token, its own token limit, a stop string, cancellation, a deadline).

Answers from a batch equal the answers each prompt gets alone under greedy decoding: rows are
independent under left padding with an attention mask (positions are counted from each row's first
real token), and the only differences are float rounding in batched matrix products (logits agree to
~1e-5 on the demo's model), which ``tests/test_serve.py`` checks does not change a greedy token.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList,
                          TemperatureLogitsWarper, TopPLogitsWarper)
from transformers.generation.streamers import BaseStreamer

from meteor.processing.conversation import ConversationError
from meteor.processing.slicing import SlicedImage


@dataclass
class Conversation:
    """A dialogue: alternating user and assistant turns; each image sits at an ``<image>`` tag
    in the user turn it was given with (before that turn's text, as LLaVA trains)."""

    turns: list[tuple[str, str]] = field(default_factory=list)
    """(role, text), role "human" or "gpt" (LLaVA's names); the text holds the image tags."""
    images: list[SlicedImage] = field(default_factory=list)
    """The images in the order of their tags."""

    def ask(self, text: str, images: Sequence[SlicedImage] = (), image_token: str = "<image>") -> None:
        """Add a user turn (merged into the previous one when that was a user turn too)."""
        if image_token in text:
            raise ConversationError(f"the text holds {image_token!r}, the model's image placeholder: "
                                    f"give images as images, not as that tag")
        value = "".join(f"{image_token}\n" for _ in images) + text
        if self.turns and self.turns[-1][0] == "human":
            self.turns[-1] = ("human", self.turns[-1][1] + "\n" + value)
        else:
            self.turns.append(("human", value))
        self.images.extend(images)

    def answer(self, text: str) -> None:
        """Add the assistant's turn (merged into the previous one when that was the assistant's)."""
        if not self.turns:
            raise ConversationError("the conversation starts with an assistant turn: a user turn must come first")
        if self.turns[-1][0] == "gpt":
            self.turns[-1] = ("gpt", self.turns[-1][1] + "\n" + text)
        else:
            self.turns.append(("gpt", text))

    def prompt_ids(self, processor, tokens_per_slice: int | None = None) -> list[int]:
        """The generation prompt in the model's template: token ids with every image laid out
        (K′ = ``tokens_per_slice`` tokens per view when given)."""
        if not self.turns or self.turns[-1][0] != "human":
            raise ConversationError("the conversation must end with a user turn to be answered")
        llava = [{"from": role, "value": text} for role, text in self.turns] + [{"from": "gpt", "value": ""}]
        ids, _ = processor.encode(llava, self.images, for_generation=True, tokens_per_slice=tokens_per_slice)
        return ids

    def reset(self) -> None:
        self.turns.clear()
        self.images.clear()


@dataclass
class AnswerStream:
    """One answer as it is generated (the module docstring says what is held back and why)."""

    tokenizer: object
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    """Strings that end the answer; the answer stops before the first one."""
    on_text: Callable[[str], None] | None = None
    """Called with each new piece of text, in the generating thread."""
    on_end: Callable[[], None] | None = None
    """Called once when the answer ends (in the generating thread): a batch's short answers are
    complete before its long ones."""
    deadline: float | None = None
    """``time.monotonic()`` after which the answer ends with finish reason "timeout"."""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    """What has been handed to ``on_text`` so far; once finished, the whole answer."""
    finish_reason: str | None = None
    """None while generating; "stop" (end token or a stop string), "length" (``max_new_tokens``),
    "cancelled" or "timeout"."""
    on_first_token: Callable[[], None] | None = None
    """Called once with the first token (in the generating thread)."""
    first_token_at: float | None = None
    last_token_at: float | None = None
    cancelled_at_tokens: int | None = None
    """How many tokens the answer had when ``cancel`` was called (how many came after it tells how
    fast a cancellation takes: at most the one step already running)."""
    _cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Ask for the answer to end at the next token (from any thread)."""
        if self.cancelled_at_tokens is None:
            self.cancelled_at_tokens = len(self.token_ids)
        self._cancel.set()

    def check(self) -> bool:
        """Whether the row should stop now: finished, cancelled or past its deadline."""
        if self.finish_reason is None:
            if self._cancel.is_set():
                self._finish("cancelled")
            elif self.deadline is not None and time.monotonic() > self.deadline:
                self._finish("timeout")
        return self.done

    def push(self, token_id: int, end_ids: Sequence[int]) -> None:
        """A new token (an end token ends the answer and adds no text)."""
        if self.done:
            return
        now = time.perf_counter()
        self.last_token_at = now
        self.token_ids.append(token_id)
        if self.first_token_at is None:
            self.first_token_at = now
            if self.on_first_token is not None:
                self.on_first_token()
        if token_id in end_ids:
            self._finish("stop")
        elif len(self.token_ids) >= self.max_new_tokens:
            self._finish("length")
        else:
            self._emit(final=False)

    def end(self) -> None:
        """Generation stopped (all rows done, or the batch's token limit): finish if still open."""
        if not self.done:
            self._finish("length")

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self._emit(final=True)
        if self.on_end is not None:
            self.on_end()

    def _emit(self, final: bool) -> None:
        if not final and self.on_text is None and not self.stop:
            return                    # nobody is shown the text before the end: decode once, then
        decoded = self.tokenizer.decode(
            [t for t in self.token_ids if t not in self._end_ids()], skip_special_tokens=True).lstrip()
        cut = _first_stop(decoded, self.stop)
        if cut is not None:
            decoded = decoded[:cut]
            if not final:
                self._finish("stop")
                return
        if not final:
            if decoded.endswith("\ufffd"):      # a character whose bytes have not all come yet
                decoded = decoded[:-1]
            decoded = decoded[:len(decoded) - _stop_prefix(decoded, self.stop)]
        if not decoded.startswith(self.text):
            # The tokenizer decoded earlier tokens differently with more context (rare): what was
            # shown stays shown, and the rest follows it.
            decoded = self.text + decoded[len(self.text):]
        piece = decoded[len(self.text):]
        if piece:
            self.text = decoded
            if self.on_text is not None:
                self.on_text(piece)

    def _end_ids(self) -> tuple[int, ...]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return () if eos is None else (eos,)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [text.find(stop) for stop in stops if stop and stop in text]
    return min(found) if found else None


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that begins a stop string (held back for now)."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


@dataclass
class Sampling:
    """How tokens are chosen: greedy for temperature 0, else sampling with temperature and top-p
    from the request's own random generator (``generator``)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    """Seeds this request's generator: the same seed and prompt give the same tokens (in a batch or
    alone, up to float rounding of the batch's logits). None: a generator seeded from the system's
    entropy. Torch's global generator is never used, so a seed touches no other request."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        """A new generator for one answer (None when greedy)."""
        if self.greedy:
            return None
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


class RowSampler(LogitsProcessor):
    """Chooses each row's next token by its own ``Sampling``: a sampled row draws from its
    temperature- and top-p-shaped distribution (transformers' ``TemperatureLogitsWarper`` and
    ``TopPLogitsWarper``) with its own ``torch.Generator``; a greedy row is left as it is. A sampled
    row's scores become -inf but at the drawn token, so ``generate`` runs greedy
    (``do_sample=False``) and takes the draws: rows of one batch sample independently, each with its
    own parameters, and never from torch's global generator."""

    def __init__(self, samplings: Sequence[Sampling]):
        self.samplings = list(samplings)
        self.generators = [s.generator() for s in self.samplings]
        self.warpers = [None if s.greedy else (TemperatureLogitsWarper(s.temperature), TopPLogitsWarper(s.top_p))
                        for s in self.samplings]

    @property
    def greedy(self) -> bool:
        return all(s.greedy for s in self.samplings)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, (warpers, generator) in enumerate(zip(self.warpers, self.generators)):
            if warpers is None:
                continue
            logits = scores[row:row + 1]                                      # (1, V)
            for warper in warpers:
                logits = warper(input_ids[row:row + 1], logits)
            probabilities = torch.softmax(logits.float(), dim=-1)
            token = torch.multinomial(probabilities[0], 1, generator=generator)   # (1,)
            scores[row] = float("-inf")
            scores[row, token] = 0.0
        return scores


@dataclass
class BatchTiming:
    """When one ``generate_streamed`` call started, had its prompts ready (images encoded, compressed
    and embedded: the decoder's first call begins) and ended, in ``time.perf_counter()`` seconds."""

    started: float
    prompt_ready: float | None = None
    ended: float | None = None

    @property
    def encode_seconds(self) -> float:
        return (self.prompt_ready or self.started) - self.started


class _Streamer(BaseStreamer):
    """transformers' streamer interface: the first ``put`` is the prompt's ids (B, T), each later one
    the batch's next tokens (B,)."""

    def __init__(self, rows: Sequence[AnswerStream], end_ids: Sequence[int], timing: BatchTiming):
        self.rows, self.end_ids, self.timing = rows, tuple(end_ids), timing
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.view(-1).tolist()):
            row.push(int(token), self.end_ids)

    def end(self) -> None:
        pass


class _RowsDone(StoppingCriteria):
    """A stopping criterion that ends each row on its own (``AnswerStream.check``)."""

    def __init__(self, rows: Sequence[AnswerStream]):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.tensor([row.check() for row in self.rows], dtype=torch.bool, device=input_ids.device)


def generate_streamed(model, processor, prompts: Sequence[tuple[list[int], Sequence[SlicedImage]]],
                      rows: Sequence[AnswerStream], tokens_per_slice: int | None = None,
                      sampling: Sampling | Sequence[Sampling] = Sampling(),
                      timing: BatchTiming | None = None, feature_cache=None) -> BatchTiming:
    """Generate one answer per prompt ((ids, its images) as ``Conversation.prompt_ids`` lays them
    out with ``tokens_per_slice``), all in one left-padded batch, streaming into ``rows``.
    ``sampling``: one for every row, or one per row (``RowSampler``). ``timing``: filled in as the
    batch runs (a new one by default); returned. ``feature_cache``: a ``FeatureCache`` the vision
    tower's outputs are read from (and kept in)."""
    if len(prompts) != len(rows):
        raise ValueError(f"{len(prompts)} prompts but {len(rows)} answer streams: give one per prompt")
    samplings = [sampling] * len(rows) if isinstance(sampling, Sampling) else list(sampling)
    if len(samplings) != len(rows):
        raise ValueError(f"{len(samplings)} samplings for {len(rows)} rows: give one, or one per row")
    sampler = RowSampler(samplings)
    tokenizer = processor.tokenizer
    timing = timing or BatchTiming(time.perf_counter())
    batch = processor.collate([(ids, ids) for ids, _ in prompts], [im for _, ims in prompts for im in ims],
                              padding_side="left")
    batch.tokens_per_slice = tokens_per_slice
    kwargs = batch.to_model_kwargs()
    kwargs.pop("labels", None)
    if feature_cache is not None and batch.images:
        kwargs["tower_outputs"] = feature_cache.encode_views(model.model, kwargs["pixel_values"], kwargs["view_grids"])
    model.eval()

    def prompts_ready(module, args):          # the decoder's first call: images encoded and embedded
        if timing.prompt_ready is None:
            timing.prompt_ready = time.perf_counter()

    hook = model.get_decoder().register_forward_pre_hook(prompts_ready)
    try:
        model.generate(**kwargs, max_new_tokens=max(row.max_new_tokens for row in rows),
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       streamer=_Streamer(rows, [tokenizer.eos_token_id], timing),
                       stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]), do_sample=False,
                       logits_processor=LogitsProcessorList([] if sampler.greedy else [sampler]))
    finally:
        hook.remove()
    for row in rows:
        row.end()
    timing.ended = time.perf_counter()
    return timing
