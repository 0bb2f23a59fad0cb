"""Segmentation metrics against hand-computed values, naive float64 recomputation and scikit-learn."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from concept_attention.segmentation.metrics import (
    PooledScores, average_precision, binary_paper_ap, confusion_matrix, foreground_ap, iou_per_class, mean_iou,
    onehot_average_precision, paper_compatible_miou, pixel_accuracy,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def test_confusion_and_iou_by_hand():
    target = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [2, 0, 2]])
    cm = confusion_matrix(pred, target, 3)
    # rows = truth: 0 -> (0, 1); 1 -> (1, 2); 2 -> 2; the 255 pixel is not counted
    assert cm.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert pixel_accuracy(cm) == pytest.approx(3 / 5)
    # IoU: class 0: 1 / (2 + 1 - 1) = 1/2; class 1: 1 / (2 + 2 - 1) = 1/3; class 2: 1 / (1 + 2 - 1) = 1/2
    assert iou_per_class(cm) == pytest.approx([1 / 2, 1 / 3, 1 / 2])
    assert mean_iou(cm) == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)


def test_absent_class_is_not_averaged():
    cm = confusion_matrix(np.array([0, 0, 1]), np.array([0, 0, 1]), 4)
    assert np.isnan(iou_per_class(cm)[2:]).all()
    assert mean_iou(cm) == 1.0


def test_bad_labels_are_rejected():
    with pytest.raises(ValueError, match="0..1"):
        confusion_matrix(np.array([0, 2]), np.array([0, 1]), 2)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 5).flatmap(lambda k: st.tuples(
    st.just(k), arrays(np.int64, 40, elements=st.integers(0, k - 1)), arrays(np.int64, 40, elements=st.integers(0, k)))))
def test_confusion_iou_match_naive_and_sklearn(case):
    k, pred, target = case
    target = np.where(target == k, 255, target)  # the extra value plays the ignore label
    target[0] = pred[0]                           # at least one scored pixel
    cm = confusion_matrix(pred, target, k)
    keep = target != 255
    expected = sklearn_metrics.confusion_matrix(target[keep], pred[keep], labels=list(range(k)))
    assert np.array_equal(cm, expected)
    for c in range(k):  # naive set IoU per class
        inter = np.sum((pred == c) & (target == c))
        union = np.sum(((pred == c) | (target == c)) & keep)
        got = iou_per_class(cm)[c]
        assert (np.isnan(got) and union == 0) or got == pytest.approx(inter / union)
    if keep.any():
        assert pixel_accuracy(cm) == pytest.approx(np.mean(pred[keep] == target[keep]))


def test_average_precision_by_hand():
    # ranking: + - + -: precision 1 at recall 1/2, 2/3 at recall 1 -> AP = 1/2 + 1/3
    assert average_precision(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.6])) == pytest.approx(5 / 6)
    # a tie between a positive and a negative is one threshold: precision 1/2 at recall 1
    assert average_precision(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert np.isnan(average_precision(np.zeros(3, bool), np.arange(3.0)))


@settings(max_examples=50, deadline=None)
@given(arrays(np.int8, st.integers(1, 60), elements=st.integers(0, 1)), st.data())
def test_average_precision_matches_sklearn(labels, data):
    if not labels.any():
        labels[0] = 1
    # few distinct values -> many ties, the case where step-wise definitions differ
    scores = data.draw(arrays(np.float64, labels.size, elements=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0])))
    assert average_precision(labels, scores) == pytest.approx(sklearn_metrics.average_precision_score(labels, scores))


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, 30, elements=st.floats(0, 1)), arrays(np.int64, 30, elements=st.integers(0, 1)))
def test_paper_ap_is_onehot_flattened_sklearn(score, target):
    expected = sklearn_metrics.average_precision_score(
        np.concatenate([target == 0, target == 1]), np.concatenate([1 - score, score]))
    assert binary_paper_ap(score, target) == pytest.approx(expected)
    if target.any():
        assert foreground_ap(score, target) == pytest.approx(sklearn_metrics.average_precision_score(target, score))


def test_onehot_ap_drops_ignore_pixels():
    scores = np.array([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5]])
    target = np.array([0, 1, 255])
    expected = sklearn_metrics.average_precision_score([1, 0, 0, 1], [0.9, 0.2, 0.1, 0.8])
    assert onehot_average_precision(scores, target) == pytest.approx(expected)


@settings(max_examples=40, deadline=None)
@given(arrays(np.int64, 50, elements=st.integers(0, 1)), arrays(np.int64, 50, elements=st.integers(0, 1)))
def test_paper_compatible_miou_is_onehot_pooled_iou(pred, target):
    # The authors' value: intersection and union pooled over both one-hot channels together.
    pred_1hot = np.stack([pred == 0, pred == 1])
    target_1hot = np.stack([target == 0, target == 1])
    authors = np.sum(pred_1hot & target_1hot) / np.sum(pred_1hot | target_1hot)
    accuracy = pixel_accuracy(confusion_matrix(pred, target, 2))
    assert paper_compatible_miou(accuracy) == pytest.approx(authors)
    assert paper_compatible_miou(accuracy) == pytest.approx(accuracy / (2 - accuracy))


def test_pooled_scores_pool_counts_not_ratios():
    pooled = PooledScores(2)
    pooled.add(confusion_matrix(np.array([1, 1]), np.array([1, 1]), 2), 1.0, 1.0)            # 2/2 correct
    pooled.add(confusion_matrix(np.array([0, 0, 0, 0]), np.array([1, 1, 0, 0]), 2), float("nan"), float("nan"))
    out = pooled.summary(["background", "object"])
    assert out["pixel_accuracy"] == pytest.approx(4 / 6)       # pooled, not the mean of 1 and 1/2
    assert out["iou_per_class"] == pytest.approx({"background": 2 / 4, "object": 2 / 4})
    assert out["miou_paper_compatible"] == pytest.approx((4 / 6) / (2 - 4 / 6))
    assert out["map_paper"] == pytest.approx(0.5)               # NaN counts as 0, as the authors' nan_to_num
    assert out["map_foreground"] == pytest.approx(1.0) and out["n_foreground_ap"] == 1
