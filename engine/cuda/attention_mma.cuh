// The tensor-core attention kernel (attention_mma.cu), which
// CudaBackend::Attention (attention.cu) runs at --gemm_precision fp16 / bf16
// for head dims that are multiples of 16 up to kMmaMaxHeadDim.
#ifndef KILN_ENGINE_CUDA_ATTENTION_MMA_CUH_
#define KILN_ENGINE_CUDA_ATTENTION_MMA_CUH_

#include <cuda_runtime.h>

namespace kiln {
namespace cuda {

class CudaBackend;

inline constexpr int kMmaWarps = 8;
inline constexpr int kMmaQueries = 16 * kMmaWarps;  // queries per block (per work-list tile)
inline constexpr int kMmaMaxHeadDim = 128;

// Enqueues the kernel on the backend's stream for the work list `tiles`
// ({sequence start row, length, first query, head}, kMmaQueries queries a
// tile), rounding Q, K, V and P to bf16 (bf16) or fp16. head_dim must be a
// multiple of 16 up to kMmaMaxHeadDim and qkv 16-byte aligned.
void LaunchMmaAttention(CudaBackend& backend, bool bf16, const float* qkv, const int4* tiles,
                        int num_tiles, int heads, int kv_heads, int head_dim, float* out);

}  // namespace cuda
}  // namespace kiln

#endif  // KILN_ENGINE_CUDA_ATTENTION_MMA_CUH_
