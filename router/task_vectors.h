// Task-vector arithmetic for merging LoRA bricks (router/merge.h describes
// the methods and the DARE random stream): one module's dense delta, TIES's
// trim and disjoint mean, DARE's drop and rescale, and a weighted sum. All in
// double, on row-major [out, in] matrices.
#ifndef KILN_ROUTER_TASK_VECTORS_H_
#define KILN_ROUTER_TASK_VECTORS_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "engine/lora.h"

namespace kiln {

// tau = scale * B A, [out, in] row-major.
std::vector<double> TaskVector(const LoraHostModule& m, size_t out, size_t in);

// TIES step (1): keeps the floor(density * n) entries of largest magnitude
// (ties at the threshold in index order) and zeroes the rest.
void Trim(std::vector<double>& tau, float density);

// DARE's drop and rescale for input `input` on module (layer, target), with
// the stream documented in merge.h.
void Drop(std::vector<double>& tau, float density, uint64_t seed, int input, int layer,
          LoraTarget target);

// TIES steps (2) and (3): sign election and weighted disjoint mean.
// `taus` is not empty and its vectors have one size.
std::vector<double> DisjointMean(const std::vector<std::vector<double>>& taus,
                                 const std::vector<double>& weights);

// sum_i weights[i] * taus[i]; `taus` is not empty and its vectors have one size.
std::vector<double> WeightedSum(const std::vector<std::vector<double>>& taus,
                                const std::vector<double>& weights);

}  // namespace kiln

#endif  // KILN_ROUTER_TASK_VECTORS_H_
