"""Research script (docs/demo-learning.md): pretrain the demo's tiny LLaMA on scenes written as text.

    TOKENIZER=meteor-demo/language_model MINO=1 python3 experiments/text_lm_pretrain.py \
        SCENES STEPS LR OUT_FOLDER

Scenes come from the world generator's train split at indices ≥ 100000 (never drawn, never the
test split); MINO sets the fewest shapes per scene (1 = a curriculum with easy scenes). Prints
teacher-forced exact match on the test scenes as text every 250 steps and saves OUT_FOLDER.
Not part of the package or the tests.
"""
import math, random, time, sys, os, torch
from meteor.world import WorldConfig
from meteor.world.scene import make_scene
from meteor.world.questions import ask_questions, SplitState
from meteor.world.captions import region_phrase, caption, caption_request
from meteor.tiny import tiny_llama_config
from transformers import LlamaForCausalLM, AutoTokenizer
from meteor.processor import MeteorProcessor
from meteor.config import MeteorConfig
torch.set_num_threads(1)
N = int(sys.argv[1]); steps = int(sys.argv[2]); lr = float(sys.argv[3]); out = sys.argv[4]
cfg = WorldConfig(seed=0, n_train_images=N, n_test_images=150, base_size=112, questions_per_image=6, min_objects=int(os.environ.get('MINO', 2)))
test_cfg = WorldConfig(seed=0, n_train_images=N, n_test_images=150, base_size=112, questions_per_image=6)
def describe_scene(s):
    objs = sorted(s.objects, key=lambda o: ((o.bbox[1]+o.bbox[3])/2, (o.bbox[0]+o.bbox[2])/2))
    parts = [f"{o.size} {o.colour} {o.shape} {region_phrase(o.bbox, s.width, s.height)}" for o in objs]
    parts += [f'{t.kind} "{t.text}" {region_phrase(t.bbox, s.width, s.height)}' for t in s.texts]
    return "Scene: " + "; ".join(parts) + "."
def records(split, n, off=0, c=None):
    c = c or cfg
    st = SplitState(); out = []
    for i in range(n):
        s = make_scene(c, split, i + off)
        qs = ask_questions(s, c, st)
        out.append((s, describe_scene(s), qs))
    return out
t0 = time.time()
train = records('train', N, 100000); test = records('test', 150, 0, test_cfg)
print('gen', time.time() - t0, flush=True)
tok = AutoTokenizer.from_pretrained('os.environ.get("TOKENIZER", "meteor-demo/language_model")')
proc = MeteorProcessor(tok, MeteorConfig(), patch_size=14, base_size=112)
rng0 = random.Random(1)
def enc(s, desc, qs, cap):
    conv = []
    items = [(q.question, q.answer) for q in qs]
    if cap: items.insert(rng0.randrange(len(items) + 1), (caption_request(rng0), caption(s)))
    for k, (q, a) in enumerate(items):
        conv += [{'from': 'human', 'value': (desc + '\n' if k == 0 else '') + q}, {'from': 'gpt', 'value': a}]
    return proc.encode(conv, [], 'vicuna_v1')
tr = [enc(s, d, qs, True) for s, d, qs in train]
te = [(enc(s, d, [q], False), q.question_type) for s, d, qs in test for q in qs]
print('len', sum(len(x[0]) for x in tr) / len(tr), flush=True)
torch.manual_seed(0)
lm = LlamaForCausalLM(tiny_llama_config(len(tok), hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))
def batch(items):
    L = max(len(i[0]) for i in items)
    ids = torch.full((len(items), L), tok.pad_token_id); lab = torch.full((len(items), L), -100); am = torch.zeros((len(items), L), dtype=torch.long)
    for j, (a, b) in enumerate(items):
        ids[j, :len(a)] = torch.tensor(a); lab[j, :len(b)] = torch.tensor(b); am[j, :len(a)] = 1
    return ids, am, lab
def evaluate():
    lm.eval(); from collections import defaultdict; hit = defaultdict(list)
    with torch.no_grad():
        for s in range(0, len(te), 64):
            chunk = te[s:s+64]; ids, am, lab = batch([c[0] for c in chunk])
            pred = lm(input_ids=ids, attention_mask=am).logits[:, :-1].argmax(-1); l = lab[:, 1:]
            ok = ((pred == l) | (l == -100)).all(-1)
            for j, c in enumerate(chunk): hit[c[1]].append(bool(ok[j]))
    lm.train(); r = {k: sum(v)/len(v) for k, v in hit.items()}; r['all'] = sum(sum(v) for v in hit.values())/len(te); return r
opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
bs = 16; total = steps; warm = max(1, total // 50)
sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s+1)/warm) * 0.5 * (1 + math.cos(math.pi * min(1, s/total))))
rng = random.Random(0); step = 0; t0 = time.time()
while step < total:
    order = list(range(len(tr))); rng.shuffle(order)
    for s in range(0, len(order), bs):
        if step >= total: break
        ids, am, lab = batch([tr[i] for i in order[s:s+bs]])
        loss = lm(input_ids=ids, attention_mask=am, labels=lab).loss
        loss.backward(); torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0); opt.step(); sch.step(); opt.zero_grad(); step += 1
        if step % 250 == 0 or step == total:
            print(f'step {step}/{total} t {time.time()-t0:.0f}s loss {loss.item():.3f}', ' '.join(f'{k} {v:.2f}' for k, v in evaluate().items()), flush=True)
            lm.save_pretrained(out); tok.save_pretrained(out)
