#include "engine/tokenizer/tokenizer_files.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln::tokenizer {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Pair;
using ::testing::UnorderedElementsAre;

// A minimal BERT tokenizer.json; `model`, `normalizer`, `extra` are spliced in.
std::string TokenizerJson(const std::string& normalizer = R"({"type": "BertNormalizer",
    "clean_text": true, "handle_chinese_chars": true, "strip_accents": null,
    "lowercase": false})",
                          const std::string& post = R"({"type": "BertProcessing",
    "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]})",
                          const std::string& added = "[]") {
  return absl::StrCat(R"({"version": "1.0", "truncation": null, "padding": null,
  "added_tokens": )",
                      added, R"(, "normalizer": )", normalizer,
                      R"(, "pre_tokenizer": {"type": "BertPreTokenizer"},
  "post_processor": )",
                      post, R"(, "decoder": null,
  "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 7,
            "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4}}})");
}

class TokenizerFilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           absl::StrCat("kiln_tokenizer_files_test_", ::getpid(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string Write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ / name, std::ios::binary | std::ios::trunc) << text;
    return (dir_ / name).string();
  }
  fs::path dir_;
};

TEST_F(TokenizerFilesTest, ReadsTokenizerJson) {
  absl::StatusOr<WordPieceTokenizerSpec> spec =
      ReadTokenizerJson(Write("tokenizer.json", TokenizerJson()));
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->vocab.size(), 5u);
  EXPECT_EQ(spec->model.max_input_chars_per_word, 7);
  EXPECT_EQ(spec->cls_id, 2);
  EXPECT_EQ(spec->sep_id, 3);
  EXPECT_EQ(spec->pad_id, 0);
  EXPECT_FALSE(spec->normalizer.lowercase);
  EXPECT_FALSE(spec->normalizer.strip_accents);  // null follows lowercase
}

TEST_F(TokenizerFilesTest, RejectsAddedTokensThatAreNotMatchedVerbatim) {
  absl::StatusOr<WordPieceTokenizerSpec> spec = ReadTokenizerJson(
      Write("tokenizer.json",
            TokenizerJson(R"({"type": "BertNormalizer"})", R"({"type": "BertProcessing",
    "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]})",
                          R"([{"id": 5, "content": "<m>", "special": true, "lstrip": true}])")));
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(spec.status().message(), HasSubstr("tokenizer.json: added_tokens[0].lstrip"));
}

TEST_F(TokenizerFilesTest, RejectsOtherPostProcessorsNamingTheField) {
  absl::StatusOr<WordPieceTokenizerSpec> spec =
      ReadTokenizerJson(Write("tokenizer.json", TokenizerJson(R"({"type": "BertNormalizer"})",
                                                              R"({"type": "RobertaProcessing"})")));
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(spec.status().message(), HasSubstr("post_processor.type is \"RobertaProcessing\""));
  spec = ReadTokenizerJson(
      Write("tokenizer.json", TokenizerJson(R"({"type": "BertNormalizer"})", "null")));
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(spec.status().message(), HasSubstr("post_processor is null"));
}

TEST_F(TokenizerFilesTest, MissingFileIsNotFound) {
  absl::StatusOr<WordPieceTokenizerSpec> spec =
      ReadTokenizerJson((dir_ / "tokenizer.json").string());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(spec.status().message(), HasSubstr("tokenizer.json: file not found"));
}

TEST_F(TokenizerFilesTest, VocabTxtLinesAsTransformersReadsThem) {
  // Universal newlines; a repeated token keeps its last line's id.
  const std::string vocab =
      Write("vocab.txt", "[PAD]\r\n[UNK]\r[CLS]\n[SEP]\n[MASK]\nhello\nhello\nworld");
  absl::StatusOr<WordPieceTokenizerSpec> spec =
      ReadVocabTxt(vocab, (dir_ / "tokenizer_config.json").string());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_THAT(
      spec->vocab,
      UnorderedElementsAre(Pair("[PAD]", 0), Pair("[UNK]", 1), Pair("[CLS]", 2), Pair("[SEP]", 3),
                           Pair("[MASK]", 4), Pair("hello", 6), Pair("world", 7)));
  // No tokenizer_config.json: BERT defaults (uncased).
  EXPECT_TRUE(spec->normalizer.lowercase);
  EXPECT_TRUE(spec->normalizer.strip_accents);
  EXPECT_EQ(spec->cls_id, 2);
  EXPECT_EQ(spec->sep_id, 3);
  EXPECT_EQ(spec->pad_id, 0);
  EXPECT_EQ(spec->added_tokens.size(), 5u);
}

TEST_F(TokenizerFilesTest, VocabTxtHonoursTokenizerConfig) {
  const std::string vocab = Write("vocab.txt", "<pad>\n[UNK]\n[CLS]\n[SEP]\n");
  const std::string config = Write("tokenizer_config.json", R"({"do_lower_case": false,
      "tokenize_chinese_chars": false, "strip_accents": null,
      "pad_token": {"content": "<pad>"}, "mask_token": null})");
  absl::StatusOr<WordPieceTokenizerSpec> spec = ReadVocabTxt(vocab, config);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_FALSE(spec->normalizer.lowercase);
  EXPECT_FALSE(spec->normalizer.strip_accents);
  EXPECT_FALSE(spec->normalizer.handle_chinese_chars);
  EXPECT_EQ(spec->pad_id, 0);
  EXPECT_EQ(spec->added_tokens.size(), 4u);  // no mask token
  EXPECT_THAT(spec->source, HasSubstr("tokenizer_config.json"));

  Write("tokenizer_config.json", R"({"do_basic_tokenize": false})");
  spec = ReadVocabTxt(vocab, config);
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(spec.status().message(), HasSubstr("tokenizer_config.json: do_basic_tokenize"));

  Write("tokenizer_config.json", R"({"do_lower_case": "yes"})");
  spec = ReadVocabTxt(vocab, config);
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(spec.status().message(), HasSubstr("do_lower_case must be true or false"));
}

TEST_F(TokenizerFilesTest, VocabTxtMustBeUtf8) {
  absl::StatusOr<WordPieceTokenizerSpec> spec =
      ReadVocabTxt(Write("vocab.txt", "[UNK]\n\xFF\n"), (dir_ / "none.json").string());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(spec.status().message(), HasSubstr("vocab.txt: invalid UTF-8 at byte offset 6"));
}

}  // namespace
}  // namespace kiln::tokenizer
