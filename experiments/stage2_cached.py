"""Research script (docs/demo-learning.md): stage 2 on the demo world with cached CLIP features.

    python3 experiments/stage2_cached.py --root meteor-demo --k 16 --epochs 3 --lr 1e-3 [--lm FOLDER]

Trains compressor + LLM (a fresh tiny LLaMA, or --lm, e.g. one from text_lm_pretrain.py) and prints
teacher-forced exact match per question type on the test split after each epoch. Not part of the
package or the tests.
"""
import argparse, json, math, random, time
import torch
from pathlib import Path
from meteor.modeling import LlavaMeteor
from meteor.config import MeteorConfig, CompressorConfig
from meteor.data import LlavaDataset, collate
from meteor.features import FeatureCache
from transformers import LlamaForCausalLM, AutoTokenizer
from meteor.tiny import tiny_llama_config

p = argparse.ArgumentParser()
p.add_argument('--root', default='meteor-demo', help='a meteor demo output folder (world, clip, language_model)')
p.add_argument('--k', type=int, default=16)
p.add_argument('--lr', type=float, default=2e-3)
p.add_argument('--epochs', type=float, default=3)
p.add_argument('--bs', type=int, default=16)
p.add_argument('--hidden', type=int, default=96)
p.add_argument('--layers', type=int, default=3)
p.add_argument('--heads', type=int, default=4)
p.add_argument('--projector', default='meteor')
p.add_argument('--single', action='store_true', help='split multi-turn records into single QA')
p.add_argument('--wd', type=float, default=0.0)
p.add_argument('--warm', type=float, default=0.03)
p.add_argument('--threads', type=int, default=1)
p.add_argument('--seed', type=int, default=0)
p.add_argument('--evalevery', type=float, default=1.0)
p.add_argument('--lm', default=None)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
root = Path(a.root)
tok = AutoTokenizer.from_pretrained(root / 'language_model')
lm = LlamaForCausalLM(tiny_llama_config(len(tok), hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=max(1, a.heads // 2)))
if a.lm:
    lm = LlamaForCausalLM.from_pretrained(a.lm)
cfg = MeteorConfig(compressor=CompressorConfig(tokens_per_slice=None if a.k == 0 else a.k, d_state=8, expand=2, projector=a.projector), max_slices=6)
model, proc = LlavaMeteor.build(str(root / 'clip'), lm, tok, cfg)

model.feature_cache = FeatureCache()   # CLIP runs once per view, then its outputs are reused

records = json.loads((root / 'world/stage2.json').read_text())
if a.single:
    out = []
    for r in records:
        conv = r['conversations']
        for i in range(0, len(conv), 2):
            q = conv[i]['value'].replace('<image>\n', '')
            out.append({'id': f"{r['id']}-{i}", 'image': r['image'], 'conversations': [
                {'from': 'human', 'value': '<image>\n' + q}, conv[i + 1]]})
    records = out
ds = LlavaDataset(records, root / 'world/images', proc, 'vicuna_v1', 2048)
tests = [json.loads(l) for l in (root / 'world/test.jsonl').read_text().splitlines() if l.strip()]
test_recs = [{'id': t['question_id'], 'image': t['image'], 'conversations': [
    {'from': 'human', 'value': '<image>\n' + t['question']}, {'from': 'gpt', 'value': t['answer']}]} for t in tests]
tds = LlavaDataset(test_recs, root / 'world/images', proc, 'vicuna_v1', 2048)
t0 = time.time()
ex_cache = {}
def get(dset, i, tag):
    k = (tag, i)
    if k not in ex_cache:
        ex_cache[k] = dset.encode(i)
    return ex_cache[k]

def evaluate():
    model.eval()
    from collections import defaultdict
    hit = defaultdict(list)
    with torch.no_grad():
        for s in range(0, len(tds), 32):
            exs = [get(tds, i, 't') for i in range(s, min(len(tds), s + 32))]
            b = collate(proc, exs)
            out = model(**{k: v for k, v in b.to_model_kwargs().items() if k != 'labels'})
            pred = out.logits[:, :-1].argmax(-1); lab = b.labels[:, 1:]
            m = lab != -100
            ok = ((pred == lab) | ~m).all(-1)
            for j, i in enumerate(range(s, s + len(exs))):
                hit[tests[i]['question_type']].append(bool(ok[j]))
    model.train()
    res = {t: sum(v) / len(v) for t, v in hit.items()}
    res['all'] = sum(sum(v) for v in hit.values()) / sum(len(v) for v in hit.values())
    return res

params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith('vision_tower')]
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.wd)
steps_per_epoch = math.ceil(len(ds) / a.bs)
total = int(steps_per_epoch * a.epochs)
warm = max(1, int(a.warm * total))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1, s / total))))
rng = random.Random(a.seed)
model.train()
step = 0; losses = []
print(f'records {len(ds)} steps {total}', flush=True)
next_eval = a.evalevery * steps_per_epoch
while step < total:
    order = list(range(len(ds))); rng.shuffle(order)
    for s in range(0, len(order), a.bs):
        if step >= total: break
        model.training_progress = step / total
        b = collate(proc, [get(ds, i, 'd') for i in order[s:s + a.bs]])
        out = model(**b.to_model_kwargs())
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); sched.step(); opt.zero_grad()
        losses.append(float(out.loss)); step += 1
        if step >= next_eval or step == total:
            next_eval += a.evalevery * steps_per_epoch
            r = evaluate()
            print(f'step {step} ep {step / steps_per_epoch:.1f} t {time.time() - t0:.0f}s loss {sum(losses[-50:]) / len(losses[-50:]):.3f} ' + ' '.join(f'{k} {v:.2f}' for k, v in r.items()), flush=True)
