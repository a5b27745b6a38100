// Masked ops (MaZO): the dense element code (process_lanes) on the lanes a compact mask selects, shared by the
// host entry points and the device kernels. z of a masked element is the dense contract's z of (key, j):
// masking changes which lanes are live, nothing else. Mask formats (zokernels/mazo/masks.py), on the tensor's
// [rows, ncols] matrix view, local index r * ncols + c, global j = offset + local:
//
//   rows   index [rows, k] column ids (int16/int32)      work item = one entry = one element
//   blocks index [rows, kb] block ids; block b covers      work item = (entry, i < npb): Philox block i of the
//          columns [b*B, min((b+1)*B, ncols))              run the entry covers (npb: most blocks a run spans)
//   bits   index uint8 [ceil(numel/8)], bit e&7 of e>>3    work item = one Philox block of the tensor
//
// Two work items may share a Philox block (adjacent scattered columns, unaligned runs); they own disjoint lanes
// and store them one element at a time, so they never write each other's elements.
#pragma once

#include <stdint.h>

#include "zo_block.cuh"

namespace zo {

enum MaskFormat : int { MASK_ROWS = 0, MASK_BLOCKS = 1, MASK_BITS = 2 };

// Row layout of the masked-launch tensor table (int64 [T, MASK_COLS]), built by zokernels/backends/cuda/masked.py.
// COL_PTR .. COL_LR_WD as in the dense table; MCOL_FORMAT = format | (index is int32) << 8.
enum MaskCol : int {
  MCOL_IDX = 7,
  MCOL_FORMAT,
  MCOL_K,      // index entries per row (rows, blocks)
  MCOL_NCOLS,  // row length of the matrix view
  MCOL_NPB,    // blocks: Philox blocks per entry
  MCOL_BLOCK,  // blocks: columns per block
  MCOL_ITEMS,  // work items of the tensor
  MASK_COLS = 16
};

struct MaskDesc {
  TensorDesc t;
  const void* index;
  int format;
  bool idx32;
  int64_t k, ncols, npb, block;
};

ZO_HD int64_t mask_entry(const MaskDesc& m, int64_t e) {
  return m.idx32 ? (int64_t) static_cast<const int32_t*>(m.index)[e] : (int64_t) static_cast<const int16_t*>(m.index)[e];
}

// Work item `item` of a mask: the Philox block it covers and its live lanes (false: nothing to do).
template <int FMT>
ZO_HD bool mask_lanes(const MaskDesc& m, int64_t item, uint64_t* block, int64_t* base, bool live[4]) {
  if (FMT == MASK_ROWS) {
    const int64_t c = mask_entry(m, item);
    if (c < 0 || c >= m.ncols) return false;  // not a valid mask entry: touch nothing
    const uint64_t j = m.t.offset + (uint64_t)((item / m.k) * m.ncols + c);
    *block = j >> 2;
    *base = (int64_t)((j & ~(uint64_t)3) - m.t.offset);
ZO_UNROLL
    for (int l = 0; l < 4; ++l) live[l] = (uint64_t)l == (j & 3u);
    return true;
  } else if (FMT == MASK_BLOCKS) {
    const int64_t e = item / m.npb, i = item - e * m.npb;
    const int64_t c0 = mask_entry(m, e) * m.block;
    if (c0 < 0 || c0 >= m.ncols) return false;
    const int64_t len = m.ncols - c0 < m.block ? m.ncols - c0 : m.block;
    const uint64_t j0 = m.t.offset + (uint64_t)((e / m.k) * m.ncols + c0), j1 = j0 + (uint64_t)len;  // [j0, j1)
    *block = (j0 >> 2) + (uint64_t)i;
    if (*block > ((j1 - 1u) >> 2)) return false;
    const uint64_t first = *block * 4u;
    *base = (int64_t)(first - m.t.offset);
ZO_UNROLL
    for (int l = 0; l < 4; ++l) live[l] = first + l >= j0 && first + l < j1;
    return true;
  } else {
    *block = (m.t.offset >> 2) + (uint64_t)item;
    *base = (int64_t)(*block * 4u - m.t.offset);
    const uint8_t* bits = static_cast<const uint8_t*>(m.index);
    bool any = false;
ZO_UNROLL
    for (int l = 0; l < 4; ++l) {
      const int64_t e = *base + l;
      live[l] = e >= 0 && e < m.t.numel && ((bits[e >> 3] >> (e & 7)) & 1);
      any = any || live[l];
    }
    return any;
  }
}

// The format is a runtime value (uniform over a CUDA block): one inlined copy of the element code per kernel
// instead of three cut nvcc's time for the masked kernels about threefold.
ZO_HD bool mask_lanes_of(const MaskDesc& m, int64_t item, uint64_t* block, int64_t* base, bool live[4]) {
  if (m.format == MASK_ROWS) return mask_lanes<MASK_ROWS>(m, item, block, base, live);
  if (m.format == MASK_BLOCKS) return mask_lanes<MASK_BLOCKS>(m, item, block, base, live);
  if (m.format == MASK_BITS) return mask_lanes<MASK_BITS>(m, item, block, base, live);
  return false;
}

template <int OP, int DT, int DIST, bool STOCH>
ZO_HD void process_mask_item(const MaskDesc& m, const OpParams& p, int64_t item) {
  uint64_t block;
  int64_t base;
  bool live[4];
  if (mask_lanes_of(m, item, &block, &base, live)) process_lanes<OP, DT, DIST, STOCH, true>(m.t, p, block, base, live);
}

// Masked counterpart of chunk_work: CUDA block `chunk` covers work items [first, last) of one tensor's mask.
struct MaskWork {
  MaskDesc m;
  int64_t first, last;
};

ZO_HD MaskWork mask_chunk_work(const int64_t* table, int n_tensors, int64_t chunk, int chunk_items) {
  int lo = 0, hi = n_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[(int64_t)mid * MASK_COLS + COL_CHUNK0] <= chunk)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int64_t* row = table + (int64_t)lo * MASK_COLS;
  MaskWork w;
  w.m.t.src = reinterpret_cast<const void*>(row[COL_PTR]);
  w.m.t.dst = reinterpret_cast<void*>(row[COL_OUT]);
  w.m.t.numel = row[COL_NUMEL];
  w.m.t.key = (uint64_t)row[COL_KEY];
  w.m.t.offset = (uint64_t)row[COL_OFFSET];
  const uint64_t lr_wd = (uint64_t)row[COL_LR_WD];
  w.m.t.lr = u2f((uint32_t)lr_wd);
  w.m.t.wd = u2f((uint32_t)(lr_wd >> 32));
  w.m.index = reinterpret_cast<const void*>(row[MCOL_IDX]);
  w.m.format = (int)(row[MCOL_FORMAT] & 0xFF);
  w.m.idx32 = ((row[MCOL_FORMAT] >> 8) & 1) != 0;
  w.m.k = row[MCOL_K];
  w.m.ncols = row[MCOL_NCOLS];
  w.m.npb = row[MCOL_NPB];
  w.m.block = row[MCOL_BLOCK];
  const int64_t items = row[MCOL_ITEMS];
  w.first = (chunk - row[COL_CHUNK0]) * chunk_items;
  w.last = w.first + chunk_items < items ? w.first + chunk_items : items;
  return w;
}

}  // namespace zo
