// BrickAdmin in-process (on the fixture's server, beside Kiln): listing,
// registering from a folder and from bytes while Embed traffic runs,
// load / unload / delete, merging, the bearer token, and every refusal with
// its code and message.
#include <atomic>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/server/kiln_service_fixture.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string ReadFile(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

class AdminServiceTest : public KilnServiceTest {
 protected:
  void StartWith(const std::string& root) {
    Start({}, 1024, BrickManager::Options{.root = root, .cache_bytes = int64_t{64} << 20});
  }
  template <typename Req, typename Resp, typename Call>
  grpc::Status Admin(Call call, const Req& req, Resp* resp, const std::string& token = "") {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
    return (admin_stub_.get()->*call)(&ctx, req, resp);
  }
  // The version an Embed with brick `id` (latest) runs on; 0 on error.
  uint32_t ServedVersion(const std::string& id) {
    EmbedRequest req;
    req.add_inputs("which version");
    AddBrick(req, id);
    EmbedResponse resp;
    return Embed(req, &resp).ok() ? resp.bricks(0).version() : 0;
  }
};

TEST_F(AdminServiceTest, ListGetAndResidency) {
  const std::string root = NewRoot("admin_list");
  CopyBrick("fx-a", root, "alpha", 1);
  CopyBrick("fx-b", root, "alpha", 2);
  CopyBrick("fx-b", root, "beta", 1);
  StartWith(root);
  v1::ListBricksResponse list;
  ASSERT_TRUE(Admin(&v1::BrickAdmin::Stub::ListBricks, v1::ListBricksRequest(), &list).ok());
  ASSERT_EQ(list.bricks_size(), 2);
  EXPECT_EQ(list.bricks(0).id(), "alpha");
  EXPECT_THAT(list.bricks(0).versions(), ElementsAre(1u, 2u));
  EXPECT_EQ(list.bricks(0).latest(), 2u);
  EXPECT_TRUE(list.bricks(0).resident_versions().empty());
  EXPECT_EQ(list.cache_budget_bytes(), uint64_t{64} << 20);

  v1::BrickVersionRef ref;
  ref.set_id("alpha");
  ref.set_version(1);
  v1::BrickInfo info;
  ASSERT_TRUE(Admin(&v1::BrickAdmin::Stub::LoadBrick, ref, &info).ok());
  EXPECT_TRUE(info.resident());
  EXPECT_FALSE(info.latest());
  EXPECT_EQ(info.kind(), "lora");
  EXPECT_EQ(info.base_fingerprint(), bricks_->fingerprint());

  v1::GetBrickRequest get;
  get.set_id("alpha");
  ASSERT_TRUE(Admin(&v1::BrickAdmin::Stub::GetBrick, get, &info).ok());
  EXPECT_EQ(info.version(), 2u);
  EXPECT_TRUE(info.latest());
  EXPECT_FALSE(info.resident());

  ASSERT_TRUE(Admin(&v1::BrickAdmin::Stub::ListBricks, v1::ListBricksRequest(), &list).ok());
  EXPECT_THAT(list.bricks(0).resident_versions(), ElementsAre(1u));
  EXPECT_GT(list.cache_bytes(), 0u);
  ASSERT_TRUE(Admin(&v1::BrickAdmin::Stub::UnloadBrick, ref, &info).ok());
  ASSERT_TRUE(Admin(&v1::BrickAdmin::Stub::ListBricks, v1::ListBricksRequest(), &list).ok());
  EXPECT_TRUE(list.bricks(0).resident_versions().empty());

  get.set_id("nope");
  grpc::Status st = Admin(&v1::BrickAdmin::Stub::GetBrick, get, &info);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(st.error_message(), HasSubstr("brick \"nope\""));
}

TEST_F(AdminServiceTest, RegisterSwitchesNewRequestsWhileTrafficRuns) {
  const std::string root = NewRoot("admin_register");
  CopyBrick("fx-b", root, "task", 1);
  CopyBrick("fx-a", root + "/incoming", "task-next", 9);  // a staging folder under the root
  StartWith(root);
  ASSERT_EQ(ServedVersion("task"), 1u);

  // Mixed traffic on "task" (latest) and the base model while versions
  // change: nothing may fail.
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0}, done{0};
  std::vector<std::thread> clients;
  // Stops and joins the clients however the test ends.
  struct Joiner {
    std::atomic<bool>& stop;
    std::vector<std::thread>& threads;
    ~Joiner() {
      stop = true;
      for (auto& t : threads) t.join();
    }
  } joiner{stop, clients};
  for (int c = 0; c < 4; ++c) {
    clients.emplace_back([&, c] {
      while (!stop.load()) {
        EmbedRequest req;
        req.add_inputs("traffic " + std::to_string(c));
        if (c % 2 == 0) AddBrick(req, "task");
        EmbedResponse resp;
        if (!Embed(req, &resp).ok()) failures.fetch_add(1);
        done.fetch_add(1);
      }
    });
  }
  v1::RegisterBrickRequest reg;
  reg.set_id("task");
  reg.set_folder("incoming/task-next/9");
  v1::BrickInfo info;
  grpc::Status st = Admin(&v1::BrickAdmin::Stub::RegisterBrick, reg, &info);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(info.version(), 2u);
  EXPECT_TRUE(info.latest());
  EXPECT_TRUE(info.resident());
  EXPECT_EQ(ServedVersion("task"), 2u);

  // From bytes, with an explicit version.
  const fs::path src = fs::path(kTestdata) / "bricks/fx-b/1";
  v1::RegisterBrickRequest upload;
  upload.set_id("task");
  upload.set_version(5);
  upload.mutable_files()->set_adapter_config_json(ReadFile(src / "adapter_config.json"));
  upload.mutable_files()->set_adapter_model_safetensors(
      ReadFile(src / "adapter_model.safetensors"));
  upload.mutable_files()->set_brick_json(ReadFile(src / "brick.json"));
  st = Admin(&v1::BrickAdmin::Stub::RegisterBrick, upload, &info);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(info.version(), 5u);
  EXPECT_EQ(ServedVersion("task"), 5u);
  // The same version again is refused; a new id grows the set.
  st = Admin(&v1::BrickAdmin::Stub::RegisterBrick, upload, &info);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::ALREADY_EXISTS) << st.error_message();
  upload.set_id("brand-new");
  upload.set_version(0);
  ASSERT_TRUE(Admin(&v1::BrickAdmin::Stub::RegisterBrick, upload, &info).ok());
  EXPECT_EQ(info.version(), 1u);
  EXPECT_EQ(ServedVersion("brand-new"), 1u);

  while (done.load() < 20) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  stop = true;
  for (auto& t : clients) t.join();
  clients.clear();
  EXPECT_EQ(failures.load(), 0);
}

TEST_F(AdminServiceTest, RegisterRefusesBadBricksAndPublishesNothing) {
  const std::string root = NewRoot("admin_refuse");
  CopyBrick("fx-b", root, "task", 1);
  CopyBrick("fx-b", root + "/incoming", "other-base", 1, std::string(64, 'a'));
  CopyBrick("fx-b", root + "/incoming", "truncated", 1);
  fs::resize_file(fs::path(root) / "incoming/truncated/1/adapter_model.safetensors", 500);
  fs::create_directories(fs::path(root) / "incoming/ffn");
  fs::copy(std::string(KILN_SOURCE_DIR) + "/deploy/bricks/ffn-e16/1",
           fs::path(root) / "incoming/ffn/1", fs::copy_options::recursive);
  StartWith(root);
  const std::vector<std::tuple<std::string, grpc::StatusCode, std::string>> cases = {
      {"incoming/other-base/1", grpc::StatusCode::FAILED_PRECONDITION, "made for base model"},
      {"incoming/truncated/1", grpc::StatusCode::INVALID_ARGUMENT, "adapter_model.safetensors"},
      {"../outside", grpc::StatusCode::INVALID_ARGUMENT, "must be a folder inside --brick_dir"},
      {"/etc", grpc::StatusCode::INVALID_ARGUMENT, "must be a folder inside --brick_dir"},
      {"incoming/missing", grpc::StatusCode::NOT_FOUND, "brick.json"},
      {"incoming/ffn/1", grpc::StatusCode::INVALID_ARGUMENT, "RegisterBrick publishes \"lora\""},
  };
  for (const auto& [folder, code, message] : cases) {
    v1::RegisterBrickRequest reg;
    reg.set_id("task");
    reg.set_folder(folder);
    v1::BrickInfo info;
    grpc::Status st = Admin(&v1::BrickAdmin::Stub::RegisterBrick, reg, &info);
    EXPECT_EQ(st.error_code(), code) << folder << ": " << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr(message)) << folder;
    EXPECT_EQ(ServedVersion("task"), 1u) << "after " << folder;
  }
  EXPECT_THAT(*bricks_->store().Versions("task"), ElementsAre(1));
  v1::RegisterBrickRequest bad_id;
  bad_id.set_id("Bad/Id");
  bad_id.set_folder("incoming/truncated/1");
  v1::BrickInfo info;
  EXPECT_EQ(Admin(&v1::BrickAdmin::Stub::RegisterBrick, bad_id, &info).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  v1::RegisterBrickRequest no_source;
  no_source.set_id("task");
  EXPECT_EQ(Admin(&v1::BrickAdmin::Stub::RegisterBrick, no_source, &info).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(AdminServiceTest, DeleteRemovesAVersionAndLatestFallsBack) {
  const std::string root = NewRoot("admin_delete");
  CopyBrick("fx-b", root, "task", 1);
  CopyBrick("fx-a", root, "task", 2);
  StartWith(root);
  ASSERT_EQ(ServedVersion("task"), 2u);
  v1::BrickVersionRef ref;
  ref.set_id("task");
  ref.set_version(2);
  v1::DeleteBrickResponse deleted;
  ASSERT_TRUE(Admin(&v1::BrickAdmin::Stub::DeleteBrick, ref, &deleted).ok());
  EXPECT_FALSE(fs::exists(fs::path(root) / "task/2"));
  EXPECT_EQ(ServedVersion("task"), 1u);
  EmbedRequest pinned;
  pinned.add_inputs("x");
  AddBrick(pinned, "task", 2);
  EmbedResponse resp;
  grpc::Status st = Embed(pinned, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND) << st.error_message();
  EXPECT_EQ(Admin(&v1::BrickAdmin::Stub::DeleteBrick, ref, &deleted).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

TEST_F(AdminServiceTest, MergeLinearWritesABrickEqualToTheWeightedPlan) {
  const std::string root = NewRoot("admin_merge");
  CopyBrick("fx-a", root, "fx-a", 1);
  CopyBrick("fx-b", root, "fx-b", 1);
  StartWith(root);
  v1::MergeBricksRequest merge;
  auto* a = merge.add_inputs();
  a->set_id("fx-a");
  a->set_weight(0.6f);
  auto* b = merge.add_inputs();
  b->set_id("fx-b");
  b->set_weight(-0.4f);
  merge.set_method("linear");
  merge.set_output_id("fx-ab");
  merge.set_description("0.6 fx-a - 0.4 fx-b");
  v1::BrickInfo info;
  grpc::Status st = Admin(&v1::BrickAdmin::Stub::MergeBricks, merge, &info);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(info.id(), "fx-ab");
  EXPECT_EQ(info.version(), 1u);
  EXPECT_EQ(info.description(), "0.6 fx-a - 0.4 fx-b");

  // The merged brick alone equals the two bricks composed per request.
  EmbedRequest merged, composed;
  for (EmbedRequest* r : {&merged, &composed}) r->add_inputs("merging task vectors");
  AddBrick(merged, "fx-ab");
  AddBrick(composed, "fx-a", 0, 0.6f);
  AddBrick(composed, "fx-b", 0, -0.4f);
  EmbedResponse m, c;
  ASSERT_TRUE(Embed(merged, &m).ok());
  ASSERT_TRUE(Embed(composed, &c).ok());
  EXPECT_LE(
      MaxAbsDiff(m.embeddings(0).values(), std::vector<float>(c.embeddings(0).values().begin(),
                                                              c.embeddings(0).values().end())),
      1e-4);

  merge.set_method("average");
  st = Admin(&v1::BrickAdmin::Stub::MergeBricks, merge, &info);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("average"));
  merge.set_method("linear");
  merge.mutable_inputs()->RemoveLast();
  st = Admin(&v1::BrickAdmin::Stub::MergeBricks, merge, &info);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("at least two"));
}

TEST_F(AdminServiceTest, TokenIsRequiredWhenSet) {
  admin_token_ = "s3cret";
  StartWith(kTestdata + "/bricks");
  v1::ListBricksResponse list;
  grpc::Status st = Admin(&v1::BrickAdmin::Stub::ListBricks, v1::ListBricksRequest(), &list);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_THAT(st.error_message(), HasSubstr("authorization: Bearer"));
  st = Admin(&v1::BrickAdmin::Stub::ListBricks, v1::ListBricksRequest(), &list, "wrong");
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  st = Admin(&v1::BrickAdmin::Stub::ListBricks, v1::ListBricksRequest(), &list, "s3cret");
  EXPECT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(list.bricks_size(), 2);
}

TEST_F(AdminServiceTest, WithoutABrickStoreEveryCallIsFailedPrecondition) {
  Start();
  v1::ListBricksResponse list;
  grpc::Status st = Admin(&v1::BrickAdmin::Stub::ListBricks, v1::ListBricksRequest(), &list);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(st.error_message(), HasSubstr("--brick_dir"));
}

}  // namespace
}  // namespace kiln
