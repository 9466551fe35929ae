// Input-sparse linear layer for a few token rows on the CPU.
//
// y[m, :] = sum over active channels k of x[m, k] * Wt[k, :], where channel k is active in
// row m when |x[m, k]| > tau_k (tau_k: one threshold for every channel, or one per channel).
// Wt is the weight stored input-major ([in, out], rows contiguous), so every active channel
// costs one contiguous read of its weight row and inactive channels cost nothing: no gathered
// copy is ever written. With several token rows a weight row is read once if any token row
// needs it (the union of the masks). The active channels are split across threads; each
// thread accumulates a private fp32 partial sum over its share, and the partial sums are added.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

// y += sum_i v[i] * rows[i][:], four rows at a time so y is loaded and stored once per four.
template <typename T>
void accumulate(float* __restrict__ y, const T* __restrict__ w, int64_t n,
                const int64_t* idx, const float* val, int64_t count) {
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) {
    const T* __restrict__ r0 = w + idx[i] * n;
    const T* __restrict__ r1 = w + idx[i + 1] * n;
    const T* __restrict__ r2 = w + idx[i + 2] * n;
    const T* __restrict__ r3 = w + idx[i + 3] * n;
    const float v0 = val[i], v1 = val[i + 1], v2 = val[i + 2], v3 = val[i + 3];
    for (int64_t j = 0; j < n; ++j) {
      y[j] += v0 * to_float(r0[j]) + v1 * to_float(r1[j]) + v2 * to_float(r2[j]) + v3 * to_float(r3[j]);
    }
  }
  for (; i < count; ++i) {
    const T* __restrict__ r = w + idx[i] * n;
    const float v = val[i];
    for (int64_t j = 0; j < n; ++j) y[j] += v * to_float(r[j]);
  }
}

// Several token rows: each channel active in any row is read once and applied to every row
// (a row where the channel is inactive gets a zero coefficient).
template <typename T>
void accumulate_rows(float* __restrict__ y, const T* __restrict__ w, int64_t n, int64_t m,
                     const int64_t* idx, const float* val, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const T* __restrict__ r = w + idx[i] * n;
    for (int64_t row = 0; row < m; ++row) {
      const float v = val[i * m + row];
      if (v == 0.0f) continue;
      float* __restrict__ yr = y + row * n;
      for (int64_t j = 0; j < n; ++j) yr[j] += v * to_float(r[j]);
    }
  }
}

template <typename T>
torch::Tensor run(const torch::Tensor& x, const torch::Tensor& wt, double threshold,
                  const float* tau, int64_t parts) {
  const int64_t m = x.size(0), k = x.size(1), n = wt.size(1);
  const T* xp = x.data_ptr<T>();
  const T* wp = wt.data_ptr<T>();
  // The union of the rows' active channels, with each row's coefficient (0 where inactive).
  std::vector<int64_t> idx;
  std::vector<float> val;
  idx.reserve(k);
  val.reserve(k * m);
  std::vector<float> coef(m);
  for (int64_t c = 0; c < k; ++c) {
    const float t = tau ? tau[c] : static_cast<float>(threshold);
    bool any = false;
    for (int64_t r = 0; r < m; ++r) {
      const float v = to_float(xp[r * k + c]);
      const bool on = std::fabs(v) > t;
      coef[r] = on ? v : 0.0f;
      any = any || on;
    }
    if (any) {
      idx.push_back(c);
      val.insert(val.end(), coef.begin(), coef.end());
    }
  }
  const int64_t total = static_cast<int64_t>(idx.size());
  parts = std::max<int64_t>(1, std::min<int64_t>(parts, total / 16 + 1));
  auto partial = torch::zeros({parts, m, n}, x.options().dtype(torch::kFloat32));
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t lo = total * p / parts, hi = total * (p + 1) / parts;
      if (m == 1) {
        accumulate<T>(pp + p * n, wp, n, idx.data() + lo, val.data() + lo, hi - lo);
      } else {
        accumulate_rows<T>(pp + p * m * n, wp, n, m, idx.data() + lo, val.data() + lo * m, hi - lo);
      }
    }
  });
  return (parts == 1 ? partial.select(0, 0) : partial.sum(0)).to(x.scalar_type());
}

// Output-sparse: y[r, j] = x[r, :] . w[idx[j], :] for the chosen rows of a row-major weight
// (the up projection of a gated MLP on its active neurons). Each chosen row is read once, in
// place, and dotted with every token row: no gathered copy. Sixteen partial sums per dot
// product so the compiler vectorises it without reassociating the reduction itself.
template <typename T>
inline float dot(const T* __restrict__ a, const T* __restrict__ b, int64_t k) {
  float acc[16] = {0};
  int64_t c = 0;
  for (; c + 16 <= k; c += 16) {
    for (int t = 0; t < 16; ++t) acc[t] += to_float(a[c + t]) * to_float(b[c + t]);
  }
  float s = 0.0f;
  for (int t = 0; t < 16; ++t) s += acc[t];
  for (; c < k; ++c) s += to_float(a[c]) * to_float(b[c]);
  return s;
}

template <typename T>
torch::Tensor run_rows(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& idx) {
  const int64_t m = x.size(0), k = x.size(1), count = idx.size(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  auto y = torch::empty({m, count}, x.options().dtype(torch::kFloat32));
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const T* __restrict__ r = wp + ip[j] * k;
      if (j + 2 < end) {  // rows are scattered: start fetching a later row's lines (no prefetcher crosses)
        const char* nxt = reinterpret_cast<const char*>(wp + ip[j + 2] * k);
        for (int64_t b = 0; b < k * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(nxt + b);
      }
      for (int64_t row = 0; row < m; ++row) yp[row * count + j] = dot<T>(xp + row * k, r, k);
    }
  });
  return y.to(x.scalar_type());
}

}  // namespace

torch::Tensor output_sparse_linear(torch::Tensor x, torch::Tensor w, torch::Tensor idx) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && idx.dim() == 1, "x must be [M, K], w [N, K] and idx [n]");
  TORCH_CHECK(x.size(1) == w.size(1), "x has ", x.size(1), " channels, w has ", w.size(1), " columns");
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous (row-major, a row per output)");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "x and w must have one dtype");
  TORCH_CHECK(idx.scalar_type() == torch::kInt64, "idx must be int64");
  auto ic = idx.contiguous();
  if (ic.numel()) {
    const int64_t lo = ic.min().item<int64_t>(), hi = ic.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < w.size(0), "idx out of range [0, ", w.size(0), ")");
  }
  auto xc = x.contiguous();
  switch (x.scalar_type()) {
    case torch::kFloat32: return run_rows<float>(xc, w, ic);
    case torch::kBFloat16: return run_rows<c10::BFloat16>(xc, w, ic);
    case torch::kFloat16: return run_rows<c10::Half>(xc, w, ic);
    default: TORCH_CHECK(false, "unsupported dtype ", x.scalar_type());
  }
}

torch::Tensor input_sparse_linear(torch::Tensor x, torch::Tensor wt, double threshold,
                                  c10::optional<torch::Tensor> channel_thresholds, int64_t parts) {
  TORCH_CHECK(x.dim() == 2 && wt.dim() == 2, "x must be [M, K] and wt [K, N]");
  TORCH_CHECK(x.size(1) == wt.size(0), "x has ", x.size(1), " channels, wt has ", wt.size(0), " rows");
  TORCH_CHECK(wt.is_contiguous(), "wt must be contiguous (the weight stored input-major)");
  TORCH_CHECK(x.scalar_type() == wt.scalar_type(), "x and wt must have one dtype");
  auto xc = x.contiguous();
  const float* tau = nullptr;
  torch::Tensor tc;
  if (channel_thresholds.has_value() && channel_thresholds->defined()) {
    tc = channel_thresholds->to(torch::kFloat32).contiguous();
    TORCH_CHECK(tc.numel() == x.size(1), "channel_thresholds must have one value per input channel");
    tau = tc.data_ptr<float>();
  }
  parts = std::max<int64_t>(1, parts);
  switch (x.scalar_type()) {
    case torch::kFloat32: return run<float>(xc, wt, threshold, tau, parts);
    case torch::kBFloat16: return run<c10::BFloat16>(xc, wt, threshold, tau, parts);
    case torch::kFloat16: return run<c10::Half>(xc, wt, threshold, tau, parts);
    default: TORCH_CHECK(false, "unsupported dtype ", x.scalar_type());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("input_sparse_linear", &input_sparse_linear, "input-sparse linear over an input-major weight");
  m.def("output_sparse_linear", &output_sparse_linear, "chosen output rows of a row-major linear");
}
