#include "engine/tokenizer/wordpiece.h"

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

const std::string kModelDir = std::string(KILN_SOURCE_DIR) + "/models/all-MiniLM-L6-v2";
const std::string kFixture =
    std::string(KILN_SOURCE_DIR) + "/tests/engine/tokenizer/testdata/wordpiece_parity.jsonl";

struct ParityCase {
  std::string category;
  std::string text;
  std::vector<int32_t> ids;
};

// Reads tests/engine/tokenizer/testdata/wordpiece_parity.jsonl, written by
// tools/make_tokenizer_fixture.py from Hugging Face `tokenizers`.
std::vector<ParityCase> LoadParityFixture() {
  std::vector<ParityCase> cases;
  std::ifstream in(kFixture);
  std::string line;
  while (std::getline(in, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    cases.push_back({j.at("cat").get<std::string>(), j.at("text").get<std::string>(),
                     j.at("ids").get<std::vector<int32_t>>()});
  }
  return cases;
}

// A readable rendering of arbitrary text: printable ASCII as is, the rest as
// \u{...} escapes.
std::string Escape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const unsigned char b = s[i];
    if (b >= 0x20 && b < 0x7F) {
      out.push_back(static_cast<char>(b));
      ++i;
      continue;
    }
    const int len = b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
    uint32_t cp = len == 1 ? b : b & (0x7F >> len);
    for (int k = 1; k < len && i + k < s.size(); ++k) cp = (cp << 6) | (s[i + k] & 0x3F);
    std::ostringstream hex;
    hex << "\\u{" << std::hex << cp << "}";
    out += hex.str();
    i += len;
  }
  return out;
}

std::string Ids(const std::vector<int32_t>& ids) { return absl::StrJoin(ids, " "); }

// Checks `tok` against every fixture case; reports the first few mismatches
// with text, expected and actual ids.
void ExpectParity(const WordPieceTokenizer& tok, const std::vector<ParityCase>& cases) {
  int mismatches = 0;
  std::string report;
  for (const ParityCase& c : cases) {
    absl::StatusOr<Encoding> enc = tok.Encode(c.text, 0);
    if (enc.ok() && enc->ids == c.ids && !enc->truncated) continue;
    if (++mismatches <= 5) {
      absl::StrAppend(&report, "\n[", c.category, "] text: \"", Escape(c.text),
                      "\"\n  expected: ", Ids(c.ids),
                      "\n  actual:   ", enc.ok() ? Ids(enc->ids) : enc.status().ToString());
    }
  }
  EXPECT_EQ(mismatches, 0) << "of " << cases.size()
                           << " fixture texts; first mismatches:" << report;
}

class WordPieceTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(fs::exists(kModelDir + "/tokenizer.json"))
        << kModelDir << " is missing: run scripts/fetch_model.sh";
    absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> tok =
        WordPieceTokenizer::FromDirectory(kModelDir);
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = *std::move(tok);
  }
  void TearDown() override {
    if (!dir_.empty()) fs::remove_all(dir_);
  }

  // A fresh scratch directory for this test.
  const fs::path& ScratchDir() {
    if (dir_.empty()) {
      dir_ = fs::temp_directory_path() /
             absl::StrCat("kiln_wordpiece_test_", ::getpid(), "_",
                          ::testing::UnitTest::GetInstance()->current_test_info()->name());
      fs::remove_all(dir_);
      fs::create_directories(dir_);
    }
    return dir_;
  }

  // Copies the model's tokenizer.json into the scratch dir with the first
  // occurrence of `from` replaced by `to`.
  void WriteEditedTokenizerJson(const std::string& from, const std::string& to) {
    std::ifstream in(kModelDir + "/tokenizer.json");
    std::string s((std::istreambuf_iterator<char>(in)), {});
    const size_t at = s.find(from);
    ASSERT_NE(at, std::string::npos) << from;
    s.replace(at, from.size(), to);
    std::ofstream(ScratchDir() / "tokenizer.json", std::ios::trunc) << s;
  }

  std::vector<int32_t> Encode(const std::string& text, int max_length = 0) {
    absl::StatusOr<Encoding> enc = tok_->Encode(text, max_length);
    EXPECT_TRUE(enc.ok()) << enc.status();
    return enc.ok() ? enc->ids : std::vector<int32_t>{};
  }

  std::unique_ptr<WordPieceTokenizer> tok_;
  fs::path dir_;
};

TEST_F(WordPieceTokenizerTest, MatchesHuggingFaceOnParityFixture) {
  const std::vector<ParityCase> cases = LoadParityFixture();
  ASSERT_GE(cases.size(), 2000u) << kFixture << ": run tools/make_tokenizer_fixture.py";
  ExpectParity(*tok_, cases);
}

TEST_F(WordPieceTokenizerTest, VocabTxtFallbackMatchesParityFixture) {
  for (const char* f : {"vocab.txt", "tokenizer_config.json"}) {
    fs::copy_file(fs::path(kModelDir) / f, ScratchDir() / f);
  }
  absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> fallback =
      WordPieceTokenizer::FromDirectory(ScratchDir().string());
  ASSERT_TRUE(fallback.ok()) << fallback.status();
  EXPECT_THAT((*fallback)->source(), HasSubstr("vocab.txt"));
  EXPECT_EQ((*fallback)->vocab_size(), tok_->vocab_size());
  EXPECT_EQ((*fallback)->cls_id(), tok_->cls_id());
  EXPECT_EQ((*fallback)->sep_id(), tok_->sep_id());
  EXPECT_EQ((*fallback)->unk_id(), tok_->unk_id());
  EXPECT_EQ((*fallback)->pad_id(), tok_->pad_id());
  EXPECT_EQ((*fallback)->TokenToId("[MASK]"), 103);
  ExpectParity(**fallback, LoadParityFixture());
}

TEST_F(WordPieceTokenizerTest, SpecialIdsAndVocabulary) {
  EXPECT_EQ(tok_->cls_id(), 101);
  EXPECT_EQ(tok_->sep_id(), 102);
  EXPECT_EQ(tok_->unk_id(), 100);
  EXPECT_EQ(tok_->pad_id(), 0);
  EXPECT_EQ(tok_->vocab_size(), 30522);
  EXPECT_EQ(tok_->IdToToken(101), "[CLS]");
  EXPECT_EQ(tok_->IdToToken(1996), "the");
  EXPECT_EQ(tok_->IdToToken(-1), "");
  EXPECT_EQ(tok_->IdToToken(30522), "");
  EXPECT_EQ(tok_->TokenToId("[MASK]"), 103);
  EXPECT_EQ(tok_->TokenToId("the"), 1996);
  EXPECT_EQ(tok_->TokenToId("##s"), 2015);
  EXPECT_EQ(tok_->TokenToId("not-a-token"), std::nullopt);
}

TEST_F(WordPieceTokenizerTest, EncodesBasicText) {
  EXPECT_THAT(Encode(""), ElementsAre(101, 102));
  EXPECT_THAT(Encode(" \t\n\u3000"), ElementsAre(101, 102));
  EXPECT_THAT(Encode("Hello, world!"), ElementsAre(101, 7592, 1010, 2088, 999, 102));
  // Accents are stripped, case folded: "Café" == "cafe".
  EXPECT_EQ(Encode("Café"), Encode("cafe"));
}

TEST_F(WordPieceTokenizerTest, SpecialTokensMatchOnRawTextOnly) {
  // As the library does: added tokens are cut out of the raw input before
  // normalization, so "[MASK]" is id 103 but "[mask]" is "[", "mask", "]".
  EXPECT_THAT(Encode("[MASK] hi [mask] [SEP]x"),
              ElementsAre(101, 103, 7632, 1031, 7308, 1033, 102, 1060, 102));
  EXPECT_THAT(Encode("[MASK][MASK]"), ElementsAre(101, 103, 103, 102));
}

TEST_F(WordPieceTokenizerTest, WordLongerThan100CharsIsUnknown) {
  EXPECT_THAT(Encode(std::string(101, 'a')), ElementsAre(101, 100, 102));
  const std::vector<int32_t> hundred = Encode(std::string(100, 'a'));
  EXPECT_GT(hundred.size(), 3u);
  EXPECT_EQ(std::count(hundred.begin(), hundred.end(), 100), 0);
}

TEST_F(WordPieceTokenizerTest, LongTextsEncodeAsTheSumOfTheirParts) {
  // Long texts are normalized in chunks; the ids must not show it.
  std::string head;
  while (head.size() < 9000)
    head += "\u00dcn\u00efc\u00f6d\u00e9 \u4e2d\u6587 \U0001F600 e\u0301x\ty\n";
  const std::string tail = "tail words [MASK] end";
  std::vector<int32_t> want = Encode(head);
  want.pop_back();  // [SEP]
  const std::vector<int32_t> tail_ids = Encode(tail);
  want.insert(want.end(), tail_ids.begin() + 1, tail_ids.end());
  EXPECT_EQ(Encode(head + tail), want);
  // One word longer than a chunk stays one word.
  EXPECT_THAT(Encode(std::string(5000, 'a')), ElementsAre(101, 100, 102));
}

TEST_F(WordPieceTokenizerTest, TruncatesToMaxLengthKeepingSepLast) {
  std::string text;
  for (int i = 0; i < 400; ++i) absl::StrAppend(&text, "word", i % 7, " ");
  const std::vector<int32_t> full = Encode(text);
  ASSERT_GT(full.size(), 256u);

  absl::StatusOr<Encoding> enc = tok_->Encode(text, 256);
  ASSERT_TRUE(enc.ok()) << enc.status();
  EXPECT_TRUE(enc->truncated);
  ASSERT_EQ(enc->ids.size(), 256u);
  EXPECT_EQ(enc->ids.front(), 101);
  EXPECT_EQ(enc->ids.back(), 102);
  EXPECT_TRUE(std::equal(enc->ids.begin(), enc->ids.end() - 1, full.begin()));

  // "the" is one token: 254 of them fill 256 exactly, 255 do not fit.
  std::string exact;
  for (int i = 0; i < 254; ++i) exact += "the ";
  enc = tok_->Encode(exact, 256);
  ASSERT_TRUE(enc.ok());
  EXPECT_FALSE(enc->truncated);
  EXPECT_EQ(enc->ids.size(), 256u);
  enc = tok_->Encode(exact + "the", 256);
  ASSERT_TRUE(enc.ok());
  EXPECT_TRUE(enc->truncated);
  EXPECT_EQ(enc->ids.size(), 256u);
  EXPECT_EQ(enc->ids.back(), 102);

  enc = tok_->Encode("hello world", 2);
  ASSERT_TRUE(enc.ok());
  EXPECT_THAT(enc->ids, ElementsAre(101, 102));
  EXPECT_TRUE(enc->truncated);
  enc = tok_->Encode("", 2);
  ASSERT_TRUE(enc.ok());
  EXPECT_FALSE(enc->truncated);
}

TEST_F(WordPieceTokenizerTest, RejectsMaxLengthWithoutRoomForSpecials) {
  for (int max_length : {-1, 1}) {
    absl::StatusOr<Encoding> enc = tok_->Encode("hello", max_length);
    EXPECT_EQ(enc.status().code(), absl::StatusCode::kInvalidArgument) << max_length;
    EXPECT_THAT(enc.status().message(), HasSubstr("max_length"));
  }
}

TEST_F(WordPieceTokenizerTest, RejectsInvalidUtf8NamingTheOffset) {
  const struct {
    std::string text;
    std::string offset;
  } cases[] = {
      {"abc\x80", "byte offset 3"},            // lone continuation byte
      {"\xC0\xAF", "byte offset 0"},           // overlong '/'
      {"ok \xE0\x80\xAF", "byte offset 3"},    // overlong, 3 bytes
      {"\xED\xA0\x80", "byte offset 0"},       // surrogate U+D800 encoded
      {"x\xF4\x90\x80\x80", "byte offset 1"},  // above U+10FFFF
      {"\xE2\x82", "byte offset 0"},           // truncated at end
      {"\xE2\x28\xA1", "byte offset 0"},       // truncated, then ASCII
      {"a\xFF", "byte offset 1"},              // never valid
  };
  for (const auto& c : cases) {
    absl::StatusOr<Encoding> enc = tok_->Encode(c.text, 0);
    EXPECT_EQ(enc.status().code(), absl::StatusCode::kInvalidArgument) << Escape(c.text);
    EXPECT_THAT(enc.status().message(), HasSubstr("UTF-8")) << Escape(c.text);
    EXPECT_THAT(enc.status().message(), HasSubstr(c.offset)) << Escape(c.text);
  }
}

TEST_F(WordPieceTokenizerTest, MissingDirectoryIsNotFoundNamingTheFile) {
  absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> tok =
      WordPieceTokenizer::FromDirectory("/nonexistent/kiln-model");
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(tok.status().message(), HasSubstr("/nonexistent/kiln-model/tokenizer.json"));
}

TEST_F(WordPieceTokenizerTest, DirectoryWithoutTokenizerFilesIsNotFound) {
  absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> tok =
      WordPieceTokenizer::FromDirectory(ScratchDir().string());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(tok.status().message(), HasSubstr("tokenizer.json"));
  EXPECT_THAT(tok.status().message(), HasSubstr("vocab.txt"));
}

TEST_F(WordPieceTokenizerTest, RejectsNonWordPieceModelNamingTheField) {
  WriteEditedTokenizerJson(R"("model":{"type":"WordPiece")", R"("model":{"type":"BPE")");
  absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> tok =
      WordPieceTokenizer::FromDirectory(ScratchDir().string());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(tok.status().message(), HasSubstr("tokenizer.json: model.type is \"BPE\""));
}

TEST_F(WordPieceTokenizerTest, RejectsNonBertNormalizerNamingTheField) {
  WriteEditedTokenizerJson(R"("normalizer":{"type":"BertNormalizer")",
                           R"("normalizer":{"type":"NFKC")");
  absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> tok =
      WordPieceTokenizer::FromDirectory(ScratchDir().string());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(tok.status().message(), HasSubstr("normalizer.type is \"NFKC\""));
}

TEST_F(WordPieceTokenizerTest, RejectsNonBertPreTokenizerNamingTheField) {
  WriteEditedTokenizerJson(R"("pre_tokenizer":{"type":"BertPreTokenizer"})",
                           R"("pre_tokenizer":{"type":"Whitespace"})");
  absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> tok =
      WordPieceTokenizer::FromDirectory(ScratchDir().string());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(tok.status().message(), HasSubstr("pre_tokenizer.type is \"Whitespace\""));
}

TEST_F(WordPieceTokenizerTest, RejectsMalformedJsonNamingTheFile) {
  std::ofstream(ScratchDir() / "tokenizer.json") << R"({"model": {"type": "WordPiece",)";
  absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> tok =
      WordPieceTokenizer::FromDirectory(ScratchDir().string());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(tok.status().message(), HasSubstr("tokenizer.json: malformed JSON"));
}

TEST_F(WordPieceTokenizerTest, RejectsUnkTokenMissingFromVocab) {
  WriteEditedTokenizerJson(R"("unk_token":"[UNK]")", R"("unk_token":"[NOPE]")");
  absl::StatusOr<std::unique_ptr<WordPieceTokenizer>> tok =
      WordPieceTokenizer::FromDirectory(ScratchDir().string());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(tok.status().message(), HasSubstr("model.unk_token \"[NOPE]\""));
}

TEST_F(WordPieceTokenizerTest, EncodesConcurrently) {
  const std::vector<ParityCase> cases = LoadParityFixture();
  std::vector<int> failures(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (size_t i = t; i < cases.size(); i += 2) {
        absl::StatusOr<Encoding> enc = tok_->Encode(cases[i].text, 0);
        if (!enc.ok() || enc->ids != cases[i].ids) ++failures[t];
      }
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_THAT(failures, ElementsAre(0, 0, 0, 0));
}

}  // namespace
}  // namespace kiln
