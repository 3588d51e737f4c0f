#include "engine/tokenizer/bpe_files.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/bpe.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace kiln::tokenizer {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;
using Json = nlohmann::json;

Json AddedToken(const std::string& content, int id) {
  return {{"id", id},        {"content", content},  {"single_word", false}, {"lstrip", false},
          {"rstrip", false}, {"normalized", false}, {"special", true}};
}

// A minimal byte-level BPE tokenizer.json as `tokenizers` 0.20 writes it
// ("Ġ" is the space byte).
Json MinimalTokenizer() {
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", {AddedToken("<sep>", 4), AddedToken("<cls>", 5)}},
          {"normalizer", nullptr},
          {"pre_tokenizer",
           {{"type", "ByteLevel"},
            {"add_prefix_space", false},
            {"trim_offsets", true},
            {"use_regex", true}}},
          {"post_processor", nullptr},
          {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}}},
          {"model",
           {{"type", "BPE"},
            {"dropout", nullptr},
            {"unk_token", nullptr},
            {"continuing_subword_prefix", nullptr},
            {"end_of_word_suffix", nullptr},
            {"fuse_unk", false},
            {"byte_fallback", false},
            {"ignore_merges", false},
            {"vocab", {{"a", 0}, {"b", 1}, {"ab", 2}, {"\u0120", 3}, {"<sep>", 4}, {"<cls>", 5}}},
            {"merges", Json::array({Json::array({"a", "b"})})}}}};
}

class BpeFilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           absl::StrCat("kiln_bpe_files_test_", ::getpid(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Write(const std::string& text, const std::string& name = "tokenizer.json") {
    std::ofstream(dir_ / name, std::ios::binary | std::ios::trunc) << text;
    return (dir_ / name).string();
  }
  absl::StatusOr<BpeTokenizerSpec> Read(const Json& j) {
    return ReadBpeTokenizerJson(Write(j.dump()));
  }
  // Reading and building: merges are checked when the tokenizer is built.
  absl::Status Load(const Json& j) { return BpeTokenizer::Load(Write(j.dump())).status(); }

  fs::path dir_;
};

TEST_F(BpeFilesTest, ReadsAByteLevelBpeTokenizer) {
  absl::StatusOr<BpeTokenizerSpec> spec = Read(MinimalTokenizer());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->vocab.size(), 6u);
  EXPECT_THAT(spec->merges, ElementsAre(Pair("a", "b")));
  EXPECT_FALSE(spec->pre_tokenizer.digits_individual.has_value());
  EXPECT_FALSE(spec->pre_tokenizer.add_prefix_space);
  EXPECT_TRUE(spec->pre_tokenizer.use_regex);
  ASSERT_EQ(spec->added_tokens.size(), 2u);
  EXPECT_EQ(spec->added_tokens[0].content, "<sep>");
  EXPECT_EQ(spec->added_tokens[0].id, 4);
  EXPECT_TRUE(spec->added_tokens[0].special);
  EXPECT_FALSE(spec->added_tokens[0].normalized);
  EXPECT_EQ(spec->sep_token, "<sep>");
  EXPECT_EQ(spec->cls_token, "<cls>");
}

TEST_F(BpeFilesTest, ReadsTheStarCoder2Pipeline) {
  Json j = MinimalTokenizer();
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers",
                         {{{"type", "Digits"}, {"individual_digits", true}},
                          {{"type", "ByteLevel"},
                           {"add_prefix_space", true},
                           {"trim_offsets", true},
                           {"use_regex", false}}}}};
  j["post_processor"] = {
      {"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}};
  j["model"]["merges"] = {"#version: 0.2", "a b"};  // the older "a b" string form
  absl::StatusOr<BpeTokenizerSpec> spec = Read(j);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->pre_tokenizer.digits_individual, true);
  EXPECT_TRUE(spec->pre_tokenizer.add_prefix_space);
  EXPECT_FALSE(spec->pre_tokenizer.use_regex);
  EXPECT_THAT(spec->merges, ElementsAre(Pair("a", "b")));
}

TEST_F(BpeFilesTest, RejectsModelTypesOtherThanBpe) {
  for (const char* type : {"WordPiece", "Unigram", "WordLevel"}) {
    Json j = MinimalTokenizer();
    j["model"]["type"] = type;
    absl::Status s = Read(j).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << type;
    EXPECT_THAT(s.message(), HasSubstr(absl::StrCat("tokenizer.json: model.type is \"", type,
                                                    "\"; only \"BPE\" is supported")));
  }
}

TEST_F(BpeFilesTest, RejectsAMergeNamingATokenNotInTheVocabulary) {
  Json j = MinimalTokenizer();
  j["model"]["merges"] = Json::array({Json::array({"a", "b"}), Json::array({"\u0120", "q"})});
  absl::Status s = Load(j);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(),
              HasSubstr("tokenizer.json: model.merges[1]: \"q\" is not in model.vocab"));
}

TEST_F(BpeFilesTest, RejectsAMergeWhoseResultIsNotInTheVocabulary) {
  Json j = MinimalTokenizer();
  j["model"]["vocab"].erase("ab");
  absl::Status s = Load(j);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(),
              HasSubstr("model.merges[0]: the merged token \"ab\" is not in model.vocab"));
}

TEST_F(BpeFilesTest, RejectsAMergeThatIsNotTwoTokens) {
  Json j = MinimalTokenizer();
  j["model"]["merges"] = {"a b c"};
  absl::Status s = Read(j).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("model.merges[0] is \"a b c\"; expected two tokens"));
  j["model"]["merges"] = Json::array({Json::array({"a", "b", "c"})});
  s = Read(j).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("model.merges[0] must be a string \"a b\" or a pair"));
}

TEST_F(BpeFilesTest, RejectsAnUnkTokenNotInTheVocabulary) {
  Json j = MinimalTokenizer();
  j["model"]["unk_token"] = "<unk>";
  absl::Status s = Load(j);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("model.unk_token \"<unk>\" is not in model.vocab"));
}

TEST_F(BpeFilesTest, RejectsNormalizers) {
  Json j = MinimalTokenizer();
  j["normalizer"] = {{"type", "NFC"}};
  absl::Status s = Read(j).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("tokenizer.json: normalizer.type is \"NFC\"; only a null "
                                     "normalizer is supported"));
}

TEST_F(BpeFilesTest, RejectsUnsupportedPreTokenizersNamingTheStep) {
  Json j = MinimalTokenizer();
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  absl::Status s = Read(j).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("pre_tokenizer.type is \"Whitespace\"; supported: ByteLevel"));

  // ByteLevel must come last: Digits after it would see byte-level text.
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers",
                         {{{"type", "ByteLevel"}, {"add_prefix_space", false}},
                          {{"type", "Digits"}, {"individual_digits", true}}}}};
  s = Read(j).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("pre_tokenizer.pretokenizers[0].type is \"ByteLevel\""));

  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers", {{{"type", "Metaspace"}, {"replacement", "_"}}}}};
  s = Read(j).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("pre_tokenizer.pretokenizers[0].type is \"Metaspace\""));

  j["pre_tokenizer"] = nullptr;
  s = Read(j).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("tokenizer.json: pre_tokenizer is null"));

  j["pre_tokenizer"] = {{"type", "ByteLevel"}};
  s = Read(j).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("pre_tokenizer.add_prefix_space is missing"));
}

TEST_F(BpeFilesTest, RejectsModelSettingsOtherThanTheDefaults) {
  const std::pair<const char*, Json> settings[] = {
      {"byte_fallback", true},
      {"dropout", 0.1},
      {"continuing_subword_prefix", "##"},
      {"end_of_word_suffix", "</w>"},
  };
  for (const auto& [key, value] : settings) {
    Json j = MinimalTokenizer();
    j["model"][key] = value;
    absl::Status s = Read(j).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << key;
    EXPECT_THAT(s.message(), HasSubstr(absl::StrCat("tokenizer.json: model.", key, " is ")));
  }
}

TEST_F(BpeFilesTest, RejectsAddedTokensNotMatchedVerbatim) {
  for (const char* flag : {"lstrip", "rstrip", "single_word"}) {
    Json j = MinimalTokenizer();
    j["added_tokens"][1][flag] = true;
    absl::Status s = Read(j).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << flag;
    EXPECT_THAT(s.message(),
                HasSubstr(absl::StrCat("added_tokens[1].", flag, " is true for \"<cls>\"")));
  }
}

TEST_F(BpeFilesTest, RejectsPostProcessorsThatAddTokens) {
  Json j = MinimalTokenizer();
  j["post_processor"] = {{"type", "TemplateProcessing"}};
  absl::Status s = Read(j).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("post_processor.type is \"TemplateProcessing\""));
}

TEST_F(BpeFilesTest, RejectsMalformedJsonNamingTheFile) {
  absl::Status s = ReadBpeTokenizerJson(Write("{\"model\": ")).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("tokenizer.json: malformed JSON"));
}

TEST_F(BpeFilesTest, MissingFileIsNotFound) {
  absl::Status s = ReadBpeTokenizerJson((dir_ / "absent.json").string()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("absent.json: file not found"));
}

// The library ignores the ids written in added_tokens: a token in the
// vocabulary keeps its vocabulary id, a new one gets the next id past the
// vocabulary (its entry count). Pinned against the library in variants.json.
TEST_F(BpeFilesTest, AssignsAddedTokenIdsAsTheLibraryDoes) {
  Json j = MinimalTokenizer();
  j["added_tokens"] = {AddedToken("<sep>", 40), AddedToken("<new>", 70), AddedToken("<two>", 71),
                       AddedToken("<cls>", 5)};
  absl::StatusOr<BpeTokenizerSpec> spec = Read(j);
  ASSERT_TRUE(spec.ok()) << spec.status();
  ASSERT_EQ(spec->added_tokens.size(), 4u);
  EXPECT_EQ(spec->added_tokens[0].id, 4);  // from the vocabulary
  EXPECT_EQ(spec->added_tokens[1].id, 6);  // vocabulary size
  EXPECT_EQ(spec->added_tokens[2].id, 7);
  EXPECT_EQ(spec->added_tokens[3].id, 5);
}

TEST_F(BpeFilesTest, RejectsAnAddedTokenListedTwice) {
  Json j = MinimalTokenizer();
  j["added_tokens"].push_back(AddedToken("<sep>", 4));
  absl::Status s = Read(j).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("added_tokens[2].content \"<sep>\" is listed twice"));
}

TEST_F(BpeFilesTest, ReadsSepAndClsNamesFromTokenizerConfig) {
  Write(MinimalTokenizer().dump());
  Write(R"({"sep_token": "<cls>", "cls_token": {"content": "<sep>", "special": true}})",
        "tokenizer_config.json");
  absl::StatusOr<BpeTokenizerSpec> spec = ReadBpeTokenizerDirectory(dir_.string());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->sep_token, "<cls>");
  EXPECT_EQ(spec->cls_token, "<sep>");
  EXPECT_THAT(spec->source, HasSubstr("tokenizer_config.json"));

  Write(R"({"sep_token": 3})", "tokenizer_config.json");
  absl::Status s = ReadBpeTokenizerDirectory(dir_.string()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("tokenizer_config.json: sep_token must be a string"));
}

}  // namespace
}  // namespace kiln::tokenizer
