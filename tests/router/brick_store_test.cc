#include "router/brick_store.h"

#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

void WriteFile(const fs::path& path, const std::string& bytes) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// A one-module adapter (layer 0 query, rank 1) for any base with hidden 8:
// 8-byte LE header length + JSON header + F32 data.
std::string AdapterSafetensors() {
  const std::string header =
      "{\"base_model.model.encoder.layer.0.attention.self.query.lora_A.weight\":"
      "{\"dtype\":\"F32\",\"shape\":[1,8],\"data_offsets\":[0,32]},"
      "\"base_model.model.encoder.layer.0.attention.self.query.lora_B.weight\":"
      "{\"dtype\":\"F32\",\"shape\":[8,1],\"data_offsets\":[32,64]}}";
  std::string out(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  std::vector<float> data(16, 0.5f);
  out += header;
  out.append(reinterpret_cast<const char*>(data.data()), data.size() * sizeof(float));
  return out;
}

const std::string kAdapterConfig =
    R"({"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["query"]})";

Json ManifestJson(const std::string& id, int version) {
  return Json{{"id", id},
              {"version", version},
              {"kind", "lora"},
              {"description", "test brick"},
              {"instructions", {{"query", {"q"}}, {"document", {"d"}}}},
              {"base_model", {{"name", "tiny"}, {"fingerprint", std::string(64, 'b')}}}};
}

// Writes a complete version folder; brick.json only if `with_manifest`.
void WriteVersion(const fs::path& dir, const std::string& id, int version,
                  bool with_manifest = true) {
  WriteFile(dir / kLoraConfigFile, kAdapterConfig);
  WriteFile(dir / kLoraWeightsFile, AdapterSafetensors());
  if (with_manifest) WriteFile(dir / kBrickManifestFile, ManifestJson(id, version).dump(2));
}

// Hidden entries (".tmp-*", ".del-*") anywhere below `dir`.
std::vector<std::string> HiddenEntries(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.path().filename().string().rfind('.', 0) == 0) out.push_back(e.path().string());
  }
  return out;
}

class BrickStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    base_ = fs::path(::testing::TempDir()) /
            absl::StrCat("kiln_brick_store_test_", info->name(), "_", getpid());
    fs::remove_all(base_);
    root_ = base_ / "store";
    outside_ = base_ / "outside";
    fs::create_directories(root_);
    fs::create_directories(outside_);
    auto store = BrickStore::Open(root_.string());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
  }
  void TearDown() override { fs::remove_all(base_); }

  // A finished brick folder outside the store, for Register.
  fs::path SourceFolder(const std::string& manifest_id = "elsewhere", int manifest_version = 7) {
    const fs::path src = outside_ / absl::StrCat("src-", counter_++);
    WriteVersion(src, manifest_id, manifest_version);
    return src;
  }

  fs::path base_, root_, outside_;
  std::unique_ptr<BrickStore> store_;
  int counter_ = 0;
};

TEST_F(BrickStoreTest, OpenRefusesMissingRootAndFiles) {
  auto missing = BrickStore::Open((base_ / "nope").string());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr((base_ / "nope").string()));
  WriteFile(base_ / "file", "x");
  auto file = BrickStore::Open((base_ / "file").string());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(file.status().message(), HasSubstr((base_ / "file").string()));
}

TEST_F(BrickStoreTest, LatestIsTheHighestCountedVersion) {
  WriteVersion(root_ / "a" / "1", "a", 1);
  WriteVersion(root_ / "a" / "2", "a", 2);
  WriteVersion(root_ / "a" / "10", "a", 10);  // numeric, not lexicographic order
  WriteVersion(root_ / "a" / "11", "a", 11, /*with_manifest=*/false);  // still being written
  auto latest = store_->Resolve("a", std::nullopt);
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(latest->manifest.version, 10);
  EXPECT_EQ(latest->dir, (fs::canonical(root_) / "a" / "10").string());
  auto v2 = store_->Resolve("a", 2);
  ASSERT_TRUE(v2.ok()) << v2.status();
  EXPECT_EQ(v2->manifest.version, 2);
  auto versions = store_->Versions("a");
  ASSERT_TRUE(versions.ok());
  EXPECT_THAT(*versions, ElementsAre(1, 2, 10));

  // Once brick.json appears (the server polls), 11 counts.
  WriteFile(root_ / "a" / "11" / kBrickManifestFile, ManifestJson("a", 11).dump());
  latest = store_->Resolve("a", std::nullopt);
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(latest->manifest.version, 11);
}

TEST_F(BrickStoreTest, UnknownIdOrVersionIsNotFound) {
  WriteVersion(root_ / "a" / "1", "a", 1);
  WriteVersion(root_ / "a" / "2", "a", 2, /*with_manifest=*/false);
  fs::create_directories(root_ / "empty");

  auto unknown = store_->Resolve("nope", std::nullopt);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(unknown.status().message(), HasSubstr("brick \"nope\""));
  unknown = store_->Resolve("nope", 1);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(unknown.status().message(), HasSubstr("brick \"nope\""));

  auto v3 = store_->Resolve("a", 3);
  EXPECT_EQ(v3.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(v3.status().message(), HasSubstr("brick \"a\" version 3"));
  auto uncounted = store_->Resolve("a", 2);
  EXPECT_EQ(uncounted.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(uncounted.status().message(), HasSubstr("brick \"a\" version 2"));

  auto empty = store_->Resolve("empty", std::nullopt);
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(empty.status().message(), HasSubstr("brick \"empty\""));

  EXPECT_EQ(store_->Resolve("a", 0).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(BrickStoreTest, BrokenVersionFolderIsInvalidArgument) {
  WriteVersion(root_ / "a" / "1", "b", 1);  // manifest names another id
  auto v = store_->Resolve("a", 1);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.status().message(), HasSubstr("field \"id\""));
}

TEST_F(BrickStoreTest, ListSkipsJunk) {
  WriteVersion(root_ / "b" / "1", "b", 1);
  WriteVersion(root_ / "a" / "3", "a", 3);
  WriteVersion(root_ / "a" / "1", "a", 1);
  WriteVersion(root_ / "a" / "01", "a", 1);  // leading zero
  WriteVersion(root_ / "a" / "0", "a", 0);   // not positive
  WriteVersion(root_ / "a" / "x2", "a", 2);  // not numeric
  WriteVersion(root_ / "a" / "-4", "a", 4);  // not numeric
  WriteVersion(root_ / "a" / "5", "a", 5, /*with_manifest=*/false);
  WriteVersion(root_ / "a" / "99999999999", "a", 1);  // past int
  WriteFile(root_ / "a" / "6", "a file, not a folder");
  WriteVersion(root_ / "Upper" / "1", "Upper", 1);  // not a valid id
  WriteVersion(root_ / ".hidden" / "1", ".hidden", 1);
  WriteVersion(root_ / "-dash" / "1", "-dash", 1);
  WriteFile(root_ / "readme.txt", "hello");
  fs::create_directories(root_ / "novers" / "1");  // no counted versions

  const std::vector<BrickStore::Entry> list = store_->List();
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].id, "a");
  EXPECT_THAT(list[0].versions, ElementsAre(1, 3));
  EXPECT_EQ(list[1].id, "b");
  EXPECT_THAT(list[1].versions, ElementsAre(1));
}

TEST_F(BrickStoreTest, BadIdsAreInvalidArgumentEverywhere) {
  const std::vector<std::string> bad = {
      "../x", "A", "-x", std::string(65, 'a'), "", "a/b", "/etc", "..", ".x", "a\\b"};
  for (const std::string& id : bad) {
    SCOPED_TRACE(id);
    EXPECT_EQ(BrickStore::ValidateBrickId(id).code(), absl::StatusCode::kInvalidArgument);
    auto r = store_->Resolve(id, std::nullopt);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr("invalid brick id"));
    EXPECT_EQ(store_->Resolve(id, 1).status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(store_->Register(id, std::nullopt, SourceFolder().string()).status().code(),
              absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(store_->Delete(id, 1).code(), absl::StatusCode::kInvalidArgument);
  }
  EXPECT_THAT(BrickStore::ValidateBrickId("A").message(), HasSubstr("\"A\""));
  EXPECT_TRUE(BrickStore::ValidateBrickId(std::string(64, 'a')).ok());
  // Nothing was created anywhere.
  EXPECT_THAT(store_->List(), IsEmpty());
  EXPECT_FALSE(fs::exists(base_ / "x"));
}

TEST_F(BrickStoreTest, SymlinksOutOfTheRootAreRefused) {
  WriteVersion(outside_ / "evil" / "1", "evil", 1);
  fs::create_directory_symlink(outside_ / "evil", root_ / "evil");  // id folder
  WriteVersion(root_ / "a" / "1", "a", 1);
  WriteVersion(outside_ / "a2", "a", 2);
  fs::create_directory_symlink(outside_ / "a2", root_ / "a" / "2");  // version folder
  WriteVersion(root_ / "a" / "3", "a", 3);
  fs::remove(root_ / "a" / "3" / kLoraWeightsFile);
  fs::create_symlink(outside_ / "a2" / kLoraWeightsFile,
                     root_ / "a" / "3" / kLoraWeightsFile);  // file inside a version

  auto evil = store_->Resolve("evil", std::nullopt);
  EXPECT_EQ(evil.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(evil.status().message(), HasSubstr("outside the brick store"));
  EXPECT_EQ(store_->Resolve("evil", 1).status().code(), absl::StatusCode::kFailedPrecondition);

  auto v2 = store_->Resolve("a", 2);
  EXPECT_EQ(v2.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(v2.status().message(), HasSubstr("brick \"a\" version 2"));

  auto v3 = store_->Resolve("a", 3);
  EXPECT_EQ(v3.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(v3.status().message(), HasSubstr(kLoraWeightsFile));

  // List and "latest" skip what escapes (3 still counts: its brick.json is inside).
  const auto list = store_->List();
  ASSERT_EQ(list.size(), 1u);
  EXPECT_EQ(list[0].id, "a");
  EXPECT_THAT(list[0].versions, ElementsAre(1, 3));

  // Writes through an escaping id are refused too, and nothing lands outside.
  auto reg = store_->Register("evil", std::nullopt, SourceFolder().string());
  EXPECT_EQ(reg.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_->Delete("evil", 1).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(fs::exists(outside_ / "evil" / "1" / kBrickManifestFile));
  EXPECT_FALSE(fs::exists(outside_ / "evil" / "2"));
  EXPECT_EQ(store_->Delete("a", 2).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(fs::exists(outside_ / "a2" / kBrickManifestFile));
}

TEST_F(BrickStoreTest, SymlinksInsideTheRootAreFollowed) {
  WriteVersion(root_ / ".staging" / "a2", "a", 2);
  WriteVersion(root_ / "a" / "1", "a", 1);
  fs::create_directory_symlink(root_ / ".staging" / "a2", root_ / "a" / "2");
  auto v = store_->Resolve("a", std::nullopt);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->manifest.version, 2);

  // Deleting a symlinked version removes the link, not its target.
  ASSERT_TRUE(store_->Delete("a", 2).ok());
  EXPECT_FALSE(fs::exists(fs::symlink_status(root_ / "a" / "2")));
  EXPECT_TRUE(fs::exists(root_ / ".staging" / "a2" / kBrickManifestFile));
}

TEST_F(BrickStoreTest, RegisterCopiesAndRewritesTheManifest) {
  const fs::path src = SourceFolder("elsewhere", 7);
  {
    Json m = Json::parse(ReadFile(src / kBrickManifestFile));
    m["extra"] = "kept";
    WriteFile(src / kBrickManifestFile, m.dump());
  }
  WriteFile(src / "README.md", "not copied");
  auto v = store_->Register("a", std::nullopt, src.string());
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->manifest.id, "a");
  EXPECT_EQ(v->manifest.version, 1);
  const fs::path dir = fs::canonical(root_) / "a" / "1";
  EXPECT_EQ(v->dir, dir.string());
  EXPECT_EQ(ReadFile(dir / kLoraWeightsFile), ReadFile(src / kLoraWeightsFile));
  EXPECT_EQ(ReadFile(dir / kLoraConfigFile), kAdapterConfig);
  const Json written = Json::parse(ReadFile(dir / kBrickManifestFile));
  EXPECT_EQ(written["id"], "a");
  EXPECT_EQ(written["version"], 1);
  EXPECT_EQ(written["extra"], "kept");
  EXPECT_FALSE(fs::exists(dir / "README.md"));
  EXPECT_THAT(HiddenEntries(root_), IsEmpty());

  auto resolved = store_->Resolve("a", std::nullopt);
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(resolved->manifest.version, 1);

  // Unset version: latest + 1. Explicit: as given.
  auto v2 = store_->Register("a", std::nullopt, src.string());
  ASSERT_TRUE(v2.ok()) << v2.status();
  EXPECT_EQ(v2->manifest.version, 2);
  auto v9 = store_->Register("a", 9, src.string());
  ASSERT_TRUE(v9.ok()) << v9.status();
  EXPECT_EQ(v9->manifest.version, 9);
  auto versions = store_->Versions("a");
  ASSERT_TRUE(versions.ok());
  EXPECT_THAT(*versions, ElementsAre(1, 2, 9));
}

TEST_F(BrickStoreTest, RegisterRefusesAnExistingVersion) {
  const fs::path src = SourceFolder();
  ASSERT_TRUE(store_->Register("a", 1, src.string()).ok());
  const std::string before = ReadFile(root_ / "a" / "1" / kBrickManifestFile);
  auto again = store_->Register("a", 1, src.string());
  EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(again.status().message(), HasSubstr("brick \"a\" version 1"));
  EXPECT_EQ(ReadFile(root_ / "a" / "1" / kBrickManifestFile), before);
  // An uncounted folder (another writer's) is not overwritten either.
  fs::create_directories(root_ / "a" / "2");
  EXPECT_EQ(store_->Register("a", 2, src.string()).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(HiddenEntries(root_), IsEmpty());
}

TEST_F(BrickStoreTest, RegisterWithoutVersionSkipsFoldersInProgress) {
  WriteVersion(root_ / "a" / "2", "a", 2);
  WriteVersion(root_ / "a" / "3", "a", 3, /*with_manifest=*/false);
  auto v = store_->Register("a", std::nullopt, SourceFolder().string());
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->manifest.version, 4);
  EXPECT_FALSE(fs::exists(root_ / "a" / "3" / kBrickManifestFile));
}

TEST_F(BrickStoreTest, RegisterRefusesAnInvalidSourceAndPublishesNothing) {
  const fs::path src = SourceFolder();
  Json m = Json::parse(ReadFile(src / kBrickManifestFile));
  m["kind"] = "head";
  WriteFile(src / kBrickManifestFile, m.dump());
  auto v = store_->Register("a", std::nullopt, src.string());
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.status().message(), AllOf(HasSubstr(src.string()), HasSubstr("field \"kind\""),
                                          ::testing::Not(HasSubstr(".tmp"))));
  EXPECT_THAT(store_->List(), IsEmpty());
  EXPECT_THAT(HiddenEntries(root_), IsEmpty());

  fs::remove(src / kLoraWeightsFile);
  v = store_->Register("a", std::nullopt, src.string());
  EXPECT_EQ(v.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(v.status().message(), HasSubstr(kLoraWeightsFile));
  EXPECT_EQ(store_->Register("a", std::nullopt, (outside_ / "none").string()).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->Register("a", 0, SourceFolder().string()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(BrickStoreTest, RegisterBytesPublishes) {
  auto v = store_->RegisterBytes("up", std::nullopt, kAdapterConfig, AdapterSafetensors(),
                                 ManifestJson("whatever", 3).dump());
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->manifest.id, "up");
  EXPECT_EQ(v->manifest.version, 1);
  EXPECT_EQ(ReadFile(root_ / "up" / "1" / kLoraWeightsFile), AdapterSafetensors());
  auto resolved = store_->Resolve("up", 1);
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(resolved->manifest.description, "test brick");

  // A manifest without id/version gets them from the target.
  Json bare = ManifestJson("x", 1);
  bare.erase("id");
  bare.erase("version");
  auto v5 = store_->RegisterBytes("up", 5, kAdapterConfig, AdapterSafetensors(), bare.dump());
  ASSERT_TRUE(v5.ok()) << v5.status();
  EXPECT_EQ(v5->manifest.version, 5);
  EXPECT_EQ(store_->RegisterBytes("up", 5, kAdapterConfig, AdapterSafetensors(), bare.dump())
                .status()
                .code(),
            absl::StatusCode::kAlreadyExists);
}

TEST_F(BrickStoreTest, RegisterBytesRefusesCorruptUploads) {
  const std::string truncated = AdapterSafetensors().substr(0, 40);
  auto v = store_->RegisterBytes("up", std::nullopt, kAdapterConfig, truncated,
                                 ManifestJson("up", 1).dump());
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.status().message(), HasSubstr("upload/adapter_model.safetensors"));

  v = store_->RegisterBytes("up", std::nullopt, R"({"use_dora": true})", AdapterSafetensors(),
                            ManifestJson("up", 1).dump());
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.status().message(), HasSubstr("use_dora"));

  v = store_->RegisterBytes("up", std::nullopt, kAdapterConfig, AdapterSafetensors(), "[1, 2]");
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.status().message(), HasSubstr("upload/brick.json"));

  EXPECT_THAT(store_->List(), IsEmpty());
  EXPECT_THAT(HiddenEntries(root_), IsEmpty());
}

TEST_F(BrickStoreTest, ConcurrentRegistersGetDistinctVersions) {
  const fs::path src = SourceFolder();
  constexpr int kThreads = 4, kEach = 3;
  std::vector<std::thread> threads;
  std::vector<std::vector<int>> got(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) {
        auto v = store_->Register("a", std::nullopt, src.string());
        if (v.ok()) got[t].push_back(v->manifest.version);
      }
    });
  }
  for (auto& th : threads) th.join();
  std::set<int> all;
  for (const auto& g : got) all.insert(g.begin(), g.end());
  EXPECT_EQ(all.size(), static_cast<size_t>(kThreads * kEach));
  auto versions = store_->Versions("a");
  ASSERT_TRUE(versions.ok());
  EXPECT_EQ(versions->size(), static_cast<size_t>(kThreads * kEach));
  EXPECT_EQ(versions->back(), kThreads * kEach);
}

TEST_F(BrickStoreTest, ReadersNeverSeeAPartialVersion) {
  const fs::path src = SourceFolder();
  std::atomic<bool> done{false};
  std::atomic<int> checked{0}, failures{0};
  std::thread reader([&] {
    while (!done.load()) {
      for (const auto& e : store_->List()) {
        for (int v : e.versions) {
          if (!store_->Resolve(e.id, v).ok()) failures.fetch_add(1);
          checked.fetch_add(1);
        }
      }
    }
  });
  for (int i = 0; i < 25; ++i) ASSERT_TRUE(store_->Register("a", std::nullopt, src.string()).ok());
  done.store(true);
  reader.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GT(checked.load(), 0);
  EXPECT_THAT(HiddenEntries(root_), IsEmpty());
}

TEST_F(BrickStoreTest, DeleteRemovesAVersion) {
  const fs::path src = SourceFolder();
  ASSERT_TRUE(store_->Register("a", 1, src.string()).ok());
  ASSERT_TRUE(store_->Register("a", 2, src.string()).ok());
  ASSERT_TRUE(store_->Delete("a", 2).ok());
  EXPECT_FALSE(fs::exists(root_ / "a" / "2"));
  EXPECT_EQ(store_->Resolve("a", 2).status().code(), absl::StatusCode::kNotFound);
  auto latest = store_->Resolve("a", std::nullopt);
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(latest->manifest.version, 1);
  EXPECT_THAT(HiddenEntries(root_), IsEmpty());

  const absl::Status again = store_->Delete("a", 2);
  EXPECT_EQ(again.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(again.message(), HasSubstr("brick \"a\" version 2"));
  EXPECT_EQ(store_->Delete("nope", 1).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->Delete("a", 0).code(), absl::StatusCode::kInvalidArgument);

  ASSERT_TRUE(store_->Delete("a", 1).ok());
  EXPECT_EQ(store_->Resolve("a", std::nullopt).status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(store_->List(), IsEmpty());
}

}  // namespace
}  // namespace kiln
