// CudaBackend::Attention: bidirectional multi-head (or grouped-query)
// self-attention over a packed ragged batch (contract in engine/backend.h),
// fp32 throughout.
//
// Design (flash-attention style, SIMT fp32, no score matrix in memory):
//   * One block of kAttnThreads threads per (sequence, head, query tile). The
//     work list is built on the host, longest sequences first so that the
//     big blocks start early and the short ones fill the tail. Under GQA the
//     blocks of the query heads sharing a K/V head each load that head's
//     tiles themselves (L2 serves the repeats).
//   * Each query is owned by kParts = ceil(head_dim / 32) adjacent lanes; a
//     lane holds 32 dims of its query (pre-scaled by log2(e) / sqrt(head_dim))
//     and of its output accumulator in registers. head_dim is padded up to
//     32 * kParts with zeros, so one kernel per kParts (1, 2, 4, 8) covers
//     every head_dim in [1, 256]; 32 and 64 run unpadded.
//   * The block walks the whole sequence in tiles of kKeys keys: K and V of
//     the tile are loaded to shared memory (coalesced along head_dim), then
//     each lane scores kChunk keys at a time (shared-memory reads are
//     broadcasts: every lane of a query group reads the same key), sums its
//     partial dot products across its kParts lanes with xor shuffles, and
//     does one online-softmax update (running max m, running sum l, output
//     rescaled by 2^(m_old - m_new)) per chunk.
// Threads whose query lies past the end of the sequence still take part in
// the loads, barriers and shuffles (with a zero query) and just skip the
// store.
//
// At --gemm_precision fp16 / bf16, head dims that are multiples of 16 up to
// 128 take the tensor-core kernel instead (attention_mma.cu).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "engine/cuda/attention_mma.cuh"
#include "engine/cuda/cuda_backend.cuh"

namespace kiln {
namespace cuda {
namespace {

constexpr int kAttnThreads = 128;
constexpr int kMaxHeadDim = 256;
// Dims of q and o each lane keeps in registers.
constexpr int kDimsPerLane = 32;
// Shared-memory floats per 32-dim part of a key row: the 4-float pad puts the
// kParts parts a query group reads at once in distinct banks (a 128-bit load
// serves 8 lanes per phase; without the pad parts p and p+1 collide).
constexpr int kPartStride = kDimsPerLane + 4;
// Keys scored between two online-softmax updates (registers: kChunk scores).
constexpr int kChunk = 16;

template <int kParts>
struct AttnShape {
  static_assert(32 % kParts == 0, "a query group must not straddle warps");
  // Keys per shared-memory tile: K and V tiles take 18 KiB (kParts 1) or
  // 36 KiB (otherwise), under the 48 KiB static limit.
  static constexpr int kKeys = kParts <= 2 ? 64 : 128 / kParts;
  static constexpr int kRow = kParts * kPartStride;  // floats per key row
  static_assert(kKeys % kChunk == 0, "chunks must not run past a tile");
};

// One block per tile = {sequence start row, length, first query, head}.
template <int kParts>
__global__ void __launch_bounds__(kAttnThreads)
    AttentionKernel(const float* __restrict__ qkv, const int4* __restrict__ tiles, int heads,
                    int kv_heads, int head_dim, float q_scale, float* __restrict__ out) {
  using Shape = AttnShape<kParts>;
  __shared__ __align__(16) float k_tile[Shape::kKeys * Shape::kRow];
  __shared__ __align__(16) float v_tile[Shape::kKeys * Shape::kRow];

  const int4 tile = tiles[blockIdx.x];
  const int start = tile.x, len = tile.y, head = tile.w;
  const int64_t hidden = static_cast<int64_t>(heads) * head_dim;  // Q width, out row stride
  const int64_t kv_hidden = static_cast<int64_t>(kv_heads) * head_dim;
  const int64_t ld = hidden + 2 * kv_hidden;
  // Column of this head's K inside a row; its V is kv_hidden further on.
  const int64_t k_col = hidden + static_cast<int64_t>(head / (heads / kv_heads)) * head_dim;
  const int part = threadIdx.x % kParts;
  const int query = tile.z + static_cast<int>(threadIdx.x) / kParts;
  const bool active = query < len;
  const int d0 = part * kDimsPerLane;
  const int64_t head_col = static_cast<int64_t>(head) * head_dim;

  float q[kDimsPerLane], o[kDimsPerLane];
  {
    const float* q_row = qkv + (start + (active ? query : 0)) * ld + head_col;
#pragma unroll
    for (int d = 0; d < kDimsPerLane; ++d) {
      q[d] = (active && d0 + d < head_dim) ? q_row[d0 + d] * q_scale : 0.0f;
      o[d] = 0.0f;
    }
  }
  float m = -INFINITY;  // running max of the scores (log2 domain)
  float l = 0.0f;       // running sum of 2^(score - m)

  constexpr int kTileFloats = Shape::kKeys * kParts * kDimsPerLane;
  for (int k0 = 0; k0 < len; k0 += Shape::kKeys) {
    const int valid = min(Shape::kKeys, len - k0);
    __syncthreads();  // every lane is done with the previous tile
    // Rows past the sequence (and dims past head_dim) are zero-filled: a
    // masked key gets p = 0, and 0 * garbage could be NaN.
    for (int i = threadIdx.x; i < kTileFloats; i += kAttnThreads) {
      const int j = i / (kParts * kDimsPerLane);
      const int d = i % (kParts * kDimsPerLane);
      float kv = 0.0f, vv = 0.0f;
      if (j < valid && d < head_dim) {
        const float* k_row = qkv + (start + k0 + j) * ld + k_col + d;
        kv = k_row[0];
        vv = k_row[kv_hidden];
      }
      const int s = j * Shape::kRow + (d / kDimsPerLane) * kPartStride + d % kDimsPerLane;
      k_tile[s] = kv;
      v_tile[s] = vv;
    }
    __syncthreads();

    // valid is the same for the whole block, so every lane runs the same
    // chunks (the shuffles below need all 32 lanes). c0 < valid means each
    // chunk has at least one real key, so m is finite after the first one.
    for (int c0 = 0; c0 < valid; c0 += kChunk) {
      float s[kChunk];
#pragma unroll
      for (int jj = 0; jj < kChunk; ++jj) {
        const float4* kr =
            reinterpret_cast<const float4*>(k_tile + (c0 + jj) * Shape::kRow + part * kPartStride);
        float acc = 0.0f;
#pragma unroll
        for (int d4 = 0; d4 < kDimsPerLane / 4; ++d4) {
          const float4 kk = kr[d4];
          acc = fmaf(q[4 * d4 + 0], kk.x, acc);
          acc = fmaf(q[4 * d4 + 1], kk.y, acc);
          acc = fmaf(q[4 * d4 + 2], kk.z, acc);
          acc = fmaf(q[4 * d4 + 3], kk.w, acc);
        }
        s[jj] = acc;
      }
      // Butterfly sum over the query group: float addition is commutative,
      // so every lane of the group ends with the same bits.
#pragma unroll
      for (int off = 1; off < kParts; off <<= 1) {
#pragma unroll
        for (int jj = 0; jj < kChunk; ++jj) s[jj] += __shfl_xor_sync(0xffffffffu, s[jj], off);
      }
      float m_new = m;
#pragma unroll
      for (int jj = 0; jj < kChunk; ++jj) {
        if (c0 + jj >= valid) s[jj] = -INFINITY;
        m_new = fmaxf(m_new, s[jj]);
      }
      const float correction = exp2f(m - m_new);  // 0 on the first chunk
      l *= correction;
#pragma unroll
      for (int d = 0; d < kDimsPerLane; ++d) o[d] *= correction;
#pragma unroll
      for (int jj = 0; jj < kChunk; ++jj) {
        const float p = exp2f(s[jj] - m_new);
        l += p;
        const float4* vr =
            reinterpret_cast<const float4*>(v_tile + (c0 + jj) * Shape::kRow + part * kPartStride);
#pragma unroll
        for (int d4 = 0; d4 < kDimsPerLane / 4; ++d4) {
          const float4 vv = vr[d4];
          o[4 * d4 + 0] = fmaf(p, vv.x, o[4 * d4 + 0]);
          o[4 * d4 + 1] = fmaf(p, vv.y, o[4 * d4 + 1]);
          o[4 * d4 + 2] = fmaf(p, vv.z, o[4 * d4 + 2]);
          o[4 * d4 + 3] = fmaf(p, vv.w, o[4 * d4 + 3]);
        }
      }
      m = m_new;
    }
  }

  if (!active) return;
  const float inv_l = 1.0f / l;
  float* o_row = out + (start + query) * hidden + head_col;
#pragma unroll
  for (int d = 0; d < kDimsPerLane; ++d) {
    if (d0 + d < head_dim) o_row[d0 + d] = o[d] * inv_l;
  }
}

template <int kParts>
void LaunchAttention(CudaBackend& backend, const float* qkv, const int4* tiles, int num_tiles,
                     int heads, int kv_heads, int head_dim, float* out) {
  const float q_scale =
      static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(head_dim)));
  AttentionKernel<kParts><<<num_tiles, kAttnThreads, 0, backend.stream()>>>(
      qkv, tiles, heads, kv_heads, head_dim, q_scale, out);
  backend.CheckLaunch("Attention kernel");
}

// Lanes per query (kParts) for a head_dim: 32 dims per lane, padded up.
int PartsFor(int head_dim) {
  return head_dim <= 32 ? 1 : head_dim <= 64 ? 2 : head_dim <= 128 ? 4 : 8;
}

}  // namespace

void CudaBackend::Attention(const float* qkv, absl::Span<const int32_t> seq_starts, int heads,
                            int kv_heads, int head_dim, float* out) {
  const int num_seqs = static_cast<int>(seq_starts.size()) - 1;
  if (num_seqs <= 0 || heads <= 0) return;
  if (head_dim <= 0 || head_dim > kMaxHeadDim) {
    Check(cudaErrorInvalidValue, "Attention: head_dim must be in [1, 256]");
    return;
  }
  if (kv_heads <= 0 || heads % kv_heads != 0) {
    Check(cudaErrorInvalidValue, "Attention: kv_heads must divide heads");
    return;
  }
  const int parts = PartsFor(head_dim);
  const bool mma = precision_ != GemmPrecision::kFp32 && head_dim % 16 == 0 &&
                   head_dim <= kMmaMaxHeadDim && reinterpret_cast<uintptr_t>(qkv) % 16 == 0;
  const int queries = mma ? kMmaQueries : kAttnThreads / parts;

  // Sequences longest first (stable, so equal lengths keep batch order):
  // a block's cost grows with its sequence's length.
  thread_local std::vector<int> order;
  order.resize(num_seqs);
  std::iota(order.begin(), order.end(), 0);
  auto length = [&](int s) { return std::max(0, seq_starts[s + 1] - seq_starts[s]); };
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return length(a) > length(b); });
  thread_local std::vector<int4> tiles;
  tiles.clear();
  for (int s : order) {
    const int len = length(s);
    for (int q0 = 0; q0 < len; q0 += queries) {
      for (int h = 0; h < heads; ++h) tiles.push_back(make_int4(seq_starts[s], len, q0, h));
    }
  }
  if (tiles.empty()) return;  // every sequence is empty
  const int4* d_tiles = Stage<int4>(Slot::kAttnTiles, absl::MakeConstSpan(tiles));
  if (d_tiles == nullptr) return;
  const int n = static_cast<int>(tiles.size());
  if (mma) {
    LaunchMmaAttention(*this, precision_ == GemmPrecision::kBf16, qkv, d_tiles, n, heads,
                       kv_heads, head_dim, out);
    return;
  }
  switch (parts) {
    case 1:
      LaunchAttention<1>(*this, qkv, d_tiles, n, heads, kv_heads, head_dim, out);
      break;
    case 2:
      LaunchAttention<2>(*this, qkv, d_tiles, n, heads, kv_heads, head_dim, out);
      break;
    case 4:
      LaunchAttention<4>(*this, qkv, d_tiles, n, heads, kv_heads, head_dim, out);
      break;
    default:
      LaunchAttention<8>(*this, qkv, d_tiles, n, heads, kv_heads, head_dim, out);
      break;
  }
}

}  // namespace cuda
}  // namespace kiln
