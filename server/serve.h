// `kiln serve`: the gRPC server process. See RunServe.
#ifndef KILN_SERVER_SERVE_H_
#define KILN_SERVER_SERVE_H_

#include <cstdint>
#include <string>
#include <vector>

namespace kiln {

struct ServeOptions {
  std::string model = "models/all-MiniLM-L6-v2";
  std::string host = "127.0.0.1";
  int port = 50051;          // 0 = any free port (logged)
  int metrics_port = 9464;   // 0 = any free port (logged)
  int max_batch_tokens = 0;  // 0 = the device's default (2048 on the CPU, 16384 on CUDA)
  int max_queue_delay_us = 0;
  int max_queue_requests = 1024;
  int max_client_batch = 64;
  int threads = 0;  // CPU backend threads; 0 = all cores
  // The engine's device (engine/device.h): "auto" (CUDA when a usable GPU
  // answers, else the CPU with one log line saying why), "cpu" or "cuda"
  // (a start-up error without a usable GPU).
  std::string device = "auto";
  int cuda_device = 0;
  std::string gemm_precision = "fp16";  // CUDA GEMM inputs: fp16, bf16 or fp32
  int drain_timeout_s = 30;
  bool log_requests = false;
  // Bricks (docs/BRICKS.md). An empty brick_dir serves the base model only.
  std::string brick_dir;
  int64_t brick_cache_bytes = int64_t{256} << 20;
  int brick_loader_threads = 2;
  std::vector<std::string> preload_bricks;  // ids; their latest versions load before SERVING
  int max_bricks_per_request = 4;
  float max_brick_weight = 2.0f;
  int brick_metrics_max = 100;
  int brick_poll_s = 0;  // 0 = never poll the store for new versions
  // BrickAdmin (only served with a brick store).
  std::string admin_host = "127.0.0.1";
  int admin_port = 50052;        // 0 = any free port (logged)
  std::string admin_token_file;  // empty = no token (loopback hosts only)
  // Routing (docs/ROUTING.md); only with a brick store.
  std::string default_routing = "auto";  // "auto" or "none"
  int router_exit = 6;
  int router_cache_entries = 4096;
  int router_top_k = 1;
  float router_min_score = 0.4f;
  float router_temperature = 0.05f;
  // Emergent bricks: the ffn_partition brick ffn_fraction < 1 runs with;
  // empty = the only one in the store.
  std::string ffn_partition;
};

// Runs the server until SIGTERM or SIGINT, then drains and returns the
// process exit status: 0 after a drain, 1 if the server could not start
// (address in use, ...), 2 for bad options or a bad model folder. Must be
// called from main() before any other thread exists (it blocks the two
// signals process-wide and waits for them with sigwait).
int RunServe(const ServeOptions& options);

}  // namespace kiln

#endif  // KILN_SERVER_SERVE_H_
