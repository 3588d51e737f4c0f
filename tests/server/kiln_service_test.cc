// KilnService in-process: a real gRPC server on loopback with the default
// model, driven through the generated C++ client. Every error code the
// service documents, each with its message; results equal the engine's.
#include "server/kiln_service.h"

#include <grpcpp/grpcpp.h>

#include <cmath>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/server/kiln_service_fixture.h"

namespace kiln {
namespace {

using ::testing::HasSubstr;

TEST_F(KilnServiceTest, EmbedEqualsTheEngineAtEveryExit) {
  Start();
  const std::vector<std::string> texts = {"hello world", "", "Kiln serves bricks at any exit.",
                                          std::string(3000, 'a') + " long"};
  for (int exit = 0; exit <= 6; ++exit) {
    EmbedRequest req;
    for (const auto& t : texts) req.add_inputs(t);
    req.set_exit_layer(exit);
    EmbedResponse resp;
    grpc::Status st = Embed(req, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    ASSERT_EQ(resp.embeddings_size(), static_cast<int>(texts.size()));
    EXPECT_EQ(resp.exit_layer(), exit == 0 ? 6u : static_cast<uint32_t>(exit));
    EXPECT_EQ(resp.model_id(), "all-MiniLM-L6-v2");
    for (size_t i = 0; i < texts.size(); ++i) {
      EXPECT_LE(MaxAbsDiff(resp.embeddings(i).values(), Reference(texts[i], exit)), 1e-5)
          << "exit " << exit << " input " << i;
    }
    EXPECT_EQ(resp.embeddings(1).tokens(), 2u);
    EXPECT_FALSE(resp.embeddings(0).truncated());
  }
}

TEST_F(KilnServiceTest, NormalizeFalseAndInstruction) {
  Start();
  EmbedRequest req;
  req.add_inputs("hello world");
  req.set_normalize(false);
  EmbedResponse resp;
  ASSERT_TRUE(Embed(req, &resp).ok());
  EXPECT_LE(MaxAbsDiff(resp.embeddings(0).values(), Reference("hello world", 6, false)), 1e-5);

  EmbedRequest with_instruction;
  with_instruction.add_inputs("reverse a list");
  with_instruction.set_instruction("Represent this query:");
  ASSERT_TRUE(Embed(with_instruction, &resp).ok());
  EXPECT_LE(
      MaxAbsDiff(resp.embeddings(0).values(), Reference("Represent this query: reverse a list", 6)),
      1e-5);
}

TEST_F(KilnServiceTest, InvalidArgumentsNameTheField) {
  Start({.max_client_batch = 4});
  EmbedResponse resp;
  EmbedRequest empty;
  grpc::Status st = Embed(empty, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("inputs: at least one input is required"));

  EmbedRequest many;
  for (int i = 0; i < 5; ++i) many.add_inputs("x");
  st = Embed(many, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("5 inputs exceed the limit of 4"));

  for (uint32_t exit : {7u, 4000000000u}) {
    EmbedRequest bad_exit;
    bad_exit.add_inputs("x");
    bad_exit.set_exit_layer(exit);
    st = Embed(bad_exit, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(st.error_message(), HasSubstr("exit_layer: " + std::to_string(exit)));
  }

  EmbedRequest too_long;
  too_long.add_inputs("fine");
  too_long.add_inputs(std::string(100000, 'b') + " " + std::string(5000, 'c'));
  too_long.set_truncate(false);
  std::string words;
  for (int i = 0; i < 400; ++i) words += "word ";
  too_long.set_inputs(1, words);
  st = Embed(too_long, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("inputs[1]: 402 tokens exceed max_input_tokens 256"));

  // A well-formed request right after still succeeds.
  EmbedRequest ok;
  ok.add_inputs(words);
  ASSERT_TRUE(Embed(ok, &resp).ok());
  EXPECT_EQ(resp.embeddings(0).tokens(), 256u);
  EXPECT_TRUE(resp.embeddings(0).truncated());
}

TEST_F(KilnServiceTest, InvalidUtf8IsInvalidArgumentNamingTheIndex) {
  Start();
  // The C++ client serialises the bytes as they are (protobuf only logs);
  // the server must answer INVALID_ARGUMENT, not fail inside its parser.
  EmbedRequest req;
  req.add_inputs("fine");
  req.add_inputs(std::string("ab\xff\xfe", 4));
  EmbedResponse resp;
  grpc::Status st = Embed(req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("inputs[1]: invalid UTF-8 at byte offset 2"));

  EmbedRequest bad_instruction;
  bad_instruction.add_inputs("fine");
  bad_instruction.set_instruction(std::string("\xc0\x80", 2));
  st = Embed(bad_instruction, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("instruction: invalid UTF-8"));

  grpc::ClientContext ctx;
  v1::TokenizeRequest treq;
  treq.add_inputs(std::string("\xe2\x82", 2));
  v1::TokenizeResponse tresp;
  st = stub_->Tokenize(&ctx, treq, &tresp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("inputs[0]: invalid UTF-8"));

  EmbedRequest ok;
  ok.add_inputs("fine");
  EXPECT_TRUE(Embed(ok, &resp).ok());
}

TEST_F(KilnServiceTest, ExpiredDeadlineIsDeadlineExceeded) {
  Start();
  EmbedRequest req;
  for (int i = 0; i < 8; ++i) req.add_inputs(std::string(2000, 'z'));
  EmbedResponse resp;
  grpc::Status st = Embed(req, &resp, std::chrono::milliseconds(1));
  EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
}

TEST_F(KilnServiceTest, FullQueueIsResourceExhausted) {
  Start({}, /*max_queue_requests=*/1);
  std::string words;
  for (int i = 0; i < 300; ++i) words += "token ";
  EmbedRequest req;
  for (int i = 0; i < 16; ++i) req.add_inputs(words);
  // Many concurrent heavy requests against a queue of one: some must be
  // refused at once, and every other one must succeed.
  std::vector<std::thread> clients;
  std::atomic<int> ok{0}, exhausted{0}, other{0};
  for (int c = 0; c < 12; ++c) {
    clients.emplace_back([&] {
      EmbedResponse resp;
      grpc::Status st = Embed(req, &resp);
      if (st.ok()) {
        ++ok;
      } else if (st.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
        EXPECT_THAT(st.error_message(), HasSubstr("queue is full"));
        ++exhausted;
      } else {
        ADD_FAILURE() << st.error_code() << " " << st.error_message();
        ++other;
      }
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_GE(exhausted.load(), 1);
  EXPECT_GE(ok.load(), 1);
  EXPECT_EQ(other.load(), 0);
}

TEST_F(KilnServiceTest, UnavailableWhileWarmingUpAndDraining) {
  Start();
  service_->SetReady(false);
  EmbedRequest req;
  req.add_inputs("x");
  EmbedResponse resp;
  grpc::Status st = Embed(req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(st.error_message(), HasSubstr("warming up"));
  service_->SetReady(true);
  ASSERT_TRUE(Embed(req, &resp).ok());
  service_->StartDraining();
  st = Embed(req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(st.error_message(), HasSubstr("draining"));
}

TEST_F(KilnServiceTest, TokenizeAndInfo) {
  Start();
  grpc::ClientContext ctx;
  v1::TokenizeRequest req;
  req.add_inputs("Hello, world!");
  v1::TokenizeResponse resp;
  ASSERT_TRUE(stub_->Tokenize(&ctx, req, &resp).ok());
  ASSERT_EQ(resp.inputs_size(), 1);
  EXPECT_THAT(std::vector<int>(resp.inputs(0).ids().begin(), resp.inputs(0).ids().end()),
              ::testing::ElementsAre(101, 7592, 1010, 2088, 999, 102));
  EXPECT_THAT(
      std::vector<std::string>(resp.inputs(0).tokens().begin(), resp.inputs(0).tokens().end()),
      ::testing::ElementsAre("[CLS]", "hello", ",", "world", "!", "[SEP]"));

  grpc::ClientContext ictx;
  v1::InfoResponse info;
  ASSERT_TRUE(stub_->Info(&ictx, v1::InfoRequest(), &info).ok());
  EXPECT_EQ(info.model_id(), "all-MiniLM-L6-v2");
  EXPECT_EQ(info.dimensions(), 384u);
  EXPECT_EQ(info.num_layers(), 6u);
  EXPECT_EQ(info.exits_size(), 6);
  EXPECT_EQ(info.max_input_tokens(), 256u);
  EXPECT_EQ(info.pooling(), "mean");
  EXPECT_THAT(info.device(), HasSubstr("cpu"));
}

TEST_F(KilnServiceTest, RequestIdIsEchoedOrMadeUp) {
  Start();
  EmbedRequest req;
  req.add_inputs("x");
  EmbedResponse resp;
  grpc::ClientContext ctx;
  ctx.AddMetadata("x-request-id", "abc-123");
  ASSERT_TRUE(stub_->Embed(&ctx, req, &resp).ok());
  auto md = ctx.GetServerInitialMetadata();
  ASSERT_EQ(md.count("x-request-id"), 1u);
  EXPECT_EQ(
      std::string(md.find("x-request-id")->second.data(), md.find("x-request-id")->second.size()),
      "abc-123");
  grpc::ClientContext ctx2;
  ASSERT_TRUE(stub_->Embed(&ctx2, req, &resp).ok());
  auto md2 = ctx2.GetServerInitialMetadata();
  ASSERT_EQ(md2.count("x-request-id"), 1u);
  EXPECT_EQ(md2.find("x-request-id")->second.size(), 32u);
}

TEST_F(KilnServiceTest, StreamAnswersInOrderAndSurvivesABadMessage) {
  Start();
  // References first: the model must not run here while the server's engine
  // worker runs it (Forward is single-threaded by contract).
  std::vector<std::vector<float>> want;
  for (int i = 0; i < 5; ++i)
    want.push_back(Reference("message " + std::to_string(i), i == 2 ? 1 : i + 1));
  grpc::ClientContext ctx;
  auto stream = stub_->EmbedStream(&ctx);
  for (int i = 0; i < 5; ++i) {
    EmbedRequest req;
    req.add_inputs("message " + std::to_string(i));
    req.set_exit_layer(i == 2 ? 9 : i + 1);
    ASSERT_TRUE(stream->Write(req));
  }
  stream->WritesDone();
  v1::EmbedStreamResponse resp;
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(stream->Read(&resp)) << "response " << i;
    if (i == 2) {
      ASSERT_TRUE(resp.has_error());
      EXPECT_EQ(resp.error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
      EXPECT_THAT(resp.error().message(), HasSubstr("exit_layer: 9"));
    } else {
      ASSERT_TRUE(resp.has_response()) << resp.error().message();
      EXPECT_EQ(resp.response().exit_layer(), static_cast<uint32_t>(i + 1));
      EXPECT_LE(MaxAbsDiff(resp.response().embeddings(0).values(), want[i]), 1e-5);
    }
  }
  EXPECT_FALSE(stream->Read(&resp));
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(KilnServiceTest, RequestsAreCountedInMetrics) {
  Start();
  EmbedRequest req;
  req.add_inputs("x");
  EmbedResponse resp;
  ASSERT_TRUE(Embed(req, &resp).ok());
  EmbedRequest bad;
  ASSERT_FALSE(Embed(bad, &resp).ok());
  const std::string text = metrics_->Serialize();
  EXPECT_THAT(text, HasSubstr("kiln_requests_total{code=\"ok\",rpc=\"Embed\"} 1"));
  EXPECT_THAT(text, HasSubstr("kiln_requests_total{code=\"invalid_argument\",rpc=\"Embed\"} 1"));
}

}  // namespace
}  // namespace kiln
