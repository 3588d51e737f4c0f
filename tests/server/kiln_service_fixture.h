// The in-process server fixture shared by tests/server/kiln_service*_test.cc:
// a real gRPC server on loopback with the default model (and optionally a
// brick store), driven through the generated C++ client.
#ifndef KILN_TESTS_SERVER_KILN_SERVICE_FIXTURE_H_
#define KILN_TESTS_SERVER_KILN_SERVICE_FIXTURE_H_

#include <grpcpp/grpcpp.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "router/brick_manager.h"
#include "server/admin_service.h"
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
    if (bricks.has_value()) {
      auto manager = BrickManager::Create(*bricks, model_->config(), backend_.get());
      ASSERT_TRUE(manager.ok()) << manager.status();
      bricks_ = *std::move(manager);
    }
    // BrickAdmin on the same server (the real one has its own port).
    admin_ =
        std::make_unique<AdminService>(AdminService::Options{.token = admin_token_}, bricks_.get());
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    builder.RegisterService(admin_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                       grpc::InsecureChannelCredentials());
    stub_ = v1::Kiln::NewStub(channel);
    admin_stub_ = v1::BrickAdmin::NewStub(channel);
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
  std::string admin_token_;  // set before Start to require a token
  std::unique_ptr<AdminService> admin_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::Kiln::Stub> stub_;
  std::unique_ptr<v1::BrickAdmin::Stub> admin_stub_;
};

inline double MaxAbsDiff(const google::protobuf::RepeatedField<float>& a,
                         const std::vector<float>& b) {
  double m = 0;
  for (int i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(double(a[i]) - b[i]));
  return a.size() == static_cast<int>(b.size()) ? m : 1e9;
}

// --- bricks -------------------------------------------------------------

const std::string kTestdata = std::string(KILN_SOURCE_DIR) + "/tests/router/testdata";

inline nlohmann::json Fixture() {
  std::ifstream in(kTestdata + "/brick_embeddings.json");
  EXPECT_TRUE(in) << "missing brick_embeddings.json";
  return nlohmann::json::parse(in);
}

// A fresh brick root under the test's temp dir.
inline std::string NewRoot(const std::string& name) {
  const std::filesystem::path root =
      std::filesystem::path(::testing::TempDir()) / ("kiln_bricks_" + name);
  std::filesystem::remove_all(root);
  std::filesystem::create_directories(root);
  return root.string();
}

// Copies fixture brick `from` (fx-a / fx-b, version 1) to <root>/<id>/<version>,
// rewriting the manifest's id and version (and, if given, its fingerprint).
inline void CopyBrick(const std::string& from, const std::string& root, const std::string& id,
                      int version, const std::string& fingerprint = "") {
  const std::filesystem::path dst = std::filesystem::path(root) / id / std::to_string(version);
  std::filesystem::create_directories(dst);
  const std::filesystem::path src = std::filesystem::path(kTestdata) / "bricks" / from / "1";
  std::filesystem::copy_file(src / "adapter_config.json", dst / "adapter_config.json");
  std::filesystem::copy_file(src / "adapter_model.safetensors", dst / "adapter_model.safetensors");
  std::ifstream in(src / "brick.json");
  nlohmann::json manifest = nlohmann::json::parse(in);
  manifest["id"] = id;
  manifest["version"] = version;
  if (!fingerprint.empty()) manifest["base_model"]["fingerprint"] = fingerprint;
  std::ofstream(dst / "brick.json") << manifest.dump(2);
}

inline v1::BrickRef* AddBrick(EmbedRequest& req, const std::string& id, uint32_t version = 0,
                              std::optional<float> weight = std::nullopt) {
  v1::BrickRef* b = req.add_bricks();
  b->set_id(id);
  b->set_version(version);
  if (weight.has_value()) b->set_weight(*weight);
  return b;
}

}  // namespace kiln

#endif  // KILN_TESTS_SERVER_KILN_SERVICE_FIXTURE_H_
