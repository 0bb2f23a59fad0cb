"""ConceptAttention (Helbling et al., ICML 2025) on flux_mini: saliency maps of concept words from the
attention outputs of a concept stream that rides beside the text stream without changing the image."""

from concept_attention.encoding import check_concepts, encode_concepts
from concept_attention.maps import MapAccumulator, compute_concept_maps, gaussian_blur3x3, linear_normalize
from concept_attention.pictures import concept_grid, heatmap, heatmaps, overlay
from concept_attention.pipeline import ConceptAttentionFluxPipeline, ConceptAttentionOutput, ConceptAttentionPipeline

__all__ = [
    "ConceptAttentionFluxPipeline",
    "ConceptAttentionOutput",
    "ConceptAttentionPipeline",
    "MapAccumulator",
    "check_concepts",
    "compute_concept_maps",
    "concept_grid",
    "encode_concepts",
    "gaussian_blur3x3",
    "heatmap",
    "heatmaps",
    "linear_normalize",
    "overlay",
]
