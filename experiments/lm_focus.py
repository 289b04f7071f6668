"""Research script (docs/demo-learning.md): the second, one-question-per-sequence phase of the demo
LLaMA's text pretraining, from the shipped first-phase model, with per-type accuracy on the test
scenes written as text every --every steps (package code: ``meteor.demo.language``).

    python3 experiments/lm_focus.py --scenes 200000 --steps 7000 --lr 1e-3 --bs 64 --out /tmp/focus

Not part of the package or the tests.
"""
import argparse, dataclasses, time
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from meteor.config import MeteorConfig
from meteor.demo.language import ASSET, LanguagePretraining, focus_conversations, pretrain_language_model
from meteor.processor import MeteorProcessor
from text_eval import exact_match, text_test_set

p = argparse.ArgumentParser()
p.add_argument("--scenes", type=int, default=200000)
p.add_argument("--steps", type=int, default=7000)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--bs", type=int, default=64)
p.add_argument("--every", type=int, default=500)
p.add_argument("--init", default=str(ASSET))
p.add_argument("--types", default=None)
p.add_argument("--out", required=True)
p.add_argument("--phase", type=int, default=2, help="3: the third phase (refine_steps / refine_learning_rate "
               "take --steps / --lr), from --init")
a = p.parse_args()
torch.set_num_threads(1)
recipe = dataclasses.replace(LanguagePretraining(), focus_scenes=a.scenes, focus_batch_size=a.bs,
                             focus_types=tuple(a.types.split(",")) if a.types else None)
recipe = (dataclasses.replace(recipe, focus_steps=a.steps, focus_learning_rate=a.lr) if a.phase == 2 else
          dataclasses.replace(recipe, refine_steps=a.steps, refine_learning_rate=a.lr))
tok = AutoTokenizer.from_pretrained(a.init)
lm = LlamaForCausalLM.from_pretrained(a.init)
proc = MeteorProcessor(tok, MeteorConfig(), patch_size=14, base_size=112)
t0 = time.time()
samples = [proc.encode(c, [], "vicuna_v1") for c in focus_conversations(recipe.world(), recipe)]
test = text_test_set(proc)
print(f"data {time.time() - t0:.0f}s: {len(samples)} samples, mean length "
      f"{sum(len(x[0]) for x in samples) / len(samples):.0f}", flush=True)


def evaluate(step):
    if step % a.every and step != a.steps:
        return
    accuracy = exact_match(lm, test, tok.pad_token_id)
    print(f"step {step} t {time.time() - t0:.0f}s " + " ".join(f"{k} {v:.2f}" for k, v in accuracy.items()),
          flush=True)
    lm.save_pretrained(a.out); tok.save_pretrained(a.out)


evaluate(0)
print(pretrain_language_model(lm, samples, tok.pad_token_id, recipe, phase=a.phase, on_step=evaluate), flush=True)
