"""Zero-shot segmentation benchmark for ConceptAttention maps (ImageNet-Segmentation, PascalVOC 2012, folders,
synthetic shapes): datasets, exact pooled metrics, the paper's protocols, a resumable/shardable evaluation."""

from concept_attention.segmentation.datasets import (
    DATASETS, IGNORE_LABEL, FolderDataset, ImageNetSegmentation, PascalVOC, SegSample, load_dataset,
)
from concept_attention.segmentation.evaluate import (
    METHODS, EvalConfig, MapProvider, add_eval_arguments, evaluate, run_eval,
)
from concept_attention.segmentation.protocols import PRESETS, SegProtocol, get_preset

__all__ = [
    "DATASETS", "IGNORE_LABEL", "METHODS", "PRESETS", "EvalConfig", "FolderDataset", "ImageNetSegmentation",
    "MapProvider", "PascalVOC", "SegProtocol", "SegSample", "add_eval_arguments", "evaluate", "get_preset",
    "load_dataset", "run_eval",
]
