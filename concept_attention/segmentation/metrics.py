"""Segmentation metrics in exact numpy: pooled confusion counts, pixel accuracy, IoU, and average precision.

Pooled means summed over the whole dataset before dividing (integer counts, so sharded runs merge exactly).
AP is the step-wise average precision of scikit-learn's `average_precision_score`:
AP = sum_k (R_k - R_{k-1}) P_k over the distinct score thresholds, highest first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from concept_attention.segmentation.datasets import IGNORE_LABEL


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int,
                     ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = true label, columns = predicted; ignore pixels dropped."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    keep = target != ignore_label
    pred, target = pred[keep].astype(np.int64), target[keep].astype(np.int64)
    for name, values in (("prediction", pred), ("target", target)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} labels must be in 0..{num_classes - 1} (or {ignore_label} = ignore)")
    counts = np.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def pixel_accuracy(confusion: np.ndarray) -> float:
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else float("nan")


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """Intersection / union per class; NaN for a class that is neither labelled nor predicted."""
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / np.maximum(union, 1), np.nan)


def mean_iou(confusion: np.ndarray) -> float:
    """Mean IoU over the classes that occur (labelled or predicted)."""
    iou = iou_per_class(confusion)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def paper_compatible_miou(accuracy: float) -> float:
    """The value the authors' ImageNet code reports as mIoU: pooled intersection over pooled union summed over
    both one-hot channels, which is always A / (2 - A) for pooled pixel accuracy A. Not a true IoU."""
    return accuracy / (2.0 - accuracy)


def average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """Step-wise AP of `scores` (higher = more positive) for boolean labels; NaN when there is no positive."""
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if positive.shape != scores.shape:
        raise ValueError(f"{positive.size} labels but {scores.size} scores")
    if not positive.any():
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, hits = scores[order], positive[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), hits.size - 1]   # one point per distinct score
    true_positives = np.cumsum(hits)[last_of_run]
    precision = true_positives / (last_of_run + 1)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def onehot_average_precision(channel_scores: np.ndarray, target: np.ndarray,
                             ignore_label: int = IGNORE_LABEL) -> float:
    """AP "as the authors compute it": channel scores (K, ...) against the one-hot target (K, ...), all channels
    flattened into one ranking. target holds channel indices 0..K-1; ignore pixels are dropped."""
    keep = target != ignore_label
    scores = channel_scores[:, keep]                                      # (K, n)
    onehot = target[keep][None, :] == np.arange(len(channel_scores))[:, None]
    return average_precision(onehot, scores)


def binary_paper_ap(score: np.ndarray, target: np.ndarray) -> float:
    """ImageNet/VOC-single paper AP: scores [1 - s, s] against the one-hot binary target."""
    return onehot_average_precision(np.stack([1.0 - score, score]), target)


def foreground_ap(score: np.ndarray, target: np.ndarray, label: int = 1) -> float:
    """Plain AP of the score for `label` against target == label (ignore pixels dropped)."""
    keep = target != IGNORE_LABEL
    return average_precision(target[keep] == label, score[keep])


def binding_accuracy(confusions: list[np.ndarray], object_labels: list[int]) -> tuple[float, int]:
    """Fraction of object pixels that get their own label, pooled over the images whose truth shows exactly two
    of `object_labels` (e.g. two different shapes); returns (accuracy, number of such images). A pixel
    labelled as background or as the other object counts as wrong. NaN when no image qualifies."""
    right = total = images = 0
    for confusion in confusions:
        confusion = np.asarray(confusion)
        rows = [k for k in object_labels if confusion[k].sum() > 0]
        if len(rows) != 2:
            continue
        right += int(sum(confusion[k, k] for k in rows))
        total += int(sum(confusion[k].sum() for k in rows))
        images += 1
    return (right / total if total else float("nan")), images


@dataclass
class PooledScores:
    """Running totals for one method: pooled confusion counts and per-image AP values."""

    num_classes: int
    confusion: np.ndarray = field(init=False)
    ap_paper: list[float] = field(default_factory=list)
    ap_foreground: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def add(self, confusion: np.ndarray, ap_paper: float, ap_foreground: float) -> None:
        self.confusion += np.asarray(confusion, dtype=np.int64)
        self.ap_paper.append(ap_paper)
        self.ap_foreground.append(ap_foreground)

    def summary(self, class_names: list[str] | None = None) -> dict:
        accuracy = pixel_accuracy(self.confusion)
        iou = iou_per_class(self.confusion)
        fg = np.asarray(self.ap_foreground, dtype=np.float64)
        paper = np.nan_to_num(np.asarray(self.ap_paper, dtype=np.float64))    # the authors' nan_to_num
        out = {
            "n_images": len(self.ap_paper),
            "pixel_accuracy": accuracy,
            "miou": mean_iou(self.confusion),
            "map_paper": float(paper.mean()) if paper.size else float("nan"),
            "map_foreground": float(np.nanmean(fg)) if np.isfinite(fg).any() else float("nan"),
            "n_foreground_ap": int(np.isfinite(fg).sum()),
            "iou_per_class": {(class_names[k] if class_names else str(k)): float(v) for k, v in enumerate(iou)},
        }
        if self.num_classes == 2:
            out["miou_paper_compatible"] = paper_compatible_miou(accuracy)
        return out
