// Block-sparse attention on CPU: each query block reads only the KV blocks its plan lists, in place.
//
// The flash-attention loop of SDPA's CPU kernel, over a plan instead of every block: per (batch row, query
// head, query block), the listed KV blocks are taken a chunk at a time; their scores land side by side in
// one buffer (one small GEMM per block, or per run of adjacent blocks), one online-softmax update covers
// the whole chunk, and P @ V accumulates block by block. Nothing is gathered or copied: the GEMMs read K
// (transposed once per call) and V where they lie. Causality is bottom-right aligned, as everywhere in
// dynasparse; only blocks that cross the diagonal are masked. fp32 throughout (the wrapper casts).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunkBlocks = 8;  // KV blocks per softmax update (512 keys at 64-token blocks)

// exp(x * scale - top) in place over n scores; returns their sum
float exp_and_sum(float* x, int64_t n, float scale, float top) {
  const Vec vscale(scale), vtop(top);
  Vec vsum(0.f);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    Vec e = (Vec::loadu(x + c) * vscale - vtop).exp_u20();
    e.store(x + c);
    vsum = vsum + e;
  }
  float lanes[Vec::size()];
  vsum.store(lanes);
  float sum = 0.f;
  for (float lane : lanes) sum += lane;
  for (; c < n; ++c) {
    x[c] = std::exp(x[c] * scale - top);
    sum += x[c];
  }
  return sum;
}

// q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] fp32; counts [B, Hkv, NQ] and indices
// [B, Hkv, NQ, NK] int32 (the plan). Returns sequence-major [B, Lq, Hq, Dv].
at::Tensor block_sparse_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                  const at::Tensor& counts_in, const at::Tensor& indices_in, int64_t block,
                                  bool is_causal, double scale) {
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_in.scalar_type() == at::kFloat &&
              v_in.scalar_type() == at::kFloat, "block_sparse_attention: q, k, v must be float32");
  const auto q = q_in.contiguous(), v = v_in.contiguous();
  const auto k_t = k_in.transpose(2, 3).contiguous();  // [B, Hkv, D, Lk]: a block's keys are B of the QK GEMM
  const auto counts = counts_in.to(at::kInt).contiguous(), indices = indices_in.to(at::kInt).contiguous();
  const int64_t batch = q.size(0), q_heads = q.size(1), q_len = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k_t.size(1), kv_len = k_t.size(3), dim_v = v.size(3);
  const int64_t groups = q_heads / kv_heads, nq = counts.size(2), nk = indices.size(3);
  const int64_t offset = kv_len - q_len, width = kChunkBlocks * block;
  auto out = at::empty({batch, q_len, q_heads, dim_v}, q.options());
  const float* q_data = q.data_ptr<float>();
  const float* k_data = k_t.data_ptr<float>();
  const float* v_data = v.data_ptr<float>();
  const int* count_data = counts.data_ptr<int>();
  const int* index_data = indices.data_ptr<int>();
  float* out_data = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, batch * q_heads * nq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(block * width), acc(block * dim_v), row_max(block), row_sum(block);
    std::vector<std::pair<int64_t, int64_t>> runs;  // adjacent listed blocks: (first key, keys), one GEMM each
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task % nq, hq = (task / nq) % q_heads, b = task / (nq * q_heads);
      const int64_t hk = hq / groups, m0 = r * block, rows = std::min(block, q_len - m0);
      const int64_t plan = (b * kv_heads + hk) * nq + r;
      const int count = count_data[plan];
      const int* listed = index_data + plan * nk;
      const float* q_block = q_data + ((b * q_heads + hq) * q_len + m0) * dim;
      const float* k_head = k_data + (b * kv_heads + hk) * dim * kv_len;
      const float* v_head = v_data + (b * kv_heads + hk) * kv_len * dim_v;
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int first = 0; first < count; first += kChunkBlocks) {
        const int last = std::min<int>(count, first + kChunkBlocks);
        runs.clear();
        for (int j = first; j < last; ++j) {
          const int64_t start = int64_t(listed[j]) * block, length = std::min(block, kv_len - start);
          if (!runs.empty() && runs.back().first + runs.back().second == start) {
            runs.back().second += length;
          } else {
            runs.emplace_back(start, length);
          }
        }
        int64_t cols = 0;
        for (const auto& [start, length] : runs) {  // scores [rows, cols] = Q_block @ K_run^T
          at::native::cpublas::brgemm(rows, length, dim, dim, kv_len, width, false, q_block, k_head + start,
                                      scores.data() + cols);
          if (is_causal && start + length - 1 > m0 + offset) {  // the run crosses the diagonal: hide the future
            for (int64_t i = 0; i < rows; ++i) {
              const int64_t visible = std::max<int64_t>(m0 + offset + i - start + 1, 0);
              std::fill(scores.data() + i * width + cols + std::min(visible, length),
                        scores.data() + i * width + cols + length, kNegInf);
            }
          }
          cols += length;
        }
        for (int64_t i = 0; i < rows; ++i) {  // online softmax over the chunk
          float* s = scores.data() + i * width;
          float top = row_max[i];
          for (int64_t c = 0; c < cols; ++c) top = std::max(top, s[c] * fscale);
          if (top == kNegInf) {  // nothing visible to this query yet
            std::fill(s, s + cols, 0.f);
            continue;
          }
          const float rescale = std::exp(row_max[i] - top);
          row_sum[i] = row_sum[i] * rescale + exp_and_sum(s, cols, fscale, top);
          row_max[i] = top;
          if (rescale != 1.f) {
            for (float* a = acc.data() + i * dim_v; a < acc.data() + (i + 1) * dim_v; ++a) *a *= rescale;
          }
        }
        cols = 0;
        for (const auto& [start, length] : runs) {  // acc += P[:, run] @ V_run
          at::native::cpublas::brgemm(rows, dim_v, length, width, dim_v, dim_v, true, scores.data() + cols,
                                      v_head + start * dim_v, acc.data());
          cols += length;
        }
      }
      for (int64_t i = 0; i < rows; ++i) {  // a query that saw nothing gives 0
        const float inverse = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
        float* o = out_data + ((b * q_len + m0 + i) * q_heads + hq) * dim_v;
        for (int64_t d = 0; d < dim_v; ++d) o[d] = acc[i * dim_v + d] * inverse;
      }
    }
    at::native::cpublas::brgemm_release(false);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(dynasparse_cpu, m) {
  m.def("block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor counts, Tensor indices, int block, "
        "bool is_causal, float scale) -> Tensor");
  m.impl("block_sparse_attention", c10::DispatchKey::CPU, TORCH_FN(block_sparse_attention));
}
