#include "engine/tokenizer/bpe.h"

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
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
using ::testing::StartsWith;
using Json = nlohmann::json;

// Written by tools/make_bpe_fixture.py with Hugging Face `tokenizers`.
const std::string kFixtureDir =
    std::string(KILN_SOURCE_DIR) + "/tests/engine/tokenizer/testdata/bpe";

struct ParityCase {
  std::string label;
  std::string text;
  std::vector<int32_t> ids;
};

std::vector<Json> ReadJsonl(const std::string& path) {
  std::vector<Json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) out.push_back(Json::parse(line));
  return out;
}

Json ReadJson(const std::string& path) {
  std::ifstream in(path);
  return Json::parse(in);
}

// Printable ASCII as is, everything else as \u{...}.
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

std::string Join(const std::vector<int32_t>& ids) { return absl::StrJoin(ids, " "); }

// Checks EncodeIds against every case; reports the first mismatches.
// Returns the number of mismatches.
int ExpectParity(const BpeTokenizer& tok, const std::vector<ParityCase>& cases) {
  int mismatches = 0;
  std::string report;
  for (const ParityCase& c : cases) {
    absl::StatusOr<std::vector<int32_t>> ids = tok.EncodeIds(c.text);
    if (ids.ok() && *ids == c.ids) continue;
    if (++mismatches <= 5) {
      absl::StrAppend(&report, "\n[", c.label, "] text: \"", Escape(c.text),
                      "\"\n  expected: ", Join(c.ids),
                      "\n  actual:   ", ids.ok() ? Join(*ids) : ids.status().ToString());
    }
  }
  EXPECT_EQ(mismatches, 0) << "of " << cases.size() << " texts; first mismatches:" << report;
  return mismatches;
}

class BpeTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<BpeTokenizer>> tok =
        BpeTokenizer::FromDirectory(kFixtureDir, {.require_model_format = true});
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = *std::move(tok);
  }
  void TearDown() override {
    if (!dir_.empty()) fs::remove_all(dir_);
  }

  // A file in a fresh scratch directory for this test.
  std::string WriteScratch(const std::string& name, const std::string& text) {
    if (dir_.empty()) {
      dir_ = fs::temp_directory_path() /
             absl::StrCat("kiln_bpe_test_", ::getpid(), "_",
                          ::testing::UnitTest::GetInstance()->current_test_info()->name());
      fs::remove_all(dir_);
      fs::create_directories(dir_);
    }
    std::ofstream(dir_ / name, std::ios::binary | std::ios::trunc) << text;
    return (dir_ / name).string();
  }

  std::vector<int32_t> Ids(absl::string_view text) {
    absl::StatusOr<std::vector<int32_t>> ids = tok_->EncodeIds(text);
    EXPECT_TRUE(ids.ok()) << ids.status();
    return ids.ok() ? *ids : std::vector<int32_t>{};
  }

  std::unique_ptr<BpeTokenizer> tok_;
  fs::path dir_;
};

TEST_F(BpeTokenizerTest, MatchesTheLibraryOnEveryFixtureText) {
  std::vector<ParityCase> cases;
  for (const Json& j : ReadJsonl(kFixtureDir + "/cases.jsonl")) {
    cases.push_back({j.at("cat").get<std::string>(), j.at("text").get<std::string>(),
                     j.at("ids").get<std::vector<int32_t>>()});
  }
  ASSERT_GE(cases.size(), 2000u);
  ExpectParity(*tok_, cases);
}

// Each variant patches the fixture's tokenizer.json (JSON pointers) or is a
// whole hand-made tokenizer; the library encoded its cases after the same
// change.
TEST_F(BpeTokenizerTest, MatchesTheLibraryForEveryAcceptedSetting) {
  const Json base = ReadJson(kFixtureDir + "/tokenizer.json");
  const Json variants = ReadJson(kFixtureDir + "/variants.json");
  ASSERT_GE(variants.size(), 10u);
  for (const Json& v : variants) {
    const std::string name = v.at("name").get<std::string>();
    SCOPED_TRACE(name);
    Json j = v.contains("tokenizer") ? v.at("tokenizer") : base;
    if (v.contains("set")) {
      for (const auto& [pointer, value] : v.at("set").items()) {
        j[Json::json_pointer(pointer)] = value;
      }
    }
    absl::StatusOr<std::unique_ptr<BpeTokenizer>> tok =
        BpeTokenizer::Load(WriteScratch(name + ".json", j.dump()));
    ASSERT_TRUE(tok.ok()) << tok.status();
    std::vector<ParityCase> cases;
    for (const Json& c : v.at("cases")) {
      cases.push_back(
          {name, c.at("text").get<std::string>(), c.at("ids").get<std::vector<int32_t>>()});
    }
    ExpectParity(**tok, cases);
  }
}

TEST_F(BpeTokenizerTest, BuildsTheModelFormatAsTheLibraryEncodesIt) {
  const std::vector<Json> cases = ReadJsonl(kFixtureDir + "/model_format.jsonl");
  ASSERT_GE(cases.size(), 50u);
  int mismatches = 0;
  for (const Json& c : cases) {
    const std::string instruction =
        c.at("instruction").is_null() ? "" : c.at("instruction").get<std::string>();
    const std::string text = c.at("text").get<std::string>();
    absl::StatusOr<Encoding> enc = tok_->EncodeForModel(text, instruction, 0);
    ASSERT_TRUE(enc.ok()) << enc.status();
    EXPECT_FALSE(enc->truncated);
    if (enc->ids != c.at("ids").get<std::vector<int32_t>>() && ++mismatches <= 5) {
      ADD_FAILURE() << "instruction \"" << Escape(instruction) << "\" text \"" << Escape(text)
                    << "\"\n  expected: " << c.at("ids").dump() << "\n  actual:   ["
                    << Join(enc->ids) << "]";
    }
  }
  EXPECT_EQ(mismatches, 0);
}

TEST_F(BpeTokenizerTest, ModelFormatWrapsTextInSepAndCls) {
  const int32_t sep = *tok_->TokenId("<sep>");
  const int32_t cls = *tok_->TokenId("<cls>");
  EXPECT_EQ(tok_->sep_id(), sep);
  EXPECT_EQ(tok_->cls_id(), cls);
  const std::vector<int32_t> text = Ids("def f(x): return x");
  const std::vector<int32_t> instruction = Ids("Find the code");

  absl::StatusOr<Encoding> plain = tok_->EncodeForModel("def f(x): return x", "", 0);
  ASSERT_TRUE(plain.ok()) << plain.status();
  std::vector<int32_t> want = {sep};
  want.insert(want.end(), text.begin(), text.end());
  want.push_back(cls);
  EXPECT_EQ(plain->ids, want);

  absl::StatusOr<Encoding> with = tok_->EncodeForModel("def f(x): return x", "Find the code", 0);
  ASSERT_TRUE(with.ok()) << with.status();
  want = {sep};
  want.insert(want.end(), instruction.begin(), instruction.end());
  want.push_back(sep);
  want.insert(want.end(), text.begin(), text.end());
  want.push_back(cls);
  EXPECT_EQ(with->ids, want);
  EXPECT_FALSE(with->truncated);
}

TEST_F(BpeTokenizerTest, ModelFormatTruncatesTheTextAndKeepsClsLast) {
  const std::string text = "int main(void) { return 0; } /* a longer comment here */";
  const std::vector<int32_t> text_ids = Ids(text);
  const std::vector<int32_t> instruction_ids = Ids("Find");
  ASSERT_GT(text_ids.size(), 10u);
  const int32_t sep = *tok_->sep_id(), cls = *tok_->cls_id();

  const int max_length = static_cast<int>(instruction_ids.size()) + 3 + 4;
  absl::StatusOr<Encoding> enc = tok_->EncodeForModel(text, "Find", max_length);
  ASSERT_TRUE(enc.ok()) << enc.status();
  EXPECT_TRUE(enc->truncated);
  ASSERT_EQ(enc->ids.size(), static_cast<size_t>(max_length));
  std::vector<int32_t> want = {sep};
  want.insert(want.end(), instruction_ids.begin(), instruction_ids.end());
  want.push_back(sep);
  want.insert(want.end(), text_ids.begin(), text_ids.begin() + 4);
  want.push_back(cls);
  EXPECT_EQ(enc->ids, want);

  // Exactly fitting is not truncation.
  const int exact = static_cast<int>(text_ids.size()) + 2;
  absl::StatusOr<Encoding> fits = tok_->EncodeForModel(text, "", exact);
  ASSERT_TRUE(fits.ok()) << fits.status();
  EXPECT_FALSE(fits->truncated);
  EXPECT_EQ(fits->ids.size(), static_cast<size_t>(exact));
  absl::StatusOr<Encoding> one_less = tok_->EncodeForModel(text, "", exact - 1);
  ASSERT_TRUE(one_less.ok()) << one_less.status();
  EXPECT_TRUE(one_less->truncated);
  EXPECT_EQ(one_less->ids.back(), cls);

  // Only the special tokens fit.
  absl::StatusOr<Encoding> bare = tok_->EncodeForModel(text, "", 2);
  ASSERT_TRUE(bare.ok()) << bare.status();
  EXPECT_THAT(bare->ids, ElementsAre(sep, cls));
  EXPECT_TRUE(bare->truncated);
}

TEST_F(BpeTokenizerTest, ModelFormatRejectsAMaxLengthWithoutRoomForTheText) {
  absl::StatusOr<Encoding> enc = tok_->EncodeForModel("x", "", 1);
  EXPECT_EQ(enc.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(enc.status().message(), HasSubstr("max_length 1 leaves no room for the text"));
  const size_t instruction = Ids("Find the code").size();
  enc = tok_->EncodeForModel("x", "Find the code", static_cast<int>(instruction) + 2);
  EXPECT_EQ(enc.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(enc.status().message()),
              StartsWith("instruction: too long: with the special tokens"));
  enc = tok_->EncodeForModel("x", "", -1);
  EXPECT_EQ(enc.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(enc.status().message(), HasSubstr("max_length must be 0 (no limit) or positive"));
}

TEST_F(BpeTokenizerTest, RejectsInvalidUtf8NamingTheOffset) {
  absl::StatusOr<std::vector<int32_t>> ids = tok_->EncodeIds("ab\xC3(");
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ids.status().message(), HasSubstr("invalid UTF-8 at byte offset 2"));
  ids = tok_->EncodeIds("\xED\xA0\x80");  // an encoded surrogate
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ids.status().message(), HasSubstr("invalid UTF-8 at byte offset 0"));

  absl::StatusOr<Encoding> enc = tok_->EncodeForModel("ok", "bad\xFF", 0);
  EXPECT_EQ(enc.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(enc.status().message(), HasSubstr("instruction: invalid UTF-8 at byte offset 3"));
  enc = tok_->EncodeForModel("\x80", "", 0);
  EXPECT_EQ(enc.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(enc.status().message(), HasSubstr("text: invalid UTF-8 at byte offset 0"));
}

TEST_F(BpeTokenizerTest, AddedTokensInTheTextBecomeTheirIds) {
  const int32_t mask = *tok_->TokenId("<mask>");
  const std::vector<int32_t> x = Ids("x"), y = Ids("y");
  EXPECT_THAT(Ids("x<mask>y"), ElementsAre(x[0], mask, y[0]));
  EXPECT_THAT(Ids("<sep><cls>"), ElementsAre(*tok_->sep_id(), *tok_->cls_id()));
  EXPECT_TRUE(Ids("").empty());
  EXPECT_NE(Ids("<SEP>"), std::vector<int32_t>{*tok_->sep_id()});
}

TEST_F(BpeTokenizerTest, LooksUpTokensAddedFirstThenVocabulary) {
  EXPECT_EQ(tok_->TokenId("<|endoftext|>"), 0);
  EXPECT_TRUE(tok_->TokenId("Ġ").has_value());   // the space byte
  EXPECT_FALSE(tok_->TokenId(" ").has_value());  // vocabulary tokens are byte-level
  EXPECT_FALSE(tok_->TokenId("no such token").has_value());
  EXPECT_EQ(tok_->vocab_size(), 3000);
}

TEST_F(BpeTokenizerTest, ConcurrentEncodesGiveTheSameIds) {
  std::vector<std::string> texts;
  for (const Json& j : ReadJsonl(kFixtureDir + "/cases.jsonl")) {
    texts.push_back(j.at("text").get<std::string>());
    if (texts.size() == 300) break;
  }
  std::vector<std::vector<int32_t>> want;
  for (const std::string& t : texts) want.push_back(Ids(t));
  constexpr int kThreads = 8;
  std::vector<int> mismatches(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 3; ++round) {
        for (size_t i = 0; i < texts.size(); ++i) {
          // Each thread walks the texts from a different start.
          const size_t k = (i + t * 37) % texts.size();
          absl::StatusOr<std::vector<int32_t>> ids = tok_->EncodeIds(texts[k]);
          if (!ids.ok() || *ids != want[k]) ++mismatches[t];
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(mismatches[t], 0) << "thread " << t;
}

TEST_F(BpeTokenizerTest, WithoutSepTheModelFormatIsRefusedOnlyWhenAskedFor) {
  Json j = ReadJson(kFixtureDir + "/tokenizer.json");
  Json kept = Json::array();
  for (const Json& t : j["added_tokens"]) {
    if (t["content"] != "<sep>") kept.push_back(t);
  }
  j["added_tokens"] = kept;
  j["model"]["vocab"].erase("<sep>");
  const std::string path = WriteScratch("tokenizer.json", j.dump());

  absl::StatusOr<std::unique_ptr<BpeTokenizer>> lenient = BpeTokenizer::Load(path);
  ASSERT_TRUE(lenient.ok()) << lenient.status();
  EXPECT_TRUE((*lenient)->EncodeIds("x <sep> y").ok());
  absl::StatusOr<Encoding> enc = (*lenient)->EncodeForModel("x", "", 0);
  EXPECT_EQ(enc.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(enc.status().message(), HasSubstr("needs sep_token \"<sep>\""));

  absl::StatusOr<std::unique_ptr<BpeTokenizer>> strict =
      BpeTokenizer::Load(path, {.require_model_format = true});
  EXPECT_EQ(strict.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(strict.status().message(),
              HasSubstr("tokenizer.json: sep_token \"<sep>\" is neither an added token nor in "
                        "model.vocab"));
}

TEST_F(BpeTokenizerTest, TakesSepAndClsNamesFromTokenizerConfig) {
  WriteScratch("tokenizer.json", ReadJson(kFixtureDir + "/tokenizer.json").dump());
  WriteScratch("tokenizer_config.json",
               R"({"sep_token": "<|endoftext|>", "cls_token": {"content": "<mask>"}})");
  absl::StatusOr<std::unique_ptr<BpeTokenizer>> tok = BpeTokenizer::FromDirectory(dir_.string());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->sep_id(), (*tok)->TokenId("<|endoftext|>"));
  EXPECT_EQ((*tok)->cls_id(), (*tok)->TokenId("<mask>"));
}

TEST_F(BpeTokenizerTest, MissingDirectoryIsNotFound) {
  absl::StatusOr<std::unique_ptr<BpeTokenizer>> tok =
      BpeTokenizer::FromDirectory("/nonexistent/kiln/model");
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(tok.status().message(), HasSubstr("/nonexistent/kiln/model/tokenizer.json"));
}

}  // namespace
}  // namespace kiln
