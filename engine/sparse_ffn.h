// PLACEHOLDER until branch sparse-engine merges (replaced by its header).
#ifndef KILN_ENGINE_SPARSE_FFN_H_
#define KILN_ENGINE_SPARSE_FFN_H_
#include "engine/device_brick.h"
namespace kiln {
class SparseFfn : public DeviceBrick {};
}  // namespace kiln
#endif  // KILN_ENGINE_SPARSE_FFN_H_
