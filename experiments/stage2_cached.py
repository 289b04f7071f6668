"""Research script (docs/demo-learning.md): stage 2 on the demo world with cached CLIP features.

    python3 experiments/stage2_cached.py --root meteor-demo --k 16 --epochs 3 --lr 1e-3 [--lm FOLDER]

Trains compressor + LLM (a fresh tiny LLaMA, or --lm, e.g. one from text_lm_pretrain.py) and prints
teacher-forced exact match per question type on the test split after each epoch. Not part of the
package or the tests.

--align / --stage1-align add the glyph-alignment loss in its first form (eighth session), computed
here with hooks on the feature cache and the fusion; the package's version is
meteor.train.glyphs (TrainConfig.glyph_alignment), with the same targets and the 'ce' loss.
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
p.add_argument('--stage1-epochs', type=float, default=0,
               help='first train the compressor alone on the captions (stage 1, LLM frozen), lr --stage1-lr')
p.add_argument('--stage1-lr', type=float, default=1e-3)
p.add_argument('--stage1-distill', type=float, default=0.0, help='scene-distillation weight in stage 1')
p.add_argument('--lm-lr', type=float, default=None, help='learning rate of the LLM in stage 2 (default --lr; 0 freezes it)')
p.add_argument('--stage1-data', default=None, help='stage-1 records (default: the world\'s stage1.json)')
p.add_argument('--text-mix', type=int, default=0,
               help="add this many text-only records (scenes written as text, the LLaMA's second-phase corpus) to "
                    "stage 2, as LLaVA-1.5 mixes language-only conversations into its instruction data")
p.add_argument('--oracle', action='store_true',
               help='replace the CLIP features by exact per-patch labels (an upper bound on what a tower can give)')
p.add_argument('--distill', type=float, default=0.0,
               help='weight of a scene-distillation loss: the LLM\'s hidden states on the conversation after the '
                    'image are pulled towards those of the frozen text-pretrained LLaMA reading the scene as text')
p.add_argument('--distill-layers', default='1,2,3', help='hidden-state layers matched by --distill (0: embeddings)')
p.add_argument('--align', type=float, default=0.0,
               help='weight of a glyph-alignment loss in stage 2: the projector applied to the fused tokens of the '
                    'patches a text covers is pulled towards the LLM\'s input embedding of that text\'s tokens '
                    '(as written in the scene line)')
p.add_argument('--stage1-align', type=float, default=0.0, help='the same loss in stage 1')
p.add_argument('--align-loss', choices=['mse', 'cos', 'ce'], default='ce',
               help='mse: relative squared error; cos: 1 - cosine; ce: cross-entropy of the cosine similarities '
                    '(temperature 0.1) to every input embedding, the text\'s first token the label')
p.add_argument('--align-cover', type=float, default=0.3, help='least fraction of a patch a text must cover')
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


class OracleFeatures:
    """Per-patch one-hot labels of the item covering most of each patch (shape, colour, size, text,
    the text's first character, background) in place of the tower's outputs; CLS attention favours
    item patches. Diagnostic only: what stage 2 learns when the vision side is perfect."""

    CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

    def __init__(self, width):
        from meteor.world import COLOURS, SHAPES, SIZES
        self.width, self.table = width, {}
        self.slots = {**{('shape', v): k for k, v in enumerate(SHAPES)},
                      **{('colour', v): 6 + k for k, v in enumerate(COLOURS)},
                      **{('size', v): 12 + k for k, v in enumerate(SIZES)},
                      ('text', None): 15, ('background', None): 16,
                      **{('char', c): 17 + k for k, c in enumerate(self.CHARS)}}

    def add(self, sliced, meta, patch):
        from meteor.features import view_key
        plan = sliced.plan
        boxes = list(plan.crop_boxes) + [(0, 0, *plan.image_size)]
        for view, box, (w, h), (rows, cols) in zip(sliced.views(), boxes, plan.view_sizes, plan.view_patches):
            sx, sy = (box[2] - box[0]) / w, (box[3] - box[1]) / h
            tokens = torch.zeros(rows * cols, self.width)
            cls = torch.full((rows * cols,), 0.1)
            items = [('object', o) for o in meta['objects']] + [('text', t) for t in meta['texts']]
            for i in range(rows):
                for j in range(cols):
                    l, t = box[0] + j * patch * sx, box[1] + i * patch * sy
                    r, b = l + patch * sx, t + patch * sy
                    best, best_area = None, 0.15 * (r - l) * (b - t)
                    for kind, item in items:
                        L, T, R, B = item['bbox']
                        area = max(0, min(r, R) - max(l, L)) * max(0, min(b, B) - max(t, T))
                        if area > best_area:
                            best, best_area = (kind, item), area
                    n = i * cols + j
                    if best is None:
                        tokens[n, self.slots[('background', None)]] = 1
                        continue
                    kind, item = best
                    cls[n] = 1.0
                    if kind == 'object':
                        for key in ('shape', 'colour', 'size'):
                            tokens[n, self.slots[(key, item[key])]] = 1
                    else:
                        tokens[n, self.slots[('text', None)]] = 1
                        tokens[n, self.slots[('char', item['text'][0])]] = 1
            self.table[view_key(view)] = (3 * tokens, cls / cls.sum())

    def encode(self, tower, pixels):
        from meteor.vision import VisionOutput
        from meteor.features import view_key
        found = [self.table[view_key(v)] for v in pixels]
        return VisionOutput(patch_tokens=torch.stack([f[0] for f in found]).to(pixels.dtype),
                            cls_attention=torch.stack([f[1] for f in found]),
                            grid=(pixels.shape[-2] // tower.patch_size, pixels.shape[-1] // tower.patch_size))

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
if a.text_mix:
    import dataclasses
    from meteor.demo.config import full_config
    from meteor.demo.language import focus_conversations
    recipe = dataclasses.replace(full_config().language_pretraining, focus_scenes=a.text_mix)
    records = records + [{'id': f'text-{i}', 'conversations': conv}
                         for i, conv in enumerate(focus_conversations(recipe.world(), recipe))]
ds = LlavaDataset(records, root / 'world/images', proc, 'vicuna_v1', 2048)
tests = [json.loads(l) for l in (root / 'world/test.jsonl').read_text().splitlines() if l.strip()]
test_recs = [{'id': t['question_id'], 'image': t['image'], 'conversations': [
    {'from': 'human', 'value': '<image>\n' + t['question']}, {'from': 'gpt', 'value': t['answer']}]} for t in tests]
tds = LlavaDataset(test_recs, root / 'world/images', proc, 'vicuna_v1', 2048)
if a.oracle:
    oracle = OracleFeatures(model.vision_tower.hidden_size)
    metas = {r['image']: r['meta'] for r in records}
    metas.update({t['image']: t['meta'] for t in tests})
    for image, meta in metas.items():
        oracle.add(proc.prepare_image(root / 'world/images' / image), meta, model.vision_tower.patch_size)
    model.feature_cache = oracle
    print(f'oracle features for {len(oracle.table)} views', flush=True)
t0 = time.time()
ex_cache = {}
def get(dset, i, tag):
    k = (tag, i)
    if k not in ex_cache:
        ex_cache[k] = dset.encode(i)
    return ex_cache[k]

teacher = None
if a.distill:
    from meteor.train.distill import SceneDistiller
    teacher = SceneDistiller(model.language_model, proc, 'vicuna_v1', records)
    layers = [int(x) for x in a.distill_layers.split(',')]
    if layers != [1, 2, 3]:
        raise SystemExit('--distill-layers: the package matches every decoder layer (1,2,3)')

    def distill_loss(idx, batch, hidden):
        total, matched = teacher.loss(idx, batch, hidden)
        return total / max(1, matched), matched * len(layers)


class GlyphAlignment:
    """Where each text lies in each view's patch grid, and the loss that pulls the projector's output
    on those patches towards the LLM's input embedding of the text's tokens."""

    def __init__(self):
        from meteor.features import view_key
        self.view_key, self.table, self.captured = view_key, {}, []
        encode = model.feature_cache.encode

        def recording_encode(tower, pixels):
            self.captured.append([self.view_key(v) for v in pixels])
            return encode(tower, pixels)
        model.feature_cache.encode = recording_encode
        model.compressor.fusion.register_forward_hook(lambda m, i, o: self.captured[-1].append(o.fused))

    def add(self, sliced, meta, patch, cover):
        plan = sliced.plan
        boxes = list(plan.crop_boxes) + [(0, 0, *plan.image_size)]
        for view, box, (w, h), (rows, cols) in zip(sliced.views(), boxes, plan.view_sizes, plan.view_patches):
            key = self.view_key(view)
            if key in self.table:
                continue
            sx, sy = (box[2] - box[0]) / w, (box[3] - box[1]) / h
            where, ids = [], []
            for text in meta['texts']:
                L, T, R, B = text['bbox']
                target = tok(f' "{text["text"]}"', add_special_tokens=False).input_ids[1:-1]
                for i in range(rows):
                    for j in range(cols):
                        l, t = box[0] + j * patch * sx, box[1] + i * patch * sy
                        r, b = l + patch * sx, t + patch * sy
                        area = max(0, min(r, R) - max(l, L)) * max(0, min(b, B) - max(t, T))
                        if area >= cover * (r - l) * (b - t):
                            where.append(i * cols + j); ids.append(target)
            self.table[key] = (where, ids)

    def loss(self):
        embed = model.language_model.get_input_embeddings().weight
        preds, targets = [], []
        for group in self.captured:
            keys, fused = group[:-1], group[-1]
            for row, key in enumerate(keys):
                where, ids = self.table.get(key, ((), ()))
                for n, target in zip(where, ids):
                    preds.append(fused[row, n]); targets.append(target[0])
        self.captured.clear()
        if not preds:
            return None, 0
        pred = model.compressor.projector(torch.stack(preds))
        labels = torch.tensor(targets)
        table = embed.detach()
        if a.align_loss == 'ce':
            logits = torch.nn.functional.normalize(pred, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
            return torch.nn.functional.cross_entropy(logits / 0.1, labels), len(preds)
        target = table[labels]
        if a.align_loss == 'cos':
            return 1 - torch.nn.functional.cosine_similarity(pred, target, dim=-1).mean(), len(preds)
        return ((pred - target) ** 2).mean() / (target ** 2).mean(), len(preds)


aligner = None
if a.align or a.stage1_align:
    aligner = GlyphAlignment()
    metas = {r['image']: r['meta'] for r in records}
    for image, meta in metas.items():
        aligner.add(proc.prepare_image(root / 'world/images' / image), meta, model.vision_tower.patch_size,
                    a.align_cover)
    print(f'glyph alignment: {sum(len(w) for w, _ in aligner.table.values())} text patches in '
          f'{len(aligner.table)} views', flush=True)


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
    if aligner is not None:
        aligner.captured.clear()
    res = {t: sum(v) / len(v) for t, v in hit.items()}
    res['all'] = sum(sum(v) for v in hit.values()) / sum(len(v) for v in hit.values())
    return res

al = []


def stage1():
    path = Path(a.stage1_data) if a.stage1_data else root / 'world/stage1.json'
    caps = json.loads(path.read_text())
    ds1 = LlavaDataset(caps, path.parent / 'images', proc, 'vicuna_v1', 2048)
    if a.oracle:
        for r in caps:
            if path.parent != root / 'world' or r['image'] not in metas:
                oracle.add(proc.prepare_image(path.parent / 'images' / r['image']), r['meta'], model.vision_tower.patch_size)
    ps = [p for n, p in model.named_parameters() if n.startswith('compressor')]
    o = torch.optim.AdamW(ps, lr=a.stage1_lr)
    teacher1 = None
    if a.stage1_distill:
        from meteor.train.distill import SceneDistiller
        teacher1 = SceneDistiller(model.language_model, proc, 'vicuna_v1', caps)
    n_steps = int(math.ceil(len(ds1) / a.bs) * a.stage1_epochs)
    sch = torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1, (s + 1) / max(1, int(0.03 * n_steps))) * 0.5 * (1 + math.cos(math.pi * min(1, s / n_steps))))
    r1 = random.Random(a.seed + 1); k = 0; ls = []
    if aligner is not None:
        for r in caps:
            aligner.add(proc.prepare_image(path.parent / 'images' / r['image']), r['meta'],
                        model.vision_tower.patch_size, a.align_cover)
    model.train()
    while k < n_steps:
        order = list(range(len(ds1))); r1.shuffle(order)
        for s_ in range(0, len(order), a.bs):
            if k >= n_steps: break
            model.training_progress = k / n_steps
            idx1 = order[s_:s_ + a.bs]
            b = collate(proc, [ds1.encode(i) for i in idx1])
            out = model(**b.to_model_kwargs(), output_hidden_states=teacher1 is not None)
            loss1 = out.loss
            if teacher1 is not None:
                d1, m1 = teacher1.loss(idx1, b, out.hidden_states)
                loss1 = loss1 + a.stage1_distill * d1 / max(1, m1)
            if aligner is not None:
                g1, _ = aligner.loss()
                if a.stage1_align and g1 is not None:
                    loss1 = loss1 + a.stage1_align * g1
                    al.append(float(g1.detach()))
            loss1.backward(); torch.nn.utils.clip_grad_norm_(ps, 1.0)
            o.step(); sch.step(); o.zero_grad(); ls.append(float(out.loss)); k += 1
            if k % 50 == 0 or k == n_steps:
                print(f'stage1 step {k}/{n_steps} t {time.time() - t0:.0f}s loss {sum(ls[-50:]) / len(ls[-50:]):.3f} align {sum(al[-50:]) / max(1, len(al[-50:])):.3f}', flush=True)


if a.stage1_epochs > 0:
    stage1()
    print('after stage 1: ' + ' '.join(f'{k} {v:.2f}' for k, v in evaluate().items()), flush=True)

params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith('vision_tower')]
lm_lr = a.lr if a.lm_lr is None else a.lm_lr
if lm_lr == 0:
    params = [p for n, p in model.named_parameters() if n.startswith('compressor')]
groups = [{'params': [p for n, p in model.named_parameters() if n.startswith('compressor')], 'lr': a.lr}]
if lm_lr:
    groups.append({'params': [p for n, p in model.named_parameters() if n.startswith('language_model')], 'lr': lm_lr})
opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=a.wd)
steps_per_epoch = math.ceil(len(ds) / a.bs)
total = int(steps_per_epoch * a.epochs)
warm = max(1, int(a.warm * total))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1, s / total))))
rng = random.Random(a.seed)
model.train()
step = 0; losses = []; dl = [0.0]; dm = [0.0]
print(f'records {len(ds)} steps {total}', flush=True)
next_eval = a.evalevery * steps_per_epoch
while step < total:
    order = list(range(len(ds))); rng.shuffle(order)
    for s in range(0, len(order), a.bs):
        if step >= total: break
        model.training_progress = step / total
        idx = order[s:s + a.bs]
        b = collate(proc, [get(ds, i, 'd') for i in idx])
        out = model(**b.to_model_kwargs(), output_hidden_states=teacher is not None)
        loss = out.loss
        if aligner is not None:
            g, _ = aligner.loss()
            if a.align and g is not None:
                loss = loss + a.align * g
                al.append(float(g.detach()))
        if teacher is not None:
            d, matched = distill_loss(idx, b, out.hidden_states)
            loss = loss + a.distill * d
            dl.append(float(d)); dm.append(matched / (len(idx) * len(layers)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); sched.step(); opt.zero_grad()
        losses.append(float(out.loss)); step += 1
        if step >= next_eval or step == total:
            next_eval += a.evalevery * steps_per_epoch
            r = evaluate()
            print(f'step {step} ep {step / steps_per_epoch:.1f} t {time.time() - t0:.0f}s loss {sum(losses[-50:]) / len(losses[-50:]):.3f} align {sum(al[-50:]) / max(1, len(al[-50:])):.3f} distill {sum(dl[-50:]) / len(dl[-50:]):.3f} matched {dm[-1]:.2f} ' + ' '.join(f'{k} {v:.2f}' for k, v in r.items()), flush=True)
