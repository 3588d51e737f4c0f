#include "router/brick.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

const std::string kModelDir = std::string(KILN_SOURCE_DIR) + "/models/all-MiniLM-L6-v2";
// The fingerprint of the default model, computed from docs/BRICKS.md by an
// independent Python implementation (hashlib over config.json and the sorted
// header lines), not by the code under test.
constexpr char kDefaultModelFingerprint[] =
    "15a6493db781eb6508ae9e3ec5f38e924d6eb955905e100fdf47935678c408ed";
const std::string kFingerprint(64, 'a');

// ---------------------------------------------------------------------------
// Fixture helpers: a safetensors writer and PEFT-shaped adapters for a tiny BERT.

struct TensorSpec {
  std::string name;
  std::string dtype;  // "F32", "F16", ...
  std::vector<int64_t> shape;
  std::string bytes;  // raw little-endian data
};

std::string F32Bytes(const std::vector<float>& v) {
  std::string out(v.size() * sizeof(float), '\0');
  if (!v.empty()) std::memcpy(out.data(), v.data(), out.size());
  return out;
}

// 8-byte little-endian header length + JSON header + data, tensors in the
// order given.
std::string MakeSafetensors(const std::vector<TensorSpec>& tensors) {
  std::vector<std::string> entries = {"\"__metadata__\":{\"format\":\"pt\"}"};
  std::string data;
  for (const TensorSpec& t : tensors) {
    entries.push_back(absl::StrCat("\"", t.name, "\":{\"dtype\":\"", t.dtype, "\",\"shape\":[",
                                   absl::StrJoin(t.shape, ","), "],\"data_offsets\":[", data.size(),
                                   ",", data.size() + t.bytes.size(), "]}"));
    data += t.bytes;
  }
  const std::string header = absl::StrCat("{", absl::StrJoin(entries, ","), "}");
  std::string out(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

void WriteFile(const fs::path& path, const std::string& bytes) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

EncoderConfig TinyBase() {
  EncoderConfig c;
  c.model_type = "bert";
  c.hidden_size = 8;
  c.intermediate_size = 16;
  c.num_layers = 2;
  c.num_heads = 2;
  c.vocab_size = 32;
  c.max_position_embeddings = 16;
  c.type_vocab_size = 2;
  return c;
}

std::string LoraKey(int layer, absl::string_view path, char ab) {
  return absl::StrCat("base_model.model.encoder.layer.", layer, ".", path, ".lora_",
                      std::string(1, ab), ".weight");
}

// Deterministic values for module `seed`: A[i] = (seed + 1) * 0.01 * (i + 1), B negated.
std::vector<float> Values(size_t n, int seed, float sign) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = sign * 0.01f * static_cast<float>((seed + 1) * (i + 1));
  return v;
}

// A and B of one module with shapes [rank, in] and [out, rank].
void AddModule(std::vector<TensorSpec>* tensors, int layer, LoraTarget target, int rank,
               const EncoderConfig& base = TinyBase(), int seed = 0) {
  const int in = LoraTargetIn(base, target), out = LoraTargetOut(base, target);
  const std::string path(LoraTargetPath(target));
  tensors->push_back({LoraKey(layer, path, 'A'),
                      "F32",
                      {rank, in},
                      F32Bytes(Values(static_cast<size_t>(rank * in), seed, 1.0f))});
  tensors->push_back({LoraKey(layer, path, 'B'),
                      "F32",
                      {out, rank},
                      F32Bytes(Values(static_cast<size_t>(out * rank), seed, -1.0f))});
}

Json PeftConfig() {
  return Json{{"peft_type", "LORA"},
              {"r", 4},
              {"lora_alpha", 8},
              {"lora_dropout", 0.1},
              {"target_modules", {"query", "value", "dense", "key"}},
              {"bias", "none"},
              {"fan_in_fan_out", false},
              {"use_rslora", false},
              {"use_dora", false},
              {"modules_to_save", nullptr},
              {"layers_to_transform", nullptr},
              {"rank_pattern", Json::object()},
              {"alpha_pattern", Json::object()},
              {"task_type", "FEATURE_EXTRACTION"}};
}

Json Manifest() {
  return Json{{"id", "py-docstring"},
              {"version", 1},
              {"kind", "lora"},
              {"description", "Python docstring -> function source retrieval."},
              {"instructions",
               {{"query", {"Represent this docstring for finding the Python function:"}},
                {"document", {"Represent this Python function for retrieval:"}}}},
              {"base_model", {{"name", "all-MiniLM-L6-v2"}, {"fingerprint", kFingerprint}}}};
}

class BrickTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ =
        fs::path(::testing::TempDir()) /
        absl::StrCat("kiln_brick_test_", info->test_suite_name(), "_", info->name(), "_", getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes an adapter (config + tensors) into dir_ and returns dir_.
  std::string WriteAdapter(const Json& config, const std::vector<TensorSpec>& tensors) {
    WriteFile(dir_ / kLoraConfigFile, config.dump(2));
    WriteFile(dir_ / kLoraWeightsFile, MakeSafetensors(tensors));
    return dir_.string();
  }

  fs::path dir_;
};

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
// adapter_config.json

TEST(LoraConfigTest, ParsesPeftFields) {
  Json j = PeftConfig();
  j["layers_to_transform"] = {0, 1};
  j["use_rslora"] = true;
  auto c = ParseLoraConfig(j.dump(), "adapter_config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->r, 4);
  EXPECT_DOUBLE_EQ(c->lora_alpha, 8.0);
  EXPECT_TRUE(c->has_target_modules);
  EXPECT_THAT(c->target_modules, ::testing::ElementsAre("query", "value", "dense", "key"));
  EXPECT_TRUE(c->target_modules_regex.empty());
  EXPECT_TRUE(c->use_rslora);
  EXPECT_THAT(c->layers_to_transform, ::testing::ElementsAre(0, 1));
  EXPECT_EQ(c->bias, "none");
}

TEST(LoraConfigTest, DefaultsFollowPeft) {
  auto c = ParseLoraConfig("{}", "adapter_config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->r, 8);
  EXPECT_DOUBLE_EQ(c->lora_alpha, 8.0);
  EXPECT_FALSE(c->has_target_modules);
  EXPECT_TRUE(c->Targets("encoder.layer.0.output.dense", 0));
}

TEST(LoraConfigTest, ListTargetModulesMatchNamesAndDottedSuffixes) {
  Json j = PeftConfig();
  j["target_modules"] = {"query", "encoder.layer.1.output.dense"};
  auto c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->Targets("encoder.layer.0.attention.self.query", 0));
  EXPECT_FALSE(c->Targets("encoder.layer.0.attention.self.key", 0));
  EXPECT_TRUE(c->Targets("encoder.layer.1.output.dense", 1));
  EXPECT_FALSE(c->Targets("encoder.layer.0.output.dense", 0));
  // "query" is a suffix after a dot, not any suffix.
  j["target_modules"] = {"ery"};
  c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->Targets("encoder.layer.0.attention.self.query", 0));
}

TEST(LoraConfigTest, LayersToTransformFiltersSuffixMatches) {
  Json j = PeftConfig();
  j["layers_to_transform"] = 1;  // PEFT also accepts a bare int
  auto c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->Targets("encoder.layer.0.attention.self.query", 0));
  EXPECT_TRUE(c->Targets("encoder.layer.1.attention.self.query", 1));
}

TEST(LoraConfigTest, StringTargetModulesIsAFullMatchRegex) {
  Json j = PeftConfig();
  j["target_modules"] = ".*\\.(query|value)";
  auto c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->target_modules_regex, ".*\\.(query|value)");
  EXPECT_TRUE(c->Targets("encoder.layer.0.attention.self.query", 0));
  EXPECT_TRUE(c->Targets("encoder.layer.1.attention.self.value", 1));
  EXPECT_FALSE(c->Targets("encoder.layer.0.attention.self.key", 0));
  // Full match: a pattern matching only a prefix does not select the module.
  j["target_modules"] = "encoder\\.layer\\.0";
  c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->Targets("encoder.layer.0.attention.self.query", 0));
  j["target_modules"] = "all-linear";
  c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->Targets("encoder.layer.1.intermediate.dense", 1));
}

TEST(LoraConfigTest, PatternKeysFollowPeftGetPatternKey) {
  Json j = PeftConfig();  // r 4, alpha 8
  j["rank_pattern"] = Json{{"layer.1.attention.self.query", 2}, {"value", 8}};
  j["alpha_pattern"] = Json{{"encoder.layer.0.attention.self.query", 32}};
  auto c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok()) << c.status();
  // A key matches after a dot boundary ...
  EXPECT_EQ(c->RankFor("encoder.layer.1.attention.self.query"), 2);
  EXPECT_DOUBLE_EQ(c->ScaleFor("encoder.layer.1.attention.self.query"), 8.0 / 2);
  EXPECT_EQ(c->RankFor("encoder.layer.0.attention.self.value"), 8);
  EXPECT_DOUBLE_EQ(c->ScaleFor("encoder.layer.0.attention.self.value"), 8.0 / 8);
  // ... or as the whole name (the optional "(.*\.)?" prefix).
  EXPECT_DOUBLE_EQ(c->AlphaFor("encoder.layer.0.attention.self.query"), 32.0);
  EXPECT_EQ(c->RankFor("encoder.layer.0.attention.self.query"), 4);
  EXPECT_DOUBLE_EQ(c->ScaleFor("encoder.layer.0.attention.self.query"), 32.0 / 4);
  // Unmatched modules keep r / lora_alpha.
  EXPECT_EQ(c->RankFor("encoder.layer.0.attention.self.key"), 4);
  EXPECT_DOUBLE_EQ(c->ScaleFor("encoder.layer.0.attention.self.key"), 8.0 / 4);
  // Not a substring match: "alue" has no dot before it; the end is anchored.
  j["rank_pattern"] = Json{{"alue", 2}, {"layer.0", 3}};
  c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->RankFor("encoder.layer.0.attention.self.value"), 4);
  // Keys are regexes, not escaped.
  j["rank_pattern"] = Json{{"layer\\.[01]\\.attention\\.self\\.(key|value)", 16}};
  c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->RankFor("encoder.layer.1.attention.self.key"), 16);
  EXPECT_EQ(c->RankFor("encoder.layer.1.attention.self.query"), 4);
}

TEST(LoraConfigTest, FirstMatchingPatternInFileOrderWins) {
  // Both keys match layer 0's query; PEFT iterates the dict in file order.
  auto first = ParseLoraConfig(
      R"({"r": 4, "rank_pattern": {"query": 2, "layer.0.attention.self.query": 6}})", "cfg");
  auto second = ParseLoraConfig(
      R"({"r": 4, "rank_pattern": {"layer.0.attention.self.query": 6, "query": 2}})", "cfg");
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_EQ(first->RankFor("encoder.layer.0.attention.self.query"), 2);
  EXPECT_EQ(second->RankFor("encoder.layer.0.attention.self.query"), 6);
  EXPECT_EQ(second->RankFor("encoder.layer.1.attention.self.query"), 2);
}

TEST(LoraConfigTest, RsLoraScalesBySquareRootOfTheModuleRank) {
  Json j = PeftConfig();
  j["use_rslora"] = true;
  j["rank_pattern"] = Json{{"key", 16}};
  j["alpha_pattern"] = Json{{"value", 2.5}};
  auto c = ParseLoraConfig(j.dump(), "cfg");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->ScaleFor("encoder.layer.0.attention.self.query"), 8.0 / 2.0);  // sqrt(4)
  EXPECT_DOUBLE_EQ(c->ScaleFor("encoder.layer.0.attention.self.key"), 8.0 / 4.0);    // sqrt(16)
  EXPECT_DOUBLE_EQ(c->ScaleFor("encoder.layer.0.attention.self.value"), 2.5 / 2.0);  // sqrt(4)
}

struct BadConfigCase {
  std::string name;
  std::function<void(Json&)> mutate;
  std::string fragment;  // expected in the message
};

class BadLoraConfigTest : public ::testing::TestWithParam<BadConfigCase> {};

TEST_P(BadLoraConfigTest, IsInvalidArgumentNamingTheField) {
  Json j = PeftConfig();
  GetParam().mutate(j);
  auto c = ParseLoraConfig(j.dump(), "/b/1/adapter_config.json");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  EXPECT_THAT(c.status().message(),
              AllOf(HasSubstr("/b/1/adapter_config.json"), HasSubstr(GetParam().fragment)));
}

INSTANTIATE_TEST_SUITE_P(
    Refusals, BadLoraConfigTest,
    ::testing::Values(
        BadConfigCase{"Dora", [](Json& j) { j["use_dora"] = true; }, "field \"use_dora\""},
        BadConfigCase{"BiasAll", [](Json& j) { j["bias"] = "all"; }, "field \"bias\""},
        BadConfigCase{"BiasLoraOnly", [](Json& j) { j["bias"] = "lora_only"; }, "field \"bias\""},
        BadConfigCase{"ModulesToSave", [](Json& j) { j["modules_to_save"] = {"classifier"}; },
                      "field \"modules_to_save\""},
        BadConfigCase{"FanInFanOut", [](Json& j) { j["fan_in_fan_out"] = true; },
                      "field \"fan_in_fan_out\""},
        BadConfigCase{"RankZero", [](Json& j) { j["r"] = 0; }, "field \"r\""},
        BadConfigCase{"RankNegative", [](Json& j) { j["r"] = -2; }, "field \"r\""},
        BadConfigCase{"RankAbsurd", [](Json& j) { j["r"] = 5000; }, "absurd rank 5000"},
        BadConfigCase{"RankFloat", [](Json& j) { j["r"] = 4.5; }, "field \"r\""},
        BadConfigCase{"AlphaZero", [](Json& j) { j["lora_alpha"] = 0; }, "field \"lora_alpha\""},
        BadConfigCase{"AlphaNegative", [](Json& j) { j["lora_alpha"] = -1.5; },
                      "field \"lora_alpha\""},
        BadConfigCase{"AlphaString", [](Json& j) { j["lora_alpha"] = "8"; },
                      "field \"lora_alpha\""},
        BadConfigCase{"PeftType", [](Json& j) { j["peft_type"] = "IA3"; }, "field \"peft_type\""},
        BadConfigCase{"TargetModulesNumber", [](Json& j) { j["target_modules"] = 5; },
                      "field \"target_modules\""},
        BadConfigCase{"TargetModulesBadRegex", [](Json& j) { j["target_modules"] = "(query"; },
                      "field \"target_modules\""},
        BadConfigCase{"RankPatternZero",
                      [](Json& j) {
                        j["rank_pattern"] = {{"query", 0}};
                      },
                      "field \"rank_pattern.query\""},
        BadConfigCase{"RankPatternAbsurd",
                      [](Json& j) {
                        j["rank_pattern"] = {{"query", 4096}};
                      },
                      "absurd rank"},
        BadConfigCase{"RankPatternBadRegex",
                      [](Json& j) {
                        j["rank_pattern"] = {{"[q", 2}};
                      },
                      "field \"rank_pattern.[q\""},
        BadConfigCase{"AlphaPatternNegative",
                      [](Json& j) {
                        j["alpha_pattern"] = {{"value", -1}};
                      },
                      "field \"alpha_pattern.value\""},
        BadConfigCase{"RankPatternList",
                      [](Json& j) {
                        j["rank_pattern"] = {1, 2};
                      },
                      "field \"rank_pattern\""},
        BadConfigCase{"LoraBias", [](Json& j) { j["lora_bias"] = true; }, "field \"lora_bias\""},
        BadConfigCase{"LayerReplication",
                      [](Json& j) {
                        j["layer_replication"] = {{0, 1}};
                      },
                      "field \"layer_replication\""},
        BadConfigCase{"LayersNegative", [](Json& j) { j["layers_to_transform"] = {-1}; },
                      "field \"layers_to_transform\""},
        BadConfigCase{"LayersWithStringTargets",
                      [](Json& j) {
                        j["target_modules"] = ".*query";
                        j["layers_to_transform"] = {0};
                      },
                      "field \"layers_to_transform\""},
        BadConfigCase{"UseRsloraString", [](Json& j) { j["use_rslora"] = "yes"; },
                      "field \"use_rslora\""}),
    [](const ::testing::TestParamInfo<BadConfigCase>& info) { return info.param.name; });

TEST(LoraConfigTest, NonFiniteAlphaAsPythonWritesItIsRefusedNamingTheField) {
  // Python's json.dumps writes float('inf') / float('nan') as bare tokens.
  for (const char* text : {R"({"r": 4, "lora_alpha": Infinity})", R"({"r": 4, "lora_alpha": NaN})",
                           R"({"r": 4,
                               "lora_alpha": -Infinity})"}) {
    SCOPED_TRACE(text);
    auto c = ParseLoraConfig(text, "/b/adapter_config.json");
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(c.status().message(),
                AllOf(HasSubstr("/b/adapter_config.json"), HasSubstr("field \"lora_alpha\""),
                      HasSubstr("must be finite")));
  }
  auto broken = ParseLoraConfig(R"({"r": 4, )", "/b/adapter_config.json");
  EXPECT_EQ(broken.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(broken.status().message(), HasSubstr("not valid JSON"));
}

// ---------------------------------------------------------------------------
// ReadLoraBrick

TEST_F(BrickTest, ReadsModulesSortedWithValuesAndScale) {
  std::vector<TensorSpec> t;
  // Written out of order on purpose.
  AddModule(&t, 1, LoraTarget::kValue, 4, TinyBase(), 3);
  AddModule(&t, 0, LoraTarget::kFfnOut, 4, TinyBase(), 2);
  AddModule(&t, 0, LoraTarget::kQuery, 4, TinyBase(), 1);
  AddModule(&t, 0, LoraTarget::kFfnIn, 4, TinyBase(), 4);
  const std::string dir = WriteAdapter(PeftConfig(), t);
  auto modules = ReadLoraBrick(dir, TinyBase());
  ASSERT_TRUE(modules.ok()) << modules.status();
  ASSERT_EQ(modules->size(), 4u);
  const std::vector<std::pair<int, LoraTarget>> order = {{0, LoraTarget::kQuery},
                                                         {0, LoraTarget::kFfnIn},
                                                         {0, LoraTarget::kFfnOut},
                                                         {1, LoraTarget::kValue}};
  for (size_t i = 0; i < order.size(); ++i) {
    EXPECT_EQ((*modules)[i].layer, order[i].first) << i;
    EXPECT_EQ((*modules)[i].target, order[i].second) << i;
    EXPECT_EQ((*modules)[i].rank, 4);
    EXPECT_FLOAT_EQ((*modules)[i].scale, 2.0f);  // 8 / 4
  }
  const LoraHostModule& ffn_in = (*modules)[1];
  EXPECT_EQ(ffn_in.a, Values(4 * 8, 4, 1.0f));    // [4, hidden]
  EXPECT_EQ(ffn_in.b, Values(16 * 4, 4, -1.0f));  // [intermediate, 4]
  const LoraHostModule& ffn_out = (*modules)[2];
  EXPECT_EQ(ffn_out.a.size(), 4u * 16);  // [4, intermediate]
  EXPECT_EQ(ffn_out.b.size(), 8u * 4);   // [hidden, 4]
}

TEST_F(BrickTest, WidensHalfPrecision) {
  const std::vector<float> a = {0.5f, -1.25f, 2.0f, 0.0f, 1.0f, 3.0f, -0.5f, 0.25f};  // [1, 8]
  const std::vector<float> b = {1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f, 8.0f};      // [8, 1]
  auto half = [](const std::vector<float>& v) {
    std::string out;
    for (float x : v) {
      const uint16_t h = FloatToHalf(x);
      out.append(reinterpret_cast<const char*>(&h), 2);
    }
    return out;
  };
  std::vector<TensorSpec> t = {{LoraKey(0, "attention.self.key", 'A'), "F16", {1, 8}, half(a)},
                               {LoraKey(0, "attention.self.key", 'B'), "BF16", {8, 1}, [&] {
                                  std::string out;
                                  for (float x : b) {
                                    const uint16_t h = FloatToBFloat16(x);
                                    out.append(reinterpret_cast<const char*>(&h), 2);
                                  }
                                  return out;
                                }()}};
  Json cfg = PeftConfig();
  cfg["r"] = 1;
  auto modules = ReadLoraBrick(WriteAdapter(cfg, t), TinyBase());
  ASSERT_TRUE(modules.ok()) << modules.status();
  ASSERT_EQ(modules->size(), 1u);
  EXPECT_EQ((*modules)[0].a, a);
  EXPECT_EQ((*modules)[0].b, b);
  EXPECT_FLOAT_EQ((*modules)[0].scale, 8.0f);
}

TEST_F(BrickTest, PerModuleRankAndScaleFromPatterns) {
  Json cfg = PeftConfig();  // r 4, alpha 8
  cfg["rank_pattern"] = Json{{"layer.1.attention.self.query", 2}};
  cfg["alpha_pattern"] = Json{{"value", 1}};
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  AddModule(&t, 1, LoraTarget::kQuery, 2);
  AddModule(&t, 1, LoraTarget::kValue, 4);
  auto modules = ReadLoraBrick(WriteAdapter(cfg, t), TinyBase());
  ASSERT_TRUE(modules.ok()) << modules.status();
  ASSERT_EQ(modules->size(), 3u);
  EXPECT_EQ((*modules)[0].rank, 4);
  EXPECT_FLOAT_EQ((*modules)[0].scale, 2.0f);
  EXPECT_EQ((*modules)[1].rank, 2);
  EXPECT_FLOAT_EQ((*modules)[1].scale, 4.0f);
  EXPECT_EQ((*modules)[2].rank, 4);
  EXPECT_FLOAT_EQ((*modules)[2].scale, 0.25f);

  cfg["use_rslora"] = true;
  modules = ReadLoraBrick(WriteAdapter(cfg, t), TinyBase());
  ASSERT_TRUE(modules.ok()) << modules.status();
  EXPECT_FLOAT_EQ((*modules)[0].scale, 8.0f / 2.0f);
  EXPECT_FLOAT_EQ((*modules)[1].scale, 8.0f / std::sqrt(2.0f));
  EXPECT_FLOAT_EQ((*modules)[2].scale, 1.0f / 2.0f);
}

TEST_F(BrickTest, StringTargetModulesLoadsSelectedAndRefusesOthers) {
  Json cfg = PeftConfig();
  cfg["target_modules"] = ".*\\.(query|value)";
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  AddModule(&t, 1, LoraTarget::kValue, 4);
  auto modules = ReadLoraBrick(WriteAdapter(cfg, t), TinyBase());
  ASSERT_TRUE(modules.ok()) << modules.status();
  EXPECT_EQ(modules->size(), 2u);

  AddModule(&t, 1, LoraTarget::kKey, 4);
  modules = ReadLoraBrick(WriteAdapter(cfg, t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(),
              AllOf(HasSubstr("encoder.layer.1.attention.self.key"), HasSubstr("target_modules")));
}

TEST_F(BrickTest, ModuleOutsideLayersToTransformIsRefused) {
  Json cfg = PeftConfig();
  cfg["layers_to_transform"] = {1};
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  auto modules = ReadLoraBrick(WriteAdapter(cfg, t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), HasSubstr("layers_to_transform"));
}

TEST_F(BrickTest, ConfigRefusalsSurfaceFromReadLoraBrick) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  Json cfg = PeftConfig();
  cfg["use_dora"] = true;
  auto modules = ReadLoraBrick(WriteAdapter(cfg, t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), AllOf(HasSubstr(kLoraConfigFile), HasSubstr("use_dora")));
}

TEST_F(BrickTest, AWithoutBIsRefused) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  AddModule(&t, 1, LoraTarget::kValue, 4);
  t.pop_back();  // drop layer 1 value's B
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(),
              AllOf(HasSubstr(LoraKey(1, "attention.self.value", 'A')),
                    HasSubstr(LoraKey(1, "attention.self.value", 'B')), HasSubstr("no matching")));
}

TEST_F(BrickTest, BWithoutAIsRefused) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  t.erase(t.begin());  // drop A
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(),
              AllOf(HasSubstr(LoraKey(0, "attention.self.query", 'A')), HasSubstr("no matching")));
}

TEST_F(BrickTest, ShapeForAnotherModelIsFailedPrecondition) {
  EncoderConfig wider = TinyBase();
  wider.hidden_size = 10;
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4, wider);
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(modules.status().message(), AllOf(HasSubstr(LoraKey(0, "attention.self.query", 'A')),
                                                HasSubstr("[4, 10]"), HasSubstr("[4, 8]")));
}

TEST_F(BrickTest, WrongOutFeaturesIsFailedPrecondition) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kFfnIn, 4);
  t[1].shape = {8, 4};  // B of intermediate.dense must be [16, 4]
  t[1].bytes.resize(8 * 4 * 4);
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(modules.status().message(), AllOf(HasSubstr(LoraKey(0, "intermediate.dense", 'B')),
                                                HasSubstr("[8, 4]"), HasSubstr("[16, 4]")));
}

TEST_F(BrickTest, LayerBeyondTheBaseIsFailedPrecondition) {
  std::vector<TensorSpec> t;
  AddModule(&t, 2, LoraTarget::kQuery, 4);  // TinyBase has layers 0 and 1
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(modules.status().message(),
              AllOf(HasSubstr(LoraKey(2, "attention.self.query", 'A')), HasSubstr("2 layers")));
}

TEST_F(BrickTest, RankDisagreementsAreInvalidArgument) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 2);  // config says r = 4
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), AllOf(HasSubstr("rank 2"), HasSubstr("rank 4")));

  std::vector<TensorSpec> mixed;
  AddModule(&mixed, 0, LoraTarget::kQuery, 4);
  std::vector<TensorSpec> other;
  AddModule(&other, 0, LoraTarget::kQuery, 2);
  mixed[1] = other[1];  // B of rank 2 with A of rank 4
  modules = ReadLoraBrick(WriteAdapter(PeftConfig(), mixed), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), HasSubstr("disagree on the rank"));
}

TEST_F(BrickTest, NonMatrixIsInvalidArgument) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  t[0].shape = {4, 2, 4};
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), HasSubstr("2 dimensions"));
}

TEST_F(BrickTest, NanOrInfIsInvalidArgumentNamingTheTensor) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  std::vector<float> b = Values(8 * 4, 0, -1.0f);
  b[5] = std::nanf("");
  t[1].bytes = F32Bytes(b);
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), AllOf(HasSubstr(LoraKey(0, "attention.self.query", 'B')),
                                                HasSubstr("NaN"), HasSubstr("element 5")));

  std::vector<float> a = Values(4 * 8, 0, 1.0f);
  a[0] = -std::numeric_limits<float>::infinity();
  t[0].bytes = F32Bytes(a);
  modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(),
              AllOf(HasSubstr(LoraKey(0, "attention.self.query", 'A')), HasSubstr("Inf")));
}

TEST_F(BrickTest, TruncatedFileIsRefusedNamingTheFile) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  const std::string dir = WriteAdapter(PeftConfig(), t);
  const std::string bytes = MakeSafetensors(t);
  WriteFile(dir_ / kLoraWeightsFile, bytes.substr(0, bytes.size() - 7));
  auto modules = ReadLoraBrick(dir, TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), HasSubstr((dir_ / kLoraWeightsFile).string()));

  WriteFile(dir_ / kLoraWeightsFile, bytes.substr(0, 5));
  modules = ReadLoraBrick(dir, TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(BrickTest, MissingFilesAreNotFound) {
  auto modules = ReadLoraBrick(dir_.string(), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(modules.status().message(), HasSubstr(kLoraConfigFile));
  WriteFile(dir_ / kLoraConfigFile, PeftConfig().dump());
  modules = ReadLoraBrick(dir_.string(), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(modules.status().message(), HasSubstr(kLoraWeightsFile));
}

TEST_F(BrickTest, PoolerAndOtherModulesAreIgnored) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  t.push_back({"base_model.model.pooler.dense.lora_A.weight",
               "F32",
               {4, 8},
               F32Bytes(Values(32, 0, 1.0f))});
  t.push_back({"base_model.model.pooler.dense.lora_B.weight",
               "F32",
               {8, 4},
               F32Bytes(Values(32, 0, 1.0f))});
  // Another layer-internal module that is not a LoRA target, and a NaN there
  // that must not matter because it is never read.
  t.push_back({"base_model.model.encoder.layer.0.attention.output.LayerNorm.lora_A.weight",
               "F32",
               {1},
               F32Bytes({std::nanf("")})});
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  ASSERT_TRUE(modules.ok()) << modules.status();
  ASSERT_EQ(modules->size(), 1u);
  EXPECT_EQ((*modules)[0].target, LoraTarget::kQuery);
}

TEST_F(BrickTest, NoModuleAtAllIsInvalidArgument) {
  std::vector<TensorSpec> t = {
      {"base_model.model.pooler.dense.lora_A.weight", "F32", {4, 8}, F32Bytes(Values(32, 0, 1.0f))},
      {"base_model.model.pooler.dense.lora_B.weight",
       "F32",
       {8, 4},
       F32Bytes(Values(32, 0, 1.0f))}};
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(),
              AllOf(HasSubstr("no LoRA module"), HasSubstr("2 tensor(s) ignored")));
  modules = ReadLoraBrick(WriteAdapter(PeftConfig(), {}), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(BrickTest, OtherTensorsOnATargetAreRefused) {
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  t.push_back({"base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector",
               "F32",
               {8},
               F32Bytes(Values(8, 0, 1.0f))});
  auto modules = ReadLoraBrick(WriteAdapter(PeftConfig(), t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), HasSubstr("lora_magnitude_vector"));
}

TEST_F(BrickTest, ModuleNotInTargetModulesIsRefused) {
  Json cfg = PeftConfig();
  cfg["target_modules"] = {"query"};
  std::vector<TensorSpec> t;
  AddModule(&t, 0, LoraTarget::kQuery, 4);
  AddModule(&t, 0, LoraTarget::kValue, 4);
  auto modules = ReadLoraBrick(WriteAdapter(cfg, t), TinyBase());
  EXPECT_EQ(modules.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(modules.status().message(), HasSubstr("encoder.layer.0.attention.self.value"));
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
}  // namespace kiln
