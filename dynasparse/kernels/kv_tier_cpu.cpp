// Attention over the compressed tier's blocks on CPU: the codes are read in place, a block at a time.
//
// A decode step's queries (a KV head's group of query heads, a few tokens) read the blocks the step chose.
// No block is dequantized into memory. Keys are coded per channel, so a query folds the block's scales into
// itself once and a logit is (q * scale) . code + q . minimum; values are coded per token and group of
// channels, so a probability p adds (p * scale) * code + p * minimum to the output. Both loops run over the
// packed bytes: the codes of one bit position of every byte (a "plane": channels s, s + P, s + 2P, ... for P
// codes per byte) are shifted and masked out side by side, so the compiler vectorizes them. The softmax is
// online, as flash attention's over dense blocks; a head's blocks are split into parts that run on different
// threads and merge by their log-sum-exp. Returns the normalised output and each query row's log-sum-exp, so
// the caller joins the tier with its full-precision slots in one softmax.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// fp16 scales and minima -> fp32, 16 at a time where the CPU converts them in one instruction
void to_float(const at::Half* from, int64_t n, float* to) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(to + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(from + i))));
  }
#endif
  for (; i < n; ++i) to[i] = static_cast<float>(from[i]);
}

struct Tier {  // the tier's fields as kv_tier.empty_tier lays them out, and the query rows
  const float* q;  // [B * Hkv, R, D]
  const uint8_t* keys;  // [B * Hkv, NB, G, D / P]
  const at::Half *key_scale, *key_min;  // [B * Hkv, NB, D]
  const uint8_t* values;  // [B * Hkv, NB, G, Dv / P]
  const at::Half *value_scale, *value_min;  // [B * Hkv, NB, G, Dv / group]
  const int* positions;  // [B * Hkv, NB, G]
  const int64_t* chosen;  // [B * Hkv, K]
  int64_t rows, dim, dim_v, blocks, group, value_groups, count;
  float scale;
};

// a . b over n floats: vector lanes, then a shuffle tree (a lane-by-lane sum would serialize every dot)
inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  float total = at::vec::vec_reduce_all<float>([](const Vec& x, const Vec& y) { return x + y; }, acc);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// a block's codes [G, n / P] (packed bytes) -> floats [G, n] in plane order (channel P * i + s at s * n / P + i)
template <int BITS>
void unpack(const uint8_t* __restrict__ codes, int64_t tokens, int64_t n, float* __restrict__ out) {
  constexpr int P = 8 / BITS, MASK = (1 << BITS) - 1;
  const int64_t bytes = n / P;
  for (int64_t k = 0; k < tokens; ++k) {
    for (int s = 0; s < P; ++s) {
      const uint8_t* __restrict__ row = codes + k * bytes;
      float* __restrict__ plane = out + k * n + s * bytes;
#pragma omp simd
      for (int64_t i = 0; i < bytes; ++i) plane[i] = static_cast<float>((row[i] >> (s * BITS)) & MASK);
    }
  }
}

// One part of one head's chosen blocks: state [R, Dv + 2] = (output in plane order, running max, running sum).
template <int BITS>
void attend(const Tier& t, int64_t head, int64_t first, int64_t last, float* state) {
  constexpr int P = 8 / BITS;
  const int64_t R = t.rows, D = t.dim, Dv = t.dim_v, G = t.group, VG = t.value_groups;
  const int64_t key_bytes = D / P, value_bytes = Dv / P, group_bytes = Dv / VG / P, width = Dv + 2;
  std::vector<float> q_step(R * D), q_low(R), logits(R * G), k_step(D), k_low(D), v_step(G * VG), v_low(G * VG);
  std::vector<float> k_tile(G * D), v_tile(G * Dv);
  for (int64_t j = first; j < last; ++j) {
    const int64_t block = head * t.blocks + t.chosen[head * t.count + j];
    const int* pos = t.positions + block * G;
    bool any = false;
    for (int64_t k = 0; k < G; ++k) any = any || pos[k] >= 0;
    if (!any) continue;
    to_float(t.key_scale + block * D, D, k_step.data());
    to_float(t.key_min + block * D, D, k_low.data());
    to_float(t.value_scale + block * G * VG, G * VG, v_step.data());
    to_float(t.value_min + block * G * VG, G * VG, v_low.data());
    for (int64_t r = 0; r < R; ++r) {  // keys: a logit is (q * scale) . code + q . minimum, q in plane order
      const float* q = t.q + (head * R + r) * D;
      for (int s = 0; s < P; ++s) {
        float* __restrict__ plane = q_step.data() + r * D + s * key_bytes;
        for (int64_t i = 0; i < key_bytes; ++i) plane[i] = q[i * P + s] * k_step[i * P + s];
      }
      q_low[r] = dot(q, k_low.data(), D);
    }
    unpack<BITS>(t.keys + block * G * key_bytes, G, D, k_tile.data());
    for (int64_t r = 0; r < R; ++r) {
      const float* __restrict__ qs = q_step.data() + r * D;
      for (int64_t k = 0; k < G; ++k) {
        const float* __restrict__ codes = k_tile.data() + k * D;
        logits[r * G + k] = pos[k] >= 0 ? (dot(qs, codes, D) + q_low[r]) * t.scale : kNegInf;
      }
    }
    unpack<BITS>(t.values + block * G * value_bytes, G, Dv, v_tile.data());
    for (int64_t k = 0; k < G; ++k) {  // values: minimum + scale * code per token and group of channels
      for (int64_t g = 0; g < VG; ++g) {
        const float low = v_low[k * VG + g], step = v_step[k * VG + g];
        for (int s = 0; s < P; ++s) {
          float* __restrict__ part = v_tile.data() + k * Dv + s * value_bytes + g * group_bytes;
#pragma omp simd
          for (int64_t i = 0; i < group_bytes; ++i) part[i] = low + step * part[i];
        }
      }
    }
    for (int64_t r = 0; r < R; ++r) {  // online softmax and P @ V
      float* __restrict__ acc = state + r * width;
      const float* row = logits.data() + r * G;
      Vec most(kNegInf);
      int64_t k0 = 0;
      for (; k0 + Vec::size() <= G; k0 += Vec::size()) most = at::vec::maximum(most, Vec::loadu(row + k0));
      float top = std::max(acc[Dv], at::vec::vec_reduce_all<float>(
                                        [](const Vec& x, const Vec& y) { return at::vec::maximum(x, y); }, most));
      for (; k0 < G; ++k0) top = std::max(top, row[k0]);
      const float rescale = std::exp(acc[Dv] - top);  // exp(-inf) = 0 before the first block
      acc[Dv + 1] *= rescale;
      for (int64_t d = 0; d < Dv; ++d) acc[d] *= rescale;
      acc[Dv] = top;
      for (int64_t k = 0; k < G; ++k) {
        if (pos[k] < 0) continue;
        const float p = std::exp(row[k] - top);
        acc[Dv + 1] += p;
        const float* __restrict__ v = v_tile.data() + k * Dv;
#pragma omp simd
        for (int64_t d = 0; d < Dv; ++d) acc[d] += p * v[d];
      }
    }
  }
}

// The chosen blocks' attention for every query row, in parts: partial [B * Hkv, parts, R, Dv + 2] holds each
// part's (output in plane order, max logit, sum of exp(logit - max)).
struct Partials {
  std::vector<float> partial;
  int64_t heads, parts, rows, dim_v, per_byte;
  const float* at(int64_t head, int64_t part, int64_t r) const {
    return partial.data() + ((head * parts + part) * rows + r) * (dim_v + 2);
  }
  // sum over parts of weight * output and of weight * sum, with weight = exp(max - top)
  float fold(int64_t head, int64_t r, float top, float* out) const {
    const int64_t value_bytes = dim_v / per_byte;
    float total = 0.f;
    for (int64_t part = 0; part < parts; ++part) {
      const float* acc = at(head, part, r);
      if (acc[dim_v] == kNegInf) continue;
      const float weight = std::exp(acc[dim_v] - top);
      total += acc[dim_v + 1] * weight;
      for (int64_t c = 0; c < dim_v; ++c) out[c] += acc[(c % per_byte) * value_bytes + c / per_byte] * weight;
    }
    return total;
  }
  float top(int64_t head, int64_t r) const {
    float most = kNegInf;
    for (int64_t part = 0; part < parts; ++part) most = std::max(most, at(head, part, r)[dim_v]);
    return most;
  }
};

Partials cold_partials(const at::Tensor& q_in, const at::Tensor& keys_in, const at::Tensor& key_scale_in,
                       const at::Tensor& key_min_in, const at::Tensor& values_in, const at::Tensor& value_scale_in,
                       const at::Tensor& value_min_in, const at::Tensor& positions_in, const at::Tensor& chosen_in,
                       int64_t bits, double scale) {
  TORCH_CHECK(q_in.scalar_type() == at::kFloat, "tier_attention: q must be float32");
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "tier_attention: bits must be 2, 4 or 8");
  const auto q = q_in.contiguous(), keys = keys_in.contiguous(), values = values_in.contiguous();
  const auto key_scale = key_scale_in.contiguous(), key_min = key_min_in.contiguous();
  const auto value_scale = value_scale_in.contiguous(), value_min = value_min_in.contiguous();
  const auto positions = positions_in.to(at::kInt).contiguous(), chosen = chosen_in.to(at::kLong).contiguous();
  const int64_t heads = q.size(0) * q.size(1), rows = q.size(2), dim_v = values.size(4) * 8 / bits;
  const Tier tier{q.data_ptr<float>(), keys.data_ptr<uint8_t>(), key_scale.data_ptr<at::Half>(),
                  key_min.data_ptr<at::Half>(), values.data_ptr<uint8_t>(), value_scale.data_ptr<at::Half>(),
                  value_min.data_ptr<at::Half>(), positions.data_ptr<int>(), chosen.data_ptr<int64_t>(),
                  rows, q.size(3), dim_v, keys.size(2), keys.size(3), value_scale.size(4), chosen.size(2),
                  static_cast<float>(scale)};
  // a head's blocks split into parts on different threads (decode has a few heads and many blocks)
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(tier.count / 16, 4));
  const int64_t width = dim_v + 2;
  Partials result{std::vector<float>(heads * parts * rows * width, 0.f), heads, parts, rows, dim_v, 8 / bits};
  for (int64_t at = dim_v; at < static_cast<int64_t>(result.partial.size()); at += width) {
    result.partial[at] = kNegInf;
  }
  at::parallel_for(0, heads * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t part = task % parts, head = task / parts;
      const int64_t first = part * tier.count / parts, last = (part + 1) * tier.count / parts;
      float* state = result.partial.data() + task * rows * width;
      if (bits == 4) {
        attend<4>(tier, head, first, last, state);
      } else if (bits == 2) {
        attend<2>(tier, head, first, last, state);
      } else {
        attend<8>(tier, head, first, last, state);
      }
    }
  });
  return result;
}

// q [B, Hkv, R, D] fp32 (a KV head's query rows); the tier's fields; chosen [B, Hkv, K] int64: the blocks to
// read. Returns (out [B, Hkv, R, Dv] fp32, lse [B, Hkv, R] fp32); a row that saw no token gets 0 and -inf.
std::tuple<at::Tensor, at::Tensor> tier_attention(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& key_scale, const at::Tensor& key_min,
    const at::Tensor& values, const at::Tensor& value_scale, const at::Tensor& value_min,
    const at::Tensor& positions, const at::Tensor& chosen, int64_t bits, double scale) {
  const Partials cold = cold_partials(q, keys, key_scale, key_min, values, value_scale, value_min, positions,
                                      chosen, bits, scale);
  const int64_t rows = cold.rows, dim_v = cold.dim_v;
  auto out = at::zeros({q.size(0), q.size(1), rows, dim_v}, q.options().dtype(at::kFloat));
  auto lse = at::full({q.size(0), q.size(1), rows}, kNegInf, out.options());
  float* out_data = out.data_ptr<float>();
  float* lse_data = lse.data_ptr<float>();
  for (int64_t head = 0; head < cold.heads; ++head) {  // merge the parts by their log-sum-exp
    for (int64_t r = 0; r < rows; ++r) {
      const float top = cold.top(head, r);
      if (top == kNegInf) continue;  // no token seen
      float* o = out_data + (head * rows + r) * dim_v;
      const float total = cold.fold(head, r, top, o);
      for (int64_t c = 0; c < dim_v; ++c) o[c] /= total;
      lse_data[head * rows + r] = top + std::log(total);
    }
  }
  return {out, lse};
}

// A decode step (one token per row) over the tier, the full-precision hot slots and the token itself, in one
// softmax: q [B, Hkv, G, D] fp32 (a KV head's query heads), the tier as for tier_attention, hot_keys /
// hot_values [B, Hkv, S, D / Dv] fp32 with hot_positions [B, Hkv, S] int64 (-1: empty), new_k / new_v
// [B, Hkv, 1, D / Dv] fp32. Returns (out [B, Hkv, G, Dv] fp32, the hot slots' masses [B, Hkv, S], the token's
// [B, Hkv, 1]): softmax probabilities pooled over the group's heads by ``reduce`` (1: max, 2: sum; 0: none).
std::tuple<at::Tensor, at::Tensor, at::Tensor> tier_decode_attention(
    const at::Tensor& q_in, const at::Tensor& keys, const at::Tensor& key_scale, const at::Tensor& key_min,
    const at::Tensor& values, const at::Tensor& value_scale, const at::Tensor& value_min,
    const at::Tensor& positions, const at::Tensor& chosen, int64_t bits, double scale,
    const at::Tensor& hot_keys_in, const at::Tensor& hot_values_in, const at::Tensor& hot_positions_in,
    const at::Tensor& new_k_in, const at::Tensor& new_v_in, int64_t reduce) {
  const auto q = q_in.contiguous();
  const Partials cold = cold_partials(q, keys, key_scale, key_min, values, value_scale, value_min, positions,
                                      chosen, bits, scale);
  const auto hot_keys = hot_keys_in.to(at::kFloat).contiguous(), hot_values = hot_values_in.to(at::kFloat).contiguous();
  const auto hot_positions = hot_positions_in.to(at::kLong).contiguous();
  const auto new_k = new_k_in.to(at::kFloat).contiguous(), new_v = new_v_in.to(at::kFloat).contiguous();
  const int64_t rows = cold.rows, dim = q.size(3), dim_v = cold.dim_v, slots = hot_keys.size(2);
  auto out = at::zeros({q.size(0), q.size(1), rows, dim_v}, q.options());
  auto mass_hot = at::zeros({q.size(0), q.size(1), slots}, q.options());
  auto mass_new = at::zeros({q.size(0), q.size(1), 1}, q.options());
  const float fscale = static_cast<float>(scale);
  const float* q_data = q.data_ptr<float>();
  const float* hk = hot_keys.data_ptr<float>();
  const float* hv = hot_values.data_ptr<float>();
  const int64_t* hp = hot_positions.data_ptr<int64_t>();
  const float* nk = new_k.data_ptr<float>();
  const float* nv = new_v.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  float* mass_hot_data = mass_hot.data_ptr<float>();
  float* mass_new_data = mass_new.data_ptr<float>();
  std::vector<float> logits(slots + 1);
  for (int64_t head = 0; head < cold.heads; ++head) {
    const float* keys_h = hk + head * slots * dim;
    const float* values_h = hv + head * slots * dim_v;
    const int64_t* pos = hp + head * slots;
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = q_data + (head * rows + r) * dim;
      float top = cold.top(head, r);
      for (int64_t t = 0; t < slots; ++t) {
        logits[t] = pos[t] >= 0 ? dot(qr, keys_h + t * dim, dim) * fscale : kNegInf;
        top = std::max(top, logits[t]);
      }
      logits[slots] = dot(qr, nk + head * dim, dim) * fscale;
      top = std::max(top, logits[slots]);
      float* o = out_data + (head * rows + r) * dim_v;
      float total = cold.fold(head, r, top, o);
      for (int64_t t = 0; t <= slots; ++t) {
        logits[t] = std::exp(logits[t] - top);  // exp(-inf) = 0 for empty slots
        total += logits[t];
      }
      for (int64_t t = 0; t < slots; ++t) {
        if (logits[t] == 0.f) continue;
        const float* v = values_h + t * dim_v;
        for (int64_t c = 0; c < dim_v; ++c) o[c] += logits[t] * v[c];
      }
      for (int64_t c = 0; c < dim_v; ++c) o[c] = (o[c] + logits[slots] * nv[head * dim_v + c]) / total;
      float* mh = mass_hot_data + head * slots;
      float* mn = mass_new_data + head;
      for (int64_t t = 0; t <= slots; ++t) {
        const float p = logits[t] / total;
        float& mass = t < slots ? mh[t] : *mn;
        mass = reduce == 1 ? std::max(mass, p) : reduce == 2 ? mass + p : 0.f;
      }
    }
  }
  return {out, mass_hot, mass_new};
}

// The most each block's keys can give a query's logit: per block, the max over the query rows of
// sum_c max(q_c * min_c, q_c * max_c), with max_c = min_c + (2^bits - 1) * scale_c the channel's code range
// (= q . min + (2^bits - 1) * relu(q) . scale, scales being >= 0). -inf for a block that holds no token.
at::Tensor tier_block_bounds(const at::Tensor& q_in, const at::Tensor& key_scale_in, const at::Tensor& key_min_in,
                             const at::Tensor& positions_in, int64_t bits) {
  const auto q = q_in.to(at::kFloat).contiguous(), key_scale = key_scale_in.contiguous();
  const auto key_min = key_min_in.contiguous(), positions = positions_in.to(at::kInt).contiguous();
  const int64_t heads = q.size(0) * q.size(1), rows = q.size(2), dim = q.size(3);
  const int64_t blocks = positions.size(2), group = positions.size(3);
  const float levels = static_cast<float>((1 << bits) - 1);
  auto bounds = at::empty({q.size(0), q.size(1), blocks}, q.options());
  const float* q_data = q.data_ptr<float>();
  const at::Half* scale_data = key_scale.data_ptr<at::Half>();
  const at::Half* min_data = key_min.data_ptr<at::Half>();
  const int* position_data = positions.data_ptr<int>();
  float* bound_data = bounds.data_ptr<float>();
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> relu(rows * dim), step(dim), low(dim);
    for (int64_t head = begin; head < end; ++head) {
      const float* qh = q_data + head * rows * dim;
      for (int64_t i = 0; i < rows * dim; ++i) relu[i] = std::max(qh[i], 0.f) * levels;
      for (int64_t j = 0; j < blocks; ++j) {
        const int64_t block = head * blocks + j;
        const int* pos = position_data + block * group;
        bool any = false;
        for (int64_t k = 0; k < group; ++k) any = any || pos[k] >= 0;
        if (!any) {
          bound_data[block] = kNegInf;
          continue;
        }
        to_float(scale_data + block * dim, dim, step.data());
        to_float(min_data + block * dim, dim, low.data());
        float best = kNegInf;
        for (int64_t r = 0; r < rows; ++r) {
          const float* qr = qh + r * dim;
          const float* rr = relu.data() + r * dim;
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t c = 0; c < dim; ++c) sum += qr[c] * low[c] + rr[c] * step[c];
          best = std::max(best, sum);
        }
        bound_data[block] = best;
      }
    }
  });
  return bounds;
}

}  // namespace

TORCH_LIBRARY(dynasparse_tier_cpu, m) {
  m.def("tier_attention(Tensor q, Tensor keys, Tensor key_scale, Tensor key_min, Tensor values, "
        "Tensor value_scale, Tensor value_min, Tensor positions, Tensor chosen, int bits, float scale) "
        "-> (Tensor, Tensor)");
  m.impl("tier_attention", c10::DispatchKey::CPU, TORCH_FN(tier_attention));
  m.def("tier_decode_attention(Tensor q, Tensor keys, Tensor key_scale, Tensor key_min, Tensor values, "
        "Tensor value_scale, Tensor value_min, Tensor positions, Tensor chosen, int bits, float scale, "
        "Tensor hot_keys, Tensor hot_values, Tensor hot_positions, Tensor new_k, Tensor new_v, int reduce) "
        "-> (Tensor, Tensor, Tensor)");
  m.impl("tier_decode_attention", c10::DispatchKey::CPU, TORCH_FN(tier_decode_attention));
  m.def("tier_block_bounds(Tensor q, Tensor key_scale, Tensor key_min, Tensor positions, int bits) -> Tensor");
  m.impl("tier_block_bounds", c10::DispatchKey::CPU, TORCH_FN(tier_block_bounds));
}
