// A matmul that skips the small entries of its input, on CPU: out[r] = sum over k with |x[r, k]| >= threshold
// of x[r, k] * weight_t[k, :].
//
// A decode step multiplies a few rows by each MLP weight, and the time is the weight's bytes. With the
// weight stored input-major (weight_t [K, N], a row per input channel), a channel that is zero in every row
// skips a whole contiguous row of the weight: the bytes read shrink with the share of zeros, which a dense
// GEMV cannot do. The kernel lists the channels kept in any row once and splits the list between threads;
// each thread streams its weight rows whole, eight at a time, adding them scaled into its own partial output
// (a few KB, in L1), and the partials are summed at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

at::Tensor row_sparse_matmul(const at::Tensor& x_in, const at::Tensor& weight_t_in, double threshold_in) {
  TORCH_CHECK(x_in.dim() == 2 && weight_t_in.dim() == 2 && x_in.size(1) == weight_t_in.size(0),
              "row_sparse_matmul: x [R, K] and weight_t [K, N], got ", x_in.sizes(), " and ", weight_t_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight_t_in.scalar_type() == at::kFloat,
              "row_sparse_matmul: float32 only");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight_t = weight_t_in.contiguous();
  const int64_t rows = x.size(0), channels = x.size(1), columns = weight_t.size(1);
  at::Tensor out = at::zeros({rows, columns}, x.options());
  const float threshold = static_cast<float>(threshold_in);
  // x with its entries below the threshold zeroed: what the kept channels multiply (rows > 1 share the list)
  std::vector<float> kept(static_cast<size_t>(rows * channels));
  const float* raw = x.data_ptr<float>();
  for (int64_t i = 0; i < rows * channels; ++i) kept[i] = std::abs(raw[i]) >= threshold ? raw[i] : 0.f;
  const float* xs = kept.data();
  const float* w = weight_t.data_ptr<float>();
  float* o = out.data_ptr<float>();

  std::vector<int64_t> nonzero;
  nonzero.reserve(channels);
  for (int64_t k = 0; k < channels; ++k) {
    for (int64_t r = 0; r < rows; ++r) {
      if (xs[r * channels + k] != 0.f) {
        nonzero.push_back(k);
        break;
      }
    }
  }
  const int64_t count = static_cast<int64_t>(nonzero.size());
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count / 16));
  std::vector<float> partial(static_cast<size_t>((parts - 1) * rows * columns), 0.f);
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t part = first; part < last; ++part) {
      float* acc = part == 0 ? o : partial.data() + (part - 1) * rows * columns;
      const int64_t begin = count * part / parts, end = count * (part + 1) / parts;
      int64_t j = begin;
      for (; j + 8 <= end; j += 8) {
        const float* wr[8];
        for (int i = 0; i < 8; ++i) wr[i] = w + nonzero[j + i] * columns;
        for (int64_t r = 0; r < rows; ++r) {
          const float* xr = xs + r * channels;
          float a[8];
          for (int i = 0; i < 8; ++i) a[i] = xr[nonzero[j + i]];
          float* row = acc + r * columns;
#pragma omp simd
          for (int64_t n = 0; n < columns; ++n)
            row[n] += (a[0] * wr[0][n] + a[1] * wr[1][n] + a[2] * wr[2][n] + a[3] * wr[3][n]) +
                      (a[4] * wr[4][n] + a[5] * wr[5][n] + a[6] * wr[6][n] + a[7] * wr[7][n]);
        }
      }
      for (; j < end; ++j) {
        const float* w0 = w + nonzero[j] * columns;
        for (int64_t r = 0; r < rows; ++r) {
          const float a0 = xs[r * channels + nonzero[j]];
          float* row = acc + r * columns;
#pragma omp simd
          for (int64_t n = 0; n < columns; ++n) row[n] += a0 * w0[n];
        }
      }
    }
  });
  for (int64_t part = 1; part < parts; ++part) {
    const float* from = partial.data() + (part - 1) * rows * columns;
#pragma omp simd
    for (int64_t i = 0; i < rows * columns; ++i) o[i] += from[i];
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(dynasparse_row_sparse_cpu, m) {
  m.def("row_sparse_matmul(Tensor x, Tensor weight_t, float threshold) -> Tensor");
  m.impl("row_sparse_matmul", c10::DispatchKey::CPU, TORCH_FN(row_sparse_matmul));
}
