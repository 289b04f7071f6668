"""LLaVA-format data: records, validation, truncation, and collation into padded batches.

A record is LLaVA's `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}, …]}`
(LLaVA-Pretrain 558K / CC-595K captions and the 665K instruction mixture share it). Files may be a
JSON list or JSONL. Bad records never stop a run by surprise: each is reported with its id and the
reason, skipped and counted (or, in strict mode, raised).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from meteor.processing.conversation import IGNORE_INDEX, ConversationError, TokenizationMismatch, parse_turns
from meteor.processing.images import ImageError
from meteor.processing.processor import Batch, LlavaMeteorProcessor
from meteor.processing.slicing import SlicedImage


class RecordError(ValueError):
    """A record that cannot be used; `record_id` names it, the message says why and what to do."""

    def __init__(self, record_id: str, reason: str):
        super().__init__(f"record {record_id!r}: {reason}")
        self.record_id = record_id
        self.reason = reason


def read_records(path: str | Path) -> list[dict]:
    """A JSON list or a JSONL file of records. Malformed lines are refused with their number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); expected LLaVA's list of records") from err
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}); each line of a "
                                 f"JSONL file must be one record") from err
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a list of records, got a {type(records).__name__}")
    return records


def record_id(record: Any, position: int) -> str:
    if isinstance(record, dict) and "id" in record:
        return str(record["id"])
    return f"#{position}"


@dataclass
class Example:
    """One encoded record, ready to collate."""
    record_id: str
    input_ids: list[int]
    labels: list[int]
    image: SlicedImage | None
    truncated: bool = False


@dataclass
class SkipReport:
    """Counts of skipped records by reason, with the first few ids of each, for the end summary."""
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, error: RecordError) -> None:
        kind = error.reason.split(":")[0]
        self.counts[kind] += 1
        self.examples.setdefault(kind, [])
        if len(self.examples[kind]) < 5:
            self.examples[kind].append(error.record_id)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no record was skipped"
        lines = [f"{self.total} record(s) skipped:"]
        for kind, count in self.counts.most_common():
            lines.append(f"  {count} × {kind} (e.g. {', '.join(self.examples[kind])})")
        return "\n".join(lines)


class LlavaDataset:
    """Records + image folder + processor → `Example`s. Indexing encodes on demand."""

    def __init__(self, records: Sequence[dict] | str | Path, image_folder: str | Path | None,
                 processor: LlavaMeteorProcessor, template: str = "vicuna_v1", max_length: int = 2048):
        self.records = read_records(records) if isinstance(records, (str, Path)) else list(records)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.processor = processor
        self.template = template
        if max_length < 8:
            raise ValueError(f"max_length must be at least 8 tokens, got {max_length}")
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.records)

    def encode(self, position: int) -> Example:
        """Encode record `position`, or raise RecordError naming it."""
        record = self.records[position]
        rid = record_id(record, position)
        if not isinstance(record, dict):
            raise RecordError(rid, f"malformed record: expected an object, got {type(record).__name__}")
        conversations = record.get("conversations")
        if not isinstance(conversations, list):
            raise RecordError(rid, "malformed conversation: 'conversations' must be a list of turns")
        try:
            parse_turns(conversations)
        except ConversationError as err:
            raise RecordError(rid, f"malformed conversation: {err}") from None
        image = None
        if record.get("image") is not None:
            image = self._load_image(rid, record["image"])
        elif any(self.processor.config.image_token in str(turn.get("value", "")) for turn in conversations):
            raise RecordError(rid, "malformed conversation: it has an <image> tag but the record has "
                                   "no 'image' field")
        try:
            ids, labels = self.processor.encode(conversations, [image] if image is not None else [],
                                                self.template)
        except TokenizationMismatch as err:
            raise RecordError(rid, f"tokenization mismatch: {err}") from None
        except (ValueError, ConversationError) as err:
            raise RecordError(rid, f"malformed conversation: {err}") from None
        cut = truncate(ids, labels, self.max_length, self.processor.image_token_id)
        if not cut.kept:
            raise RecordError(rid, cut.reason)
        if not any(label != IGNORE_INDEX for label in cut.labels):
            raise RecordError(rid, "no supervised token: the conversation has no answer to learn")
        return Example(rid, cut.input_ids, cut.labels, image, cut.truncated)

    def _load_image(self, rid: str, relative: Any) -> SlicedImage:
        if not isinstance(relative, str) or not relative:
            raise RecordError(rid, f"malformed record: 'image' must be a file name, got {relative!r}")
        if self.image_folder is None:
            raise RecordError(rid, "missing image folder: the record has an image but no image "
                                   "folder was given (--image-folder)")
        path = self.image_folder / relative
        if not path.is_file():
            raise RecordError(rid, f"missing image: {path} does not exist")
        try:
            return self.processor.prepare_image(path)
        except ImageError as err:
            raise RecordError(rid, f"unreadable image: {err}") from None


@dataclass
class Truncation:
    """How `truncate` changed a sample: `kept` is False when it had to be dropped instead."""
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    kept: bool
    reason: str = ""


def truncate(input_ids: list[int], labels: list[int], max_length: int, image_token_id: int) -> Truncation:
    """Cut a sample to `max_length`. A cut that would split an image's visual tokens, or leave no
    supervised token, drops the sample instead (training on it would be silently wrong)."""
    if len(input_ids) <= max_length:
        return Truncation(input_ids, labels, False, True)
    if image_token_id in input_ids[max_length:]:
        return Truncation(input_ids, labels, True, False,
                          f"too long: its visual tokens end past max_length={max_length}")
    ids, labs = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labs):
        return Truncation(ids, labs, True, False,
                          f"too long: no answer token is left within max_length={max_length}")
    return Truncation(ids, labs, True, True)


def collate(processor: LlavaMeteorProcessor, examples: Sequence[Example]) -> Batch:
    """Examples → a right-padded `Batch` (images in the order of their samples)."""
    return processor.collate([(e.input_ids, e.labels) for e in examples],
                             [e.image for e in examples if e.image is not None])


def split_turns(records: Sequence[dict]) -> list[dict]:
    """One record per question of each multi-turn record: the k-th human turn and its answer, the
    record's image with each (its tag moved to the front of that question), id ``<id>#<k>``; other
    fields (``meta``, …) are kept, and a per-question list (``questions``) keeps only its k-th
    entry. Single-turn and malformed records pass through unchanged (the loader reports the
    malformed ones). A model whose image selection depends on the question trains on these: it
    sees one question per encoded image, as it is asked at inference."""
    split = []
    for position, record in enumerate(records):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or len(turns) <= 2 or len(turns) % 2 or \
                not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
            split.append(record)
            continue
        for k in range(len(turns) // 2):
            human, answer = dict(turns[2 * k]), dict(turns[2 * k + 1])
            if record.get("image") is not None:
                text = human["value"].replace("<image>", "").lstrip("\n")
                human["value"] = "<image>\n" + text
            single = {**record, "id": f"{record_id(record, position)}#{k}", "conversations": [human, answer]}
            if isinstance(record.get("questions"), list) and len(record["questions"]) == len(turns) // 2:
                single["questions"] = [record["questions"][k]]
            split.append(single)
    return split
