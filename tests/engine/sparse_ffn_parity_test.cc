// The engine's sparse FFN against an independent implementation: the
// fixture tests/engine/testdata/sparse_ffn.json holds PyTorch embeddings
// (tools/make_sparse_ffn_fixture.py, transformers' BertModel with each FFN
// masked as tools/sparse_ffn_torch.py does) at ffn_fraction 0.5 and 0.25
// over the shipped partition deploy/bricks/ffn-e16, version 1 (skipped
// neurons zero), version 2 (with its fill) and version 3 (co-activation
// groups, with a fill). The fixture keeps only texts
// whose routing has no near tie, so both sides choose the same groups.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/model/embedding_model.h"
#include "engine/sparse_ffn.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "router/ffn_partition.h"

namespace kiln {
namespace {

const std::string kSource = KILN_SOURCE_DIR;

TEST(SparseFfnParityTest, MatchesPyTorchWithAndWithoutTheFill) {
  std::ifstream in(kSource + "/tests/engine/testdata/sparse_ffn.json");
  ASSERT_TRUE(in) << "missing fixture (tools/make_sparse_ffn_fixture.py)";
  const nlohmann::json fx = nlohmann::json::parse(in);
  auto backend = CpuBackend::Create({.threads = 2});
  auto model = EmbeddingModel::Load(kSource + "/models/all-MiniLM-L6-v2", backend.get());
  ASSERT_TRUE(model.ok()) << model.status() << " (run scripts/fetch_model.sh)";
  const auto& texts = fx.at("texts");
  ASSERT_GE(texts.size(), 6u);
  std::vector<std::vector<int32_t>> ids;
  for (size_t i = 0; i < texts.size(); ++i) {
    ids.push_back(fx.at("input_ids")[i].get<std::vector<int32_t>>());
    auto enc = (*model)->Tokenize(texts[i].get<std::string>());
    ASSERT_TRUE(enc.ok()) << enc.status();
    ASSERT_EQ(enc->ids, ids.back()) << "text " << i << ": Kiln's tokenizer disagrees";
  }
  const int dim = (*model)->dim();
  for (const std::string version : {"1", "2", "3"}) {
    const std::string dir = kSource + "/deploy/bricks/ffn-e16/" + version;
    auto partition = ReadFfnPartitionBrick(dir, (*model)->config().encoder);
    ASSERT_TRUE(partition.ok()) << partition.status();
    EXPECT_EQ(partition->layers[0].fill.empty(), version == "1");
    auto sparse = SparseFfn::Create((*model)->encoder(), *partition, dir);
    ASSERT_TRUE(sparse.ok()) << sparse.status();
    for (const double fraction : fx.at("fractions").get<std::vector<double>>()) {
      SCOPED_TRACE(absl::StrCat("ffn-e16/", version, " at fraction ", fraction));
      // All texts in one batch, as the server batches them.
      std::vector<SequenceInput> seqs;
      for (const auto& i : ids) {
        seqs.push_back(
            {.ids = i, .ffn = sparse->get(), .ffn_fraction = static_cast<float>(fraction)});
      }
      std::vector<float> got(seqs.size() * dim);
      ASSERT_TRUE((*model)->Forward(seqs, got.data()).ok());
      const auto& want = fx.at("versions").at(version).at(absl::StrCat(fraction));
      double worst = 0;
      for (size_t s = 0; s < seqs.size(); ++s) {
        const std::vector<float> w = want[s].get<std::vector<float>>();
        ASSERT_EQ(static_cast<int>(w.size()), dim);
        for (int c = 0; c < dim; ++c) {
          worst = std::max(worst, std::fabs(double(got[s * dim + c]) - w[c]));
        }
      }
      std::printf("ffn-e16/%s fraction %g: max |Kiln - PyTorch| %.3g over %zu texts\n",
                  version.c_str(), fraction, worst, seqs.size());
      EXPECT_LT(worst, 1e-5);
    }
  }
}

}  // namespace
}  // namespace kiln
