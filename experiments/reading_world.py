"""Research script (docs/demo-learning.md, seventh session): how legible the world's text is to the
demo's tiny CLIP, for variants of how the text is drawn. Not part of the package or the tests.

    python3 experiments/reading_world.py --out /tmp/rw-base [--world '{"text_height_patches": [1.5, 2]}']
        [--stroke 1] [--contrast 120 150] [--threads 1]

Builds the full demo's world, tokenizer (the shipped LLaMA's) and tiny CLIP in --out with the world
options given (``WorldConfig`` fields as JSON), then runs ``experiments/clip_probe.py --radius 1`` on it.
Since the eighth session the demo's world is the legible one (single digits, 2-2.5 patches, stroke
0.05), so '{}' gives it; the earlier default is '{"number_digits": 3, "text_height_patches": [1, 1.5],
"text_stroke": 0}'.
--stroke and --contrast patch the renderer / scene generator in this process only (the text's
outline width in pixels, and the grey-level gap between text and background, now 70-100), to see
whether they are worth making world options.
"""
import argparse, dataclasses, json, subprocess, sys, time
from pathlib import Path

from meteor.demo.config import full_config
from meteor.demo.pipeline import open_pipeline

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--world", default="{}", help="WorldConfig overrides as JSON")
p.add_argument("--stroke", type=int, default=0)
p.add_argument("--contrast", type=int, nargs=2, default=None)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--clip-epochs", type=int, default=None)
a = p.parse_args()

if a.stroke:
    from meteor.world import render
    original = render.ImageDraw.ImageDraw.text

    def text(self, xy, string, *args, **kwargs):
        kwargs.setdefault("stroke_width", a.stroke)
        kwargs.setdefault("stroke_fill", kwargs.get("fill"))
        return original(self, xy, string, *args, **kwargs)
    render.ImageDraw.ImageDraw.text = text
if a.contrast:
    from meteor.world import scene
    scene.TEXT_CONTRAST = tuple(a.contrast)

config = full_config()
world_options = json.loads(a.world)
config = dataclasses.replace(config, world=dataclasses.replace(config.world, **world_options))
if a.clip_epochs:
    config = dataclasses.replace(config, clip=dataclasses.replace(config.clip, epochs=a.clip_epochs))
config = dataclasses.replace(config, threads=1, workers=a.threads)
started = time.time()
pipe = open_pipeline(a.out, config, force=False)
world = pipe.world()
lm = pipe.base_language_model(world)
pipe.clip(world, lm)
print(f"world and CLIP in {time.time() - started:.0f} s", flush=True)
subprocess.run([sys.executable, str(Path(__file__).parent / "clip_probe.py"), "--root", a.out, "--radius", "1"],
               check=True)
