"""Token pictures: readable text, no overlapping labels, wrapped inside the image, padding hidden."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from lightning_interp.callbacks._maps import token_strings
from lightning_interp.visualize import render_tokens
from lightning_interp.visualize.maps import _token_figure


def _text_boxes(figure):
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    return [(text.get_text(), text.get_window_extent(renderer)) for text in figure.axes[0].texts]


def _sentences(seed: int = 0):
    rng = np.random.default_rng(seed)
    words = ["the", "a", "remarkably", "film", "was", "extraordinarily", "dull", "and", "I", "left", "early", "?"]
    tokens = [[str(rng.choice(words)) for _ in range(count)] for count in (40, 7, 23)]
    tokens[1] += [None, None, None]  # padding, hidden
    values = [[rng.random(len(row)), rng.random(len(row))] for row in tokens]
    return tokens, values


def test_no_two_text_labels_overlap_and_all_lie_inside_the_image():
    tokens, values = _sentences()
    figure = _token_figure(
        tokens,
        values,
        headers=["#0   label negative   pred negative 97%", "#1   label positive", "#2"],
        line_titles=["layers.1 heads mean", "rollout"],
        title="attention",
    )
    boxes = _text_boxes(figure)
    width, height = figure.canvas.get_width_height()
    assert len(boxes) == 1 + 3 + 3 * 2 + sum(len([t for t in row if t is not None]) * 2 for row in tokens)
    for text, box in boxes:
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, (text, box)
        assert box.height >= 9, (text, box.height)  # 10 pt at 100 dpi: capitals and ascenders of 9 px or more
    for (first, a), (second, b) in itertools.combinations(boxes, 2):
        overlap_x = min(a.x1, b.x1) - max(a.x0, b.x0)
        overlap_y = min(a.y1, b.y1) - max(a.y0, b.y0)
        assert overlap_x <= 0.5 or overlap_y <= 0.5, f"{first!r} overlaps {second!r}"


def test_long_sequences_wrap_onto_more_lines_instead_of_widening_the_image():
    short = render_tokens([["word"] * 5], [[np.ones(5)]], headers=["#0"])
    long = render_tokens([["word"] * 200], [[np.ones(200)]], headers=["#0"])
    assert short.shape[1] == long.shape[1] == 900
    assert long.shape[0] > short.shape[0] + 10 * 20  # 200 tokens of 4 letters: well over ten lines of 24 px


def test_token_colours_follow_their_values_and_padding_is_not_drawn():
    image = render_tokens([["low", "high", None]], [[np.array([0.0, 1.0, 5.0])]], headers=["#0"])
    figure = _token_figure([["low", "high", None]], [[np.array([0.0, 1.0, 5.0])]], headers=["#0"], line_titles=[""])
    patches = figure.axes[0].patches
    assert len(patches) == 2  # the padding token has no box, and its value does not scale the others
    low, high = (np.array(p.get_facecolor()[:3]) for p in patches)
    assert low.mean() > 0.9 and high.mean() < 0.6  # the lowest value nearly white, the highest dark
    assert image.dtype == np.uint8


def test_ids_become_words_through_the_vocabulary_or_decode_and_padding_none():
    ids = torch.tensor([[3, 1, 0, 0], [2, 9, 3, 0]])
    vocabulary = ["<pad>", "cat", "the", "sat"]
    expected = [["sat", "cat", None, None], ["the", "<9?>", "sat", None]]
    assert token_strings(ids, vocabulary=vocabulary, pad_id=0) == expected
    assert token_strings(ids, decode=lambda i: f"w{i}") == [["w3", "w1", "w0", "w0"], ["w2", "w9", "w3", "w0"]]
    assert token_strings(ids[:1]) == [["3", "1", "0", "0"]]
