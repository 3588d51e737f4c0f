// SafetensorsFile on files it reads: tensor listing and offsets, typed reads
// and their checks, SerializeSafetensors round trips, the dtype names and
// half / bfloat16 conversions, and the real all-MiniLM-L6-v2 checkpoint.
// Files Open must refuse: safetensors_test.cc.
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/safetensors_test_util.h"

namespace kiln {
namespace {

using safetensors_testing::BytesOf;
using safetensors_testing::MakeSafetensors;
using safetensors_testing::SafetensorsTest;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// ------------------------------------------------------------------ valid files

// Three float tensors of two elements each plus an I64 one; the header lists them out of
// file order, padded with trailing spaces as writers do to align the data section.
class ValidFileTest : public SafetensorsTest {
 protected:
  void SetUp() override {
    const std::string header =
        R"({"__metadata__": {"format": "pt", "note": "unit test"},
            "half": {"dtype": "F16", "shape": [2, 3], "data_offsets": [16, 28]},
            "ids": {"dtype": "I64", "shape": [2], "data_offsets": [36, 52]},
            "brain": {"dtype": "BF16", "shape": [4], "data_offsets": [28, 36]},
            "full": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})"
        "      ";
    header_len_ = header.size();
    const std::string data = BytesOf<float>({1.5f, -2.25f, 3e-30f, 65504.0f}) +
                             BytesOf<uint16_t>({0x3c00, 0x7c00, 0xfc00, 0x0001, 0x03ff, 0x8000}) +
                             BytesOf<uint16_t>({0x3f80, 0xc040, 0x7f80, 0x0001}) +
                             BytesOf<int64_t>({7, -9});
    auto file = SafetensorsFile::Open(WriteTemp(MakeSafetensors(header, data)));
    ASSERT_TRUE(file.ok()) << file.status();
    file_ = *std::move(file);
  }

  size_t header_len_ = 0;
  std::unique_ptr<SafetensorsFile> file_;
};

TEST_F(ValidFileTest, ListsTensorsInFileOrderWithAbsoluteOffsets) {
  EXPECT_EQ(file_->path(), path_);
  const std::vector<TensorInfo>& t = file_->tensors();
  ASSERT_EQ(t.size(), 4u);
  EXPECT_EQ(t[0].name, "full");
  EXPECT_EQ(t[1].name, "half");
  EXPECT_EQ(t[2].name, "brain");
  EXPECT_EQ(t[3].name, "ids");
  EXPECT_EQ(t[1].dtype, DType::kF16);
  EXPECT_THAT(t[1].shape, ElementsAre(2, 3));
  EXPECT_EQ(t[1].num_elements(), 6);
  EXPECT_EQ(t[1].offset, 8 + header_len_ + 16);
  EXPECT_EQ(t[1].nbytes, 12u);
}

TEST_F(ValidFileTest, ReadsF32Exactly) {
  auto v = file_->ReadFloat32("full");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_THAT(*v, ElementsAre(1.5f, -2.25f, 3e-30f, 65504.0f));
}

TEST_F(ValidFileTest, WidensF16IncludingInfinityAndSubnormals) {
  auto v = file_->ReadFloat32("half", {2, 3});
  ASSERT_TRUE(v.ok()) << v.status();
  ASSERT_EQ(v->size(), 6u);
  EXPECT_EQ((*v)[0], 1.0f);
  EXPECT_EQ((*v)[1], std::numeric_limits<float>::infinity());
  EXPECT_EQ((*v)[2], -std::numeric_limits<float>::infinity());
  EXPECT_EQ((*v)[3], std::ldexp(1.0f, -24));              // Smallest subnormal half.
  EXPECT_EQ((*v)[4], std::ldexp(1023.0f, -24));           // Largest subnormal half.
  EXPECT_TRUE((*v)[5] == 0.0f && std::signbit((*v)[5]));  // -0 keeps its sign.
}

TEST_F(ValidFileTest, WidensBF16) {
  auto v = file_->ReadFloat32("brain");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_THAT(*v, ElementsAre(1.0f, -3.0f, std::numeric_limits<float>::infinity(),
                              std::numeric_limits<float>::denorm_min() * float(1 << 16)));
}

TEST_F(ValidFileTest, ListsI64ButRefusesToReadItAsFloat) {
  const TensorInfo* ids = file_->Find("ids");
  ASSERT_NE(ids, nullptr);
  EXPECT_EQ(ids->dtype, DType::kI64);
  std::vector<int64_t> values(2);
  ASSERT_EQ(file_->Bytes(*ids).size(), 16u);
  std::memcpy(values.data(), file_->Bytes(*ids).data(), 16);
  EXPECT_THAT(values, ElementsAre(7, -9));

  auto v = file_->ReadFloat32("ids");
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(v.status().message()),
              AllOf(HasSubstr("'ids'"), HasSubstr("I64"), HasSubstr(path_)));
}

TEST_F(ValidFileTest, ReadsMetadata) {
  EXPECT_EQ(file_->metadata().size(), 2u);
  EXPECT_EQ(file_->metadata().at("format"), "pt");
  EXPECT_EQ(file_->metadata().at("note"), "unit test");
}

TEST_F(ValidFileTest, WrongExpectedShapeIsInvalidArgumentNamingBothShapes) {
  auto v = file_->ReadFloat32("half", {3, 2});
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(v.status().message(),
            absl::StrCat("tensor 'half' in ", path_, " has shape [2, 3], expected [3, 2]"));
}

TEST_F(ValidFileTest, MissingTensorIsNotFoundNamingTensorAndFile) {
  EXPECT_EQ(file_->Find("nope"), nullptr);
  for (const auto& v : {file_->ReadFloat32("nope"), file_->ReadFloat32("nope", {1})}) {
    EXPECT_EQ(v.status().code(), absl::StatusCode::kNotFound);
    EXPECT_THAT(std::string(v.status().message()), AllOf(HasSubstr("'nope'"), HasSubstr(path_)));
  }
}

TEST_F(SafetensorsTest, ReadsI32ExactlyAndRefusesOtherDtypes) {
  auto file = SafetensorsFile::Open(WriteTemp(MakeSafetensors(
      R"({"idx": {"dtype": "I32", "shape": [2, 2], "data_offsets": [0, 16]},
          "f": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]}})",
      BytesOf<int32_t>({0, -1, 2147483647, 3}) + BytesOf<float>({1.0f}))));
  ASSERT_TRUE(file.ok()) << file.status();
  auto v = (*file)->ReadInt32("idx", {2, 2});
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_THAT(*v, ElementsAre(0, -1, 2147483647, 3));

  auto f = (*file)->ReadInt32("f");
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(f.status().message()),
              AllOf(HasSubstr("'f'"), HasSubstr("F32"), HasSubstr(path_)));

  auto shape = (*file)->ReadInt32("idx", {4});
  EXPECT_EQ(shape.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(shape.status().message(),
            absl::StrCat("tensor 'idx' in ", path_, " has shape [2, 2], expected [4]"));

  auto missing = (*file)->ReadInt32("nope", {1});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()),
              AllOf(HasSubstr("'nope'"), HasSubstr(path_)));
}

TEST_F(SafetensorsTest, SerializeRoundTripsThroughOpenInCanonicalLayout) {
  const std::vector<float> w = {1.5f, -2.0f, 0.25f, 8.0f, 3.0f, -0.5f};
  const std::vector<int32_t> idx = {2, 0, 1};
  const std::string w_bytes = BytesOf(w), idx_bytes = BytesOf(idx);
  // Given out of name order: the file holds them sorted.
  auto bytes = SerializeSafetensors(
      {{"w", DType::kF32, {2, 3}, w_bytes}, {"idx", DType::kI32, {3}, idx_bytes}},
      {{"format", "pt"}});
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  uint64_t n = 0;
  std::memcpy(&n, bytes->data(), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes->substr(8, n),
            std::string(R"({"__metadata__":{"format":"pt"},)"
                        R"("idx":{"data_offsets":[0,12],"dtype":"I32","shape":[3]},)"
                        R"("w":{"data_offsets":[12,36],"dtype":"F32","shape":[2,3]}})")
                .append(n - 145, ' '));
  auto file = SafetensorsFile::Open(WriteTemp(*bytes));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->tensors()[0].name, "idx");
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  auto rw = (*file)->ReadFloat32("w", {2, 3});
  ASSERT_TRUE(rw.ok()) << rw.status();
  EXPECT_EQ(*rw, w);
  auto ri = (*file)->ReadInt32("idx", {3});
  ASSERT_TRUE(ri.ok()) << ri.status();
  EXPECT_EQ(*ri, idx);
}

TEST_F(SafetensorsTest, SerializeRefusesInconsistentTensorsNamingThem) {
  const std::string four(4, '\0');
  struct Case {
    std::vector<SafetensorsTensorData> tensors;
    std::string fragment;
  };
  const std::vector<Case> cases = {
      {{{"a", DType::kF32, {2}, four}}, "tensor 'a' (F32 [2]) needs 8 bytes, got 4"},
      {{{"a", DType::kF32, {-1}, four}}, "tensor 'a' has shape [-1] with a negative dim"},
      {{{"a", DType::kF32, {1}, four}, {"a", DType::kI32, {1}, four}}, "tensor 'a' given twice"},
      {{{"__metadata__", DType::kF32, {1}, four}}, "tensor name '__metadata__'"},
      {{{"", DType::kF32, {1}, four}}, "tensor name ''"},
  };
  for (const Case& c : cases) {
    auto bytes = SerializeSafetensors(c.tensors);
    EXPECT_EQ(bytes.status().code(), absl::StatusCode::kInvalidArgument) << c.fragment;
    EXPECT_THAT(std::string(bytes.status().message()), HasSubstr(c.fragment));
  }
}

TEST_F(SafetensorsTest, RefusesToNarrowF64) {
  auto file = SafetensorsFile::Open(WriteTemp(MakeSafetensors(
      R"({"d": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}})", BytesOf<double>({1.0}))));
  ASSERT_TRUE(file.ok()) << file.status();
  auto v = (*file)->ReadFloat32("d");
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(v.status().message()), AllOf(HasSubstr("'d'"), HasSubstr("F64")));
}

TEST_F(SafetensorsTest, AcceptsEmptyAndScalarTensorsAndNoMetadata) {
  // An empty tensor may sit at any offset, even inside another tensor's range: it owns no bytes.
  auto file = SafetensorsFile::Open(WriteTemp(MakeSafetensors(
      R"({"empty": {"dtype": "F32", "shape": [0, 384], "data_offsets": [2, 2]},
          "scalar": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}})",
      BytesOf<float>({42.0f}))));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->metadata().empty());
  const TensorInfo* empty = (*file)->Find("empty");
  ASSERT_NE(empty, nullptr);
  EXPECT_EQ(empty->num_elements(), 0);
  EXPECT_TRUE((*file)->Bytes(*empty).empty());
  auto e = (*file)->ReadFloat32("empty", {0, 384});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_TRUE(e->empty());
  auto s = (*file)->ReadFloat32("scalar", {});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_THAT(*s, ElementsAre(42.0f));
}

TEST_F(SafetensorsTest, AcceptsEmptyHeaderObject) {
  auto file = SafetensorsFile::Open(WriteTemp(MakeSafetensors("{}", "")));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->tensors().empty());
}

// ------------------------------------------------------------------ conversions

TEST(DTypeTest, NamesAndSizesMatchTheFileFormat) {
  EXPECT_EQ(DTypeName(DType::kBF16), "BF16");
  EXPECT_EQ(DTypeName(DType::kBool), "BOOL");
  EXPECT_EQ(DTypeName(DType::kF8E4M3), "F8_E4M3");
  EXPECT_EQ(DTypeSize(DType::kF64), 8u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBool), 1u);
  for (DType d : {DType::kF64, DType::kF32, DType::kF16, DType::kBF16, DType::kI64, DType::kI32,
                  DType::kI16, DType::kI8, DType::kU8, DType::kBool, DType::kU16, DType::kU32,
                  DType::kU64, DType::kF8E4M3, DType::kF8E5M2}) {
    auto parsed = ParseDType(DTypeName(d));
    ASSERT_TRUE(parsed.ok()) << DTypeName(d);
    EXPECT_EQ(*parsed, d);
  }
  EXPECT_EQ(ParseDType("f32").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(HalfTest, EveryHalfRoundTripsThroughFloat) {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    const bool is_nan = (h & 0x7c00) == 0x7c00 && (h & 0x03ff) != 0;
    ASSERT_EQ(std::isnan(f), is_nan) << std::hex << h;
    if (is_nan) {
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f)))) << std::hex << h;
    } else {
      ASSERT_EQ(FloatToHalf(f), h) << std::hex << h;
    }
  }
}

TEST(HalfTest, NarrowingRoundsToNearestEven) {
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // Tie, even is down.
  EXPECT_EQ(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // Tie, even is up.
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)), 0x3c01);
  EXPECT_EQ(FloatToHalf(65519.0f), 0x7bff);  // Largest finite, 65504.
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);  // Ties away to inf.
  EXPECT_EQ(FloatToHalf(-1e10f), 0xfc00);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -25)), 0x0000);     // Tie to even zero.
  EXPECT_EQ(FloatToHalf(std::ldexp(1.5f, -25)), 0x0001);     // Above the tie.
  EXPECT_EQ(FloatToHalf(std::ldexp(3.0f, -25)), 0x0002);     // Tie to even 2 x 2^-24.
  EXPECT_EQ(FloatToHalf(std::ldexp(1023.5f, -24)), 0x0400);  // Carries into the normals.
  EXPECT_EQ(FloatToHalf(-std::numeric_limits<float>::denorm_min()), 0x8000);
  const uint16_t nan = FloatToHalf(-std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0xfe00, 0xfe00);  // Negative quiet NaN.
}

#ifdef __FLT16_MAX__
TEST(HalfTest, NarrowingMatchesCompilerFloat16OnASweep) {
  // A stride coprime to 2^32 visits about a million float bit patterns of every exponent.
  for (uint64_t bits = 0; bits <= 0xffffffffu; bits += 4099) {
    float f;
    const uint32_t b = static_cast<uint32_t>(bits);
    std::memcpy(&f, &b, 4);
    if (std::isnan(f)) continue;
    const _Float16 ref = static_cast<_Float16>(f);
    uint16_t ref_bits;
    std::memcpy(&ref_bits, &ref, 2);
    ASSERT_EQ(FloatToHalf(f), ref_bits) << std::hexfloat << f;
  }
}
#endif

TEST(BFloat16Test, EveryBFloat16RoundTripsThroughFloat) {
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    const float f = BFloat16ToFloat(static_cast<uint16_t>(b));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(BFloat16ToFloat(FloatToBFloat16(f)))) << std::hex << b;
    } else {
      ASSERT_EQ(FloatToBFloat16(f), b) << std::hex << b;
    }
  }
}

TEST(BFloat16Test, NarrowingRoundsToNearestEven) {
  EXPECT_EQ(FloatToBFloat16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);      // Tie, even is down.
  EXPECT_EQ(FloatToBFloat16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);  // Tie, even is up.
  EXPECT_EQ(FloatToBFloat16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3f81);
  EXPECT_EQ(FloatToBFloat16(std::numeric_limits<float>::max()), 0x7f80);  // Rounds up to inf.
  EXPECT_TRUE(
      std::isnan(BFloat16ToFloat(FloatToBFloat16(std::numeric_limits<float>::quiet_NaN()))));
  // A NaN whose payload lies only in the low 16 bits must not truncate to inf.
  EXPECT_TRUE(std::isnan(BFloat16ToFloat(FloatToBFloat16(std::bit_cast<float>(0x7f800001u)))));
}

// ------------------------------------------------------------------ the real model

TEST(SafetensorsModelTest, OpensAllMiniLmL6V2) {
  const std::string path = KILN_SOURCE_DIR "/models/all-MiniLM-L6-v2/model.safetensors";
  ASSERT_TRUE(std::filesystem::exists(path))
      << path << " is missing; run scripts/fetch_model.sh to download it";
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const SafetensorsFile& f = **file;

  // 104 tensors; with "__metadata__" the header has 105 entries.
  EXPECT_EQ(f.tensors().size(), 104u);
  EXPECT_EQ(f.metadata().at("format"), "pt");

  const TensorInfo* words = f.Find("embeddings.word_embeddings.weight");
  ASSERT_NE(words, nullptr);
  EXPECT_EQ(words->dtype, DType::kF32);
  EXPECT_THAT(words->shape, ElementsAre(30522, 384));
  auto values = f.ReadFloat32("embeddings.word_embeddings.weight", {30522, 384});
  ASSERT_TRUE(values.ok()) << values.status();
  ASSERT_EQ(values->size(), 30522u * 384u);
  for (float v : *values) ASSERT_TRUE(std::isfinite(v));

  const TensorInfo* positions = f.Find("embeddings.position_ids");
  ASSERT_NE(positions, nullptr);
  EXPECT_EQ(positions->dtype, DType::kI64);
  EXPECT_THAT(positions->shape, ElementsAre(1, 512));
  std::vector<int64_t> ids(512);
  std::memcpy(ids.data(), f.Bytes(*positions).data(), 512 * sizeof(int64_t));
  for (int64_t i = 0; i < 512; ++i) ASSERT_EQ(ids[i], i);
  EXPECT_EQ(f.ReadFloat32("embeddings.position_ids").status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kiln
