"""meteor.processing.slicing: LLaVA-UHD geometry (SPEC §2), pixels → normalised views, prompt layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from meteor.processing.slicing import (
    CLIP_MEAN,
    CLIP_STD,
    SlicePlan,
    count_image_tokens,
    layout_tokens,
    plan_slices,
    slice_image,
    view_size,
    view_token_counts,
)

PATCH, BASE, BUDGET = 14, 336, 576


def assert_valid_plan(plan: SlicePlan, max_slices: int = 6, patch: int = PATCH, base: int = BASE) -> None:
    """Every invariant a consumer relies on, for any image size."""
    width, height = plan.image_size
    budget = (base // patch) ** 2
    rows, cols = plan.grid
    assert rows * cols == plan.num_slices <= max_slices
    assert plan.num_views == plan.num_slices + 1
    assert len(plan.crop_boxes) == plan.num_slices
    for size, patches in zip(plan.view_sizes, plan.view_patches):
        w, h = size
        assert w % patch == 0 and h % patch == 0 and w >= patch and h >= patch
        assert patches == (h // patch, w // patch)
        assert patches[0] * patches[1] <= budget
    if not plan.is_sliced:
        assert plan.grid == (0, 0) and plan.slice_size is None and plan.slice_patches is None
        assert math.ceil(width * height / base**2) <= 1 or max_slices == 1
        return
    assert plan.num_slices >= 2
    # The boxes tile the image exactly: rows share vertical edges, columns share horizontal ones,
    # the outer edges are the image's edges, and every cell is non-empty.
    for r in range(rows):
        for c in range(cols):
            left, upper, right, lower = plan.crop_boxes[r * cols + c]
            assert left < right and upper < lower
            assert left == (0 if c == 0 else plan.crop_boxes[r * cols + c - 1][2])
            assert upper == (0 if r == 0 else plan.crop_boxes[(r - 1) * cols + c][3])
            if c == cols - 1:
                assert right == width
            if r == rows - 1:
                assert lower == height
    assert sum((b[2] - b[0]) * (b[3] - b[1]) for b in plan.crop_boxes) == width * height


# --- geometry -----------------------------------------------------------------------------------

def test_paper_672x1008_is_six_square_slices_plus_global():
    plan = plan_slices(672, 1008)
    assert plan.grid == (3, 2)  # 3 rows × 2 cols
    assert plan.num_slices == 6
    assert plan.slice_size == (336, 336) and plan.slice_patches == (24, 24)
    assert plan.crop_boxes[0] == (0, 0, 336, 336) and plan.crop_boxes[-1] == (336, 672, 672, 1008)
    assert plan.global_size == (266, 406)  # 19×29 patches: 20×29 = 580 would exceed 576
    assert_valid_plan(plan)


def test_336_square_is_unsliced_and_untouched():
    plan = plan_slices(336, 336)
    assert plan.num_slices == 0 and not plan.is_sliced and plan.grid == (0, 0)
    assert plan.global_size == (336, 336) and plan.global_patches == (24, 24)
    assert plan.view_sizes == [(336, 336)]
    assert_valid_plan(plan)


@pytest.mark.parametrize("size, grid", [
    ((1000, 1000), (2, 3)),  # mirrored 2×3 / 3×2 tie: fewer rows wins
    ((1920, 1080), (2, 3)),
    ((1080, 1920), (3, 2)),
    ((4000, 3000), (2, 3)),
    ((337, 337), (1, 2)),  # just over one view: N = 2, never 1
])
def test_common_sizes(size, grid):
    plan = plan_slices(*size)
    assert plan.grid == grid
    assert_valid_plan(plan)


@pytest.mark.parametrize("size", [(1, 4000), (4000, 1), (2, 2), (1, 1), (1, 200_000), (100, 40_000),
                                  (200_000, 3)])
def test_extreme_sizes_give_valid_views(size):
    plan = plan_slices(*size)
    assert_valid_plan(plan)
    assert max(max(s) for s in plan.view_sizes) <= BUDGET * PATCH


def test_extreme_strip_global_view_is_one_patch_wide():
    assert plan_slices(1, 4000).global_size == (14, 8064)
    assert plan_slices(4000, 1).global_patches == (1, 576)


def test_slices_are_about_base_area_and_within_a_patch_of_the_exact_aspect():
    for w, h in [(336, 336), (640, 540), (1333, 1500), (500, 333), (900, 300)]:
        vw, vh = view_size(w, h)
        exact_w = BASE * math.sqrt(w / h)
        assert abs(vw - exact_w) <= PATCH and abs(vh - BASE * math.sqrt(h / w)) <= PATCH
        assert 0.9 * BASE**2 <= vw * vh <= BASE**2


def test_max_slices_caps_and_one_disables_slicing():
    assert plan_slices(4000, 3000, max_slices=1).num_slices == 0
    plan = plan_slices(4000, 3000, max_slices=2)
    assert plan.grid == (1, 2)
    assert_valid_plan(plan, max_slices=2)
    big = plan_slices(4000, 3000, max_slices=9)
    assert big.num_slices <= 9
    assert_valid_plan(big, max_slices=9)


@pytest.mark.parametrize("kwargs, words", [
    (dict(width=0, height=10), "width"),
    (dict(width=10, height=-3), "height"),
    (dict(width=10.5, height=10), "width"),
    (dict(width=10, height=10, max_slices=0), "max_slices"),
    (dict(width=10, height=10, patch_size=0), "patch_size"),
    (dict(width=10, height=10, base_size=-336), "base_size"),
    (dict(width=10, height=10, base_size=330), "multiple of patch_size"),
])
def test_impossible_options_are_refused_by_name(kwargs, words):
    with pytest.raises(ValueError, match=words):
        plan_slices(**kwargs)


def test_property_random_sizes():
    import hypothesis
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(st.integers(1, 30_000), st.integers(1, 30_000), st.integers(1, 9),
                      st.sampled_from([(14, 336), (14, 224), (16, 384), (32, 64)]))
    def check(width, height, max_slices, geometry):
        patch, base = geometry
        assert_valid_plan(plan_slices(width, height, max_slices, patch, base), max_slices, patch, base)

    check()


# --- pixels -------------------------------------------------------------------------------------

def test_mid_grey_normalises_to_the_clip_statistics():
    sliced = slice_image(Image.new("RGB", (700, 500), (128, 128, 128)))
    expected = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    for view in sliced.views():
        assert view.dtype == torch.float32
        torch.testing.assert_close(view.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)
        assert float(view.std(dim=(1, 2)).max()) < 1e-5


def test_custom_mean_and_std_are_used():
    sliced = slice_image(Image.new("RGB", (50, 50), (255, 0, 51)), image_mean=(0.5, 0.5, 0.5),
                         image_std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(sliced.global_view[:, 0, 0], torch.tensor([1.0, -1.0, -0.6]), atol=1e-5, rtol=0)


def test_slice_shapes_and_view_order():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1008, 672, 3), dtype=np.uint8))
    sliced = slice_image(image)
    assert sliced.slices.shape == (6, 3, 336, 336)
    assert sliced.global_view.shape == (3, 406, 266)
    views = sliced.views()
    assert len(views) == 7 and views[-1] is sliced.global_view
    assert all(torch.equal(v, s) for v, s in zip(views, sliced.slices))


def test_slices_follow_the_crop_boxes_row_major():
    # A 2 cols × 3 rows image whose cells have distinct colours: each slice is one flat colour.
    colours = [(10 * i + 5, 200 - 20 * i, 40 * i) for i in range(6)]
    pixels = np.zeros((1008, 672, 3), dtype=np.uint8)
    for i, colour in enumerate(colours):
        r, c = divmod(i, 2)
        pixels[r * 336:(r + 1) * 336, c * 336:(c + 1) * 336] = colour
    sliced = slice_image(Image.fromarray(pixels), image_mean=(0, 0, 0), image_std=(1, 1, 1))
    for view, colour in zip(sliced.slices, colours):
        torch.testing.assert_close(view.mean(dim=(1, 2)), torch.tensor(colour) / 255, atol=1e-6, rtol=0)


def test_unsliced_image_has_no_slices_and_one_global_view_of_the_planned_size():
    sliced = slice_image(Image.new("RGB", (300, 200)))
    assert sliced.slices.shape == (0, 3, 0, 0)
    assert len(sliced.views()) == 1
    width, height = plan_slices(300, 200).global_size
    # Upscaled to about 336² in area with the 3:2 aspect kept: 406×266, i.e. 29×19 patches.
    assert (width, height) == (406, 266) and sliced.global_view.shape == (3, height, width)


def test_non_rgb_inputs_go_through_load_image():
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # transparent → white
    sliced = slice_image(rgba, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    torch.testing.assert_close(sliced.global_view.min(), torch.tensor(1.0))
    grey = slice_image(np.full((30, 40), 255, dtype=np.uint8), image_mean=(0, 0, 0), image_std=(1, 1, 1))
    torch.testing.assert_close(grey.global_view.min(), torch.tensor(1.0))


def test_plan_for_another_size_is_refused():
    with pytest.raises(ValueError, match="672×1008"):
        slice_image(Image.new("RGB", (100, 100)), plan=plan_slices(672, 1008))


def test_bad_statistics_are_refused():
    with pytest.raises(ValueError, match="image_std"):
        slice_image(Image.new("RGB", (10, 10)), image_std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="image_mean"):
        slice_image(Image.new("RGB", (10, 10)), image_mean=(0.5, 0.5))


# --- layout -------------------------------------------------------------------------------------

def test_layout_of_the_paper_grid():
    plan = plan_slices(672, 1008)  # 3 rows × 2 cols
    text = layout_tokens(plan, 3, image_token="<image>")
    k = "<image>" * 3
    assert text == f"{k},{k}\n{k},{k}\n{k},{k}\n{k}"
    assert text.count("<image>") == 3 * (6 + 1) == count_image_tokens(plan, 3)
    assert text.count(",") == 3 and text.count("\n") == 3


def test_layout_of_a_wide_grid_and_custom_separators():
    plan = plan_slices(1920, 1080)  # 2 rows × 3 cols
    text = layout_tokens(plan, 1, image_token="I", slice_sep="|", row_sep=";")
    assert text == "I|I|I;I|I|I;I"


def test_unsliced_layout_is_the_global_view_only():
    plan = plan_slices(336, 336)
    assert layout_tokens(plan, 144) == "<image>" * 144
    assert count_image_tokens(plan, 144) == 144


def test_keep_all_tokens_with_a_callable_and_a_sequence():
    plan = plan_slices(672, 1008)
    keep_all = lambda grid: grid[0] * grid[1]  # noqa: E731
    assert view_token_counts(plan, keep_all) == [576] * 6 + [19 * 29]
    assert count_image_tokens(plan, keep_all) == 6 * 576 + 551
    counts = [1, 2, 3, 4, 5, 6, 7]
    text = layout_tokens(plan, counts, image_token="I")
    assert text == "I,II\nIII,IIII\nIIIII,IIIIII\nIIIIIII"


@pytest.mark.parametrize("tokens, error, words", [
    (0, ValueError, "view 0 would get 0 visual tokens"),
    ([1, 2], ValueError, r"2 counts but the plan has 7 views \(6 slices \+ the global view\)"),
    (True, TypeError, "int, a sequence of ints or a callable, got bool"),
    (lambda grid: -1, ValueError, "view 0 would get -1 visual tokens"),
    ([3, 3, 3, 3, 3, 2.5, 3], ValueError, "view 5 would get 2.5"),
    ("144", TypeError, "got str"),
])
def test_bad_token_counts_are_refused_naming_the_view_and_value(tokens, error, words):
    with pytest.raises(error, match=words):
        layout_tokens(plan_slices(672, 1008), tokens)
