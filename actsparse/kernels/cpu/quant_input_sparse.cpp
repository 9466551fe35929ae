// Input-sparse linear layer over quantized input-major weights, for a few token rows on the CPU.
//
// The weights are actsparse.quantize's storage (actsparse/quant/storage.py): row k of the
// quantized matrix holds input channel k's N outputs, contiguous, so an inactive channel
// (|x[m, k]| <= cutoff of row m, in every row) costs no weight bytes.
//
// * int8: W[n, k] = q[k, n] * s[n]. The scale does not depend on k, so the kernel sums
//   x[m, k] * q[k, n] over the active channels in fp32 and multiplies by s[n] once at the end.
// * grouped int8: W[n, k] = q[k, n] * s[g, n], g = k / G. Per group with at least one active
//   channel: a[n] = sum x[k] q[k, n] over its active channels, then y[n] += s[g, n] a[n]. A
//   group with no active channel reads neither its weights nor its scales.
// * int4: W[n, k] = q[k, n] * s[g, n] + o[g, n], g = k / G, two values per byte ("half-split":
//   byte j of a row holds output j in its low nibble and output j + N/2 in its high one).
//   Per group with at least one active channel: a[n] = sum x[k] q[k, n] and xs = sum x[k] over
//   its active channels, then y[n] += s[g, n] a[n] + o[g, n] xs. A group with no active channel
//   reads neither its weights nor its scales.
//
// Accumulation is fp32 throughout; the active channels (int8) or active groups (grouped) are split
// across threads, each with a private partial sum, and the partial sums are added.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

// The union of the rows' active channels (ascending) and each row's coefficient per channel
// (x where active, 0 where not), laid out [channel][row].
template <typename T>
void collect(const T* xp, int64_t m, int64_t k, const float* cut, std::vector<int64_t>& idx,
             std::vector<float>& val) {
  idx.reserve(k);
  val.reserve(k * m);
  std::vector<float> coef(m);
  for (int64_t c = 0; c < k; ++c) {
    bool any = false;
    for (int64_t r = 0; r < m; ++r) {
      const float v = to_float(xp[r * k + c]);
      const bool on = std::fabs(v) > cut[r];
      coef[r] = on ? v : 0.0f;
      any = any || on;
    }
    if (any) {
      idx.push_back(c);
      val.insert(val.end(), coef.begin(), coef.end());
    }
  }
}

// acc[row][:] += sum over the given channels of val * q[channel][:] (int8 rows of n values).
void int8_rows(float* __restrict__ acc, const int8_t* __restrict__ q, int64_t n, int64_t m,
               const int64_t* idx, const float* val, int64_t count) {
  if (m == 1) {
    int64_t i = 0;
    for (; i + 4 <= count; i += 4) {  // four rows per pass: acc loaded and stored once per four
      const int8_t* __restrict__ r0 = q + idx[i] * n;
      const int8_t* __restrict__ r1 = q + idx[i + 1] * n;
      const int8_t* __restrict__ r2 = q + idx[i + 2] * n;
      const int8_t* __restrict__ r3 = q + idx[i + 3] * n;
      const float v0 = val[i], v1 = val[i + 1], v2 = val[i + 2], v3 = val[i + 3];
      for (int64_t j = 0; j < n; ++j) {
        acc[j] += v0 * static_cast<float>(r0[j]) + v1 * static_cast<float>(r1[j]) +
                  v2 * static_cast<float>(r2[j]) + v3 * static_cast<float>(r3[j]);
      }
    }
    for (; i < count; ++i) {
      const int8_t* __restrict__ r = q + idx[i] * n;
      const float v = val[i];
      for (int64_t j = 0; j < n; ++j) acc[j] += v * static_cast<float>(r[j]);
    }
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    const int8_t* __restrict__ r = q + idx[i] * n;
    for (int64_t row = 0; row < m; ++row) {
      const float v = val[i * m + row];
      if (v == 0.0f) continue;
      float* __restrict__ a = acc + row * n;
      for (int64_t j = 0; j < n; ++j) a[j] += v * static_cast<float>(r[j]);
    }
  }
}

// One int4 channel row (n / 2 bytes, half-split) times v, added into a[0..n).
inline void int4_row(float* __restrict__ a, const uint8_t* __restrict__ r, int64_t half, float v) {
  for (int64_t j = 0; j < half; ++j) {
    const uint8_t b = r[j];
    a[j] += v * static_cast<float>(b & 0xF);
    a[j + half] += v * static_cast<float>(b >> 4);
  }
}

torch::Tensor finish(torch::Tensor partial, int64_t parts, const c10::optional<torch::Tensor>& bias,
                     const torch::Tensor* scales, c10::ScalarType out) {
  auto y = parts == 1 ? partial.select(0, 0) : partial.sum(0);
  if (scales) y = y * *scales;
  if (bias.has_value() && bias->defined()) y = y + bias->to(torch::kFloat32);
  return y.to(out);
}

template <typename T>
torch::Tensor run_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                       const c10::optional<torch::Tensor>& bias, const float* cut, int64_t parts) {
  const int64_t m = x.size(0), k = x.size(1), n = q.size(1);
  std::vector<int64_t> idx;
  std::vector<float> val;
  collect<T>(x.data_ptr<T>(), m, k, cut, idx, val);
  const int64_t total = static_cast<int64_t>(idx.size());
  parts = std::max<int64_t>(1, std::min<int64_t>(parts, total / 16 + 1));
  auto partial = torch::zeros({parts, m, n}, x.options().dtype(torch::kFloat32));
  float* pp = partial.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t lo = total * p / parts, hi = total * (p + 1) / parts;
      int8_rows(pp + p * m * n, qp, n, m, idx.data() + lo, val.data() + lo * m, hi - lo);
    }
  });
  auto s = scales.to(torch::kFloat32);
  return finish(partial, parts, bias, &s, x.scalar_type());
}

template <typename T>
torch::Tensor run_int4(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                       const torch::Tensor& offsets, const c10::optional<torch::Tensor>& bias, const float* cut,
                       int64_t group, int64_t parts) {
  const int64_t m = x.size(0), k = x.size(1), half = q.size(1), n = 2 * half;
  std::vector<int64_t> idx;
  std::vector<float> val;
  collect<T>(x.data_ptr<T>(), m, k, cut, idx, val);
  // Active groups: starts[i]..starts[i + 1] index the active channels of the i-th active group.
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < static_cast<int64_t>(idx.size()); ++i) {
    if (i == 0 || idx[i] / group != idx[i - 1] / group) starts.push_back(i);
  }
  const int64_t groups = static_cast<int64_t>(starts.size());
  starts.push_back(static_cast<int64_t>(idx.size()));
  parts = std::max<int64_t>(1, std::min<int64_t>(parts, groups));
  auto partial = torch::zeros({parts, m, n}, x.options().dtype(torch::kFloat32));
  auto sc = scales.to(torch::kFloat32).contiguous();
  auto of = offsets.to(torch::kFloat32).contiguous();
  float* pp = partial.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  const float* op = of.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(m * n), xs(m);
    for (int64_t p = begin; p < end; ++p) {
      float* y = pp + p * m * n;
      for (int64_t gi = groups * p / parts; gi < groups * (p + 1) / parts; ++gi) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        std::fill(xs.begin(), xs.end(), 0.0f);
        for (int64_t i = starts[gi]; i < starts[gi + 1]; ++i) {
          const uint8_t* r = qp + idx[i] * half;
          for (int64_t row = 0; row < m; ++row) {
            const float v = val[i * m + row];
            if (v == 0.0f) continue;
            xs[row] += v;
            int4_row(acc.data() + row * n, r, half, v);
          }
        }
        const int64_t g = idx[starts[gi]] / group;
        const float* __restrict__ s = sp + g * n;
        const float* __restrict__ o = op + g * n;
        for (int64_t row = 0; row < m; ++row) {
          const float* __restrict__ a = acc.data() + row * n;
          float* __restrict__ yr = y + row * n;
          const float xr = xs[row];
          for (int64_t j = 0; j < n; ++j) yr[j] += s[j] * a[j] + o[j] * xr;
        }
      }
    }
  });
  return finish(partial, parts, bias, nullptr, x.scalar_type());
}


// Groups of the active channels: starts[i]..starts[i + 1] index the channels of the i-th
// active group (idx ascending); returns the number of active groups (starts gets one more entry).
int64_t active_groups(const std::vector<int64_t>& idx, int64_t group, std::vector<int64_t>& starts) {
  for (int64_t i = 0; i < static_cast<int64_t>(idx.size()); ++i) {
    if (i == 0 || idx[i] / group != idx[i - 1] / group) starts.push_back(i);
  }
  const int64_t groups = static_cast<int64_t>(starts.size());
  starts.push_back(static_cast<int64_t>(idx.size()));
  return groups;
}

template <typename T>
torch::Tensor run_int8_grouped(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                               const c10::optional<torch::Tensor>& bias, const float* cut, int64_t group,
                               int64_t parts) {
  const int64_t m = x.size(0), k = x.size(1), n = q.size(1);
  std::vector<int64_t> idx;
  std::vector<float> val;
  collect<T>(x.data_ptr<T>(), m, k, cut, idx, val);
  std::vector<int64_t> starts;
  const int64_t groups = active_groups(idx, group, starts);
  parts = std::max<int64_t>(1, std::min<int64_t>(parts, groups));
  auto partial = torch::zeros({parts, m, n}, x.options().dtype(torch::kFloat32));
  auto sc = scales.to(torch::kFloat32).contiguous();
  float* pp = partial.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(m * n);
    for (int64_t p = begin; p < end; ++p) {
      float* y = pp + p * m * n;
      for (int64_t gi = groups * p / parts; gi < groups * (p + 1) / parts; ++gi) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        const int64_t lo = starts[gi], hi = starts[gi + 1];
        int8_rows(acc.data(), qp, n, m, idx.data() + lo, val.data() + lo * m, hi - lo);
        const float* __restrict__ s = sp + (idx[lo] / group) * n;
        for (int64_t row = 0; row < m; ++row) {
          const float* __restrict__ a = acc.data() + row * n;
          float* __restrict__ yr = y + row * n;
          for (int64_t j = 0; j < n; ++j) yr[j] += s[j] * a[j];
        }
      }
    }
  });
  return finish(partial, parts, bias, nullptr, x.scalar_type());
}

}  // namespace

torch::Tensor quant_input_sparse_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                                        c10::optional<torch::Tensor> offsets, c10::optional<torch::Tensor> bias,
                                        double threshold, c10::optional<torch::Tensor> row_scale, int64_t bits,
                                        int64_t group_size, int64_t parts) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2, "x must be [M, K] and qweight [K, N] (int4: [K, N / 2])");
  TORCH_CHECK(x.size(1) == qweight.size(0), "x has ", x.size(1), " channels, qweight has ", qweight.size(0), " rows");
  TORCH_CHECK(qweight.is_contiguous(), "qweight must be contiguous (input-major)");
  const int64_t m = x.size(0), k = x.size(1);
  auto xc = x.contiguous();
  // Each row's cutoff: the threshold, times the row's scale where given (statistical top-k).
  std::vector<float> cut(m, static_cast<float>(threshold));
  if (row_scale.has_value() && row_scale->defined()) {
    auto rs = row_scale->to(torch::kFloat32).contiguous();
    TORCH_CHECK(rs.numel() == m, "row_scale must have one value per row of x");
    for (int64_t r = 0; r < m; ++r) cut[r] = static_cast<float>(threshold) * rs.data_ptr<float>()[r];
  }
  parts = std::max<int64_t>(1, parts);
#define ACTSPARSE_QUANT_DISPATCH(CALL)                                         \
  switch (xc.scalar_type()) {                                                  \
    case torch::kFloat32: { using T = float; return CALL; }                   \
    case torch::kBFloat16: { using T = c10::BFloat16; return CALL; }          \
    case torch::kFloat16: { using T = c10::Half; return CALL; }               \
    default: TORCH_CHECK(false, "unsupported activation dtype ", xc.scalar_type()); \
  }
  if (bits == 8 && group_size > 0) {
    TORCH_CHECK(qweight.scalar_type() == torch::kInt8, "int8 weights must be int8");
    TORCH_CHECK(k % group_size == 0, "group_size must divide the input width");
    TORCH_CHECK(scales.dim() == 2 && scales.size(0) == k / group_size && scales.size(1) == qweight.size(1),
                "grouped int8 scales must be [K / group_size, N]");
    ACTSPARSE_QUANT_DISPATCH((run_int8_grouped<T>(xc, qweight, scales, bias, cut.data(), group_size, parts)));
  }
  if (bits == 8) {
    TORCH_CHECK(qweight.scalar_type() == torch::kInt8, "int8 weights must be int8");
    TORCH_CHECK(scales.numel() == qweight.size(1), "int8 needs one scale per output");
    ACTSPARSE_QUANT_DISPATCH((run_int8<T>(xc, qweight, scales, bias, cut.data(), parts)));
  }
  TORCH_CHECK(bits == 4, "bits must be 8 or 4, got ", bits);
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8, "int4 weights must be packed uint8");
  TORCH_CHECK(offsets.has_value() && offsets->defined(), "int4 needs offsets");
  TORCH_CHECK(group_size > 0 && k % group_size == 0, "group_size must divide the input width");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == k / group_size && scales.size(1) == 2 * qweight.size(1),
              "int4 scales must be [K / group_size, N]");
  TORCH_CHECK(offsets->sizes() == scales.sizes(), "int4 offsets must have the scales' shape");
  ACTSPARSE_QUANT_DISPATCH((run_int4<T>(xc, qweight, scales, *offsets, bias, cut.data(), group_size, parts)));
#undef ACTSPARSE_QUANT_DISPATCH
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_input_sparse_linear", &quant_input_sparse_linear,
        "input-sparse linear over an int8, grouped int8 or int4 input-major weight");
}
