"""How one mirrored request's outputs compare: the edge cases (found by mutation testing)."""

from __future__ import annotations

import math

import numpy as np

from serving.traffic.shadow import compare_outputs

LOGITS = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]], np.float32)


def test_a_missing_output_differs_by_infinity_and_the_others_still_count() -> None:
    figures = compare_outputs({"extra": LOGITS, "logits": LOGITS}, {"logits": LOGITS})
    assert figures.max_abs_diff == math.inf
    assert (figures.rows, figures.top1_rows, figures.agree_rows) == (2, 2, 2)


def test_string_outputs_compare_by_equality() -> None:
    words = np.array([b"cat", b"dog"], dtype=np.object_)
    same = compare_outputs({"w": words, "logits": LOGITS}, {"w": words.copy(), "logits": LOGITS})
    assert same.max_abs_diff == 0.0
    assert (same.top1_rows, same.agree_rows) == (2, 2), "outputs after a string one count"
    other = np.array([b"cat", b"cow"], dtype=np.object_)
    assert compare_outputs({"w": words}, {"w": other}).max_abs_diff == math.inf


def test_a_string_output_against_a_numeric_one_differs() -> None:
    words = np.array([b"one", b"two"], dtype=np.object_)
    numbers = np.array([1.0, 2.0])
    assert compare_outputs({"w": numbers}, {"w": words}).max_abs_diff == math.inf
    assert compare_outputs({"w": words}, {"w": numbers}).max_abs_diff == math.inf


def test_nan_in_the_shadow_differs_by_infinity() -> None:
    shadow = LOGITS.copy()
    shadow[0, 0] = np.nan
    assert compare_outputs({"logits": LOGITS}, {"logits": shadow}).max_abs_diff == math.inf


def test_a_scalar_output_is_one_row() -> None:
    figures = compare_outputs(
        {"score": np.array(0.5, np.float32)}, {"score": np.array(0.25, np.float32)}
    )
    assert figures.rows == 1
    assert figures.max_abs_diff == 0.25
    assert figures.top1_rows == 0, "no classes to agree on"


def test_top1_is_taken_on_the_first_output_with_rows_and_classes() -> None:
    column = np.zeros((2, 1), np.float32)  # one class: nothing to agree on
    shadow = LOGITS[::-1].copy()  # each row's top class swapped
    figures = compare_outputs(
        {"column": column, "logits": LOGITS}, {"column": column, "logits": shadow}
    )
    assert (figures.top1_rows, figures.agree_rows) == (2, 0)
    two = np.array([[0.0, 1.0]], np.float32)  # two classes, one row
    figures = compare_outputs({"two": two}, {"two": two})
    assert (figures.top1_rows, figures.agree_rows) == (1, 1)


def test_an_output_without_rows_leaves_top1_to_the_next() -> None:
    empty = np.zeros((0, 3), np.float32)
    both = {"empty": empty, "logits": LOGITS}
    figures = compare_outputs(both, dict(both))
    assert (figures.rows, figures.top1_rows, figures.agree_rows) == (2, 2, 2)
    assert figures.max_abs_diff == 0.0
