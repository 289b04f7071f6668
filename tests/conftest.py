"""Fixtures several test files share: the tiny real-class model, the talkative one, and a world test split.

Everything here comes from ``meteor.testing`` (and ``talk_helpers``), never from ``meteor.demo``:
the tests of the library build what they need without the demo (tests/test_layout.py checks it);
the demo's own tests live in ``tests/demo/``. A test file that defines a fixture of the same name
uses its own.

This folder is on ``sys.path`` while the tests run (pytest puts a conftest's folder there), so
``tests/demo/`` imports the helpers here (``talk_helpers``, ``chat_endpoint``) by plain name too.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny():
    """A randomly initialised tiny LLaVA-Meteor (CLIP ViT, LLaMA, BPE) and its processor, seed 0;
    one per test module, so a test that changes it cannot reach another file."""
    from meteor.testing import tiny_model

    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def talker():
    """``talk_helpers.talkative_model()``: a tiny model whose greedy answers differ with the question
    and the image; one per test module."""
    from talk_helpers import talkative_model

    return talkative_model()


@pytest.fixture
def world_split(tmp_path):
    """A three-image world test split (12 questions) in this test's own folder, as
    ``meteor.testing.tiny_world_split`` draws it: a test may delete its files."""
    from meteor.testing import tiny_world_split

    return tiny_world_split(tmp_path / "world", images=3, seed=1)
