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
// 128 take MmaAttentionKernel instead: the same tiles and online softmax, but
// Q K^T and P V run on the tensor cores (mma.sync m16n8k16, 16-bit inputs,
// fp32 accumulation). A block has 8 warps (128 queries, so each K/V tile is
// loaded and rounded once per 128 queries); each warp owns 16 queries; the scores stay in the mma
// accumulator registers, whose layout is exactly the A-operand layout P needs
// for P V, so neither S nor P goes through memory. Q, K, V and P are rounded
// to 16 bits; scores, softmax statistics and O are fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

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

// --- tensor-core path ---------------------------------------------------------

constexpr int kMmaWarps = 8;
constexpr int kMmaQueries = 16 * kMmaWarps;  // queries per block
constexpr int kMmaKeys = 64;                 // keys per shared-memory tile
constexpr int kMmaMaxHeadDim = 128;
// Row pads (in 16-bit elements) that spread a fragment load's 32 lanes over
// distinct banks: K rows of head_dim + 8, V^T rows of kMmaKeys + 8.
constexpr int kKPad = 8, kVPad = 8;

template <typename T>
struct Half2Of;
template <>
struct Half2Of<__half> {
  static __device__ uint32_t Pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __half From(float x) { return __float2half_rn(x); }
};
template <>
struct Half2Of<__nv_bfloat16> {
  static __device__ uint32_t Pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __nv_bfloat16 From(float x) { return __float2bfloat16_rn(x); }
};

// d += a * b for one m16n8k16 tile (a: 4 registers, b: 2, d: 4 floats).
template <typename T>
__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// One block per tile = {sequence start row, length, first query, head}, as
// AttentionKernel, with kMmaQueries queries a tile. kDim = head_dim.
// Fragment layouts (PTX ISA, mma.m16n8k16 with 16-bit inputs), for lane
// g * 4 + t: A holds rows g and g + 8, columns 2t, 2t + 1 and 2t + 8, 2t + 9;
// B holds rows (k) 2t, 2t + 1 and 2t + 8, 2t + 9 of column g; the fp32
// accumulator holds rows g and g + 8, columns 2t and 2t + 1.
template <typename T, int kDim>
__global__ void __launch_bounds__(32 * kMmaWarps)
    MmaAttentionKernel(const float* __restrict__ qkv, const int4* __restrict__ tiles, int heads,
                       int kv_heads, float q_scale, float* __restrict__ out) {
  static_assert(kDim % 16 == 0 && kDim <= kMmaMaxHeadDim, "head_dim: a multiple of 16 <= 128");
  constexpr int kKRow = kDim + kKPad;        // K tile: [key][dim]
  constexpr int kVRow = kMmaKeys + kVPad;    // V tile, transposed: [dim][key]
  __shared__ __align__(16) T k_tile[kMmaKeys * kKRow];
  __shared__ __align__(16) T v_tile[kDim * kVRow];

  const int4 tile = tiles[blockIdx.x];
  const int start = tile.x, len = tile.y, head = tile.w;
  const int64_t hidden = static_cast<int64_t>(heads) * kDim;
  const int64_t kv_hidden = static_cast<int64_t>(kv_heads) * kDim;
  const int64_t ld = hidden + 2 * kv_hidden;
  const int64_t k_col = hidden + static_cast<int64_t>(head / (heads / kv_heads)) * kDim;
  const int64_t head_col = static_cast<int64_t>(head) * kDim;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int q0 = tile.z + warp * 16;  // this warp's first query
  const int row_a = q0 + g, row_b = q0 + g + 8;
  const bool warp_active = q0 < len;

  // Q as A fragments, pre-scaled by log2(e) / sqrt(head_dim); rows past the
  // sequence are zero.
  uint32_t qf[kDim / 16][4];
  {
    auto q_at = [&](int row, int d) -> float2 {
      if (row >= len) return make_float2(0.0f, 0.0f);
      const float2 v =
          *reinterpret_cast<const float2*>(qkv + (start + row) * ld + head_col + d);
      return make_float2(v.x * q_scale, v.y * q_scale);
    };
#pragma unroll
    for (int kc = 0; kc < kDim / 16; ++kc) {
      const int d = kc * 16 + 2 * t;
      float2 v = q_at(row_a, d);
      qf[kc][0] = Half2Of<T>::Pack(v.x, v.y);
      v = q_at(row_b, d);
      qf[kc][1] = Half2Of<T>::Pack(v.x, v.y);
      v = q_at(row_a, d + 8);
      qf[kc][2] = Half2Of<T>::Pack(v.x, v.y);
      v = q_at(row_b, d + 8);
      qf[kc][3] = Half2Of<T>::Pack(v.x, v.y);
    }
  }
  float o[kDim / 8][4];
#pragma unroll
  for (int nb = 0; nb < kDim / 8; ++nb) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.0f;
  float m_a = -INFINITY, m_b = -INFINITY;  // running max, rows g and g + 8 (log2 domain)
  float l_a = 0.0f, l_b = 0.0f;            // this lane's share of the running sums

  for (int k0 = 0; k0 < len; k0 += kMmaKeys) {
    const int valid = min(kMmaKeys, len - k0);
    __syncthreads();  // every warp is done with the previous tile
    // K and V rows past the sequence are zero (a masked key gets p = 0, and
    // 0 * garbage could be NaN). Loads run along head_dim, 4 floats a lane
    // (coalesced; qkv is 16-byte aligned, CudaBackend::Attention checks).
    for (int i = threadIdx.x; i < kMmaKeys * kDim / 4; i += 32 * kMmaWarps) {
      const int j = i / (kDim / 4), d = (i % (kDim / 4)) * 4;
      float4 kv = make_float4(0.0f, 0.0f, 0.0f, 0.0f), vv = kv;
      if (j < valid) {
        const float* k_row = qkv + (start + k0 + j) * ld + k_col + d;
        kv = *reinterpret_cast<const float4*>(k_row);
        vv = *reinterpret_cast<const float4*>(k_row + kv_hidden);
      }
      *reinterpret_cast<uint2*>(k_tile + j * kKRow + d) =
          make_uint2(Half2Of<T>::Pack(kv.x, kv.y), Half2Of<T>::Pack(kv.z, kv.w));
      v_tile[(d + 0) * kVRow + j] = Half2Of<T>::From(vv.x);
      v_tile[(d + 1) * kVRow + j] = Half2Of<T>::From(vv.y);
      v_tile[(d + 2) * kVRow + j] = Half2Of<T>::From(vv.z);
      v_tile[(d + 3) * kVRow + j] = Half2Of<T>::From(vv.w);
    }
    __syncthreads();
    if (!warp_active) continue;

    // S = Q K^T for the tile's 64 keys: 8 accumulators of 16 x 8.
    float s[kMmaKeys / 8][4];
#pragma unroll
    for (int nb = 0; nb < kMmaKeys / 8; ++nb) {
      s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
      const T* k_row = k_tile + (nb * 8 + g) * kKRow + 2 * t;
#pragma unroll
      for (int kc = 0; kc < kDim / 16; ++kc) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(k_row + kc * 16);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(k_row + kc * 16 + 8);
        Mma<T>(s[nb], qf[kc], b0, b1);
      }
    }
    // Mask keys past the sequence, then the online-softmax update per row.
    float mx_a = m_a, mx_b = m_b;
#pragma unroll
    for (int nb = 0; nb < kMmaKeys / 8; ++nb) {
      const int key = nb * 8 + 2 * t;
      if (key >= valid) s[nb][0] = s[nb][2] = -INFINITY;
      if (key + 1 >= valid) s[nb][1] = s[nb][3] = -INFINITY;
      mx_a = fmaxf(mx_a, fmaxf(s[nb][0], s[nb][1]));
      mx_b = fmaxf(mx_b, fmaxf(s[nb][2], s[nb][3]));
    }
    // The 4 lanes of a row group hold its 64 scores between them.
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
    // Key 0 of every tile is real, so mx_* is finite from the first tile on.
    const float corr_a = exp2f(m_a - mx_a), corr_b = exp2f(m_b - mx_b);
    m_a = mx_a;
    m_b = mx_b;
    l_a *= corr_a;
    l_b *= corr_b;
#pragma unroll
    for (int nb = 0; nb < kDim / 8; ++nb) {
      o[nb][0] *= corr_a;
      o[nb][1] *= corr_a;
      o[nb][2] *= corr_b;
      o[nb][3] *= corr_b;
    }
    // O += P V, 16 keys at a time: the accumulators of key blocks 2kb and
    // 2kb + 1 are P's A fragment.
#pragma unroll
    for (int kb = 0; kb < kMmaKeys / 16; ++kb) {
      float p[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 4; ++e) p[h][e] = exp2f(s[2 * kb + h][e] - (e < 2 ? m_a : m_b));
        l_a += p[h][0] + p[h][1];
        l_b += p[h][2] + p[h][3];
      }
      const uint32_t pf[4] = {Half2Of<T>::Pack(p[0][0], p[0][1]), Half2Of<T>::Pack(p[0][2], p[0][3]),
                              Half2Of<T>::Pack(p[1][0], p[1][1]), Half2Of<T>::Pack(p[1][2], p[1][3])};
#pragma unroll
      for (int nb = 0; nb < kDim / 8; ++nb) {
        const T* v_row = v_tile + (nb * 8 + g) * kVRow + kb * 16 + 2 * t;
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(v_row);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(v_row + 8);
        Mma<T>(o[nb], pf, b0, b1);
      }
    }
  }

  if (!warp_active) return;
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
  const float inv_a = 1.0f / l_a, inv_b = 1.0f / l_b;
#pragma unroll
  for (int nb = 0; nb < kDim / 8; ++nb) {
    const int d = nb * 8 + 2 * t;
    if (row_a < len) {
      *reinterpret_cast<float2*>(out + (start + row_a) * hidden + head_col + d) =
          make_float2(o[nb][0] * inv_a, o[nb][1] * inv_a);
    }
    if (row_b < len) {
      *reinterpret_cast<float2*>(out + (start + row_b) * hidden + head_col + d) =
          make_float2(o[nb][2] * inv_b, o[nb][3] * inv_b);
    }
  }
}

template <typename T>
void LaunchMmaAttention(CudaBackend& backend, const float* qkv, const int4* tiles, int num_tiles,
                        int heads, int kv_heads, int head_dim, float* out) {
  const float q_scale =
      static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(head_dim)));
  auto launch = [&](auto kernel) {
    kernel<<<num_tiles, 32 * kMmaWarps, 0, backend.stream()>>>(qkv, tiles, heads, kv_heads,
                                                                q_scale, out);
  };
  switch (head_dim) {
    case 16: launch(MmaAttentionKernel<T, 16>); break;
    case 32: launch(MmaAttentionKernel<T, 32>); break;
    case 48: launch(MmaAttentionKernel<T, 48>); break;
    case 64: launch(MmaAttentionKernel<T, 64>); break;
    case 80: launch(MmaAttentionKernel<T, 80>); break;
    case 96: launch(MmaAttentionKernel<T, 96>); break;
    case 112: launch(MmaAttentionKernel<T, 112>); break;
    default: launch(MmaAttentionKernel<T, 128>); break;
  }
  backend.CheckLaunch("Attention kernel (tensor cores)");
}

// --- fp32 path ----------------------------------------------------------------

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
    if (precision_ == GemmPrecision::kBf16) {
      LaunchMmaAttention<__nv_bfloat16>(*this, qkv, d_tiles, n, heads, kv_heads, head_dim, out);
    } else {
      LaunchMmaAttention<__half>(*this, qkv, d_tiles, n, heads, kv_heads, head_dim, out);
    }
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
