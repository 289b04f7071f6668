"""Research script (docs/demo-learning.md): how fast does a tiny LLaMA learn each question type from
scenes written as text?  Uses the package's own text corpus code (``meteor.demo.language``).

    python3 experiments/lm_probe.py --types exist --min-objects 1 --max-objects 2 --qps 12 \
        --steps 1500 --out /tmp/probe

Prints teacher-forced exact match per question type (and exist subtype) on the demo world's test
scenes written as text, every --every steps. Not part of the package or the tests.
"""
import argparse, dataclasses, time

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from meteor.config import MeteorConfig
from meteor.demo.language import ASSET, LanguagePretraining, describe_scene, pretrain_language_model, text_conversations
from meteor.processor import MeteorProcessor
from meteor.tiny import tiny_llama_config
from meteor.world.questions import SplitState, ask_questions
from meteor.world.scene import make_scene
from text_eval import exact_match, text_test_set

p = argparse.ArgumentParser()
p.add_argument("--types", default="colour,count,exist,read,position,choice")
p.add_argument("--min-objects", type=int, default=1)
p.add_argument("--max-objects", type=int, default=6)
p.add_argument("--qps", type=int, default=6)
p.add_argument("--scenes", type=int, default=20000)
p.add_argument("--steps", type=int, default=1500)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--bs", type=int, default=16)
p.add_argument("--hidden", type=int, default=96)
p.add_argument("--layers", type=int, default=3)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--kv", type=int, default=2)
p.add_argument("--every", type=int, default=250)
p.add_argument("--no-caption", action="store_true")
p.add_argument("--init", default=None)
p.add_argument("--out", required=True)
a = p.parse_args()
torch.set_num_threads(1)
types = tuple(a.types.split(","))
recipe = LanguagePretraining(scenes=a.scenes, questions_per_scene=a.qps, min_objects=a.min_objects)
world = dataclasses.replace(recipe.world(), question_types=types, max_objects=a.max_objects)
tok = AutoTokenizer.from_pretrained(ASSET)
proc = MeteorProcessor(tok, MeteorConfig(), patch_size=14, base_size=112)
t0 = time.time()
convs = text_conversations(world, recipe)
if a.no_caption:  # rebuild each conversation from its scene and questions only
    config = dataclasses.replace(world, questions_per_image=a.qps, min_objects=a.min_objects)
    state, convs = SplitState(), []
    for index in range(100_000, 100_000 + a.scenes):
        scene = make_scene(config, "train", index)
        conv = []
        for k, q in enumerate(ask_questions(scene, config, state)):
            conv += [{"from": "human", "value": (describe_scene(scene) + "\n" if k == 0 else "") + q.question},
                     {"from": "gpt", "value": q.answer}]
        convs.append(conv)
train = [proc.encode(c, [], "vicuna_v1") for c in convs]
test = text_test_set(proc, key=lambda q: q.question_type + ("/" + q.subtype if q.question_type == "exist" else ""))
print(f"data {time.time() - t0:.0f}s, mean train length {sum(len(x[0]) for x in train) / len(train):.0f}", flush=True)
torch.manual_seed(0)
if a.init:
    lm = LlamaForCausalLM.from_pretrained(a.init)
else:
    lm = LlamaForCausalLM(tiny_llama_config(len(tok), hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                                            num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                            num_key_value_heads=a.kv))


def evaluate(step):
    if step % a.every == 0 or step == a.steps:
        print(f"step {step} t {time.time() - t0:.0f}s "
              + " ".join(f"{k} {v:.2f}" for k, v in exact_match(lm, test, tok.pad_token_id).items()), flush=True)
        lm.save_pretrained(a.out); tok.save_pretrained(a.out)


t0 = time.time()
recipe = dataclasses.replace(recipe, steps=a.steps, learning_rate=a.lr, batch_size=a.bs)
print(pretrain_language_model(lm, train, tok.pad_token_id, recipe, on_step=evaluate), flush=True)
