"""lmms-eval's model interface for LLaVA-Meteor folders, registered as ``llava_meteor``.

    lmms-eval --model llava_meteor --model_args pretrained=runs/meteor-7b,batch_size=8 --tasks gqa

lmms-eval (0.7) finds models through its ``ModelRegistryV2``: built-in names, plus manifests
published under the Python entry-point group ``lmms_eval.models``. This package publishes
``lmms_eval_manifest`` there (pyproject ``[project.entry-points."lmms_eval.models"]``), so an
installed llava-meteor is visible to the ``lmms-eval`` command with nothing else to do; in a
Python session, ``register()`` does the same by hand.

Requests arrive as lmms-eval builds them: ``Instance.args`` is
``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` for ``generate_until`` and
``(context, continuation_or_doc_to_target, doc_to_visual, doc_id, task, split)`` for
``loglikelihood``; the document is ``self.task_dict[task][split][doc_id]`` (lmms-eval sets
``task_dict`` before asking). The prompt goes through the model's own ``MeteorProcessor`` (Vicuna
template, the image's slice layout in place of ``<image>``). LLaVA-Meteor takes one image per
question: a document with several gets its first one and a warning (which one is used is said,
never silent).

Importing this module needs lmms-eval (``pip install --no-deps lmms-eval`` plus the few packages its
model API imports; see the README) but not its heavy task dependencies.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger

from meteor.processing.conversation import IGNORE_INDEX
from meteor.pretrained import load_pretrained

MODEL_NAME = "llava_meteor"
CLASS_PATH = "meteor.adapters.lmms_eval.LlavaMeteorLMMS"


class LlavaMeteorLMMS(lmms):
    """A LLaVA-Meteor folder (``meteor.pretrained.save_pretrained``) behind lmms-eval's ``lmms`` API."""

    is_simple = True

    def __init__(self, pretrained: str, batch_size: int | str = 1, device: str = "cpu",
                 dtype: str | None = None, max_new_tokens: int | str = 1024, **unused: Any) -> None:
        super().__init__()
        if unused:
            logger.warning(f"llava_meteor ignores model_args it does not know: {sorted(unused)}")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size!r}")
        self.default_max_new_tokens = int(max_new_tokens)
        torch_dtype = None if dtype in (None, "auto") else getattr(torch, str(dtype))
        self.model, self.processor = load_pretrained(pretrained, dtype=torch_dtype)
        self.model.to(device).eval()
        self.tokenizer = self.processor.tokenizer
        self._warned_multi_image = False

    # --- documents and images -------------------------------------------------------------------------
    def _image(self, doc_to_visual, doc_id, task: str, split: str):
        """The first image of a document, or None for text-only."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1 and not self._warned_multi_image:
            logger.warning(f"{task}: documents with {len(visuals)} images; LLaVA-Meteor uses the first image "
                           "of each (one image per question)")
            self._warned_multi_image = True
        return visuals[0] if visuals else None

    # --- generation -------------------------------------------------------------------------------------
    def generate_until(self, requests: Sequence[Instance]) -> list[str]:
        """Greedy (or sampled, if ``temperature > 0``) answers, cut at the first ``until`` string."""
        answers: list[str] = [""] * len(requests)
        batch: list[int] = []
        for position, request in enumerate(requests):
            # Requests batch together only while their gen_kwargs agree.
            if batch and (len(batch) == self.batch_size or requests[batch[0]].args[1] != request.args[1]):
                self._generate_batch(requests, batch, answers)
                batch = []
            batch.append(position)
        if batch:
            self._generate_batch(requests, batch, answers)
        return answers

    @torch.no_grad()
    def _generate_batch(self, requests: Sequence[Instance], positions: list[int], answers: list[str]) -> None:
        from meteor.serve.streaming import AnswerStream, Sampling, generate_streamed

        gen_kwargs = dict(requests[positions[0]].args[1] or {})
        until = gen_kwargs.pop("until", None) or []
        until = tuple(stop for stop in ([until] if isinstance(until, str) else until) if stop)
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        sampling = Sampling(temperature=temperature, top_p=float(gen_kwargs.pop("top_p", None) or 1.0)) \
            if temperature > 0 else Sampling()
        max_new_tokens = int(gen_kwargs.pop("max_new_tokens", self.default_max_new_tokens))
        if int(gen_kwargs.pop("num_beams", 1) or 1) > 1:
            logger.warning("llava_meteor decodes greedily or by sampling; num_beams > 1 is ignored")
        prompts = []
        for position in positions:
            context, _, doc_to_visual, doc_id, task, split = requests[position].args
            prompts.append(self.processor.question_prompt(context, self._image(doc_to_visual, doc_id, task, split)))
        # the project's one generation path; each answer stops before the first `until` string
        rows = [AnswerStream(self.tokenizer, max_new_tokens, stop=until) for _ in prompts]
        generate_streamed(self.model, self.processor, prompts, rows, sampling=sampling)
        for position, row in zip(positions, rows):
            answers[position] = row.text.strip()

    # --- likelihood ---------------------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[Instance]) -> list[tuple[float, bool]]:
        """(sum of the continuation's token log-probabilities, whether greedy decoding produces it).

        The continuation is the assistant turn of a Vicuna conversation whose user turn is the
        context, so its tokens are those a generated answer would have (its closing ``</s>``
        included, as the template ends every assistant turn with it)."""
        results = []
        for request in requests:
            context, target, doc_to_visual, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            image = self._image(doc_to_visual, doc_id, task, split)
            images = [] if image is None else [self.processor.prepare_image(image)]
            tag = self.processor.config.image_token
            if images and tag not in context:
                context = f"{tag}\n{context}"
            ids, labels = self.processor.encode([{"from": "human", "value": context},
                                                 {"from": "gpt", "value": continuation}], images)
            batch = self.processor.collate([(ids, labels)], images)
            inputs = {k: v for k, v in batch.to_model_kwargs().items() if k != "labels"}
            logits = self.model(**inputs).logits[0, :-1].float()                             # (T-1, V)
            targets = torch.tensor(labels[1:], device=logits.device)                        # (T-1,)
            scored = targets != IGNORE_INDEX
            log_probs = F.log_softmax(logits[scored], dim=-1)
            wanted = targets[scored]
            total = log_probs.gather(-1, wanted[:, None]).sum().item()
            greedy = bool((log_probs.argmax(-1) == wanted).all())
            results.append((total, greedy))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("llava_meteor answers single-round requests only (generate_until)")


def lmms_eval_manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's manifest naming this adapter."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Register ``llava_meteor`` in a running lmms-eval (what the entry point does at its start)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(lmms_eval_manifest(), overwrite=True)
