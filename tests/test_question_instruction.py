"""The question-conditioned instruction token (CompressorConfig.instruction="question", not in the
paper): INS + W·q with q the mean input embedding of the question asked about the image."""

import pytest
import torch
from PIL import Image

from meteor.model.configuration import CompressorConfig, ConfigError
from meteor.testing import tiny_meteor_config, tiny_model
from meteor.model.projectors import count_parameters


def _models():
    paper, processor = tiny_model(seed=0)
    asking, _ = tiny_model(tiny_meteor_config(instruction="question"), seed=0)
    return paper.eval(), asking.eval(), processor


def test_it_starts_as_the_papers_model_and_costs_one_d_by_c_map():
    paper, asking, processor = _models()
    shared = {k: v for k, v in asking.state_dict().items() if "question_map" not in k}
    assert all(torch.equal(v, paper.state_dict()[k]) for k, v in shared.items())   # same seed, same weights
    assert torch.count_nonzero(asking.compressor.question_map.weight) == 0
    batch = processor.prompts(["What colour is the square?"], [Image.new("RGB", (112, 56), (200, 30, 30))])
    torch.testing.assert_close(asking(**batch.to_model_kwargs()).logits, paper(**batch.to_model_kwargs()).logits)
    counts = count_parameters(CompressorConfig(instruction="question", vision_width=1024, text_width=5120))
    assert counts["question_map"] == 5120 * 1024
    assert counts["total"] == count_parameters(CompressorConfig(vision_width=1024, text_width=5120))["total"] + 5120 * 1024


def test_the_question_is_the_text_between_the_image_and_the_answer():
    _, asking, processor = _models()
    image = processor.prepare_image(Image.new("RGB", (56, 56), (20, 200, 30)))
    conversation = [{"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "green"},
                    {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "No"}]
    ids, labels = processor.encode(conversation, [image], "vicuna_v1")
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    embeds = asking.language_model.get_input_embeddings()(ids.masked_fill(ids == processor.image_token_id, 0))
    grids = processor.image_inputs([image])
    (vector,) = asking.model.question_embeddings(ids, embeds, grids["view_grids"], grids["image_grids"], labels=labels)
    last = int((ids[0] == processor.image_token_id).nonzero().max())
    first_answer = int((labels[0] != -100).nonzero().min())
    torch.testing.assert_close(vector, embeds[0, last + 1:first_answer].mean(0))
    text = processor.tokenizer.decode(ids[0, last + 1:first_answer])
    assert "What colour is the square?" in text and "Is it big" not in text
    # at inference the prompt ends with the question: the same span, up to the end
    prompt = processor.prompts(["What colour is the square?"], [image])
    prompt_ids = prompt.input_ids
    prompt_embeds = asking.language_model.get_input_embeddings()(prompt_ids.masked_fill(prompt_ids == processor.image_token_id, 0))
    (inference,) = asking.model.question_embeddings(prompt_ids, prompt_embeds, grids["view_grids"], grids["image_grids"],
                                                    attention_mask=prompt.attention_mask)
    torch.testing.assert_close(inference, vector)


def test_other_questions_select_other_patches_once_the_map_has_learnt():
    _, asking, processor = _models()
    torch.manual_seed(1)
    with torch.no_grad():
        asking.compressor.question_map.weight.normal_(0, 5.0)
    image = Image.new("RGB", (56, 56), (120, 120, 120))
    kept = []
    for question in ("What colour is the square?", "How many circles are there?", "Is there a word?"):
        batch = processor.prompts([question], [image])
        mask = batch.attention_mask
        ids = batch.input_ids
        embeds = asking.language_model.get_input_embeddings()(ids.masked_fill(ids == processor.image_token_id, 0))
        grids = processor.image_inputs(batch.images)
        questions = asking.model.question_embeddings(ids, embeds, grids["view_grids"], grids["image_grids"],
                                                     attention_mask=mask)
        _, selections = asking.encode_images(**processor.image_inputs(batch.images), return_selection=True, questions=questions)
        kept.append(tuple(selections[0].indices.tolist()))
    assert len(set(kept)) > 1


def test_the_map_trains_and_other_projectors_refuse_it():
    _, asking, processor = _models()
    asking.train()
    conversation = [{"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "green"}]
    image = processor.prepare_image(Image.new("RGB", (112, 112), (20, 200, 30)))
    batch = processor.collate([processor.encode(conversation, [image], "vicuna_v1")], [image])
    asking(**batch.to_model_kwargs()).loss.backward()
    assert asking.compressor.question_map.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="the 'cls_topk' projector has none"):
        CompressorConfig(projector="cls_topk", instruction="question")


def test_explain_and_prompt_selections_keep_what_forward_keeps_for_each_question(tmp_path):
    # The figure of `meteor explain` (and the serve UI's picture) must show the patches the model
    # keeps when it answers *this* question, not the selection made without one.
    from meteor.serve.explain import explain
    from meteor.serve.visualize import image_selections

    _, asking, processor = _models()
    torch.manual_seed(1)
    with torch.no_grad():
        asking.compressor.question_map.weight.normal_(0, 5.0)
    image_path = tmp_path / "grey.png"
    Image.new("RGB", (56, 56), (120, 120, 120)).save(image_path)
    explained = []
    for number, question in enumerate(("What colour is the square?", "How many circles are there?",
                                       "Is there a word?")):
        batch = processor.prompts([question], [Image.open(image_path)])
        with torch.no_grad():
            views = asking(**batch.to_model_kwargs(), return_views=True).views
        forward_kept = views[0].output.indices[0].sort().values.tolist()
        from_prompt = image_selections(asking, processor, batch.images, batch.input_ids[0].tolist())
        assert from_prompt[0].indices.sort().values.tolist() == forward_kept
        result = explain(asking, processor, image_path, question, tmp_path / f"q{number}.png", max_new_tokens=2)
        assert sorted(result.views[0].kept) == forward_kept
        explained.append(tuple(sorted(result.views[0].kept)))
    assert len(set(explained)) > 1                      # the selection follows the question
    with pytest.raises(ValueError, match="pass each view's pooled question embeddings"):
        asking.encode_images(**processor.image_inputs([image_path]), return_selection=True)
