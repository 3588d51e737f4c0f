// AdminService: the kiln.v1.BrickAdmin gRPC service (callback API), served on
// its own address (--admin_host:--admin_port) when the server has a brick
// store. Proto <-> BrickManager only; the rules live in the manager.
//
// Threads: quick calls (List, Get, Unload, Delete) answer on the gRPC thread;
// LoadBrick answers from the brick loader thread that finishes the load; the
// slow ones (RegisterBrick, MergeBricks: file checks, a blocking load, SVDs)
// run one at a time on the service's own worker thread, never on a gRPC or
// engine thread.
//
// Auth: with a token, every call needs "authorization: Bearer <token>" in its
// metadata, else UNAUTHENTICATED (compared in constant time).
#ifndef KILN_SERVER_ADMIN_SERVICE_H_
#define KILN_SERVER_ADMIN_SERVICE_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "kiln/v1/kiln.grpc.pb.h"
#include "router/brick_manager.h"

namespace kiln {

class AdminService final : public kiln::v1::BrickAdmin::CallbackService {
 public:
  struct Options {
    std::string token;  // empty: no authorization needed
  };
  // `bricks` (which must outlive the service) may be null: every call is then
  // FAILED_PRECONDITION.
  AdminService(Options options, BrickManager* bricks);
  // Finishes the queued slow calls, then joins the worker.
  ~AdminService() override;

  grpc::ServerUnaryReactor* ListBricks(grpc::CallbackServerContext* ctx,
                                       const kiln::v1::ListBricksRequest* request,
                                       kiln::v1::ListBricksResponse* response) override;
  grpc::ServerUnaryReactor* GetBrick(grpc::CallbackServerContext* ctx,
                                     const kiln::v1::GetBrickRequest* request,
                                     kiln::v1::BrickInfo* response) override;
  grpc::ServerUnaryReactor* RegisterBrick(grpc::CallbackServerContext* ctx,
                                          const kiln::v1::RegisterBrickRequest* request,
                                          kiln::v1::BrickInfo* response) override;
  grpc::ServerUnaryReactor* LoadBrick(grpc::CallbackServerContext* ctx,
                                      const kiln::v1::BrickVersionRef* request,
                                      kiln::v1::BrickInfo* response) override;
  grpc::ServerUnaryReactor* UnloadBrick(grpc::CallbackServerContext* ctx,
                                        const kiln::v1::BrickVersionRef* request,
                                        kiln::v1::BrickInfo* response) override;
  grpc::ServerUnaryReactor* DeleteBrick(grpc::CallbackServerContext* ctx,
                                        const kiln::v1::BrickVersionRef* request,
                                        kiln::v1::DeleteBrickResponse* response) override;
  grpc::ServerUnaryReactor* MergeBricks(grpc::CallbackServerContext* ctx,
                                        const kiln::v1::MergeBricksRequest* request,
                                        kiln::v1::BrickInfo* response) override;

 private:
  // OK, or UNAUTHENTICATED / FAILED_PRECONDITION (no brick store).
  absl::Status Check(grpc::CallbackServerContext* ctx) const;
  // Check, then the exact version `ref` names (0 = latest).
  absl::StatusOr<BrickKey> Resolve(grpc::CallbackServerContext* ctx,
                                   const kiln::v1::BrickVersionRef& ref) const;
  // The manifest and state of one version (0 = latest).
  absl::StatusOr<kiln::v1::BrickInfo> Info(const std::string& id, int version) const;
  // Queues `work` for the worker thread.
  void Post(std::function<void()> work);
  void WorkerLoop();

  const Options options_;
  BrickManager* const bricks_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> work_;
  bool stopping_ = false;
  std::thread worker_;
};

}  // namespace kiln

#endif  // KILN_SERVER_ADMIN_SERVICE_H_
