// zokernels._cuda: pybind11 module. Tensors cross as raw pointers (Python ints), dtype tags (0 float32,
// 1 bfloat16, 2 float16) and the CUDA stream as an int, so the module does not link libtorch.
// host_* functions run the shared element code (zo_block.cuh) on the CPU for bitwise tests.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "zo_block.cuh"
#include "zo_launch.h"

namespace py = pybind11;

namespace {

void check_common(int64_t n, uint64_t offset, uint32_t query, uint32_t stream) {
  if (n < 0) throw py::value_error("numel must be >= 0");
  if (offset + (uint64_t)n > (1ull << 50)) throw py::value_error("element indices must stay below 2^50");
  if (query >= 4096u) throw py::value_error("query must be < 4096");
  if (stream >= 16u) throw py::value_error("stream must be < 16");
}

void run_host(int op, int dtype, int dist, bool stochastic, const zo::TensorDesc& t, const zo::OpParams& p) {
  if (t.numel == 0) return;
  const int64_t n_blocks = zo::philox_blocks(t.offset, t.numel);
  const uint64_t block0 = t.offset >> 2;
  const bool known = zo::dispatch(op, dtype, dist, stochastic, [&](auto op_c, auto dt_c, auto dist_c, auto st_c) {
    for (int64_t b = 0; b < n_blocks; ++b)
      zo::process_block<decltype(op_c)::value, decltype(dt_c)::value, decltype(dist_c)::value,
                        decltype(st_c)::value>(t, p, block0 + (uint64_t)b);
  });
  if (!known) throw py::value_error("unsupported op/dtype/dist combination");
}

zo::TensorDesc desc(uintptr_t src, uintptr_t dst, int64_t n, uint64_t key, uint64_t offset, float lr = 0.f,
                    float wd = 0.f) {
  return zo::TensorDesc{reinterpret_cast<const void*>(src), reinterpret_cast<void*>(dst), n, key, offset, lr, wd};
}

zo::OpParams params(uint64_t seed) {
  zo::OpParams p{};
  p.seed = seed;
  return p;
}

void host_philox(uintptr_t counters, int64_t n, uint32_t k0, uint32_t k1, uintptr_t out) {
  const uint32_t* c = reinterpret_cast<const uint32_t*>(counters);
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
  for (int64_t i = 0; i < n; ++i) {
    const zo::U4 r = zo::philox4x32_10(zo::U4{c[4 * i], c[4 * i + 1], c[4 * i + 2], c[4 * i + 3]}, k0, k1);
    o[4 * i] = r.x;
    o[4 * i + 1] = r.y;
    o[4 * i + 2] = r.z;
    o[4 * i + 3] = r.w;
  }
}

void host_perturbation(uintptr_t out, int64_t n, uint64_t seed, uint64_t key, uint32_t query, uint32_t stream,
                       int dist, uint64_t offset) {
  check_common(n, offset, query, stream);
  zo::OpParams p = params(seed);
  p.query = query;
  p.stream = stream;
  run_host(zo::FILL_Z, zo::F32, dist, false, desc(0, out, n, key, offset), p);
}

void host_uniform(uintptr_t out, int64_t n, uint64_t seed, uint64_t key, uint32_t query, uint32_t stream,
                  uint64_t offset) {
  check_common(n, offset, query, stream);
  zo::OpParams p = params(seed);
  p.query = query;
  p.stream = stream;
  run_host(zo::FILL_U, zo::F32, zo::GAUSSIAN, false, desc(0, out, n, key, offset), p);
}

void host_stochastic_round(uintptr_t x, uintptr_t out, int64_t n, int dtype, uint64_t seed, uint64_t key,
                           uint32_t query, uint32_t stream, uint64_t offset) {
  check_common(n, offset, query, stream);
  zo::OpParams p = params(seed);
  p.query = query;
  p.stream = stream;
  run_host(zo::SROUND, dtype, zo::GAUSSIAN, true, desc(x, out, n, key, offset), p);
}

void host_round_nearest(uintptr_t x, uintptr_t out, int64_t n, int dtype) {
  const float* src = reinterpret_cast<const float*>(x);
  uint16_t* dst = reinterpret_cast<uint16_t*>(out);
  if (dtype != zo::BF16 && dtype != zo::F16) throw py::value_error("dtype tag must be 1 (bf16) or 2 (fp16)");
  for (int64_t i = 0; i < n; ++i)
    dst[i] = dtype == zo::BF16 ? zo::round_nearest<zo::BF16>(src[i]) : zo::round_nearest<zo::F16>(src[i]);
}

void host_perturb(uintptr_t src, uintptr_t dst, int64_t n, int dtype, uint64_t seed, uint64_t key, uint64_t offset,
                  float scale, uint32_t query, int dist, bool stochastic, uint32_t sr_stream) {
  check_common(n, offset, query, sr_stream);
  zo::OpParams p = params(seed);
  p.scale = scale;
  p.query = query;
  p.sr_stream = sr_stream;
  run_host(zo::PERTURB, dtype, dist, stochastic && dtype != zo::F32, desc(src, dst, n, key, offset), p);
}

void host_zo_update(uintptr_t ptr, int64_t n, int dtype, uint64_t seed, uint64_t key, uint64_t offset,
                    const std::vector<float>& coeffs, float lr, float wd, int dist, bool stochastic,
                    uint32_t sr_stream, py::object restore_scale, uint32_t restore_query) {
  check_common(n, offset, restore_query, sr_stream);
  if (coeffs.size() > 4096) throw py::value_error("at most 4096 queries");
  zo::OpParams p = params(seed);
  p.sr_stream = sr_stream;
  p.coeffs = coeffs.data();
  p.n_coeffs = (int)coeffs.size();
  p.restore = !restore_scale.is_none();
  p.restore_scale = p.restore ? restore_scale.cast<float>() : 0.f;
  p.restore_query = restore_query;
  run_host(zo::UPDATE, dtype, dist, stochastic && dtype != zo::F32, desc(ptr, ptr, n, key, offset, lr, wd), p);
}

int device_count() {
  const char* err = nullptr;
  return zo::device_count(&err);
}

std::string probe(int device) {
  const char* err = zo::probe_device(device);
  return err ? std::string(err) : std::string();
}

zo::LaunchArgs launch_args(int op, int dtype, int dist, bool stochastic, uintptr_t table, int n_tensors,
                           int64_t n_chunks, uint64_t seed, float scale, uint32_t query, uint32_t stream,
                           uint32_t sr_stream, uintptr_t coeffs, int n_coeffs, bool restore, float restore_scale,
                           uint32_t restore_query) {
  zo::LaunchArgs a{};
  a.op = op;
  a.dtype = dtype;
  a.dist = dist;
  a.stochastic = stochastic ? 1 : 0;
  a.table = reinterpret_cast<const int64_t*>(table);
  a.n_tensors = n_tensors;
  a.n_chunks = n_chunks;
  a.seed = seed;
  a.scale = scale;
  a.query = query;
  a.stream = stream;
  a.sr_stream = sr_stream;
  a.coeffs = reinterpret_cast<const float*>(coeffs);
  a.n_coeffs = n_coeffs;
  a.restore = restore ? 1 : 0;
  a.restore_scale = restore_scale;
  a.restore_query = restore_query;
  return a;
}

void launch_impl(bool masked, int op, int dtype, int dist, bool stochastic, uintptr_t table, int n_tensors,
                 int64_t n_chunks, uint64_t seed, float scale, uint32_t query, uint32_t stream, uint32_t sr_stream,
                 uintptr_t coeffs, int n_coeffs, bool restore, float restore_scale, uint32_t restore_query,
                 int device, uintptr_t cuda_stream) {
  zo::LaunchArgs a = launch_args(op, dtype, dist, stochastic, table, n_tensors, n_chunks, seed, scale, query,
                                 stream, sr_stream, coeffs, n_coeffs, restore, restore_scale, restore_query);
  a.masked = masked ? 1 : 0;
  a.device = device;
  a.cuda_stream = cuda_stream;
  const char* err = zo::launch(a);
  if (err) throw std::runtime_error(std::string("zokernels CUDA backend: ") + err);
}

void launch(int op, int dtype, int dist, bool stochastic, uintptr_t table, int n_tensors, int64_t n_chunks,
            uint64_t seed, float scale, uint32_t query, uint32_t stream, uint32_t sr_stream, uintptr_t coeffs,
            int n_coeffs, bool restore, float restore_scale, uint32_t restore_query, int device,
            uintptr_t cuda_stream) {
  launch_impl(false, op, dtype, dist, stochastic, table, n_tensors, n_chunks, seed, scale, query, stream, sr_stream,
              coeffs, n_coeffs, restore, restore_scale, restore_query, device, cuda_stream);
}

void launch_masked(int op, int dtype, int dist, bool stochastic, uintptr_t table, int n_tensors, int64_t n_chunks,
                   uint64_t seed, float scale, uint32_t query, uint32_t sr_stream, uintptr_t coeffs, int n_coeffs,
                   bool restore, float restore_scale, uint32_t restore_query, int device, uintptr_t cuda_stream) {
  launch_impl(true, op, dtype, dist, stochastic, table, n_tensors, n_chunks, seed, scale, query, 0, sr_stream,
              coeffs, n_coeffs, restore, restore_scale, restore_query, device, cuda_stream);
}

// Table row of CUDA block `chunk` (the last row whose first chunk <= chunk).
int64_t chunk_row(const int64_t* table, int n_tensors, int64_t chunk) {
  int64_t row = 0;
  while (row + 1 < n_tensors && table[(row + 1) * zo::MASK_COLS + zo::COL_CHUNK0] <= chunk) ++row;
  return row;
}

// launch_masked()'s grid on the CPU over a host-memory table: same chunk -> (tensor, work items) mapping.
void host_masked_launch(int op, int dtype, int dist, bool stochastic, uintptr_t table, int n_tensors,
                        int64_t n_chunks, uint64_t seed, float scale, uint32_t query, uint32_t sr_stream,
                        uintptr_t coeffs, int n_coeffs, bool restore, float restore_scale, uint32_t restore_query) {
  if (op != zo::PERTURB && op != zo::UPDATE) throw py::value_error("masked ops are perturb and zo_update");
  const zo::LaunchArgs a = launch_args(op, dtype, dist, stochastic, table, n_tensors, n_chunks, seed, scale,
                                       query, 0, sr_stream, coeffs, n_coeffs, restore, restore_scale, restore_query);
  const zo::OpParams p = zo::op_params(a);
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
    const int format = (int)(a.table[chunk_row(a.table, n_tensors, chunk) * zo::MASK_COLS + zo::MCOL_FORMAT] & 0xFF);
    if (format < zo::MASK_ROWS || format > zo::MASK_BITS) throw py::value_error("unknown mask format in the table");
  }
  const bool known = zo::dispatch(op, dtype, dist, stochastic, [&](auto op_c, auto dt_c, auto dist_c, auto st_c) {
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
      const zo::MaskWork w = zo::mask_chunk_work(a.table, n_tensors, chunk, zo::MASK_CHUNK_ITEMS);
      for (int thread = 0; thread < zo::THREADS; ++thread)
        for (int64_t i = w.first + thread; i < w.last; i += zo::THREADS)
          zo::process_mask_item<decltype(op_c)::value, decltype(dt_c)::value, decltype(dist_c)::value,
                                decltype(st_c)::value>(w.m, p, i);
    }
  });
  if (!known) throw py::value_error("unsupported op/dtype/dist combination");
}

zo::QuantParams quant_params(int op, int fmt, int dist, int out_kind, int in_dtype, bool stochastic, bool paper,
                             int64_t n, int64_t k, int64_t kb, int64_t scale_cols, int64_t group, uintptr_t w,
                             uintptr_t q, uintptr_t scale, uintptr_t out, uintptr_t saturated, uint64_t seed,
                             uint64_t key, uint32_t query, float eps, float lr, int sign, uintptr_t coeffs,
                             int n_coeffs) {
  if (op < zo::Q_QUANTIZE || op > zo::Q_UPDATE) throw py::value_error("quant op must be 0, 1 or 2");
  if (fmt < zo::QF_INT8 || fmt > zo::QF_FP8) throw py::value_error("quant format must be 0 (int8), 1 (int4), 2 (fp8)");
  if (n < 0 || k < 0 || (n && k && (uint64_t)n * (uint64_t)k > (1ull << 50)))
    throw py::value_error("element indices must stay below 2^50");
  if (fmt == zo::QF_INT4 && (group <= 0 || group % 2 || kb * 2 < k)) throw py::value_error("bad int4 geometry");
  if (query >= 4096u) throw py::value_error("query must be < 4096");
  if (n_coeffs < 0 || n_coeffs > 4096) throw py::value_error("at most 4096 queries");
  if (sign != 1 && sign != -1) throw py::value_error("sign must be +1 or -1");
  if (out_kind < zo::QO_F32 || out_kind > zo::QO_PACKED || (out_kind == zo::QO_PACKED && fmt != zo::QF_INT4))
    throw py::value_error("bad probe output kind");
  zo::QuantParams p{};
  p.op = op;
  p.fmt = fmt;
  p.dist = dist;
  p.out_kind = out_kind;
  p.in_dtype = in_dtype;
  p.stochastic = stochastic ? 1 : 0;
  p.paper = paper ? 1 : 0;
  p.n = n;
  p.k = k;
  p.kb = kb;
  p.scale_cols = scale_cols;
  p.group = fmt == zo::QF_INT4 ? group : 1;
  p.w = reinterpret_cast<const void*>(w);
  p.q = reinterpret_cast<void*>(q);
  p.scale = reinterpret_cast<const float*>(scale);
  p.out = reinterpret_cast<void*>(out);
  p.saturated = reinterpret_cast<unsigned long long*>(saturated);
  p.seed = seed;
  p.key = key;
  p.query = query;
  p.eps = eps;
  p.lr = lr;
  p.sign = sign;
  p.coeffs = reinterpret_cast<const float*>(coeffs);
  p.n_coeffs = n_coeffs;
  return p;
}

#define QUANT_ARGS                                                                                              \
  int op, int fmt, int dist, int out_kind, int in_dtype, bool stochastic, bool paper, int64_t n, int64_t k,    \
      int64_t kb, int64_t scale_cols, int64_t group, uintptr_t w, uintptr_t q, uintptr_t scale, uintptr_t out, \
      uintptr_t saturated, uint64_t seed, uint64_t key, uint32_t query, float eps, float lr, int sign,          \
      uintptr_t coeffs, int n_coeffs
#define QUANT_PASS                                                                                           \
  op, fmt, dist, out_kind, in_dtype, stochastic, paper, n, k, kb, scale_cols, group, w, q, scale, out, saturated, \
      seed, key, query, eps, lr, sign, coeffs, n_coeffs

// The quant kernel's work items on the CPU (host memory), in order; the saturation count added once.
void host_quant(QUANT_ARGS) {
  const zo::QuantParams p = quant_params(QUANT_PASS);
  const int64_t items = zo::quant_items(p);
  int64_t count = 0;
  for (int64_t i = 0; i < items; ++i) count += zo::quant_item(p, i);
  if (p.saturated) *reinterpret_cast<int64_t*>(p.saturated) += count;
}

void launch_quant(QUANT_ARGS, int device, uintptr_t cuda_stream) {
  const char* err = zo::launch_quant(quant_params(QUANT_PASS), device, cuda_stream);
  if (err) throw std::runtime_error(std::string("zokernels CUDA backend: ") + err);
}

// e4m3 grid helpers on arrays (tests against torch's float8_e4m3fn casts and the reference SR).
void host_e4m3(uintptr_t x, uintptr_t v, uintptr_t out, int64_t n, bool stochastic) {
  const float* xs = reinterpret_cast<const float*>(x);
  const float* vs = reinterpret_cast<const float*>(v);
  uint8_t* o = reinterpret_cast<uint8_t*>(out);
  for (int64_t i = 0; i < n; ++i) o[i] = (uint8_t)(stochastic ? zo::e4m3_sr(xs[i], vs[i]) : zo::e4m3_rn(xs[i]));
}

// The kernel's grid on the CPU: same table (host memory), same chunk -> (tensor, Philox blocks) mapping,
// threads of a CUDA block run one after another.
void host_launch(int op, int dtype, int dist, bool stochastic, uintptr_t table, int n_tensors, int64_t n_chunks,
                 uint64_t seed, float scale, uint32_t query, uint32_t stream, uint32_t sr_stream, uintptr_t coeffs,
                 int n_coeffs, bool restore, float restore_scale, uint32_t restore_query) {
  const zo::LaunchArgs a = launch_args(op, dtype, dist, stochastic, table, n_tensors, n_chunks, seed, scale,
                                       query, stream, sr_stream, coeffs, n_coeffs, restore, restore_scale,
                                       restore_query);
  const zo::OpParams p = zo::op_params(a);
  const bool known = zo::dispatch(op, dtype, dist, stochastic, [&](auto op_c, auto dt_c, auto dist_c, auto st_c) {
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
      const zo::ChunkWork w = zo::chunk_work(a.table, n_tensors, chunk, zo::CHUNK_BLOCKS);
      for (int thread = 0; thread < zo::THREADS; ++thread)
        for (int64_t b = w.first + thread; b < w.last; b += zo::THREADS)
          zo::process_block<decltype(op_c)::value, decltype(dt_c)::value, decltype(dist_c)::value,
                            decltype(st_c)::value>(w.t, p, w.block0 + (uint64_t)b);
    }
  });
  if (!known) throw py::value_error("unsupported op/dtype/dist combination");
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "zokernels CUDA kernels (raw pointers, no libtorch) and their host twins for CPU tests";
  m.attr("CONTRACT_VERSION") = 1;
  m.attr("THREADS") = zo::THREADS;
  m.attr("CHUNK_BLOCKS") = zo::CHUNK_BLOCKS;
  m.attr("TABLE_COLS") = (int)zo::TABLE_COLS;
  m.attr("OPS") = py::dict(py::arg("fill_perturbation") = (int)zo::FILL_Z, py::arg("fill_uniform") = (int)zo::FILL_U,
                           py::arg("stochastic_round") = (int)zo::SROUND, py::arg("perturb") = (int)zo::PERTURB,
                           py::arg("zo_update") = (int)zo::UPDATE);
  m.def("host_philox", &host_philox, py::arg("counters"), py::arg("n"), py::arg("k0"), py::arg("k1"), py::arg("out"));
  m.def("host_perturbation", &host_perturbation, py::arg("out"), py::arg("n"), py::arg("seed"), py::arg("key"),
        py::arg("query"), py::arg("stream"), py::arg("dist"), py::arg("offset"));
  m.def("host_uniform", &host_uniform, py::arg("out"), py::arg("n"), py::arg("seed"), py::arg("key"),
        py::arg("query"), py::arg("stream"), py::arg("offset"));
  m.def("host_stochastic_round", &host_stochastic_round, py::arg("x"), py::arg("out"), py::arg("n"),
        py::arg("dtype"), py::arg("seed"), py::arg("key"), py::arg("query"), py::arg("stream"), py::arg("offset"));
  m.def("host_round_nearest", &host_round_nearest, py::arg("x"), py::arg("out"), py::arg("n"), py::arg("dtype"));
  m.def("host_perturb", &host_perturb, py::arg("src"), py::arg("dst"), py::arg("n"), py::arg("dtype"),
        py::arg("seed"), py::arg("key"), py::arg("offset"), py::arg("scale"), py::arg("query"), py::arg("dist"),
        py::arg("stochastic"), py::arg("sr_stream"));
  m.def("host_zo_update", &host_zo_update, py::arg("ptr"), py::arg("n"), py::arg("dtype"), py::arg("seed"),
        py::arg("key"), py::arg("offset"), py::arg("coeffs"), py::arg("lr"), py::arg("wd"), py::arg("dist"),
        py::arg("stochastic"), py::arg("sr_stream"), py::arg("restore_scale") = py::none(),
        py::arg("restore_query") = 0);
  m.attr("MASK_COLS") = (int)zo::MASK_COLS;
  m.attr("MASK_CHUNK_ITEMS") = zo::MASK_CHUNK_ITEMS;
  m.attr("MASK_FORMATS") = py::dict(py::arg("rows") = (int)zo::MASK_ROWS, py::arg("blocks") = (int)zo::MASK_BLOCKS,
                                    py::arg("bits") = (int)zo::MASK_BITS);
  m.def("launch_masked", &launch_masked, py::arg("op"), py::arg("dtype"), py::arg("dist"), py::arg("stochastic"),
        py::arg("table"), py::arg("n_tensors"), py::arg("n_chunks"), py::arg("seed"), py::arg("scale"),
        py::arg("query"), py::arg("sr_stream"), py::arg("coeffs"), py::arg("n_coeffs"), py::arg("restore"),
        py::arg("restore_scale"), py::arg("restore_query"), py::arg("device"), py::arg("cuda_stream"),
        "masked perturb / zo_update over a MASK_COLS table (zo_masked.cuh), asynchronous on cuda_stream");
  m.def("host_masked_launch", &host_masked_launch, py::arg("op"), py::arg("dtype"), py::arg("dist"),
        py::arg("stochastic"), py::arg("table"), py::arg("n_tensors"), py::arg("n_chunks"), py::arg("seed"),
        py::arg("scale"), py::arg("query"), py::arg("sr_stream"), py::arg("coeffs"), py::arg("n_coeffs"),
        py::arg("restore"), py::arg("restore_scale"), py::arg("restore_query"),
        "launch_masked()'s grid run on the CPU over a host-memory table");
  m.attr("QUANT_OPS") = py::dict(py::arg("quantize") = (int)zo::Q_QUANTIZE, py::arg("probe") = (int)zo::Q_PROBE,
                                 py::arg("update") = (int)zo::Q_UPDATE);
  m.attr("QUANT_FORMATS") = py::dict(py::arg("int8") = (int)zo::QF_INT8, py::arg("int4") = (int)zo::QF_INT4,
                                     py::arg("fp8") = (int)zo::QF_FP8);
  m.attr("QUANT_OUT_GRID") = (int)zo::QO_GRID;
  m.attr("QUANT_OUT_PACKED") = (int)zo::QO_PACKED;
#define QUANT_PYARGS                                                                                             \
  py::arg("op"), py::arg("fmt"), py::arg("dist"), py::arg("out_kind"), py::arg("in_dtype"), py::arg("stochastic"), \
      py::arg("paper"), py::arg("n"), py::arg("k"), py::arg("kb"), py::arg("scale_cols"), py::arg("group"),         \
      py::arg("w"), py::arg("q"), py::arg("scale"), py::arg("out"), py::arg("saturated"), py::arg("seed"),          \
      py::arg("key"), py::arg("query"), py::arg("eps"), py::arg("lr"), py::arg("sign"), py::arg("coeffs"),          \
      py::arg("n_coeffs")
  m.def("host_quant", &host_quant, QUANT_PYARGS, "a quantized-weight op (zo_quant.cuh) run on the CPU");
  m.def("launch_quant", &launch_quant, QUANT_PYARGS, py::arg("device"), py::arg("cuda_stream"),
        "a quantized-weight op on the GPU, asynchronous on cuda_stream");
  m.def("host_e4m3", &host_e4m3, py::arg("x"), py::arg("v"), py::arg("out"), py::arg("n"), py::arg("stochastic"),
        "float32 -> e4m3fn bits: round to nearest even (torch's cast) or SR8 with uniforms v");
  m.def("device_count", &device_count, "CUDA devices visible (0 without driver or GPU)");
  m.def("probe", &probe, py::arg("device"), "'' if the kernels can run on the device, else the CUDA error");
  m.def("launch", &launch, py::arg("op"), py::arg("dtype"), py::arg("dist"), py::arg("stochastic"),
        py::arg("table"), py::arg("n_tensors"), py::arg("n_chunks"), py::arg("seed"), py::arg("scale"),
        py::arg("query"), py::arg("stream"), py::arg("sr_stream"), py::arg("coeffs"), py::arg("n_coeffs"),
        py::arg("restore"), py::arg("restore_scale"), py::arg("restore_query"), py::arg("device"),
        py::arg("cuda_stream"));
  m.def("host_launch", &host_launch, py::arg("op"), py::arg("dtype"), py::arg("dist"), py::arg("stochastic"),
        py::arg("table"), py::arg("n_tensors"), py::arg("n_chunks"), py::arg("seed"), py::arg("scale"),
        py::arg("query"), py::arg("stream"), py::arg("sr_stream"), py::arg("coeffs"), py::arg("n_coeffs"),
        py::arg("restore"), py::arg("restore_scale"), py::arg("restore_query"),
        "launch()'s grid run on the CPU over a host-memory table (tests of the multi-tensor mapping)");
}
