"""A deterministic synthetic visual-instruction world for training and testing a small model.

Scenes of coloured shapes (several sizes) and small grey text (words, numbers) at aspect ratios and
sizes that need from 0 to ``max_slices`` UHD slices for a vision tower of side ``base_size``;
stage-1 captions, stage-2 questions with exact answers (colour, count, exist, read, position,
choice), and a test split that never shares an image with train::

    from meteor.demo.world import WorldConfig, generate_world, world_texts
    world = generate_world("runs/world", WorldConfig(seed=0, base_size=112, n_train_images=2000))
    world.stage2_path, world.image_folder, world.test_path, world.baselines
    tokenizer_corpus = world_texts(world)

Modules: ``config`` (options and vocabulary), ``scene`` (what is in an image), ``fonts`` and
``render`` (pixels), ``captions`` and ``questions`` (text), ``generate`` (files).
"""

from meteor.demo.world.config import COLOURS, QUESTION_TYPES, SHAPES, SIZES, WORDS, WorldConfig
from meteor.demo.world.generate import (
    WorldManifest,
    WorldRecords,
    build_records,
    generate_world,
    question_baselines,
    vocabulary_text,
    world_texts,
)
from meteor.demo.world.questions import Question
from meteor.demo.world.render import render_scene
from meteor.demo.world.scene import Scene, SceneObject, SceneText, make_scene

__all__ = ["COLOURS", "QUESTION_TYPES", "SHAPES", "SIZES", "WORDS", "Question", "Scene", "SceneObject",
           "SceneText", "WorldConfig", "WorldManifest", "WorldRecords", "build_records", "generate_world",
           "make_scene", "question_baselines", "render_scene", "vocabulary_text", "world_texts"]
