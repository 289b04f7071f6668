"""Research script (docs/results.md): where do a trained model's kept tokens fall? (not part of the package)

    python3 experiments/kept_items.py /tmp/demo6 meteor expert_native expert_visual

For each ablation variant of a finished `meteor demo` + `meteor ablate` folder, loads its stage-2
model, selects tokens on the first 60 test images, and prints the share of kept patches that touch
an item's box (a shape or a text), beside the share of all patches that do. Keeping background
patches only gives a share below the second figure.
"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))
from clip_probe import view_frames
from meteor.modeling import LlavaMeteor
root = Path(sys.argv[1])
tests = [json.loads(l) for l in (root / 'world/test.jsonl').read_text().splitlines()]
metas = {}
for t in tests:
    metas.setdefault(t['image'], t['meta'])
metas = list(metas.items())[:60]
for name in sys.argv[2:]:
    model, proc = LlavaMeteor.from_pretrained(root / 'runs' / name / 'stage2' / 'model')
    model.eval()
    hit = tot = base = alltot = 0
    for image, meta in metas:
        sliced = proc.prepare_image(root / 'world/images' / image)
        with torch.no_grad():
            _, sel = model.encode_images([sliced], return_selection=True)
        frames = view_frames(sliced.plan)
        p = proc.patch_size
        for s in sel:
            box, size, (rows, cols) = frames[s.view_index]
            sx, sy = size[0] / (box[2] - box[0]), size[1] / (box[3] - box[1])
            items = [o['bbox'] for o in meta['objects']] + [t['bbox'] for t in meta['texts']]
            mapped = [((l - box[0]) * sx, (t - box[1]) * sy, (r - box[0]) * sx, (b - box[1]) * sy) for l, t, r, b in items]
            touch = torch.zeros(rows * cols, dtype=torch.bool)
            for i in range(rows):
                for j in range(cols):
                    touch[i * cols + j] = any(l < (j + 1) * p and r > j * p and t < (i + 1) * p and b > i * p for l, t, r, b in mapped)
            kept = s.indices
            hit += int(touch[kept].sum()); tot += len(kept)
            base += int(touch.sum()); alltot += rows * cols
    print(f'{name}: kept patches touching an item {hit / tot:.2f} (all patches: {base / alltot:.2f})', flush=True)
