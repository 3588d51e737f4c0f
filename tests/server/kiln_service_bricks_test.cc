// KilnService with a brick store: Embed with bricks against PEFT's reference
// embeddings (tests/router/testdata), every brick error with its code and
// message, new versions and broken versions while serving, a brick deleted
// from disk while resident, and mixed-brick traffic from many threads.
#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/server/kiln_service_fixture.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class KilnServiceBricksTest : public KilnServiceTest {
 protected:
  void StartWith(const std::string& root, int64_t cache_bytes = int64_t{64} << 20,
                 int max_bricks = 4) {
    Start({}, 1024,
          BrickManager::Options{.root = root,
                                .cache_bytes = cache_bytes,
                                .loader_threads = 2,
                                .max_bricks_per_request = max_bricks,
                                .max_brick_weight = 2.0f});
  }
  // One input embedded with `req`'s bricks; the status, and the vector in `out`.
  grpc::Status EmbedOne(EmbedRequest req, const std::string& text, EmbedResponse* resp) {
    req.add_inputs(text);
    return Embed(req, resp);
  }
  // A base-model request succeeds (the server keeps serving).
  void ExpectStillServing() {
    EmbedRequest req;
    req.add_inputs("still serving");
    EmbedResponse resp;
    grpc::Status st = Embed(req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    EXPECT_LE(MaxAbsDiff(resp.embeddings(0).values(), Reference("still serving", 6)), 1e-5);
  }
};

TEST_F(KilnServiceBricksTest, EmbedWithBricksMatchesPeft) {
  StartWith(kTestdata + "/bricks");
  const nlohmann::json fx = Fixture();
  const auto texts = fx["texts"].get<std::vector<std::string>>();
  const auto ids = fx["input_ids"].get<std::vector<std::vector<int32_t>>>();
  for (const nlohmann::json& c : fx["cases"]) {
    EmbedRequest req;
    for (const auto& t : texts) req.add_inputs(t);
    for (const nlohmann::json& t : c["terms"]) {
      AddBrick(req, t["brick"].get<std::string>(), 0, t["weight"].get<float>());
    }
    EmbedResponse resp;
    grpc::Status st = Embed(req, &resp);
    ASSERT_TRUE(st.ok()) << c["name"] << ": " << st.error_message();
    ASSERT_EQ(resp.embeddings_size(), static_cast<int>(texts.size()));
    ASSERT_EQ(resp.bricks_size(), static_cast<int>(c["terms"].size()));
    for (int b = 0; b < resp.bricks_size(); ++b) {
      EXPECT_EQ(resp.bricks(b).id(), c["terms"][b]["brick"].get<std::string>());
      EXPECT_EQ(resp.bricks(b).version(), 1u);
      EXPECT_FLOAT_EQ(resp.bricks(b).weight(), c["terms"][b]["weight"].get<float>());
    }
    const auto want = c["embeddings"].get<std::vector<std::vector<float>>>();
    for (size_t i = 0; i < texts.size(); ++i) {
      EXPECT_EQ(resp.embeddings(i).tokens(), ids[i].size()) << "text " << i;
      EXPECT_LE(MaxAbsDiff(resp.embeddings(i).values(), want[i]), 1e-4)
          << c["name"] << " text " << i;
    }
  }
}

TEST_F(KilnServiceBricksTest, BadBrickRequestsNameTheField) {
  StartWith(kTestdata + "/bricks", int64_t{64} << 20, /*max_bricks=*/2);
  struct Case {
    std::vector<std::tuple<std::string, uint32_t, std::optional<float>>> bricks;
    grpc::StatusCode code;
    std::string message;
  };
  const float nan = std::nanf("");
  const std::vector<Case> cases = {
      {{{"nope", 0, {}}}, grpc::StatusCode::NOT_FOUND, "bricks[0]: brick \"nope\""},
      {{{"fx-a", 7, {}}}, grpc::StatusCode::NOT_FOUND, "bricks[0]: brick \"fx-a\" version 7"},
      {{{"fx-a", 4000000000u, {}}}, grpc::StatusCode::NOT_FOUND, "version 4000000000"},
      {{{"fx-a", 0, {}}, {"fx-b", 0, {}}, {"fx-a", 0, {}}},
       grpc::StatusCode::INVALID_ARGUMENT,
       "bricks: 3 bricks exceed the limit of 2 per request (--max_bricks_per_request)"},
      {{{"fx-a", 0, {}}, {"fx-a", 0, {}}},
       grpc::StatusCode::INVALID_ARGUMENT,
       "bricks[1].id: brick \"fx-a\" is already bricks[0]"},
      {{{"../fx-a", 0, {}}}, grpc::StatusCode::INVALID_ARGUMENT, "bricks[0].id: \"../fx-a\""},
      {{{"FX-A", 0, {}}}, grpc::StatusCode::INVALID_ARGUMENT, "is not a brick id"},
      {{{"fx-a", 0, nan}}, grpc::StatusCode::INVALID_ARGUMENT, "bricks[0].weight: must be finite"},
      {{{"fx-a", 0, INFINITY}}, grpc::StatusCode::INVALID_ARGUMENT, "must be finite"},
      {{{"fx-a", 0, 2.5f}},
       grpc::StatusCode::INVALID_ARGUMENT,
       "bricks[0].weight: |2.5| exceeds --max_brick_weight 2"},
  };
  for (const Case& c : cases) {
    EmbedRequest req;
    for (const auto& [id, version, weight] : c.bricks) AddBrick(req, id, version, weight);
    EmbedResponse resp;
    grpc::Status st = EmbedOne(req, "hello", &resp);
    EXPECT_EQ(st.error_code(), c.code) << c.message << " / got: " << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr(c.message));
    ExpectStillServing();
  }
  // Negative weights are valid (task arithmetic).
  EmbedRequest negative;
  AddBrick(negative, "fx-a", 0, -2.0f);
  EmbedResponse resp;
  EXPECT_TRUE(EmbedOne(negative, "hello", &resp).ok());
}

TEST_F(KilnServiceBricksTest, BricksWithoutAStoreAreFailedPrecondition) {
  Start();
  EmbedRequest req;
  AddBrick(req, "fx-a");
  EmbedResponse resp;
  grpc::Status st = EmbedOne(req, "hello", &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(st.error_message(), HasSubstr("--brick_dir"));
  ExpectStillServing();
}

TEST_F(KilnServiceBricksTest, BrokenBricksFailTheirLoadAndNothingElse) {
  const std::string root = NewRoot("broken");
  CopyBrick("fx-b", root, "good", 1);
  CopyBrick("fx-b", root, "other-base", 1, std::string(64, '0'));
  CopyBrick("fx-a", root, "big", 1);  // 685 KB: larger than the 400 KB cache
  CopyBrick("fx-b", root, "truncated", 1);
  fs::resize_file(fs::path(root) / "truncated/1/adapter_model.safetensors", 1000);
  CopyBrick("fx-b", root, "nan", 1);
  {
    // Overwrite the last float of the data with a NaN.
    const fs::path f = fs::path(root) / "nan/1/adapter_model.safetensors";
    std::fstream io(f, std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(static_cast<std::streamoff>(fs::file_size(f)) - 4);
    const float nan = std::nanf("");
    io.write(reinterpret_cast<const char*>(&nan), 4);
  }
  // The committed ffn_partition brick (version 1 of it): a valid brick, but not
  // one a request can apply.
  fs::create_directories(fs::path(root) / "ffn-e16");
  fs::copy(std::string(KILN_SOURCE_DIR) + "/deploy/bricks/ffn-e16/1", fs::path(root) / "ffn-e16/1",
           fs::copy_options::recursive);
  StartWith(root, 400 << 10);
  const std::vector<std::tuple<std::string, grpc::StatusCode, std::string>> cases = {
      {"ffn-e16", grpc::StatusCode::INVALID_ARGUMENT,
       "bricks[0]: brick ffn-e16@1 is an \"ffn_partition\" brick, not a lora brick"},
      {"other-base", grpc::StatusCode::FAILED_PRECONDITION, "made for base model"},
      {"big", grpc::StatusCode::RESOURCE_EXHAUSTED, "big@1"},
      {"truncated", grpc::StatusCode::INVALID_ARGUMENT, "adapter_model.safetensors"},
      {"nan", grpc::StatusCode::INVALID_ARGUMENT, "NaN"},
  };
  for (const auto& [id, code, message] : cases) {
    EmbedRequest req;
    AddBrick(req, id);
    EmbedResponse resp;
    grpc::Status st = EmbedOne(req, "hello", &resp);
    EXPECT_EQ(st.error_code(), code) << id << ": " << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr(message)) << id;
    // The good brick and the base model keep serving.
    EmbedRequest good;
    AddBrick(good, "good");
    EXPECT_TRUE(EmbedOne(good, "hello", &resp).ok()) << "after " << id;
    ExpectStillServing();
  }
}

TEST_F(KilnServiceBricksTest, PolledVersionsServeNewRequestsAndABrokenOneNeverTakesOver) {
  const std::string root = NewRoot("versions");
  CopyBrick("fx-b", root, "task", 1);
  StartWith(root);
  EmbedRequest req;
  AddBrick(req, "task");
  EmbedResponse v1_resp, resp;
  ASSERT_TRUE(EmbedOne(req, "hello", &v1_resp).ok());
  EXPECT_EQ(v1_resp.bricks(0).version(), 1u);

  // A folder that appears on disk does not switch traffic by itself...
  CopyBrick("fx-a", root, "task", 2);
  ASSERT_TRUE(EmbedOne(req, "hello", &resp).ok());
  EXPECT_EQ(resp.bricks(0).version(), 1u);
  // ...until a poll (--brick_poll_s) has loaded it.
  EXPECT_EQ(bricks_->Poll(), 1);
  ASSERT_TRUE(EmbedOne(req, "hello", &resp).ok());
  EXPECT_EQ(resp.bricks(0).version(), 2u);
  EXPECT_GT(MaxAbsDiff(resp.embeddings(0).values(),
                       std::vector<float>(v1_resp.embeddings(0).values().begin(),
                                          v1_resp.embeddings(0).values().end())),
            1e-3);
  // Version 1 can still be asked for by number.
  EmbedRequest pinned;
  AddBrick(pinned, "task", 1);
  ASSERT_TRUE(EmbedOne(pinned, "hello", &resp).ok());
  EXPECT_EQ(resp.bricks(0).version(), 1u);

  // A broken version 3 fails its load in the poll and never takes over: no
  // request sees it unless it asks for it by number.
  CopyBrick("fx-a", root, "task", 3);
  fs::resize_file(fs::path(root) / "task/3/adapter_model.safetensors", 100);
  EXPECT_EQ(bricks_->Poll(), 0);
  ASSERT_TRUE(EmbedOne(req, "hello", &resp).ok());
  EXPECT_EQ(resp.bricks(0).version(), 2u);
  EmbedRequest broken;
  AddBrick(broken, "task", 3);
  grpc::Status st = EmbedOne(broken, "hello", &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  EXPECT_THAT(st.error_message(), HasSubstr("task@3"));
}

TEST_F(KilnServiceBricksTest, ABrickDeletedFromDiskServesUntilUnloaded) {
  const std::string root = NewRoot("deleted");
  CopyBrick("fx-b", root, "gone", 1);
  StartWith(root);
  EmbedRequest req;
  AddBrick(req, "gone");
  EmbedResponse resp;
  ASSERT_TRUE(EmbedOne(req, "hello", &resp).ok());
  fs::remove_all(fs::path(root) / "gone");
  ASSERT_TRUE(EmbedOne(req, "hello", &resp).ok()) << "resident: still served";
  EXPECT_EQ(resp.bricks(0).version(), 1u);
  bricks_->cache().Unload({"gone", 1});
  grpc::Status st = EmbedOne(req, "hello", &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND) << st.error_message();
  EXPECT_THAT(st.error_message(), HasSubstr("brick \"gone\""));
  ExpectStillServing();
}

TEST_F(KilnServiceBricksTest, ConcurrentMixedBrickTrafficGetsEachPlansAnswer) {
  StartWith(kTestdata + "/bricks");
  // The answers one at a time first, then the same requests from 8 threads
  // at once (so batches mix plans), each compared with its own answer.
  const std::vector<std::string> texts = {"sort a list in place", "open a file",
                                          "the quick brown fox", "parse command line flags"};
  const std::vector<std::vector<std::pair<std::string, float>>> plans = {
      {}, {{"fx-a", 1.0f}}, {{"fx-b", 1.0f}}, {{"fx-a", 0.5f}, {"fx-b", -1.0f}}};
  auto request = [&](size_t t, size_t p) {
    EmbedRequest req;
    req.add_inputs(texts[t]);
    for (const auto& [id, w] : plans[p]) AddBrick(req, id, 0, w);
    return req;
  };
  std::map<std::pair<size_t, size_t>, std::vector<float>> want;
  for (size_t t = 0; t < texts.size(); ++t) {
    for (size_t p = 0; p < plans.size(); ++p) {
      EmbedResponse resp;
      ASSERT_TRUE(Embed(request(t, p), &resp).ok());
      want[{t, p}].assign(resp.embeddings(0).values().begin(), resp.embeddings(0).values().end());
    }
  }
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int c = 0; c < 8; ++c) {
    threads.emplace_back([&, c] {
      for (int i = 0; i < 12; ++i) {
        const size_t t = (c + i) % texts.size(), p = (c * 3 + i) % plans.size();
        EmbedResponse resp;
        if (!Embed(request(t, p), &resp).ok() ||
            MaxAbsDiff(resp.embeddings(0).values(), want[{t, p}]) > 1e-5) {
          bad.fetch_add(1);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  // The plans really differ, so a mix-up would have been caught.
  for (size_t p = 1; p < plans.size(); ++p) {
    double diff = 0;
    for (size_t c = 0; c < want[{0, 0}].size(); ++c) {
      diff = std::max(diff, std::fabs(double(want[{0, 0}][c]) - want[{0, p}][c]));
    }
    EXPECT_GT(diff, 1e-3) << "plan " << p;
  }
}

}  // namespace
}  // namespace kiln
