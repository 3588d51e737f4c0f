#include "server/health_command.h"

#include <chrono>
#include <cmath>
#include <memory>

#include <grpcpp/grpcpp.h>

#include "grpc/health/v1/health.grpc.pb.h"
#include "server/status_mapping.h"

namespace kiln {

int RunHealthCommand(const HealthCommandOptions& options, std::ostream& out, std::ostream& err) {
  if (options.addr.empty() || options.addr.find(':') == std::string::npos) {
    err << "kiln health: --addr must be HOST:PORT, got '" << options.addr << "'\n";
    return 2;
  }
  if (!(options.timeout_s > 0) || !std::isfinite(options.timeout_s)) {
    err << "kiln health: --timeout_s must be > 0, got " << options.timeout_s << "\n";
    return 2;
  }
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateChannel(options.addr, grpc::InsecureChannelCredentials());
  std::unique_ptr<grpc::health::v1::Health::Stub> stub = grpc::health::v1::Health::NewStub(channel);

  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::microseconds(static_cast<int64_t>(options.timeout_s * 1e6)));
  // A server still starting may not listen yet: keep trying to connect until
  // the deadline rather than failing on the first refused connection.
  context.set_wait_for_ready(true);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(options.service);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) {
    err << "kiln health: " << options.addr << ": " << GrpcCodeLabel(status.error_code()) << ": "
        << status.error_message() << "\n";
    return 1;
  }
  out << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status()) << "\n";
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
}

}  // namespace kiln
