#include "router/brick.h"

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/router/brick_test_util.h"

namespace kiln {
namespace brick_testing {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

// The fingerprint of the default model, computed from docs/BRICKS.md by an
// independent Python implementation (hashlib over config.json and the sorted
// header lines), not by the code under test.
constexpr char kDefaultModelFingerprint[] =
    "15a6493db781eb6508ae9e3ec5f38e924d6eb955905e100fdf47935678c408ed";

// ---------------------------------------------------------------------------
// brick.json

TEST(BrickManifestTest, ParsesEveryField) {
  auto m = ParseBrickManifest(Manifest().dump(), "/x/y/brick.json");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->id, "py-docstring");
  EXPECT_EQ(m->version, 1);
  EXPECT_EQ(m->kind, "lora");
  EXPECT_EQ(m->description, "Python docstring -> function source retrieval.");
  EXPECT_THAT(m->query_instructions,
              ::testing::ElementsAre("Represent this docstring for finding the Python function:"));
  EXPECT_THAT(m->document_instructions,
              ::testing::ElementsAre("Represent this Python function for retrieval:"));
  EXPECT_EQ(m->base_name, "all-MiniLM-L6-v2");
  EXPECT_EQ(m->base_fingerprint, kFingerprint);
}

TEST(BrickManifestTest, IgnoresUnknownFieldsAndAcceptsEmptyInstructionLists) {
  Json j = Manifest();
  j["future_field"] = {1, 2};
  j["instructions"]["document"] = Json::array();
  auto m = ParseBrickManifest(j.dump(), "brick.json");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_TRUE(m->document_instructions.empty());
}

TEST(BrickManifestTest, AcceptsTheFfnPartitionKindAndNamesKindOtherwise) {
  Json j = Manifest();
  j["kind"] = "ffn_partition";
  auto m = ParseBrickManifest(j.dump(), "/x/y/brick.json");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->kind, kFfnPartitionKind);
  j["kind"] = "head";
  m = ParseBrickManifest(j.dump(), "/x/y/brick.json");
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m.status().message(),
            "/x/y/brick.json: field \"kind\": unsupported kind \"head\" (supported: \"lora\", "
            "\"ffn_partition\")");
}

TEST(BrickManifestTest, ToJsonRoundTrips) {
  auto m = ParseBrickManifest(Manifest().dump(), "a");
  ASSERT_TRUE(m.ok());
  m->version = 17;
  m->query_instructions.push_back("second");
  auto again = ParseBrickManifest(BrickManifestToJson(*m), "b");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->version, 17);
  EXPECT_EQ(again->query_instructions, m->query_instructions);
  EXPECT_EQ(again->document_instructions, m->document_instructions);
  EXPECT_EQ(again->base_fingerprint, m->base_fingerprint);
  EXPECT_EQ(again->description, m->description);
}

TEST(BrickManifestTest, FfnPartitionIsOptionalAndRoundTrips) {
  auto none = ParseBrickManifest(Manifest().dump(), "a");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->ffn_partition, "");
  EXPECT_THAT(BrickManifestToJson(*none), Not(HasSubstr("ffn_partition")));
  Json j = Manifest();
  j["ffn_partition"] = "ffn-e16@2";
  auto m = ParseBrickManifest(j.dump(), "a");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->ffn_partition, "ffn-e16@2");
  auto again = ParseBrickManifest(BrickManifestToJson(*m), "b");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->ffn_partition, "ffn-e16@2");
}

TEST(BrickManifestTest, RefusesAnFfnPartitionThatIsNotIdAtVersionOrOnAPartition) {
  const std::vector<std::pair<Json, std::string>> cases = {
      {Json(3), "must be a string"},           {Json("ffn-e16"), "must name a version"},
      {Json("ffn-e16@0"), "positive integer"}, {Json("ffn-e16@x"), "positive integer"},
      {Json("FFN@2"), "not a valid brick id"},
  };
  for (const auto& [value, message] : cases) {
    Json j = Manifest();
    j["ffn_partition"] = value;
    auto m = ParseBrickManifest(j.dump(), "/x/brick.json");
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << value.dump();
    EXPECT_THAT(m.status().message(),
                AllOf(HasSubstr("/x/brick.json: field \"ffn_partition\""), HasSubstr(message)))
        << value.dump();
  }
  Json j = Manifest();
  j["kind"] = "ffn_partition";
  j["ffn_partition"] = "ffn-e16@2";
  auto m = ParseBrickManifest(j.dump(), "/x/brick.json");
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(m.status().message(), HasSubstr("only a \"lora\" brick"));
}

TEST(BrickManifestTest, NamesFileAndFieldForNegativeVersion) {
  Json j = Manifest();
  j["version"] = -3;
  auto m = ParseBrickManifest(j.dump(), "/x/y/brick.json");
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m.status().message(),
            "/x/y/brick.json: field \"version\": must be a positive integer, got -3");
}

struct BadManifestCase {
  std::string name;
  std::function<void(Json&)> mutate;
  std::string field;  // expected in the message as field "<field>"
};

class BadManifestTest : public ::testing::TestWithParam<BadManifestCase> {};

TEST_P(BadManifestTest, IsInvalidArgumentNamingFileAndField) {
  Json j = Manifest();
  GetParam().mutate(j);
  auto m = ParseBrickManifest(j.dump(), "/store/b/1/brick.json");
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << m.status();
  EXPECT_THAT(m.status().message(),
              AllOf(HasSubstr("/store/b/1/brick.json"),
                    HasSubstr(absl::StrCat("field \"", GetParam().field, "\""))));
}

INSTANTIATE_TEST_SUITE_P(
    EveryField, BadManifestTest,
    ::testing::Values(
        BadManifestCase{"IdMissing", [](Json& j) { j.erase("id"); }, "id"},
        BadManifestCase{"IdUppercase", [](Json& j) { j["id"] = "Py"; }, "id"},
        BadManifestCase{"IdNumber", [](Json& j) { j["id"] = 5; }, "id"},
        BadManifestCase{"IdDotDot", [](Json& j) { j["id"] = ".."; }, "id"},
        BadManifestCase{"IdTooLong", [](Json& j) { j["id"] = std::string(65, 'a'); }, "id"},
        BadManifestCase{"VersionMissing", [](Json& j) { j.erase("version"); }, "version"},
        BadManifestCase{"VersionZero", [](Json& j) { j["version"] = 0; }, "version"},
        BadManifestCase{"VersionString", [](Json& j) { j["version"] = "1"; }, "version"},
        BadManifestCase{"VersionFloat", [](Json& j) { j["version"] = 1.5; }, "version"},
        BadManifestCase{"VersionBool", [](Json& j) { j["version"] = true; }, "version"},
        BadManifestCase{"VersionHuge", [](Json& j) { j["version"] = 1ull << 40; }, "version"},
        BadManifestCase{"KindMissing", [](Json& j) { j.erase("kind"); }, "kind"},
        BadManifestCase{"KindHead", [](Json& j) { j["kind"] = "head"; }, "kind"},
        BadManifestCase{"DescriptionNumber", [](Json& j) { j["description"] = 3; }, "description"},
        BadManifestCase{"DescriptionMissing", [](Json& j) { j.erase("description"); },
                        "description"},
        BadManifestCase{"InstructionsMissing", [](Json& j) { j.erase("instructions"); },
                        "instructions"},
        BadManifestCase{"InstructionsArray", [](Json& j) { j["instructions"] = Json::array(); },
                        "instructions"},
        BadManifestCase{"QueryString", [](Json& j) { j["instructions"]["query"] = "x"; },
                        "instructions.query"},
        BadManifestCase{"QueryMissing", [](Json& j) { j["instructions"].erase("query"); },
                        "instructions.query"},
        BadManifestCase{"DocumentEmptyString",
                        [](Json& j) {
                          j["instructions"]["document"] = {"ok", ""};
                        },
                        "instructions.document[1]"},
        BadManifestCase{"DocumentNumber", [](Json& j) { j["instructions"]["document"] = {1}; },
                        "instructions.document[0]"},
        BadManifestCase{"BaseMissing", [](Json& j) { j.erase("base_model"); }, "base_model"},
        BadManifestCase{"BaseNameMissing", [](Json& j) { j["base_model"].erase("name"); },
                        "base_model.name"},
        BadManifestCase{"FingerprintMissing", [](Json& j) { j["base_model"].erase("fingerprint"); },
                        "base_model.fingerprint"},
        BadManifestCase{"FingerprintUppercase",
                        [](Json& j) { j["base_model"]["fingerprint"] = std::string(64, 'A'); },
                        "base_model.fingerprint"},
        BadManifestCase{"FingerprintShort",
                        [](Json& j) { j["base_model"]["fingerprint"] = std::string(63, 'a'); },
                        "base_model.fingerprint"},
        BadManifestCase{"FingerprintNotHex",
                        [](Json& j) { j["base_model"]["fingerprint"] = std::string(64, 'g'); },
                        "base_model.fingerprint"}),
    [](const ::testing::TestParamInfo<BadManifestCase>& info) { return info.param.name; });

TEST(BrickManifestTest, RefusesNonJsonAndNonObjects) {
  EXPECT_THAT(ParseBrickManifest("{", "/m/brick.json").status().message(),
              HasSubstr("/m/brick.json: not valid JSON"));
  auto arr = ParseBrickManifest("[1]", "/m/brick.json");
  EXPECT_EQ(arr.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(arr.status().message(), HasSubstr("must be a JSON object"));
}

TEST(BrickManifestTest, ReadMissingFileIsNotFound) {
  auto m = ReadBrickManifest("/nonexistent/kiln/brick.json");
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(m.status().message(), HasSubstr("/nonexistent/kiln/brick.json"));
}

TEST(BrickIdTest, FollowsThePattern) {
  EXPECT_TRUE(IsValidBrickId("a"));
  EXPECT_TRUE(IsValidBrickId("py-docstring_2.v1"));
  EXPECT_TRUE(IsValidBrickId("0abc"));
  EXPECT_TRUE(IsValidBrickId(std::string(64, 'z')));
  EXPECT_FALSE(IsValidBrickId(""));
  EXPECT_FALSE(IsValidBrickId(std::string(65, 'z')));
  EXPECT_FALSE(IsValidBrickId("A"));
  EXPECT_FALSE(IsValidBrickId("-x"));
  EXPECT_FALSE(IsValidBrickId(".x"));
  EXPECT_FALSE(IsValidBrickId(".."));
  EXPECT_FALSE(IsValidBrickId("../x"));
  EXPECT_FALSE(IsValidBrickId("a/b"));
  EXPECT_FALSE(IsValidBrickId("/abs"));
  EXPECT_FALSE(IsValidBrickId("a b"));
}

// ---------------------------------------------------------------------------
// Fingerprint

TEST(FingerprintTest, DefaultModelMatchesTheIndependentReference) {
  auto fp = BaseModelFingerprint(kModelDir);
  ASSERT_TRUE(fp.ok()) << fp.status();
  EXPECT_THAT(*fp, ::testing::MatchesRegex("[0-9a-f]{64}"));
  EXPECT_EQ(*fp, kDefaultModelFingerprint);
  auto again = BaseModelFingerprint(kModelDir);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *fp);
}

class FingerprintFilesTest : public BrickTest {
 protected:
  // config.json bytes as given and a header with tensors named to exercise
  // byte order ("B" < "a.b" < "a_b" < "b.weight"), a scalar and an empty shape.
  void WriteModel(const std::string& config, bool reverse_order = false,
                  std::vector<int64_t> b_shape = {2, 3}) {
    std::vector<TensorSpec> tensors = {
        {"b.weight", "F32", b_shape, std::string(4 * b_shape[0] * b_shape[1], '\0')},
        {"a_b", "F32", {0}, ""},
        {"B", "F32", {1}, std::string(4, '\0')},
        {"a.b", "F16", {}, std::string(2, '\0')},
    };
    if (reverse_order) std::reverse(tensors.begin(), tensors.end());
    WriteFile(dir_ / "config.json", config);
    WriteFile(dir_ / "model.safetensors", MakeSafetensors(tensors));
  }
};

TEST_F(FingerprintFilesTest, HashesConfigBytesThenSortedHeaderLines) {
  // sha256(b'{"model_type": "bert"}\n' b'B\tF32\t1\n' b'a.b\tF16\t\n' b'a_b\tF32\t0\n'
  //        b'b.weight\tF32\t2,3\n'), computed with Python's hashlib.
  WriteModel("{\"model_type\": \"bert\"}\n");
  auto fp = BaseModelFingerprint(dir_.string());
  ASSERT_TRUE(fp.ok()) << fp.status();
  EXPECT_EQ(*fp, "451c6c65d41fe28a7c543565859a5bf60369b08dcc0832e77a301fcc8fd4bf4d");
}

TEST_F(FingerprintFilesTest, IgnoresHeaderOrderAndMetadata) {
  WriteModel("{}");
  auto a = BaseModelFingerprint(dir_.string());
  WriteModel("{}", /*reverse_order=*/true);
  auto b = BaseModelFingerprint(dir_.string());
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, *b);
}

TEST_F(FingerprintFilesTest, ChangesWithConfigBytesAndShapes) {
  std::ifstream in(kModelDir + "/config.json", std::ios::binary);
  std::string config((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_FALSE(config.empty());
  WriteModel(config);
  auto base = BaseModelFingerprint(dir_.string());
  ASSERT_TRUE(base.ok()) << base.status();
  EXPECT_NE(*base, kDefaultModelFingerprint);  // same config, other tensors

  WriteModel(config + " ");  // one byte more in config.json
  auto edited = BaseModelFingerprint(dir_.string());
  ASSERT_TRUE(edited.ok());
  EXPECT_NE(*edited, *base);

  WriteModel(config, false, {3, 2});  // same bytes of data, other shape
  auto reshaped = BaseModelFingerprint(dir_.string());
  ASSERT_TRUE(reshaped.ok());
  EXPECT_NE(*reshaped, *base);
}

TEST_F(FingerprintFilesTest, MissingFilesAreNotFound) {
  EXPECT_EQ(BaseModelFingerprint(dir_.string()).status().code(), absl::StatusCode::kNotFound);
  WriteFile(dir_ / "config.json", "{}");
  auto fp = BaseModelFingerprint(dir_.string());
  EXPECT_EQ(fp.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(fp.status().message(), HasSubstr("model.safetensors"));
}

TEST_F(FingerprintFilesTest, MalformedHeaderIsInvalidArgument) {
  WriteFile(dir_ / "config.json", "{}");
  WriteFile(dir_ / "model.safetensors", std::string("\xff\xff\xff\xff\0\0\0\0{}", 10));
  auto fp = BaseModelFingerprint(dir_.string());
  EXPECT_EQ(fp.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(fp.status().message(), HasSubstr("model.safetensors"));
}

// ---------------------------------------------------------------------------
// ReadBrickVersion

class BrickVersionTest : public BrickTest {
 protected:
  void WriteVersion(const Json& manifest) {
    std::vector<TensorSpec> t;
    AddModule(&t, 0, LoraTarget::kQuery, 4);
    WriteAdapter(PeftConfig(), t);
    WriteFile(dir_ / kBrickManifestFile, manifest.dump(2));
  }
};

TEST_F(BrickVersionTest, ReadsAMatchingFolder) {
  WriteVersion(Manifest());
  auto v = ReadBrickVersion(dir_.string(), "py-docstring", 1);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->manifest.id, "py-docstring");
  EXPECT_EQ(v->manifest.version, 1);
  EXPECT_EQ(v->dir, dir_.string());
}

TEST_F(BrickVersionTest, IdOrVersionOtherThanTheFolderIsRefused) {
  WriteVersion(Manifest());
  auto v = ReadBrickVersion(dir_.string(), "other", 1);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.status().message(), AllOf(HasSubstr("field \"id\""), HasSubstr("\"other\"")));
  v = ReadBrickVersion(dir_.string(), "py-docstring", 2);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.status().message(), HasSubstr("field \"version\""));
}

TEST_F(BrickVersionTest, MissingManifestIsNotFoundAndMissingAdapterIsInvalid) {
  auto v = ReadBrickVersion(dir_.string(), "py-docstring", 1);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kNotFound);
  WriteVersion(Manifest());
  fs::remove(dir_ / kLoraWeightsFile);
  v = ReadBrickVersion(dir_.string(), "py-docstring", 1);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.status().message(), HasSubstr(kLoraWeightsFile));
  fs::remove(dir_ / kLoraConfigFile);
  v = ReadBrickVersion(dir_.string(), "py-docstring", 1);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.status().message(), HasSubstr(kLoraConfigFile));
}

TEST_F(BrickVersionTest, FfnPartitionFolderNeedsOnlyItsSafetensorsFile) {
  Json manifest = Manifest();
  manifest["kind"] = "ffn_partition";
  WriteFile(dir_ / kBrickManifestFile, manifest.dump(2));
  auto v = ReadBrickVersion(dir_.string(), "py-docstring", 1);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.status().message(), AllOf(HasSubstr(kFfnPartitionFile), HasSubstr("missing")));
  WriteFile(dir_ / kFfnPartitionFile, "garbage");
  v = ReadBrickVersion(dir_.string(), "py-docstring", 1);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.status().message(), HasSubstr(kFfnPartitionFile));
  WriteFile(dir_ / kFfnPartitionFile,
            MakeSafetensors({{"layer.0.groups", "I32", {1, 1}, std::string(4, '\0')}}));
  v = ReadBrickVersion(dir_.string(), "py-docstring", 1);
  ASSERT_TRUE(v.ok()) << v.status();  // no adapter_config.json needed
  EXPECT_EQ(v->manifest.kind, "ffn_partition");
}

TEST_F(BrickVersionTest, CorruptAdapterIsRefused) {
  WriteVersion(Manifest());
  WriteFile(dir_ / kLoraWeightsFile, "garbage");
  auto v = ReadBrickVersion(dir_.string(), "py-docstring", 1);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.status().message(), HasSubstr(kLoraWeightsFile));
  WriteVersion(Manifest());
  Json cfg = PeftConfig();
  cfg["bias"] = "all";
  WriteFile(dir_ / kLoraConfigFile, cfg.dump());
  v = ReadBrickVersion(dir_.string(), "py-docstring", 1);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.status().message(), HasSubstr("field \"bias\""));
}

}  // namespace
}  // namespace brick_testing
}  // namespace kiln
