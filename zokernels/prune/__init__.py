"""Pruning (Wanda, Wanda++, magnitude; unstructured and N:M) of a causal LM's decoder Linears, and what a sparse
model needs afterwards: the kept-weight masks that keep pruned weights at zero through ZO training (ZOSGD(masks=...)),
and 2:4 semi-structured matmuls on a GPU. docs/prune.md."""
from .calibration import BLOCK_PATHS, decoder_blocks
from .patterns import PATTERNS, PruneError, keep_mask, parse_pattern, resolve_sparsity, rows_mask
from .prune import PruneReport, prune
from .scores import METHODS, score
from .semistructured import is_two_four, to_semi_structured

__all__ = ["BLOCK_PATHS", "METHODS", "PATTERNS", "PruneError", "PruneReport", "decoder_blocks", "is_two_four",
           "keep_mask", "parse_pattern", "prune", "resolve_sparsity", "rows_mask", "score", "to_semi_structured"]
