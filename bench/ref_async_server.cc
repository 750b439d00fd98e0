// Reference: grpc++ async (completion-queue) server, one CQ per thread, the classic pattern from
// grpc's own examples. Handles Unary, Record and RecordBatch.
#include <grpcpp/grpcpp.h>

#include <csignal>
#include <memory>
#include <thread>
#include <vector>

#include "iot/testing/v1/echo.grpc.pb.h"
#include "ref_common.h"

using grpc::ServerAsyncReader;
using grpc::ServerAsyncResponseWriter;
using grpc::ServerCompletionQueue;
using grpc::ServerContext;
using grpc::Status;
namespace pb = iot::testing::v1;

struct Tagged {
    virtual ~Tagged() = default;
    virtual void Proceed(bool ok) = 0;
};

class UnaryCall : public Tagged {
  public:
    UnaryCall(pb::Echo::AsyncService *svc, ServerCompletionQueue *cq) : svc_(svc), cq_(cq), writer_(&ctx_) {
        svc_->RequestUnary(&ctx_, &req_, &writer_, cq_, cq_, this);
    }
    void Proceed(bool ok) override {
        if (state_ == 0) {
            if (!ok) { delete this; return; }
            new UnaryCall(svc_, cq_);
            resp_.set_message(req_.message());
            resp_.set_payload(req_.payload());
            state_ = 1;
            writer_.Finish(resp_, Status::OK, this);
        } else {
            delete this;
        }
    }

  private:
    pb::Echo::AsyncService *svc_;
    ServerCompletionQueue *cq_;
    ServerContext ctx_;
    pb::EchoRequest req_;
    pb::EchoResponse resp_;
    ServerAsyncResponseWriter<pb::EchoResponse> writer_;
    int state_ = 0;
};

template <typename Msg, bool Batch>
class RecordCall : public Tagged {
  public:
    RecordCall(pb::Echo::AsyncService *svc, ServerCompletionQueue *cq) : svc_(svc), cq_(cq), reader_(&ctx_) {
        if constexpr (Batch)
            svc_->RequestRecordBatch(&ctx_, &reader_, cq_, cq_, this);
        else
            svc_->RequestRecord(&ctx_, &reader_, cq_, cq_, this);
    }
    void Proceed(bool ok) override {
        switch (state_) {
        case 0:
            if (!ok) { delete this; return; }
            new RecordCall(svc_, cq_);
            state_ = 1;
            reader_.Read(&msg_, this);
            break;
        case 1:
            if (ok) {
                ref_count(&sum_, msg_);
                reader_.Read(&msg_, this);
            } else {
                state_ = 2;
                reader_.Finish(sum_, Status::OK, this);
            }
            break;
        default:
            delete this;
        }
    }

  private:
    pb::Echo::AsyncService *svc_;
    ServerCompletionQueue *cq_;
    ServerContext ctx_;
    Msg msg_;
    pb::StreamSummary sum_;
    ServerAsyncReader<pb::StreamSummary, Msg> reader_;
    int state_ = 0;
};

int main() {
    sigset_t set = ref_block_signals();
    pb::Echo::AsyncService svc;
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(&svc);
    int n = ref_threads();
    std::vector<std::unique_ptr<ServerCompletionQueue>> cqs;
    for (int i = 0; i < n; i++) cqs.push_back(b.AddCompletionQueue());
    auto server = b.BuildAndStart();
    ref_announce("ref_async", port);
    std::vector<std::thread> threads;
    for (int i = 0; i < n; i++) {
        ServerCompletionQueue *cq = cqs[i].get();
        for (int k = 0; k < 8; k++) {
            new UnaryCall(&svc, cq);
            new RecordCall<pb::Point, false>(&svc, cq);
            new RecordCall<pb::PointBatch, true>(&svc, cq);
        }
        threads.emplace_back([cq] {
            void *tag;
            bool ok;
            while (cq->Next(&tag, &ok)) static_cast<Tagged *>(tag)->Proceed(ok);
        });
    }
    int sig;
    sigwait(&set, &sig);
    server->Shutdown();
    for (auto &cq : cqs) cq->Shutdown();
    for (auto &t : threads) t.join();
    return 0;
}
