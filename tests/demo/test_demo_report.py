"""The demo report: which gaps count as "clearly above" a baseline, its notes, and its drawing."""

import math

import pytest

from meteor.demo.report import MIN_MARGIN, findings, margin


def results(per_budget):
    """{k: {type: (accuracy, questions)}} -> the results dict the report reads."""
    budgets = []
    for k, cells in per_budget.items():
        accuracy = {t: {"accuracy": a, "questions": n} for t, (a, n) in cells.items()}
        total = sum(n for _, n in cells.values())
        accuracy["all"] = {"accuracy": sum(a * n for a, n in cells.values()) / total, "questions": total}
        budgets.append({"k": k, "scores": {"accuracy": accuracy}})
    return {"budgets": budgets}


BASELINES = {"colour": {"majority_accuracy": 0.22, "form_majority_accuracy": 0.22},
             "exist": {"majority_accuracy": 0.50, "form_majority_accuracy": 0.53},
             "all": {"majority_accuracy": 0.36, "form_majority_accuracy": 0.375}}


def test_margin_is_two_standard_errors_and_never_below_five_points():
    assert margin(0.5, 100) == pytest.approx(0.10)
    assert margin(0.5, 10_000) == MIN_MARGIN
    assert margin(0.6, 200) == pytest.approx(2 * math.sqrt(0.24 / 200))    # 0.069
    assert margin(0.5, 0) == math.inf


def test_a_nine_point_gap_is_noise_on_100_questions_but_not_on_2000():
    small = findings(results({16: {"colour": (0.60, 100), "exist": (0.59, 100)}}), BASELINES, 64)
    assert "NOT clearly above the majority baseline" in small[0] and small[0].endswith("on: exist.")
    assert "The models use the image on: colour" in small[1] and "not on: exist" in small[1]

    large = findings(results({16: {"colour": (0.60, 2000), "exist": (0.59, 2000)}}), BASELINES, 64)
    assert "clearly above the majority baseline" in large[0] and "NOT" not in large[0]
    assert large[1].startswith("The models use the image on: colour, exist (") and "not on" not in large[1]


def test_no_budget_beating_the_blind_prior_is_said_plainly():
    notes = findings(results({None: {"colour": (0.25, 100), "exist": (0.52, 100)},
                              16: {"colour": (0.24, 100), "exist": (0.50, 100)}}), BASELINES, 64)
    assert any(note.startswith("No budget beats the blind prior") for note in notes)
    assert not any("costs" in note for note in notes)


def test_compression_cost_is_compared_with_the_paper():
    notes = findings(results({16: {"colour": (0.70, 200), "exist": (0.50, 200)},
                              3: {"colour": (0.50, 200), "exist": (0.50, 200)}}), BASELINES, 64)
    cost = next(note for note in notes if note.startswith("Compression from K=16"))
    assert "costs 10.0 accuracy points here, more than the 3.1 points" in cost
    assert any(note.endswith("colour 0.70 → 0.50.") for note in notes)


def test_the_report_says_how_the_texts_are_drawn():
    from meteor.demo.config import full_config
    from meteor.demo.report import text_note

    assert text_note({}) == ""
    note = text_note(full_config().to_dict())
    assert "words and single digits, 1-1.5 patches tall, with a bold outline (0.05 of their height)" in note
    plain = text_note({"world": {"text_height_patches": [1.0, 1.5], "number_digits": 3, "text_stroke": 0.0}})
    assert "numbers of 1-3 digits, 1-1.5 patches tall, in grey" in plain


def test_the_report_names_the_stages_trained_with_glyph_alignment():
    from meteor.demo.report import glyph_note

    assert glyph_note({}) == "" and glyph_note({"stage1": {"glyph_alignment": 0.0}}) == ""
    note = glyph_note({"stage1": {"glyph_alignment": 1.0}, "stage2": {"glyph_alignment": 0.0}})
    assert "Also not in the paper: stage 1 (weight 1) adds glyph alignment" in note and "stage 2" not in note
    assert "`meteor.demo.glyphs`" in note


def test_the_report_names_the_stages_trained_with_scene_distillation():
    from meteor.demo.report import distillation_note

    assert distillation_note({}) == ""
    assert distillation_note({"stage1": {"scene_distillation": 0.0}, "stage2": {"scene_distillation": 0.0}}) == ""
    note = distillation_note({"stage1": {"scene_distillation": 0.0}, "stage2": {"scene_distillation": 2.0}})
    assert "Not in the paper: stage 2 (weight 2) adds scene distillation" in note and "stage 1" not in note
    both = distillation_note({"stage1": {"scene_distillation": 1.0}, "stage2": {"scene_distillation": 2.0}})
    assert "stage 1 (weight 1) and stage 2 (weight 2) add scene distillation" in both


def test_the_report_draws_with_the_library():
    import meteor.demo.report as report
    import meteor.serve.visualize as visualize

    assert report.selection_figure is visualize.selection_figure
