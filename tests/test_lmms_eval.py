"""The lmms-eval adapter, through lmms-eval's own classes (`make setup` installs lmms-eval without
its heavy task dependencies; a missing install fails here rather than skipping)."""

from importlib.metadata import entry_points

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms  # noqa: E402

from meteor.processing.conversation import IGNORE_INDEX  # noqa: E402
from meteor.adapters.lmms_eval import MODEL_NAME, LlavaMeteorLMMS, lmms_eval_manifest, register  # noqa: E402
from meteor.testing import tiny_model  # noqa: E402
from meteor.pretrained import save_pretrained

TASK, SPLIT = "tiny_shapes", "test"


def _doc_to_visual(doc):
    return [doc["image"]]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny-meteor"
    model, processor = tiny_model(seed=0)
    save_pretrained(folder, model, processor)
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
    """The log-probability is the continuation's, recomputed one token at a time; the flag is
    whether each of its tokens is the argmax after the tokens before it."""
    requests = [Instance(request_type="loglikelihood",
                         arguments=(doc["question"], doc["answer"], _doc_to_visual, doc_id, TASK, SPLIT),
                         idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})
                for doc_id, doc in enumerate(adapter.task_dict[TASK][SPLIT][:2])]
    results = adapter.loglikelihood(requests)
    assert len(results) == 2
    model, processor = adapter.model, adapter.processor
    tag = processor.config.image_token
    for doc, (log_prob, greedy) in zip(adapter.task_dict[TASK][SPLIT][:2], results):
        sliced = processor.prepare_image(doc["image"])
        ids, labels = processor.encode([{"from": "human", "value": f"{tag}\n{doc['question']}"},
                                        {"from": "gpt", "value": doc["answer"]}], [sliced])
        start = next(t for t, label in enumerate(labels) if label != IGNORE_INDEX)
        assert labels[start:] == ids[start:]
        assert processor.tokenizer.decode(ids[start:]) == f" {doc['answer']}</s>"
        # the continuation follows exactly the prompt that generation would be given
        assert processor.prompts([doc["question"]], [doc["image"]]).input_ids[0].tolist() == ids[:start]
        # token by token: the log-softmax of the next-token logits after each prefix
        expected, argmax_hits = 0.0, []
        with torch.no_grad():
            for t in range(start, len(ids)):
                logits = model(input_ids=torch.tensor([ids[:t]]), **processor.image_inputs([sliced])).logits[0, -1].float()
                log_probs = F.log_softmax(logits, dim=-1)
                expected += float(log_probs[ids[t]])
                argmax_hits.append(int(log_probs.argmax()) == ids[t])
        assert log_prob == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert isinstance(greedy, bool) and greedy == all(argmax_hits)


def test_llava_meteor_is_registered_with_lmms_eval():
    manifest = lmms_eval_manifest()
    assert manifest.model_id == MODEL_NAME == "llava_meteor"
    published = [ep for ep in entry_points().select(group="lmms_eval.models") if ep.name == MODEL_NAME]
    if not published:   # the package was installed before the entry point existed: register by hand
        register()
    from lmms_eval.models import get_model

    assert get_model(MODEL_NAME) is LlavaMeteorLMMS


# --- lmms-eval's own evaluator, on a task defined by a local YAML and dataset (no network) ----------------
TASK_UTILS = '''
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + "\\nAnswer the question using a single word or phrase."


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
'''


@pytest.mark.slow
def test_lmms_evals_simple_evaluate_runs_llava_meteor_on_a_local_task(tmp_path):
    import datasets
    import lmms_eval.evaluator as evaluator   # needs sacrebleu and tenacity beside the --no-deps install
    from lmms_eval.tasks import TaskManager

    model, processor = tiny_model(seed=0)
    save_pretrained(tmp_path / "model", model, processor)
    docs = {"question": ["What colour is the square?", "How many shapes are there?", "Is the shape round?"],
            "image": [Image.new("RGB", (56, 56), (220, 40, 40)), Image.new("RGB", (112, 56), (40, 80, 220)),
                      Image.new("RGB", (56, 112), (40, 170, 60))],
            "answer": ["red", "1", "no"]}
    features = datasets.Features({"question": datasets.Value("string"), "image": datasets.Image(),
                                  "answer": datasets.Value("string")})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(docs, features=features)}).save_to_disk(
        str(tmp_path / "dataset"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_shapes_utils.py").write_text(TASK_UTILS)
    (tasks / "tiny_shapes.yaml").write_text(f"""task: tiny_meteor_shapes
dataset_path: {tmp_path / "dataset"}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function tiny_shapes_utils.doc_to_visual
doc_to_text: !function tiny_shapes_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function tiny_shapes_utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
""")
    if not [ep for ep in entry_points().select(group="lmms_eval.models") if ep.name == MODEL_NAME]:
        register()
    # lmms-eval 0.7.3 patches filelock through ``filelock._api``, which filelock ≥ 4 no longer has; the
    # patch only guards multi-process lock sharing, so a single-process run can go without it.
    evaluator._enable_reentrant_filelocks._patched = True

    results = evaluator.simple_evaluate(
        model=MODEL_NAME, model_args=f"pretrained={tmp_path / 'model'},max_new_tokens=4", tasks=["tiny_meteor_shapes"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), batch_size=2, device="cpu",
        log_samples=True)

    samples = sorted(results["samples"]["tiny_meteor_shapes"], key=lambda sample: sample["doc_id"])
    answers = [sample["resps"][0][0] if isinstance(sample["resps"][0], list) else sample["resps"][0]
               for sample in samples]
    assert [sample["doc_id"] for sample in samples] == [0, 1, 2]
    assert all(isinstance(answer, str) for answer in answers)
    expected = sum(a.strip().lower() == gold for a, gold in zip(answers, docs["answer"])) / 3
    assert results["results"]["tiny_meteor_shapes"]["exact_match,none"] == pytest.approx(expected)
    # The evaluator's answers are the adapter's own for the same requests (greedy, same folder).
    adapter = LlavaMeteorLMMS.create_from_arg_string(f"pretrained={tmp_path / 'model'},max_new_tokens=4")
    adapter.task_dict = {TASK: {SPLIT: [{"image": image} for image in docs["image"]]}}
    direct = adapter.generate_until([
        Instance(request_type="generate_until",
                 arguments=(f"{question}\nAnswer the question using a single word or phrase.",
                            {"max_new_tokens": 4, "temperature": 0, "do_sample": False}, _doc_to_visual,
                            doc_id, TASK, SPLIT),
                 idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})
        for doc_id, question in enumerate(docs["question"])])
    assert answers == direct
