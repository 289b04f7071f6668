"""End to end on tiny configs of the real classes: CLIPVisionModel + LlamaForCausalLM."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from meteor.processing.conversation import IGNORE_INDEX
from meteor.testing import tiny_meteor_config, tiny_model
from meteor.pretrained import save_pretrained
from meteor.pretrained import load_pretrained


def _image(width, height, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def _conversation(question="What is it?", answer="a red circle"):
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def _supervised(labels):
    """The labels the loss reads: position t predicts label t + 1, IGNORE_INDEX left out."""
    return labels[:, 1:]


def _cross_entropy(logits, labels):
    """The causal-LM loss recomputed from the logits: mean over the supervised next tokens."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           _supervised(labels).reshape(-1), ignore_index=IGNORE_INDEX)


def _assert_loss_is_the_cross_entropy(out, batch):
    torch.testing.assert_close(out.loss, _cross_entropy(out.logits, batch.labels), rtol=1e-5, atol=1e-6)


def test_prompt_layout_has_one_placeholder_per_kept_token(tiny):
    model, processor = tiny
    sliced = processor.prepare_image(_image(112, 168))     # the paper's 672×1008 at a 56-px base
    assert sliced.plan.grid == (3, 2) and sliced.plan.num_slices == 6
    ids, labels = processor.encode(_conversation(), [sliced])
    k = model.meteor_config.compressor.tokens_per_slice
    assert ids.count(processor.image_token_id) == k * (sliced.plan.num_slices + 1)
    layout = processor.tokenizer.decode(processor.image_layout(sliced))
    rows, cols = sliced.plan.grid
    assert layout.count(",") == rows * (cols - 1) and layout.count("\n") == rows


def test_only_assistant_tokens_are_supervised(tiny):
    _, processor = tiny
    sliced = processor.prepare_image(_image(56, 56))
    ids, labels = processor.encode(_conversation(answer="a red circle"), [sliced])
    supervised = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(supervised) == " a red circle</s>"
    assert labels[-1] == processor.tokenizer.eos_token_id


def test_mixed_batch_loss_backward_reaches_compressor_not_vision(tiny):
    model, processor = tiny
    model.train()
    images = [processor.prepare_image(_image(112, 168, 1)), processor.prepare_image(_image(40, 30, 2))]
    samples = [processor.encode(_conversation(), [images[0]]),
               processor.encode([{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]),
               processor.encode(_conversation("Colour?", "blue"), [images[1]])]
    assert images[0].plan.num_slices != images[1].plan.num_slices
    batch = processor.collate(samples, images)
    model.zero_grad()
    out = model(**batch.to_model_kwargs())
    _assert_loss_is_the_cross_entropy(out, batch)
    out.loss.backward()
    assert model.compressor.fusion.instruction_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vision_tower.parameters())
    # Each sample alone: right padding leaves its logits as they were, and the batch's loss is the
    # mean of the samples' losses weighted by their supervised token counts.
    alone_images = [[images[0]], [], [images[1]]]
    losses, counts = [], []
    with torch.no_grad():
        for row, (sample, own) in enumerate(zip(samples, alone_images)):
            single = processor.collate([sample], own)
            single_out = model(**single.to_model_kwargs())
            length = len(sample[0])
            torch.testing.assert_close(out.logits[row, :length].detach(), single_out.logits[0],
                                       rtol=1e-4, atol=1e-5)
            losses.append(single_out.loss)
            counts.append(int((_supervised(single.labels) != IGNORE_INDEX).sum()))
    assert counts == [int((_supervised(batch.labels[row:row + 1]) != IGNORE_INDEX).sum()) for row in range(3)]
    weighted = sum(n * loss for n, loss in zip(counts, losses)) / sum(counts)
    torch.testing.assert_close(out.loss.detach(), weighted, rtol=1e-5, atol=1e-6)
    model.eval()


def test_placeholder_mismatch_is_a_loud_error(tiny):
    model, processor = tiny
    sliced = processor.prepare_image(_image(56, 56))
    ids, labels = processor.encode(_conversation(), [sliced])
    batch = processor.collate([(ids[:-3] + [processor.image_token_id] * 3, labels)], [sliced])
    with pytest.raises(ValueError, match="disagree"):
        model(**batch.to_model_kwargs())
    with pytest.raises(ValueError, match="1 <image> tag\\(s\\) but 2 image"):
        processor.encode(_conversation(), [sliced, sliced])


def test_generate_and_save_load_round_trip(tiny, tmp_path):
    model, processor = tiny
    model.eval()
    batch = processor.prompts(["What is it?", "Describe the image."], [_image(112, 168), None])
    torch.manual_seed(0)
    out = model.generate(**batch.to_model_kwargs(), max_new_tokens=5, do_sample=False)
    prompt = batch.input_ids.shape[1]
    assert out.shape[0] == 2 and 1 <= out.shape[1] - prompt <= 5 and torch.equal(out[:, :prompt], batch.input_ids)
    with torch.no_grad():
        logits = model(**batch.to_model_kwargs()).logits
    folder = save_pretrained(tmp_path / "saved", model, processor)
    assert {"config.json", "model.safetensors", "processor_config.json", "preprocessor_config.json",
            "chat_template.jinja", "generation_config.json"} <= {f.name for f in folder.iterdir()}
    assert not list(folder.rglob("*.bin"))
    reloaded, reprocessor = load_pretrained(folder)
    reloaded.eval()
    again = reprocessor.prompts(["What is it?", "Describe the image."], [_image(112, 168), None])
    assert torch.equal(again.input_ids, batch.input_ids)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**again.to_model_kwargs()).logits, logits, rtol=0, atol=0)
    assert torch.equal(reloaded.generate(**again.to_model_kwargs(), max_new_tokens=5, do_sample=False), out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(folder, model, processor)


def test_keep_all_tokens_mode(tmp_path):
    model, processor = tiny_model(tiny_meteor_config(tokens_per_slice=None))
    sliced = processor.prepare_image(_image(112, 168))
    tokens, selections = model.encode_images(**processor.image_inputs([sliced]), return_selection=True)
    assert tokens[0].shape[0] == sum(s.grid[0] * s.grid[1] for s in selections)
    ids, labels = processor.encode(_conversation(), [sliced])
    assert ids.count(processor.image_token_id) == tokens[0].shape[0]
    batch = processor.collate([(ids, labels)], [sliced])
    out = model(**batch.to_model_kwargs())
    _assert_loss_is_the_cross_entropy(out, batch)
    # every view keeps all its patch tokens, in raster order
    assert all(s.indices.tolist() == list(range(s.grid[0] * s.grid[1])) for s in selections)


def test_selection_details_cover_every_view(tiny):
    model, processor = tiny
    sliced = processor.prepare_image(_image(112, 168))
    _, selections = model.encode_images(**processor.image_inputs([sliced]), return_selection=True)
    assert len(selections) == sliced.plan.num_slices + 1 and selections[-1].is_global
    k = model.meteor_config.compressor.tokens_per_slice
    assert [s.view_index for s in selections] == list(range(sliced.plan.num_slices + 1))
    for s in selections:
        torch.testing.assert_close(s.visual_scores.sum(), torch.tensor(1.0))
        assert len(s.indices) == k
        assert s.indices.tolist() == sorted(set(s.indices.tolist()))       # raster order, no repeats
        # the kept positions are the K highest aggregate scores: no dropped score beats a kept one
        kept = torch.zeros_like(s.aggregate_scores, dtype=torch.bool)
        kept[s.indices] = True
        assert s.aggregate_scores[kept].min() >= s.aggregate_scores[~kept].max()


def test_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("size", [(20, 600), (600, 20), (1, 300)])
def test_extreme_aspect_ratios_run_end_to_end(tiny, size):
    model, processor = tiny
    sliced = processor.prepare_image(_image(*size))
    ids, labels = processor.encode(_conversation(), [sliced])
    batch = processor.collate([(ids, labels)], [sliced])
    out = model(**batch.to_model_kwargs())
    _assert_loss_is_the_cross_entropy(out, batch)
    assert out.logits.shape[:2] == batch.input_ids.shape


def test_a_tokenizer_without_an_image_token_gets_one(tmp_path):
    """Real LLaMA/Vicuna tokenizers have no <image> and no pad token: the processor adds the one
    and pads with unk, and the placeholder then encodes as a single id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from meteor.model.configuration import MeteorConfig
    from meteor.processing.processor import build_processor

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["what colour is it"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    before = len(tokenizer)
    processor = build_processor(tokenizer, MeteorConfig())
    assert len(tokenizer) == before + 1 and processor.image_token_id == before
    assert tokenizer("a<image><image>", add_special_tokens=False)["input_ids"][-2:] == [before, before]
    assert tokenizer.pad_token == "<unk>"


def test_a_model_runs_at_another_k_than_it_was_trained_with():
    """Selection has no parameters: the model trained at K = 4 answers at K′ = 2 or 15 (every patch
    of the 5×3 global view), the prompt laid out with K′ and the projector keeping K′ per view."""
    model, processor = tiny_model(seed=0)
    model.eval()
    image = Image.new("RGB", (112, 56), (90, 30, 200))        # 2 slices + global: 3 views
    default = processor.prompts(["What colour?"], [image])
    assert int((default.input_ids == processor.image_token_id).sum()) == 3 * 4
    for k in (2, 15):
        batch = processor.prompts(["What colour?"], [image], tokens_per_slice=k)
        assert int((batch.input_ids == processor.image_token_id).sum()) == 3 * k
        tokens, selections = model.encode_images(**processor.image_inputs(batch.images), return_selection=True, tokens_per_slice=k)
        assert tokens[0].shape[0] == 3 * k and all(len(s.indices) == k for s in selections)
        logits = model(**batch.to_model_kwargs()).logits
        assert logits.shape[1] == batch.input_ids.shape[1]
    # the kept K′ = 2 are the two best of the trained K = 4 (same scores, a shorter Top-K)
    _, at4 = model.encode_images(**processor.image_inputs(default.images), return_selection=True)
    _, at2 = model.encode_images(**processor.image_inputs(default.images), return_selection=True, tokens_per_slice=2)
    for four, two in zip(at4, at2):
        assert set(two.indices.tolist()) <= set(four.indices.tolist())
    with pytest.raises(ValueError, match="cannot keep K=16 tokens from a view of 15 patch tokens"):
        model.encode_images(**processor.image_inputs(default.images), tokens_per_slice=16)
