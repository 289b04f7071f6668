"""Shared by the research scripts lm_probe.py and lm_focus.py: the demo world's test questions with
their scene written as text, and teacher-forced exact match per key. Not part of the package."""
import dataclasses
from collections import defaultdict

import torch

from meteor.demo.language import LanguagePretraining, describe_scene, pad_batch
from meteor.world.questions import SplitState, ask_questions
from meteor.world.scene import make_scene


def text_test_set(processor, key=lambda q: q.question_type, images=150):
    """[(encoded (ids, labels), key)] for the 4 test questions of each of the first ``images`` test scenes."""
    world = dataclasses.replace(LanguagePretraining().world(), questions_per_image=4)
    state, items = SplitState(), []
    for index in range(images):
        scene = make_scene(world, "test", index)
        for q in ask_questions(scene, world, state):
            conversation = [{"from": "human", "value": describe_scene(scene) + "\n" + q.question},
                            {"from": "gpt", "value": q.answer}]
            items.append((processor.encode(conversation, [], "vicuna_v1"), key(q)))
    return items


def exact_match(model, items, pad_id, batch_size=64):
    """{key: accuracy} plus each key's part before "/" and "all"; the model is left in train mode."""
    model.eval(); hits = defaultdict(list)
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            ids, mask, labels = pad_batch([c[0] for c in chunk], pad_id)
            pred, target = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1), labels[:, 1:]
            ok = ((pred == target) | (target == -100)).all(-1)
            for row, (_, key) in enumerate(chunk):
                for name in dict.fromkeys((key, key.split("/")[0], "all")):
                    hits[name].append(bool(ok[row]))
    model.train()
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}
