"""MaZO: importance-masked multi-task zeroth-order fine-tuning (Zhang et al., EMNLP 2025, arXiv 2502.11513).

    scores = importance(model, task_batches, method="mazo")     # per-weight scores, summed over tasks
    masks  = build_masks(scores, ratio=0.1, rule="row_topk")    # compact per-row column ids
    opt    = ZOSGD(model, lr=..., masks=masks)                  # probes and updates touch masked weights only

See docs/mazo.md for the score formulas (which are exact, which approximate the paper), the mask
formats and what the masked kernels cost.
"""
from .masks import (ParamMask, block_topk, bits_topk, build_masks, from_dense, load_masks, masks_fingerprint,
                    pack_bits, resolve_masks, row_topk, rows_from_columns, save_masks, unpack_bits)
from .importance import METHODS, importance

__all__ = ["ParamMask", "build_masks", "row_topk", "block_topk", "bits_topk", "from_dense", "rows_from_columns",
           "save_masks", "load_masks", "masks_fingerprint", "resolve_masks", "pack_bits", "unpack_bits",
           "importance", "METHODS"]
