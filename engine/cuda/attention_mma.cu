// Attention on the tensor cores for CudaBackend::Attention (attention.cu has
// the contract, the work list and the fp32 kernel).
//
// Same tiles and online softmax as the fp32 kernel, but Q K^T and P V run on
// the tensor cores (mma.sync m16n8k16, 16-bit inputs, fp32 accumulation). A
// block has kMmaWarps = 8 warps of 16 queries, so each K/V tile is loaded and
// rounded once per 128 queries. The scores stay in the mma accumulator
// registers, whose layout is exactly the A-operand layout P needs for P V, so
// neither S nor P goes through memory. Q, K, V and P are rounded to 16 bits;
// scores, softmax statistics and O are fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "engine/cuda/attention_mma.cuh"
#include "engine/cuda/cuda_backend.cuh"

namespace kiln {
namespace cuda {
namespace {

constexpr int kMmaKeys = 64;  // keys per shared-memory tile
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
  constexpr int kKRow = kDim + kKPad;      // K tile: [key][dim]
  constexpr int kVRow = kMmaKeys + kVPad;  // V tile, transposed: [dim][key]
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
      const float2 v = *reinterpret_cast<const float2*>(qkv + (start + row) * ld + head_col + d);
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
      const uint32_t pf[4] = {
          Half2Of<T>::Pack(p[0][0], p[0][1]), Half2Of<T>::Pack(p[0][2], p[0][3]),
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
void LaunchFor(CudaBackend& backend, const float* qkv, const int4* tiles, int num_tiles, int heads,
               int kv_heads, int head_dim, float* out) {
  const float q_scale =
      static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(head_dim)));
  auto launch = [&](auto kernel) {
    kernel<<<num_tiles, 32 * kMmaWarps, 0, backend.stream()>>>(qkv, tiles, heads, kv_heads, q_scale,
                                                               out);
  };
  switch (head_dim) {
    case 16:
      launch(MmaAttentionKernel<T, 16>);
      break;
    case 32:
      launch(MmaAttentionKernel<T, 32>);
      break;
    case 48:
      launch(MmaAttentionKernel<T, 48>);
      break;
    case 64:
      launch(MmaAttentionKernel<T, 64>);
      break;
    case 80:
      launch(MmaAttentionKernel<T, 80>);
      break;
    case 96:
      launch(MmaAttentionKernel<T, 96>);
      break;
    case 112:
      launch(MmaAttentionKernel<T, 112>);
      break;
    default:
      launch(MmaAttentionKernel<T, 128>);
      break;
  }
  backend.CheckLaunch("Attention kernel (tensor cores)");
}

}  // namespace

void LaunchMmaAttention(CudaBackend& backend, bool bf16, const float* qkv, const int4* tiles,
                        int num_tiles, int heads, int kv_heads, int head_dim, float* out) {
  if (bf16) {
    LaunchFor<__nv_bfloat16>(backend, qkv, tiles, num_tiles, heads, kv_heads, head_dim, out);
  } else {
    LaunchFor<__half>(backend, qkv, tiles, num_tiles, heads, kv_heads, head_dim, out);
  }
}

}  // namespace cuda
}  // namespace kiln
