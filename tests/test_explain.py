"""meteor.serve.visualize (the Figure-4 drawing), `meteor explain`, and tokens per slice at inference
in `meteor eval`. The demo's report draws with the same functions (tests/demo/test_demo_report.py)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from meteor.serve.explain import explain, format_explanation, view_reports
from meteor.serve.visualize import COLUMNS, draw_selection, expert_choices, selection_figure
from talk_helpers import noise_image, save_talkative_model


def test_the_experts_choices_are_their_top_k_and_the_aggregate_is_what_was_kept(talker):
    model, processor = talker
    sliced = processor.prepare_image(noise_image(0, (112, 56)))
    _, selections = model.encode_images(**processor.image_inputs([sliced]), return_selection=True, tokens_per_slice=3)
    for selection in selections:
        visual, native, kept = expert_choices(selection)
        assert torch.equal(kept, selection.indices) and len(visual) == len(native) == 3
        assert set(visual.tolist()) == set(torch.topk(selection.visual_scores, 3).indices.tolist())
        assert set(native.tolist()) == set(torch.topk(selection.native_scores, 3).indices.tolist())
        assert visual.tolist() == sorted(visual.tolist())


@pytest.mark.parametrize("by_view, shape", [("rows", (3, 4)), ("columns", (4, 3))])
def test_the_figure_has_a_row_or_a_column_per_view(talker, by_view, shape):
    model, processor = talker
    sliced = processor.prepare_image(noise_image(1, (112, 56)))          # 1×2 slices + global: 3 views
    _, selections = model.encode_images(**processor.image_inputs([sliced]), return_selection=True)
    fig = draw_selection(sliced, selections, processor, "title", by_view=by_view)
    axes = fig.axes
    assert len(axes) == 12
    grid = axes[0].get_subplotspec().get_gridspec()
    assert (grid.nrows, grid.ncols) == shape
    titles = [ax.get_title() for ax in axes if ax.get_title()]
    assert titles == (list(COLUMNS) if by_view == "rows" else ["slice 1", "slice 2", "global"])
    with pytest.raises(ValueError, match="by_view"):
        draw_selection(sliced, selections, processor, by_view="diagonal")


def test_selection_figure_writes_a_png_of_any_image_at_any_k(talker, tmp_path):
    model, processor = talker
    path = tmp_path / "fig.png"
    selections = selection_figure(model, processor, noise_image(2, (168, 112)), "What is it?", path, tokens_per_slice=5)
    assert len(selections) == 7 and all(len(s.indices) == 5 for s in selections)
    with Image.open(path) as figure:
        assert figure.format == "PNG" and figure.height > figure.width > 500


def test_explain_writes_the_figure_the_scores_and_answers(talker, tmp_path):
    model, processor = talker
    image = tmp_path / "photo.png"
    noise_image(3, (112, 112)).save(image)
    result = explain(model, processor, image, "What is in the image?", tmp_path / "out" / "photo_sel.png",
                     tokens_per_slice=3, max_new_tokens=6)
    sliced = processor.prepare_image(image)
    _, selections = model.encode_images(**processor.image_inputs([sliced]), return_selection=True, tokens_per_slice=3)
    assert [v.kept for v in result.views] == [s.indices.tolist() for s in selections]
    assert [v.view for v in result.views] == ["slice 1", "slice 2", "slice 3", "slice 4", "global"]
    assert result.views[0].region == (0, 0, 56, 56) and result.views[-1].region == (0, 0, 112, 112)
    for view in result.views:
        assert 0 <= view.agree_visual <= 3 and 0 <= view.agree_native <= 3
        assert 0 < view.aggregate_mass_kept <= 1 and abs(sum(view.aggregate_scores) - 1) < 1e-4
        assert len(view.visual_scores) == view.grid[0] * view.grid[1]
    # the answer is the model's greedy answer to the question about that image at K′ = 3
    batch = processor.prompts(["What is in the image?"], [sliced], tokens_per_slice=3)
    out = model.generate(**batch.to_model_kwargs(), max_new_tokens=6, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=processor.tokenizer.eos_token_id)
    new = out[0, batch.input_ids.shape[1]:]
    assert result.answer == processor.tokenizer.decode(new, skip_special_tokens=True).lstrip()
    written = json.loads((tmp_path / "out" / "photo_sel.json").read_text())
    assert written["views"][2]["kept"] == result.views[2].kept and written["tokens_per_slice"] == 3
    assert (tmp_path / "out" / "photo_sel.png").stat().st_size > 10_000
    table = format_explanation(result)
    assert table.startswith(f"answer: {result.answer}") and "slice 4" in table and "3/16" in table


def test_meteor_explain_from_the_command_line(tmp_path, capsys):
    from meteor.cli import main

    model_dir = save_talkative_model(tmp_path / "model")
    image = tmp_path / "mine.png"
    noise_image(4, (56, 56)).save(image)
    assert main(["explain", "--model", str(model_dir), "--image", str(image), "--question", "Describe it.",
                 "--out", str(tmp_path / "mine_sel.png"), "--tokens-per-slice", "2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("answer: ") and "global" in out and "2/16" in out
    assert (tmp_path / "mine_sel.png").is_file() and (tmp_path / "mine_sel.json").is_file()
    assert main(["explain", "--model", str(model_dir), "--image", str(tmp_path / "missing.png"),
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "image file not found" in capsys.readouterr().err


def test_view_reports_of_a_mixing_projector_have_no_expert_columns():
    from types import SimpleNamespace

    from meteor.model.modeling import ViewSelection
    from meteor.processing.slicing import plan_slices

    image = SimpleNamespace(plan=plan_slices(56, 56, patch_size=14, base_size=56))
    reports = view_reports(image, [ViewSelection(0, 0, True, (4, 4), None, None, None, None)])
    assert reports[0].kept == [] and reports[0].agree_visual is None and reports[0].aggregate_mass_kept is None


# --- meteor eval --tokens-per-slice ------------------------------------------------------------------

def test_eval_answers_with_k_prime_tags_its_rows_and_will_not_resume_across_k(tmp_path, talker):
    from meteor.eval import EvalConfig, WorldRunner
    from meteor.testing import tiny_world_split

    model, processor = talker
    world = tiny_world_split(tmp_path / "world", images=2, seed=1)
    calls = []
    real = model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs.get("tokens_per_slice"))
        return real(*args, **kwargs)

    model.generate = spy
    try:
        scores = WorldRunner(EvalConfig(batch_size=4, tokens_per_slice=2, limit=4)).run(
            model, processor, world.test_path, world.image_folder, tmp_path / "k2")
    finally:
        del model.generate
    assert calls and set(calls) == {2} and scores["tokens_per_slice"] == 2
    rows = [json.loads(line) for line in (tmp_path / "k2" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {row["tokens_per_slice"] for row in rows} == {2}
    with pytest.raises(ValueError, match="tokens_per_slice=2, not None"):
        WorldRunner(EvalConfig(batch_size=4, limit=4)).run(model, processor, world.test_path, world.image_folder,
                                                           tmp_path / "k2")
    with pytest.raises(ValueError, match="tokens_per_slice"):
        EvalConfig(tokens_per_slice=0)


def test_eval_takes_tokens_per_slice_on_the_command_line():
    from meteor.cli import _parser

    args = _parser().parse_args(["eval", "--model", "m", "--data", "d", "--tokens-per-slice", "8"])
    assert args.tokens_per_slice == 8
    assert _parser().parse_args(["eval", "--model", "m", "--data", "d"]).tokens_per_slice is None
    with pytest.raises(SystemExit):
        _parser().parse_args(["eval", "--model", "m", "--data", "d", "--tokens-per-slice", "0"])
