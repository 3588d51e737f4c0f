#include "engine/model/encoder.h"

#include "absl/strings/str_cat.h"
#include "engine/model/bert_encoder.h"
#include "engine/model/star_encoder.h"

namespace kiln {

absl::StatusOr<std::unique_ptr<Encoder>> Encoder::Load(const EncoderConfig& config,
                                                       const PoolingConfig& pooling,
                                                       const SafetensorsFile& weights,
                                                       Backend* backend) {
  switch (config.family) {
    case ModelFamily::kBert:
      return BertEncoder::Load(config, pooling, weights, backend);
    case ModelFamily::kModularStarEncoder:
      return StarEncoder::Load(config, pooling, weights, backend);
  }
  return absl::InvalidArgumentError("Encoder::Load: unknown model family");
}

absl::Status Encoder::TakeBackendError() const {
  if (absl::Status st = backend_->TakeError(); !st.ok()) {
    return absl::InternalError(absl::StrCat("engine (", backend_->Describe(), "): ", st.message()));
  }
  return absl::OkStatus();
}

}  // namespace kiln
