"""The demo's stand-in for Vicuna: a tiny LLaMA pretrained on the world's scenes written as text.

The paper's LLM arrives able to read a context and answer about it; a tiny LLaMA from random
initialisation cannot learn that within the demo's budget, even when the scene is given as text
(docs/demo-findings.md). So the demo's language model is pretrained here, by this module, on text
only: scenes of the generator's train split at indices from ``FIRST_INDEX`` up (never drawn, never
the test split), each written as ``Scene: large red star near the top left; …; word "CAT" on the
right.`` followed by its caption and questions in the vicuna_v1 template. No image is involved.

Pretraining takes about 3 hours on one CPU core (three phases: 6000 steps of whole scenes with six
questions and a caption each, 12000 steps of one question per scene, then 15000 more steps of
that corpus with a fresh schedule), so the package ships the
result (``assets/language_model``, 1.8 MB) with the key it was made with; the demo uses
it when its configuration matches and pretrains otherwise (``meteor demo --pretrain-language-model``
forces a rebuild).
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from meteor.model.configuration import ConfigError
from meteor.processing.processor import pad_batch
from meteor.train.schedule import warmup_cosine
from meteor.demo.world import WorldConfig
from meteor.demo.world.captions import caption, caption_request, scene_line
from meteor.demo.world.questions import SplitState, ask_questions
from meteor.demo.world.scene import Scene, make_scene

FIRST_INDEX = 100_000
"""Text scenes are train-split scenes from this index up: far beyond any drawn image."""


@dataclass(frozen=True)
class LanguagePretraining:
    """How the demo's tiny LLaMA is pretrained on text (the shipped asset used these values)."""

    scenes: int = 20_000
    steps: int = 6_000
    learning_rate: float = 2e-3
    batch_size: int = 16
    questions_per_scene: int = 6
    min_objects: int = 1
    """1: easy one-shape scenes mixed in (a curriculum); the test world keeps its own minimum."""
    focus_scenes: int = 200_000
    """Second phase (0: none): this many further scenes, each one sequence holding one question (or,
    one time in ``len(question types) + 1``, the caption). Short sequences give about 2.5x more
    answers per token than the first phase (docs/demo-findings.md)."""
    focus_types: tuple[str, ...] | None = None
    """Question types of the second phase (None: all of them)."""
    focus_steps: int = 12_000
    focus_learning_rate: float = 2e-3
    focus_batch_size: int = 32
    refine_steps: int = 15_000
    """Third phase (0: none): more steps on the second phase's corpus, from the second phase's
    model, with a fresh warm-up and cosine decay at ``refine_learning_rate`` (batch
    ``focus_batch_size``). The second phase's accuracy was still rising when its schedule ended;
    in this phase exist (0.58 → 1.00), count (0.67 → 0.88) and choice (0.39 → 0.67) were learnt."""
    refine_learning_rate: float = 1e-3
    seed: int = 0
    world_seed: int = 0
    """The text world (and the tokenizer's corpus): the full demo's world at this seed, whatever
    seed the demo itself runs with, so one pretrained LLaMA serves every demo seed."""

    def __post_init__(self) -> None:
        if self.scenes < 1 or self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"LanguagePretraining needs scenes, steps and batch_size ≥ 1, got {self.scenes}, "
                              f"{self.steps}, {self.batch_size}")
        if self.focus_scenes < 0 or self.focus_steps < 0 or self.focus_batch_size < 1 \
                or (self.focus_scenes == 0) != (self.focus_steps == 0):
            raise ConfigError(f"LanguagePretraining's second phase needs focus_scenes and focus_steps both 0 "
                              f"(no second phase) or both ≥ 1, and focus_batch_size ≥ 1; got "
                              f"{self.focus_scenes}, {self.focus_steps}, {self.focus_batch_size}")
        if self.refine_steps < 0 or (self.refine_steps and not self.focus_steps) or self.refine_learning_rate <= 0:
            raise ConfigError(f"LanguagePretraining's third phase needs refine_steps ≥ 0 (0: none), a second "
                              f"phase to continue (focus_steps ≥ 1) and refine_learning_rate > 0; got "
                              f"refine_steps={self.refine_steps}, focus_steps={self.focus_steps}, "
                              f"refine_learning_rate={self.refine_learning_rate}")

    def world(self) -> WorldConfig:
        return WorldConfig(seed=self.world_seed, n_train_images=1000, n_test_images=150, base_size=112)


def describe_scene(scene: Scene) -> str:
    """The scene as text: shapes in reading order, then texts, each with where it is."""
    return scene_line(scene.to_meta())


def text_conversations(world: WorldConfig, recipe: LanguagePretraining) -> list[list[dict[str, str]]]:
    """One conversation per text scene: the scene, then its caption request (at a random turn) and
    its questions, each answered."""
    config = dataclasses.replace(world, questions_per_image=recipe.questions_per_scene,
                                 min_objects=recipe.min_objects)
    state, order = SplitState(), random.Random(1)
    conversations = []
    for index in range(FIRST_INDEX, FIRST_INDEX + recipe.scenes):
        scene = make_scene(config, "train", index)
        turns = [(q.question, q.answer) for q in ask_questions(scene, config, state)]
        turns.insert(order.randrange(len(turns) + 1), (caption_request(order), caption(scene)))
        conversation = []
        for k, (question, answer) in enumerate(turns):
            prefix = describe_scene(scene) + "\n" if k == 0 else ""
            conversation += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
        conversations.append(conversation)
    return conversations


def focus_conversations(world: WorldConfig, recipe: LanguagePretraining) -> list[list[dict[str, str]]]:
    """The second phase's corpus: scenes after the first phase's, one sequence each: the scene and
    one question (types balanced over the corpus), or the scene and its caption request."""
    config = dataclasses.replace(world, questions_per_image=1, min_objects=recipe.min_objects,
                                 question_types=recipe.focus_types or world.question_types)
    state, order = SplitState(), random.Random(2)
    conversations = []
    first = FIRST_INDEX + recipe.scenes
    for index in range(first, first + recipe.focus_scenes):
        scene = make_scene(config, "train", index)
        if order.randrange(len(config.question_types) + 1) == 0:
            question, answer = caption_request(order), caption(scene)
        else:
            asked = ask_questions(scene, config, state)
            if not asked:
                continue
            question, answer = asked[0].question, asked[0].answer
        conversations.append([{"from": "human", "value": describe_scene(scene) + "\n" + question},
                              {"from": "gpt", "value": answer}])
    return conversations


def pretrain_language_model(model: torch.nn.Module, samples: Sequence[tuple[list[int], list[int]]],
                            pad_id: int, recipe: LanguagePretraining,
                            progress: Callable[[str], None] = print, *, phase: int = 1,
                            on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train ``model`` (a causal LM) on encoded ``samples`` (input ids, labels): AdamW, cosine decay
    after a 2 % warm-up, gradient clipping at 1, shuffled epochs; the recipe's ``phase`` 1 (whole
    scenes), 2 (one question per scene) or 3 (more of phase 2's corpus, see ``refine_steps``).
    ``on_step(step)`` runs after every step. Returns a summary."""
    if not samples:
        raise ValueError("pretrain_language_model got no samples: give the recipe at least one scene")
    phases = {1: (recipe.steps, recipe.learning_rate, recipe.batch_size),
              2: (recipe.focus_steps, recipe.focus_learning_rate, recipe.focus_batch_size),
              3: (recipe.refine_steps, recipe.refine_learning_rate, recipe.focus_batch_size)}
    if phase not in phases or phases[phase][0] < 1:
        raise ValueError(f"phase {phase} is not one of this recipe's phases (1, and 2 and 3 when "
                         f"focus_steps / refine_steps are set)")
    started = time.perf_counter()
    steps, learning_rate, batch_size = phases[phase]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    total, warmup = steps, max(1, steps // 50)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup, decay_during_warmup=True))
    shuffle, step, losses = random.Random(recipe.seed + phase - 1), 0, []
    model.train()
    while step < total:
        order = list(range(len(samples)))
        shuffle.shuffle(order)
        for start in range(0, len(order), batch_size):
            if step >= total:
                break
            ids, mask, labels = pad_batch([samples[i] for i in order[start:start + batch_size]], pad_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
            step += 1
            if on_step is not None:
                on_step(step)
            if step % max(1, total // 10) == 0 or step == total:
                progress(f"    language model step {step}/{total}: loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    return {"steps": step, "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
            "seconds": round(time.perf_counter() - started, 1)}
