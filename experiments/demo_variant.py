"""Research script (docs/demo-learning.md): the full demo's pipeline for some budgets with a changed
stage recipe, in a copy of an earlier demo folder (its world, CLIP and feature cache are reused).

    python3 experiments/demo_variant.py --from /tmp/demo7 --out /tmp/v1 --budgets 16 --stage2-distill 2

Every option left out keeps the demo's value (before the eighth session, the distillation weights
defaulted to 0).

Not part of the package or the tests.
"""
import argparse, dataclasses, json, shutil
from pathlib import Path

from meteor.demo import run_demo
from meteor.demo.config import full_config

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--from", dest="source", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--budgets", default="16", help="comma-separated K, 0 for all tokens")
    p.add_argument("--stage1-distill", type=float, default=None, help="default: the demo's")
    p.add_argument("--stage2-distill", type=float, default=None, help="default: the demo's")
    p.add_argument("--stage1-glyph", type=float, default=None, help="glyph-alignment weight (default: the demo's)")
    p.add_argument("--stage2-glyph", type=float, default=None, help="glyph-alignment weight (default: the demo's)")
    p.add_argument("--stage1-epochs", type=float, default=None)
    p.add_argument("--stage2-epochs", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="training seed (the world and CLIP keep theirs)")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args()
    source, out = Path(a.source), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("world", "clip", "clip_corpus", "features", "language_model"):
        if (source / name).exists() and not (out / name).exists():
            shutil.copytree(source / name, out / name, symlinks=True)
    config = full_config()


    def stage(run, distill, glyph, epochs):
        return dataclasses.replace(run, scene_distillation=run.scene_distillation if distill is None else distill,
                                   glyph_alignment=run.glyph_alignment if glyph is None else glyph,
                                   epochs=epochs or run.epochs)


    config = dataclasses.replace(
        config, workers=a.workers, budgets=tuple(None if k == "0" else int(k) for k in a.budgets.split(",")),
        stage1=stage(config.stage1, a.stage1_distill, a.stage1_glyph, a.stage1_epochs),
        stage2=stage(config.stage2, a.stage2_distill, a.stage2_glyph, a.stage2_epochs),
        seed=config.seed if a.seed is None else a.seed)
    results = run_demo(out, config=config)
    print(json.dumps([{"name": b["name"], **{k: v for k, v in b["scores"].items() if k != "per_question"}} for b in results["budgets"]], indent=1, default=str)[:4000])


if __name__ == "__main__":   # the budgets' worker processes import this file
    main()
