// The in-process server fixture shared by tests/server/kiln_service*_test.cc:
// a real gRPC server on loopback with the default model (and optionally a
// brick store), driven through the generated C++ client.
#ifndef KILN_TESTS_SERVER_KILN_SERVICE_FIXTURE_H_
#define KILN_TESTS_SERVER_KILN_SERVICE_FIXTURE_H_

#include <grpcpp/grpcpp.h>

#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "gtest/gtest.h"
#include "router/brick_manager.h"
#include "server/batcher.h"
#include "server/kiln_service.h"
#include "server/metrics.h"

namespace kiln {

using v1::EmbedRequest;
using v1::EmbedResponse;

const std::string kModelDir = std::string(KILN_SOURCE_DIR) + "/models/all-MiniLM-L6-v2";

class KilnServiceTest : public ::testing::Test {
 protected:
  // `bricks`: serve a brick store too (BrickManager over the served model).
  void Start(ServiceOptions options = {}, int max_queue_requests = 1024,
             std::optional<BrickManager::Options> bricks = std::nullopt) {
    backend_ = CpuBackend::Create({.threads = 2});
    auto model = EmbeddingModel::Load(kModelDir, backend_.get());
    ASSERT_TRUE(model.ok()) << model.status() << " (run scripts/fetch_model.sh)";
    model_ = *std::move(model);
    auto metrics =
        Metrics::Create({.listen = "", .device = "cpu", .model_id = "", .version = "test"});
    ASSERT_TRUE(metrics.ok()) << metrics.status();
    metrics_ = *std::move(metrics);
    Batcher::Options bo;
    bo.max_queue_requests = max_queue_requests;
    auto batcher = Batcher::Create(bo, model_.get());
    ASSERT_TRUE(batcher.ok()) << batcher.status();
    batcher_ = *std::move(batcher);
    service_ = std::make_unique<KilnService>(options, metrics_.get());
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = v1::Kiln::NewStub(grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                                  grpc::InsecureChannelCredentials()));
    if (bricks.has_value()) {
      auto manager = BrickManager::Create(*bricks, model_->config(), backend_.get());
      ASSERT_TRUE(manager.ok()) << manager.status();
      bricks_ = *std::move(manager);
    }
    service_->Attach(model_.get(), batcher_.get(), bricks_.get());
    service_->SetReady(true);
  }
  void TearDown() override {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    if (batcher_) batcher_->Drain(absl::Now() + absl::Seconds(5));
  }

  grpc::Status Embed(const EmbedRequest& req, EmbedResponse* resp,
                     std::chrono::milliseconds deadline = std::chrono::seconds(60)) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + deadline);
    return stub_->Embed(&ctx, req, resp);
  }

  // The engine's own answer for one text (what `kiln embed` prints).
  std::vector<float> Reference(const std::string& text, int exit, bool normalize = true) {
    auto enc = model_->Tokenize(text);
    EXPECT_TRUE(enc.ok());
    SequenceInput seq{enc->ids, exit};
    seq.normalize = normalize;
    std::vector<float> out(model_->dim());
    EXPECT_TRUE(model_->Forward(std::vector<SequenceInput>{seq}, out.data()).ok());
    return out;
  }

  std::unique_ptr<Backend> backend_;
  std::unique_ptr<EmbeddingModel> model_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<BrickManager> bricks_;  // destroyed after the batcher (its jobs hold pins)
  std::unique_ptr<Batcher> batcher_;
  std::unique_ptr<KilnService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::Kiln::Stub> stub_;
};

inline double MaxAbsDiff(const google::protobuf::RepeatedField<float>& a,
                         const std::vector<float>& b) {
  double m = 0;
  for (int i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(double(a[i]) - b[i]));
  return a.size() == static_cast<int>(b.size()) ? m : 1e9;
}

}  // namespace kiln

#endif  // KILN_TESTS_SERVER_KILN_SERVICE_FIXTURE_H_
