// The one place where absl::Status becomes grpc::Status. Codes carry over
// one to one (both use the google.rpc.Code numbering); the message is kept.
#ifndef KILN_SERVER_STATUS_MAPPING_H_
#define KILN_SERVER_STATUS_MAPPING_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace kiln {

grpc::Status ToGrpcStatus(const absl::Status& status);

// The lower-case label used for the `code` label of kiln_requests_total,
// e.g. "ok", "invalid_argument".
const char* GrpcCodeLabel(grpc::StatusCode code);

}  // namespace kiln

#endif  // KILN_SERVER_STATUS_MAPPING_H_
