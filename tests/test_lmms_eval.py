"""The lmms-eval adapter, through lmms-eval's own classes (`make setup` installs lmms-eval without
its heavy task dependencies; a missing install fails here rather than skipping)."""

import math
from importlib.metadata import entry_points

import pytest
from PIL import Image

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms  # noqa: E402

from meteor.integrations.lmms_eval import MODEL_NAME, LlavaMeteorLMMS, lmms_eval_manifest, register  # noqa: E402
from meteor.tiny import tiny_model  # noqa: E402

TASK, SPLIT = "tiny_shapes", "test"


def _doc_to_visual(doc):
    return [doc["image"]]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny-meteor"
    model, processor = tiny_model(seed=0)
    model.save_pretrained(folder, processor)
    adapter = LlavaMeteorLMMS.create_from_arg_string(f"pretrained={folder},batch_size=2,max_new_tokens=4")
    adapter.task_dict = {TASK: {SPLIT: [
        {"question": "What colour is the square?", "image": Image.new("RGB", (56, 56), (220, 40, 40)), "answer": "red"},
        {"question": "How many shapes are there?", "image": Image.new("RGB", (112, 56), (40, 80, 220)), "answer": "1"},
        {"question": "Is the shape round?", "image": Image.new("RGB", (56, 112), (40, 170, 60)), "answer": "no"},
    ]}}
    return adapter


def test_generate_until_answers_lmms_eval_requests_with_strings(adapter):
    assert isinstance(adapter, lmms)
    docs = adapter.task_dict[TASK][SPLIT]
    gen_kwargs = {"until": ["ASSISTANT:"], "max_new_tokens": 4, "temperature": 0}
    requests = [Instance(request_type="generate_until",
                         arguments=(f"{doc['question']}\nAnswer the question using a single word or phrase.",
                                    dict(gen_kwargs), _doc_to_visual, doc_id, TASK, SPLIT),
                         idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})
                for doc_id, doc in enumerate(docs)]
    requests.append(Instance(request_type="generate_until",   # a text-only document in the same batch
                             arguments=("Say yes.", dict(gen_kwargs), lambda doc: [], 0, TASK, SPLIT),
                             idx=0, metadata={"task": TASK, "doc_id": 0, "repeats": 1}))
    answers = adapter.generate_until(requests)
    assert len(answers) == 4 and all(isinstance(answer, str) for answer in answers)
    # Batched (2 + 1) and one-by-one generation agree: padding does not leak into the answers.
    assert answers == [adapter.generate_until([request])[0] for request in requests]


def test_loglikelihood_gives_a_finite_log_probability_and_a_greedy_flag(adapter):
    requests = [Instance(request_type="loglikelihood",
                         arguments=(doc["question"], doc["answer"], _doc_to_visual, doc_id, TASK, SPLIT),
                         idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})
                for doc_id, doc in enumerate(adapter.task_dict[TASK][SPLIT][:2])]
    results = adapter.loglikelihood(requests)
    assert len(results) == 2
    for log_prob, greedy in results:
        assert math.isfinite(log_prob) and log_prob < 0 and isinstance(greedy, bool)


def test_llava_meteor_is_registered_with_lmms_eval():
    manifest = lmms_eval_manifest()
    assert manifest.model_id == MODEL_NAME == "llava_meteor"
    published = [ep for ep in entry_points().select(group="lmms_eval.models") if ep.name == MODEL_NAME]
    if not published:   # the package was installed before the entry point existed: register by hand
        register()
    from lmms_eval.models import get_model

    assert get_model(MODEL_NAME) is LlavaMeteorLMMS
