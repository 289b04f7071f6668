"""Runs vLLM's offline engine on a job file, in vLLM's own virtual environment (`make vllm-env`).

tests/test_vllm.py writes the job and compares the answers with the transformers class's. This is
what a user's offline script does: ``vllm.LLM(model=FOLDER)`` on a folder saved by the package, then
``LLM.generate`` with prompts holding ``<image>`` tags, PIL images and per-request
``mm_processor_kwargs``; the plugin is found through its ``vllm.general_plugins`` entry point.

    .venv-vllm/bin/python tests/vllm_engine.py JOB.json RESULT.json

JOB: {"folder", "max_tokens", "cases": [{"name", "prompt", "images": [png paths],
      "mm_processor_kwargs": {...}}], "refuse": [folders that must fail to load]}.
RESULT: {"cases": {name: {"prompt_token_ids", "token_ids"}}, "refused": {folder: message},
         "seconds": {"engine_start", "generate"}}.
vLLM starts processes, so everything runs under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import json
import os
import sys
import time


def run(job: dict) -> dict:
    from PIL import Image
    from vllm import LLM, SamplingParams

    result = {"cases": {}, "refused": {}, "seconds": {}}
    for folder in job.get("refuse", []):
        try:
            LLM(model=folder, dtype="float32", max_model_len=1024, enforce_eager=True)
        except Exception as err:    # the refusal, as a user sees it
            result["refused"][folder] = f"{type(err).__name__}: {err}"
        else:
            result["refused"][folder] = None
    start = time.perf_counter()
    llm = LLM(model=job["folder"], dtype="float32", max_model_len=2048, enforce_eager=True, seed=0,
              limit_mm_per_prompt={"image": 2}, max_num_seqs=8)
    result["seconds"]["engine_start"] = time.perf_counter() - start
    prompts = []
    for case in job["cases"]:
        prompt = {"prompt": case["prompt"]}
        if case["images"]:
            images = [Image.open(path).convert("RGB") for path in case["images"]]
            prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
        if case.get("mm_processor_kwargs"):
            prompt["mm_processor_kwargs"] = case["mm_processor_kwargs"]
        prompts.append(prompt)
    greedy = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
    start = time.perf_counter()
    outputs = llm.generate(prompts, greedy, use_tqdm=False)   # one batch: the cases run side by side
    result["seconds"]["generate"] = time.perf_counter() - start
    for case, output in zip(job["cases"], outputs):
        result["cases"][case["name"]] = {"prompt_token_ids": list(output.prompt_token_ids),
                                         "token_ids": list(output.outputs[0].token_ids)}
    return result


if __name__ == "__main__":
    job_file, result_file = sys.argv[1:3]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with open(job_file) as f:
        job = json.load(f)
    with open(result_file, "w") as f:
        json.dump(run(job), f)
