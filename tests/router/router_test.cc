#include "router/router.h"

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kiln {
namespace {

using ::testing::HasSubstr;

std::vector<float> Unit(std::vector<float> v) {
  double sq = 0;
  for (float x : v) sq += double(x) * x;
  for (float& x : v) x = static_cast<float>(x / std::sqrt(sq));
  return v;
}

Router::Key MakeKey(const std::string& id, int version, std::vector<float> query,
                    std::vector<float> document = {}) {
  return {.brick = {id, version}, .query = std::move(query), .document = std::move(document)};
}

// A deterministic EmbedFn: a fixed vector per text; unknown texts fail.
// With `defer`, callbacks are held until Flush() (to test coalescing).
class FakeEmbedder {
 public:
  std::map<std::string, std::vector<float>> vectors;
  bool defer = false;
  int calls = 0;
  std::vector<std::function<void()>> held;

  Router::EmbedFn Fn() {
    return [this](std::vector<std::string> texts,
                  std::function<void(absl::StatusOr<Router::Vectors>)> done) {
      ++calls;
      Router::Vectors out;
      absl::Status error;
      for (const std::string& t : texts) {
        auto it = vectors.find(t);
        if (it == vectors.end()) {
          error = absl::UnavailableError("engine down");
          break;
        }
        out.push_back(it->second);
      }
      auto finish = [done, out, error] {
        if (!error.ok()) return done(error);
        done(out);
      };
      if (defer) {
        held.push_back(finish);
      } else {
        finish();
      }
    };
  }
  void Flush() {
    auto run = std::move(held);
    held.clear();
    for (auto& f : run) f();
  }
};

TEST(RouterDecideTest, ScoresWeightsAndReasonsMatchAHandComputedCase) {
  // query = (1, 0, 0). Keys: a = (0.8, 0.6, 0) -> 0.8; b's document key
  // (0.6, 0, 0.8) -> 0.6 beats its query key (0, 1, 0) -> 0; c = (0.3, ...) -> 0.3.
  const std::vector<Router::Key> keys = {
      MakeKey("a", 1, {0.8f, 0.6f, 0.0f}),
      MakeKey("b", 2, {0.0f, 1.0f, 0.0f}, {0.6f, 0.0f, 0.8f}),
      MakeKey("c", 1, Unit({0.3f, 0.9539392f, 0.0f})),
  };
  const Router::Options options{.top_k = 2, .min_score = 0.5f, .temperature = 0.1f};
  const Router::Decision d = Router::Decide(std::vector<float>{1, 0, 0}, keys, options);
  ASSERT_EQ(d.candidates.size(), 3u);
  EXPECT_EQ(d.candidates[0].brick, (BrickKey{"a", 1}));
  EXPECT_NEAR(d.candidates[0].score, 0.8f, 1e-6);
  EXPECT_EQ(d.candidates[0].side, "query");
  EXPECT_EQ(d.candidates[1].brick, (BrickKey{"b", 2}));
  EXPECT_NEAR(d.candidates[1].score, 0.6f, 1e-6);
  EXPECT_EQ(d.candidates[1].side, "document");
  EXPECT_NEAR(d.candidates[2].score, 0.3f, 1e-6);
  EXPECT_FALSE(d.candidates[2].chosen);
  EXPECT_THAT(d.candidates[2].reason, HasSubstr("below --router_min_score 0.500"));
  // softmax(0.8 / 0.1, 0.6 / 0.1) = 1 / (1 + e^-2), e^-2 / (1 + e^-2).
  const double wa = 1.0 / (1.0 + std::exp(-2.0));
  ASSERT_EQ(d.chosen.size(), 2u);
  EXPECT_EQ(d.chosen[0].first, (BrickKey{"a", 1}));
  EXPECT_NEAR(d.chosen[0].second, wa, 1e-6);
  EXPECT_NEAR(d.chosen[1].second, 1.0 - wa, 1e-6);
  EXPECT_NEAR(d.candidates[0].weight, wa, 1e-6);
  EXPECT_THAT(d.reason, HasSubstr("2 of 3 bricks at or above --router_min_score 0.500"));
}

TEST(RouterDecideTest, TopKKeepsTheBestAndSaysWhyTheRestAreOut) {
  const std::vector<Router::Key> keys = {MakeKey("a", 1, {0.8f, 0.6f}),
                                         MakeKey("b", 1, {0.6f, 0.8f})};
  const Router::Decision d =
      Router::Decide(std::vector<float>{1, 0}, keys, {.top_k = 1, .min_score = 0.5f});
  ASSERT_EQ(d.chosen.size(), 1u);
  EXPECT_EQ(d.chosen[0].first.id, "a");
  EXPECT_FLOAT_EQ(d.chosen[0].second, 1.0f);
  EXPECT_THAT(d.candidates[1].reason, HasSubstr("outside --router_top_k 1"));
}

TEST(RouterDecideTest, NothingAboveTheThresholdMeansTheBaseModel) {
  const std::vector<Router::Key> keys = {MakeKey("a", 1, {0.0f, 1.0f})};
  const Router::Decision d =
      Router::Decide(std::vector<float>{1, 0}, keys, {.top_k = 1, .min_score = 0.5f});
  EXPECT_TRUE(d.chosen.empty());
  EXPECT_THAT(d.reason, HasSubstr("no brick at or above --router_min_score 0.500"));
  EXPECT_THAT(d.reason, HasSubstr("base model"));
  const Router::Decision none = Router::Decide(std::vector<float>{1, 0}, {}, {});
  EXPECT_TRUE(none.chosen.empty());
  EXPECT_THAT(none.reason, HasSubstr("no routable bricks"));
}

TEST(RouterDecideTest, EqualScoresBreakTiesByIdAndSmallTemperatureDoesNotOverflow) {
  const std::vector<Router::Key> keys = {MakeKey("zeta", 1, {1.0f, 0.0f}),
                                         MakeKey("alpha", 1, {1.0f, 0.0f})};
  const Router::Decision d =
      Router::Decide(std::vector<float>{1, 0}, keys, {.top_k = 2, .temperature = 1e-6f});
  ASSERT_EQ(d.chosen.size(), 2u);
  EXPECT_EQ(d.chosen[0].first.id, "alpha");
  EXPECT_FLOAT_EQ(d.chosen[0].second, 0.5f);
  EXPECT_FLOAT_EQ(d.chosen[1].second, 0.5f);
}

TEST(RouterTest, CreateNamesTheBadFlag) {
  auto fn = [](std::vector<std::string>, std::function<void(absl::StatusOr<Router::Vectors>)>) {};
  struct Case {
    Router::Options options;
    const char* flag;
  };
  const Case cases[] = {{{.exit = 0}, "--router_exit"},
                        {{.cache_entries = 0}, "--router_cache_entries"},
                        {{.top_k = 0}, "--router_top_k"},
                        {{.min_score = NAN}, "--router_min_score"},
                        {{.min_score = 1.5f}, "--router_min_score"},
                        {{.temperature = 0.0f}, "--router_temperature"},
                        {{.temperature = INFINITY}, "--router_temperature"}};
  for (const Case& c : cases) {
    absl::StatusOr<std::unique_ptr<Router>> r = Router::Create(c.options, fn);
    ASSERT_FALSE(r.ok()) << c.flag;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr(c.flag));
  }
}

TEST(RouterTest, UpsertKeysAreUnitMeansPerSideAndRouteUsesThem) {
  FakeEmbedder e;
  e.vectors = {{"q1", {1, 0, 0}}, {"q2", {0, 1, 0}}, {"d1", {0, 0, 1}}, {"go", Unit({1, 1, 0})}};
  auto router = *Router::Create({.min_score = 0.5f}, e.Fn());
  BrickManifest m{.id = "py", .version = 3, .kind = "lora"};
  m.query_instructions = {"q1", "q2"};
  m.document_instructions = {"d1"};
  ASSERT_TRUE(router->Upsert({"py", 3}, m).ok());
  const std::vector<Router::Key> keys = router->keys();
  ASSERT_EQ(keys.size(), 1u);
  EXPECT_EQ(keys[0].brick, (BrickKey{"py", 3}));
  const float r = 1.0f / std::sqrt(2.0f);
  EXPECT_THAT(keys[0].query, ::testing::Pointwise(::testing::FloatNear(1e-6), {r, r, 0.0f}));
  EXPECT_THAT(keys[0].document, ::testing::Pointwise(::testing::FloatNear(1e-6), {0.f, 0.f, 1.f}));

  absl::StatusOr<Router::Decision> got;
  router->Route("go", [&](absl::StatusOr<Router::Decision> d) { got = std::move(d); });
  ASSERT_TRUE(got.ok());
  EXPECT_FALSE(got->cache_hit);
  ASSERT_EQ(got->chosen.size(), 1u);
  EXPECT_EQ(got->chosen[0].first, (BrickKey{"py", 3}));
  EXPECT_NEAR(got->candidates[0].score, 1.0f, 1e-6);

  // A new version replaces the old key; a manifest without instructions
  // makes the id unroutable.
  ASSERT_TRUE(router->Upsert({"py", 4}, m).ok());
  ASSERT_EQ(router->keys().size(), 1u);
  EXPECT_EQ(router->keys()[0].brick.version, 4);
  ASSERT_TRUE(router->Upsert({"py", 5}, BrickManifest{.id = "py", .version = 5}).ok());
  EXPECT_TRUE(router->keys().empty());
}

TEST(RouterTest, SecondRouteOfAnInstructionIsACacheHitAndSeesNewKeys) {
  FakeEmbedder e;
  e.vectors = {{"find code", {1, 0}}, {"k", {1, 0}}};
  auto router = *Router::Create({}, e.Fn());
  absl::StatusOr<Router::Decision> got;
  router->Route("find code", [&](absl::StatusOr<Router::Decision> d) { got = std::move(d); });
  ASSERT_TRUE(got.ok());
  EXPECT_TRUE(got->chosen.empty());  // no bricks yet
  EXPECT_EQ(e.calls, 1);
  ASSERT_TRUE(router->Upsert({"a", 1}, {.id = "a", .version = 1, .query_instructions = {"k"}}).ok());
  EXPECT_EQ(e.calls, 2);
  router->Route("find code", [&](absl::StatusOr<Router::Decision> d) { got = std::move(d); });
  ASSERT_TRUE(got.ok());
  EXPECT_TRUE(got->cache_hit);
  EXPECT_EQ(e.calls, 2);  // not embedded again
  ASSERT_EQ(got->chosen.size(), 1u);
  EXPECT_EQ(got->chosen[0].first.id, "a");
  router->Remove("a");
  router->Route("find code", [&](absl::StatusOr<Router::Decision> d) { got = std::move(d); });
  ASSERT_TRUE(got.ok());
  EXPECT_TRUE(got->chosen.empty());
}

TEST(RouterTest, ConcurrentMissesShareOneEmbeddingAndErrorsReachEveryWaiter) {
  FakeEmbedder e;
  e.vectors = {{"x", {1, 0}}};
  e.defer = true;
  auto router = *Router::Create({}, e.Fn());
  int ok = 0;
  for (int i = 0; i < 3; ++i) {
    router->Route("x", [&](absl::StatusOr<Router::Decision> d) { ok += d.ok() ? 1 : 0; });
  }
  EXPECT_EQ(e.calls, 1);
  EXPECT_EQ(ok, 0);
  e.Flush();
  EXPECT_EQ(ok, 3);

  std::vector<absl::Status> errors;
  router->Route("unknown", [&](absl::StatusOr<Router::Decision> d) { errors.push_back(d.status()); });
  router->Route("unknown", [&](absl::StatusOr<Router::Decision> d) { errors.push_back(d.status()); });
  e.Flush();
  ASSERT_EQ(errors.size(), 2u);
  for (const absl::Status& st : errors) EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  // A failure is not cached: the next call embeds again.
  const int before = e.calls;
  router->Route("unknown", [](absl::StatusOr<Router::Decision>) {});
  EXPECT_EQ(e.calls, before + 1);
}

TEST(RouterTest, CacheEvictsTheLeastRecentlyUsedInstruction) {
  FakeEmbedder e;
  e.vectors = {{"a", {1, 0}}, {"b", {0, 1}}};
  auto router = *Router::Create({.cache_entries = 1}, e.Fn());
  auto route = [&](const std::string& text) {
    bool hit = false;
    router->Route(text, [&](absl::StatusOr<Router::Decision> d) { hit = d->cache_hit; });
    return hit;
  };
  EXPECT_FALSE(route("a"));
  EXPECT_TRUE(route("a"));
  EXPECT_FALSE(route("b"));  // evicts "a"
  EXPECT_FALSE(route("a"));
  EXPECT_EQ(e.calls, 3);
}

TEST(RouterTest, UpsertReportsTheEmbeddingErrorNamingTheBrick) {
  FakeEmbedder e;  // knows no text: every embedding fails
  auto router = *Router::Create({}, e.Fn());
  absl::Status st = router->Upsert({"py", 2}, {.id = "py", .version = 2, .query_instructions = {"q"}});
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(st.message(), HasSubstr("py@2"));
  EXPECT_TRUE(router->keys().empty());
}

}  // namespace
}  // namespace kiln
