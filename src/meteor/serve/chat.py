"""``meteor chat``: a conversation with a saved model in the terminal, answers streamed as they are
generated; or, with a pipe on standard input, one question per line for scripts.

    meteor chat --model runs/stage2/model --image photo.jpg
    you> What is written on the sign?
    meteor> OPEN
    [80 visual tokens (K′=16 per view, 5 views) · encode 0.05 s · first token 0.09 s · decode 41.3 tokens/s (3 tokens)]

Commands: ``/image PATH`` (a new image for the next question), ``/reset`` (a new conversation; the
current image goes with its first question), ``/quit`` (or end of input). The conversation is in
the model's template (``MeteorConfig.template``) and every turn is answered with all of it, the
images re-encoded each time (LLaVA's CLI does the same). Piped, the answers go to standard output
one per line and everything else to standard error.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from meteor.serve.streaming import AnswerStream, Conversation, Sampling, generate_streamed

HELP = "commands: /image PATH (a new image for the next question), /reset (a new conversation), /quit"


@dataclass(frozen=True)
class TurnStats:
    """What one answer cost."""

    visual_tokens: int
    """Visual tokens in the prompt (every image of the conversation, K′ per view)."""
    views: int
    tokens_per_slice: int | None
    encode_seconds: float
    """Until the prompt was ready: vision tower, compression and embedding of the whole prompt."""
    first_token_seconds: float | None
    """From the call to the first answer token (encode and prefill included)."""
    new_tokens: int
    decode_tokens_per_second: float | None
    """Answer tokens after the first, per second after the first."""

    def line(self) -> str:
        k = "all tokens" if self.tokens_per_slice is None else f"K′={self.tokens_per_slice} per view"
        first = "-" if self.first_token_seconds is None else f"{self.first_token_seconds:.2f} s"
        speed = "-" if self.decode_tokens_per_second is None else f"{self.decode_tokens_per_second:.1f} tokens/s"
        return (f"[{self.visual_tokens} visual tokens ({k}, {self.views} views) · encode "
                f"{self.encode_seconds:.2f} s · first token {first} · decode {speed} ({self.new_tokens} tokens)]")


class ChatSession:
    """A conversation with one model; ``ask`` answers the next question (``meteor chat`` drives it)."""

    def __init__(self, model, processor, tokens_per_slice: int | None = None, max_new_tokens: int = 512,
                 sampling: Sampling = Sampling()):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        self.model, self.processor = model, processor
        self.tokens_per_slice = tokens_per_slice
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.conversation = Conversation()
        self.image = None
        """The current image (a SlicedImage), if any."""
        self._attach = False

    @property
    def k(self) -> int | None:
        """K′ in use: the flag's, else the model's trained K."""
        return self.processor.config.resolve_tokens_per_slice(self.tokens_per_slice)

    def set_image(self, source: Any):
        """Prepare ``source`` (a path or anything ``load_image`` takes) for the next question."""
        self.image = self.processor.prepare_image(source)
        self._attach = True
        return self.image

    def reset(self) -> None:
        """A new conversation; the current image goes with its first question."""
        self.conversation.reset()
        self._attach = self.image is not None

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> tuple[str, TurnStats]:
        """Answer ``question`` in the conversation so far, streaming pieces to ``on_text``. An
        interrupted answer (KeyboardInterrupt) leaves the conversation as it was."""
        images = [self.image] if self._attach else []
        before = (list(self.conversation.turns), list(self.conversation.images))
        self.conversation.ask(question, images, self.processor.config.image_token)
        row = AnswerStream(self.processor.tokenizer, self.max_new_tokens, on_text=on_text)
        try:
            ids = self.conversation.prompt_ids(self.processor, self.tokens_per_slice)
            timing = generate_streamed(self.model, self.processor, [(ids, self.conversation.images)], [row],
                                       self.tokens_per_slice, self.sampling)
        except BaseException:
            self.conversation.turns[:], self.conversation.images[:] = before
            raise
        self._attach = False
        self.conversation.answer(row.text)
        stats = TurnStats(
            visual_tokens=ids.count(self.processor.image_token_id),
            views=sum(image.plan.num_views for image in self.conversation.images),
            tokens_per_slice=self.k, encode_seconds=timing.encode_seconds,
            first_token_seconds=None if row.first_token_at is None else row.first_token_at - timing.started,
            new_tokens=len(row.token_ids),
            decode_tokens_per_second=(len(row.token_ids) - 1) / (row.last_token_at - row.first_token_at)
            if len(row.token_ids) > 1 and row.last_token_at > row.first_token_at else None)
        return row.text, stats


def describe_image(name: str, image) -> str:
    rows, cols = image.plan.grid
    layout = f"{rows}×{cols} slices + global" if image.plan.num_slices else "one view"
    return f"image: {name} ({image.plan.image_size[0]}×{image.plan.image_size[1]} px, {layout}, " \
           f"{image.plan.num_views} views)"


def run_chat(model_dir: str | os.PathLike, image: str | None = None, tokens_per_slice: int | None = None,
             max_new_tokens: int = 512, temperature: float = 0.0, stdin: TextIO | None = None,
             stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """The ``meteor chat`` loop: interactive on a terminal, one question per line from a pipe."""
    from transformers.utils import logging as hf_logging

    from meteor.processing.conversation import ConversationError, resolve_template
    from meteor.processing.images import ImageError
    from meteor.pretrained import load_pretrained

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin.isatty()
    info = stdout if interactive else stderr          # piped: only answers on standard output
    hf_logging.disable_progress_bar()
    print(f"meteor chat: loading {model_dir} ...", file=info, flush=True)
    model, processor = load_pretrained(model_dir)
    session = ChatSession(model, processor, tokens_per_slice, max_new_tokens, Sampling(temperature=temperature))
    template = resolve_template(processor.config.template, processor.tokenizer)
    trained = processor.config.resolve_tokens_per_slice()
    print(f"model {Path(model_dir).name}: template {template}, trained K={trained} per view"
          + (f", answering with K′={tokens_per_slice}" if tokens_per_slice is not None else "")
          + f". {HELP}.", file=info, flush=True)
    if image is not None:
        print(describe_image(image, session.set_image(image)), file=info, flush=True)

    def read() -> str | None:
        if interactive:
            try:
                return input("you> ")
            except EOFError:
                return None
        line = stdin.readline()
        return None if line == "" else line.rstrip("\n")

    def write(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    while True:
        line = read()
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command == "/quit":
            break
        if command == "/reset":
            session.reset()
            print("a new conversation" + (" (the current image goes with the next question)"
                                          if session.image is not None else ""), file=info, flush=True)
            continue
        if command == "/image":
            if not argument.strip():
                print("/image needs a path: /image photo.jpg", file=info, flush=True)
                continue
            try:
                prepared = session.set_image(argument.strip())
            except (ImageError, OSError) as err:
                print(f"error: {err}", file=info, flush=True)
                continue
            print(describe_image(argument.strip(), prepared) + ", for the next question", file=info, flush=True)
            continue
        if command.startswith("/"):
            print(f"unknown command {command}; {HELP}", file=info, flush=True)
            continue
        if interactive:
            write("meteor> ")
        try:
            _, stats = session.ask(line, write)
        except KeyboardInterrupt:
            print("\n[interrupted: the answer is dropped]", file=info, flush=True)
            continue
        except (ConversationError, ValueError) as err:
            print(f"\nerror: {err}", file=info, flush=True)
            continue
        write("\n")
        print(stats.line(), file=info, flush=True)
    return 0
