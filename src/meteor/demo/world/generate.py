"""Writing a world folder, reusing it safely, and reading its texts back.

A world folder holds::

    images/train/000000.png …   images/test/000000.png …   (the image folder is ``images/``)
    stage1.json    LLaVA-Pretrain captions, one record per train image
    stage2.json    LLaVA instruction records, one per train image, one question per turn
    test.jsonl     one test question per line (question, answer, type, image path, scene)
    manifest.json  config, counts, slice-count histogram, baselines (written last: it marks a
                   complete world)

Records are built from the config alone (``build_records``); pixels are only drawn when files
are written, so ``world_texts(config)`` is cheap.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import PIL

from meteor.demo.world.captions import caption, caption_request
from meteor.demo.world.config import COLOURS, FORMAT_VERSION, PLURALS, QUESTION_TYPES, SHAPES, SIZES, WORDS, WorldConfig
from meteor.demo.world.questions import LETTERS, Question, SplitState, ask_questions
from meteor.demo.world.render import render_scene
from meteor.demo.world.scene import Scene, make_scene

IMAGE_TOKEN = "<image>"
IMAGE_FOLDER = "images"
STAGE1_FILE = "stage1.json"
STAGE2_FILE = "stage2.json"
TEST_FILE = "test.jsonl"
MANIFEST_FILE = "manifest.json"
WORLD_ENTRIES = frozenset({IMAGE_FOLDER, STAGE1_FILE, STAGE2_FILE, TEST_FILE, MANIFEST_FILE})
"""Everything generate_world writes; it never deletes anything else."""


@dataclass(frozen=True)
class WorldRecords:
    """A world without its pixels: scenes and every record, exactly as written to disk."""

    train_scenes: list[Scene]
    test_scenes: list[Scene]
    stage1: list[dict[str, Any]]
    stage2: list[dict[str, Any]]
    test: list[dict[str, Any]]


@dataclass(frozen=True)
class WorldManifest:
    """A generated world: where its files are and what ``manifest.json`` says about it."""

    out_dir: Path
    config: WorldConfig
    data: dict[str, Any]
    """The parsed manifest.json (counts, question_types, slice_histogram, baselines, …)."""
    reused: bool = False
    """True when ``generate_world`` found this world already complete and wrote nothing."""

    @property
    def image_folder(self) -> Path:
        """Folder the records' ``"image"`` paths are relative to (LLaVA's ``--image_folder``)."""
        return self.out_dir / IMAGE_FOLDER

    @property
    def stage1_path(self) -> Path:
        return self.out_dir / STAGE1_FILE

    @property
    def stage2_path(self) -> Path:
        return self.out_dir / STAGE2_FILE

    @property
    def test_path(self) -> Path:
        return self.out_dir / TEST_FILE

    @property
    def counts(self) -> dict[str, int]:
        return self.data["counts"]

    @property
    def slice_histogram(self) -> dict[str, dict[str, int]]:
        return self.data["slice_histogram"]

    @property
    def baselines(self) -> dict[str, dict[str, Any]]:
        return self.data["baselines"]

    @classmethod
    def load(cls, out_dir: str | Path) -> "WorldManifest":
        out = Path(out_dir)
        data = _read_manifest(out)
        if data is None:
            raise FileNotFoundError(f"{out} holds no world: {MANIFEST_FILE} is missing or unreadable; "
                                    "create one with meteor.demo.world.generate_world")
        return cls(out_dir=out, config=WorldConfig.from_dict(data["config"]), data=data)


# --- records ------------------------------------------------------------------------------------------

def build_records(config: WorldConfig) -> WorldRecords:
    """Scenes and records of both splits (no pixels). Images are processed in order because the
    question balance (types, POPE yes/no) is kept over each split."""
    splits = {}
    for split, count in (("train", config.n_train_images), ("test", config.n_test_images)):
        state = SplitState()
        scenes = [make_scene(config, split, index) for index in range(count)]
        splits[split] = (scenes, [ask_questions(scene, config, state) for scene in scenes])
    train_scenes, train_questions = splits["train"]
    test_scenes, test_questions = splits["test"]
    stage1 = [_caption_record(scene, config) for scene in train_scenes]
    stage2 = [_instruction_record(scene, questions)
              for scene, questions in zip(train_scenes, train_questions)]
    test = [_test_record(scene, k, question)
            for scene, questions in zip(test_scenes, test_questions) for k, question in enumerate(questions)]
    return WorldRecords(train_scenes, test_scenes, stage1, stage2, test)


def _caption_record(scene: Scene, config: WorldConfig) -> dict[str, Any]:
    rng = random.Random(f"meteor.world/{config.seed}/{scene.image_id}/caption")
    return {"id": scene.image_id, "image": scene.image_path,
            "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{caption_request(rng)}"},
                              {"from": "gpt", "value": caption(scene)}],
            "meta": scene.to_meta()}


def _instruction_record(scene: Scene, questions: list[Question]) -> dict[str, Any]:
    """One multi-turn record per image (as LLaVA's 665K mixture): the image is encoded once for all
    its questions. ``questions[k]`` describes the k-th human/gpt turn pair."""
    turns = []
    for k, question in enumerate(questions):
        prefix = f"{IMAGE_TOKEN}\n" if k == 0 else ""
        turns += [{"from": "human", "value": prefix + question.question},
                  {"from": "gpt", "value": question.answer}]
    return {"id": scene.image_id, "image": scene.image_path, "conversations": turns,
            "questions": [_question_fields(q) for q in questions], "meta": scene.to_meta()}


def _test_record(scene: Scene, k: int, question: Question) -> dict[str, Any]:
    return {"question_id": f"{scene.image_id}-q{k}", "image_id": scene.image_id, "image": scene.image_path,
            **_question_fields(question), "meta": scene.to_meta()}


def _question_fields(question: Question) -> dict[str, Any]:
    fields = question.to_dict()
    return {key: fields[key] for key in ("question_type", "question", "answer", "subtype", "form", "query",
                                         "answer_space", "options") if key in fields}


# --- baselines and statistics ---------------------------------------------------------------------------

def question_baselines(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per question type: how many questions, the majority answer and its accuracy (always answering
    it), the accuracy of a blind prior that reads the wording (the majority answer of each
    ``form``, e.g. "left" for the left/right questions), and chance accuracy (mean of 1 / answer_space, i.e.
    guessing among the answers the question admits). "all" pools the types."""
    by_type: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_type.setdefault(record["question_type"], []).append(record)
    result, hits, prior_hits, chance, total = {}, 0, 0, 0.0, 0
    for question_type in [t for t in QUESTION_TYPES if t in by_type]:
        group = by_type[question_type]
        answers = Counter(r["answer"] for r in group)
        majority, majority_count = min(answers.items(), key=lambda item: (-item[1], item[0]))
        by_form = Counter((r["form"], r["answer"]) for r in group)
        form_hits = sum(max(n for (f, _), n in by_form.items() if f == form)
                        for form in {f for f, _ in by_form})
        type_chance = sum(1.0 / r["answer_space"] for r in group)
        result[question_type] = {"questions": len(group), "majority_answer": majority,
                                 "majority_accuracy": round(majority_count / len(group), 4),
                                 "form_majority_accuracy": round(form_hits / len(group), 4),
                                 "chance_accuracy": round(type_chance / len(group), 4)}
        hits, chance, total = hits + majority_count, chance + type_chance, total + len(group)
        prior_hits += form_hits
    if total:
        result["all"] = {"questions": total, "majority_accuracy": round(hits / total, 4),
                         "form_majority_accuracy": round(prior_hits / total, 4),
                         "chance_accuracy": round(chance / total, 4)}
    return result


def _statistics(config: WorldConfig, records: WorldRecords) -> dict[str, Any]:
    def histogram(scenes: list[Scene]) -> dict[str, int]:
        counts = Counter(scene.num_slices for scene in scenes)
        return {str(n): counts[n] for n in sorted(counts)}

    train_questions = [q for record in records.stage2 for q in record["questions"]]
    exist = {split: Counter(q["answer"] for q in questions if q["question_type"] == "exist")
             for split, questions in (("train", train_questions), ("test", records.test))}
    texts = [t for scene in records.train_scenes + records.test_scenes for t in scene.texts]
    return {
        "format_version": FORMAT_VERSION,
        "generator": "meteor.world",
        "pillow_version": PIL.__version__,
        "config": config.to_dict(),
        "image_folder": IMAGE_FOLDER,
        "files": {"stage1": STAGE1_FILE, "stage2": STAGE2_FILE, "test": TEST_FILE},
        "counts": {"train_images": len(records.train_scenes), "test_images": len(records.test_scenes),
                   "stage1_records": len(records.stage1), "stage2_records": len(records.stage2),
                   "stage2_questions": len(train_questions), "test_questions": len(records.test)},
        "question_types": {"train": dict(Counter(q["question_type"] for q in train_questions)),
                           "test": dict(Counter(q["question_type"] for q in records.test))},
        "slice_histogram": {"train": histogram(records.train_scenes), "test": histogram(records.test_scenes)},
        "exist_yes_ratio": {split: round(c["yes"] / max(1, c["yes"] + c["no"]), 4)
                            for split, c in exist.items()},
        "text_view_height": {"min": round(min((t.view_height for t in texts), default=0.0), 3),
                             "max": round(max((t.view_height for t in texts), default=0.0), 3),
                             "patch_size": config.patch_size},
        "baselines": question_baselines(records.test),
    }


# --- the folder ---------------------------------------------------------------------------------------------

def generate_world(out_dir: str | Path, config: WorldConfig | None = None,
                   overwrite: bool = False) -> WorldManifest:
    """Generate the world of ``config`` into ``out_dir`` (see the module docstring for the layout).

    - ``out_dir`` already holds this exact world (same config and format, files complete): it is
      reused as is (``manifest.reused`` is True), even with ``overwrite=True``. The key is the
      config plus ``FORMAT_VERSION``: bump that constant whenever the generator's output changes.
    - ``out_dir`` is missing or empty: the world is written.
    - ``out_dir`` holds anything else: refused with ``FileExistsError`` unless ``overwrite=True``,
      which deletes only what a world consists of (``images/``, the JSON files, the manifest), and
      only in a folder that is recognisably a world (a readable manifest, or nothing but world
      entries). A folder of unrelated files is never emptied.
    """
    config = WorldConfig() if config is None else config
    if not isinstance(config, WorldConfig):
        raise TypeError(f"config must be a WorldConfig, got {type(config).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; generate_world needs a folder (new, empty, or a world)")
    existing = _read_manifest(out)
    if existing is not None and _same_world(existing, config):
        if _complete(out, existing):
            return WorldManifest(out_dir=out, config=config, data=existing, reused=True)
        overwrite = True  # our own world, same config, files missing: rewriting it loses nothing
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries:
        _refuse_or_clear(out, entries, existing, config, overwrite)
    records = build_records(config)
    _write_images(out, records)
    _write_json_list(out / STAGE1_FILE, records.stage1)
    _write_json_list(out / STAGE2_FILE, records.stage2)
    (out / TEST_FILE).write_text("".join(_dumps(r) + "\n" for r in records.test), encoding="utf-8")
    data = _statistics(config, records)
    (out / MANIFEST_FILE).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return WorldManifest(out_dir=out, config=config, data=json.loads(json.dumps(data)))


def _refuse_or_clear(out: Path, entries: list[str], existing: dict | None, config: WorldConfig,
                     overwrite: bool) -> None:
    if existing is not None:
        what = f"a different world ({_config_diff(existing, config)})"
    else:
        listed = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
        what = f"{len(entries)} entries that are not a complete world ({listed})"
    if not overwrite:
        raise FileExistsError(f"{out} is not empty: it holds {what}. Pass a new or empty folder, the same "
                              "config to reuse it, or overwrite=True to replace a world")
    if existing is None and not set(entries) <= WORLD_ENTRIES:
        raise FileExistsError(f"refusing to overwrite {out}: it holds {what}, which generate_world did not "
                              f"write (it only writes {sorted(WORLD_ENTRIES)}); use a new or empty folder")
    for name in sorted(WORLD_ENTRIES & set(entries)):
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _write_images(out: Path, records: WorldRecords) -> None:
    """Render and save every image; assert that no two images of different splits are identical."""
    digests: dict[str, set[str]] = {}
    for split, scenes in (("train", records.train_scenes), ("test", records.test_scenes)):
        folder = out / IMAGE_FOLDER / split
        folder.mkdir(parents=True, exist_ok=True)
        digests[split] = set()
        for scene in scenes:
            image = render_scene(scene)
            digests[split].add(hashlib.blake2b(image.tobytes() + bytes(str(image.size), "ascii")).hexdigest())
            image.save(out / IMAGE_FOLDER / scene.image_path, format="PNG", compress_level=1)
    shared_ids = {s.image_id for s in records.train_scenes} & {s.image_id for s in records.test_scenes}
    shared_pixels = digests["train"] & digests["test"]
    if shared_ids or shared_pixels:
        raise RuntimeError(f"train and test share images ({len(shared_ids)} ids, {len(shared_pixels)} "
                           "identical pixel arrays): a bug in meteor.demo.world, please report it")


def _write_json_list(path: Path, records: list[dict[str, Any]]) -> None:
    """A JSON array with one record per line: valid JSON for LLaVA loaders, diffable by line."""
    path.write_text("[\n" + ",\n".join(_dumps(r) for r in records) + "\n]\n", encoding="utf-8")


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("generator") != "meteor.world" or "config" not in data:
        return None
    return data


def _same_world(manifest: dict[str, Any], config: WorldConfig) -> bool:
    return manifest.get("format_version") == FORMAT_VERSION and manifest["config"] == config.to_dict()


def _config_diff(manifest: dict[str, Any], config: WorldConfig) -> str:
    old, new = manifest.get("config", {}), config.to_dict()
    changes = [f"{key}: {old.get(key)!r} there, {new[key]!r} asked"
               for key in new if old.get(key) != new[key]]
    if manifest.get("format_version") != FORMAT_VERSION:
        changes.append(f"format_version: {manifest.get('format_version')!r} there, {FORMAT_VERSION} here")
    return "; ".join(changes) or "same config"


def _complete(out: Path, manifest: dict[str, Any]) -> bool:
    if not all((out / name).is_file() for name in (STAGE1_FILE, STAGE2_FILE, TEST_FILE)):
        return False
    counts = manifest.get("counts", {})
    for split in ("train", "test"):
        folder = out / IMAGE_FOLDER / split
        if not folder.is_dir():
            return False
        if sum(1 for p in folder.iterdir() if p.suffix == ".png") != counts.get(f"{split}_images"):
            return False
    return True


# --- texts for a tokenizer ---------------------------------------------------------------------------------

def vocabulary_text() -> str:
    """Every word the world can use, in one line, so a tokenizer trained on the train split's text
    still covers any test answer (a word or a number it never saw in training)."""
    words = [*SHAPES, *PLURALS.values(), *sorted(COLOURS), *SIZES, *WORDS, *map(str, range(10)),
             "yes", "no", "left", "right", "above", "below", *LETTERS]
    return " ".join(words)


def world_texts(source: WorldConfig | WorldManifest | str | Path, include_test: bool = False) -> list[str]:
    """All text of a world, for training a tokenizer: every conversation turn of stage 1 and 2
    (the ``<image>`` placeholder removed: make it a special token), plus ``vocabulary_text()``;
    with ``include_test``, the test questions and answers too.

    ``source`` is a config (records are built in memory, no pixels drawn), a manifest, or a
    world folder (its files are read)."""
    if isinstance(source, WorldConfig):
        records = build_records(source)
        stage1, stage2, test = records.stage1, records.stage2, records.test
    else:
        out = source.out_dir if isinstance(source, WorldManifest) else Path(source)
        WorldManifest.load(out)  # a clear error if this is not a world
        stage1 = json.loads((out / STAGE1_FILE).read_text(encoding="utf-8"))
        stage2 = json.loads((out / STAGE2_FILE).read_text(encoding="utf-8"))
        lines = (out / TEST_FILE).read_text(encoding="utf-8").splitlines()
        test = [json.loads(line) for line in lines if line]
    texts = []
    for record in [*stage1, *stage2]:
        for turn in record["conversations"]:
            value = turn["value"].replace(IMAGE_TOKEN, "").strip()
            if value:
                texts.append(value)
    if include_test:
        for record in test:
            texts += [record["question"], record["answer"]]
    texts.append(vocabulary_text())
    return texts
