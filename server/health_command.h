// `kiln health`: a gRPC health probe for container health checks and
// scripts. It calls grpc.health.v1.Health/Check on a running `kiln serve`
// and answers through its exit status:
//
//   kiln health [--addr=127.0.0.1:50051] [--service=] [--timeout_s=5]
//
//   0  the server answered SERVING
//   1  it answered anything else (NOT_SERVING while warming up or draining),
//      or could not be reached within --timeout_s
//   2  a flag is wrong (never a verdict about the server)
//
// It prints one line: the status name on stdout, or on stderr why the call
// failed (address, gRPC code and message). The Dockerfile's HEALTHCHECK runs
// it; Kubernetes uses its own native gRPC probe against the same service.
#ifndef KILN_SERVER_HEALTH_COMMAND_H_
#define KILN_SERVER_HEALTH_COMMAND_H_

#include <ostream>
#include <string>

namespace kiln {

struct HealthCommandOptions {
  std::string addr = "127.0.0.1:50051";  // host:port of the gRPC server
  std::string service;                   // "" = the whole server
  double timeout_s = 5.0;                // connect + call deadline, seconds
};

// Runs the probe; returns the process exit status above. Thread-compatible;
// blocks for at most about timeout_s.
int RunHealthCommand(const HealthCommandOptions& options, std::ostream& out, std::ostream& err);

}  // namespace kiln

#endif  // KILN_SERVER_HEALTH_COMMAND_H_
