// Reference: grpc++ callback (reactor) server, the API grpc recommends for new C++ servers.
#include <grpcpp/grpcpp.h>

#include <csignal>

#include "iot/testing/v1/echo.grpc.pb.h"
#include "ref_common.h"

namespace pb = iot::testing::v1;

class EchoImpl final : public pb::Echo::CallbackService {
    grpc::ServerUnaryReactor *Unary(grpc::CallbackServerContext *ctx, const pb::EchoRequest *req,
                                    pb::EchoResponse *resp) override {
        resp->set_message(req->message());
        resp->set_payload(req->payload());
        auto *r = ctx->DefaultReactor();
        r->Finish(grpc::Status::OK);
        return r;
    }

    template <typename Msg>
    class Reader : public grpc::ServerReadReactor<Msg> {
      public:
        explicit Reader(pb::StreamSummary *sum) : sum_(sum) { this->StartRead(&msg_); }
        void OnReadDone(bool ok) override {
            if (!ok) {
                this->Finish(grpc::Status::OK);
                return;
            }
            ref_count(sum_, msg_);
            this->StartRead(&msg_);
        }
        void OnDone() override { delete this; }

      private:
        pb::StreamSummary *sum_;
        Msg msg_;
    };

    // Echoes each message; used for the idle-streams memory comparison.
    class BidiEcho : public grpc::ServerBidiReactor<pb::EchoRequest, pb::EchoResponse> {
      public:
        BidiEcho() { StartRead(&req_); }
        void OnReadDone(bool ok) override {
            if (!ok) {
                Finish(grpc::Status::OK);
                return;
            }
            resp_.set_message(req_.message());
            StartWrite(&resp_);
        }
        void OnWriteDone(bool ok) override {
            if (ok) StartRead(&req_);
        }
        void OnDone() override { delete this; }

      private:
        pb::EchoRequest req_;
        pb::EchoResponse resp_;
    };

    grpc::ServerBidiReactor<pb::EchoRequest, pb::EchoResponse> *Bidi(grpc::CallbackServerContext *) override {
        return new BidiEcho();
    }

    grpc::ServerReadReactor<pb::Point> *Record(grpc::CallbackServerContext *, pb::StreamSummary *sum) override {
        return new Reader<pb::Point>(sum);
    }
    grpc::ServerReadReactor<pb::PointBatch> *RecordBatch(grpc::CallbackServerContext *, pb::StreamSummary *sum) override {
        return new Reader<pb::PointBatch>(sum);
    }
};

int main() {
    sigset_t set = ref_block_signals();
    EchoImpl svc;
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(&svc);
    auto server = b.BuildAndStart();
    ref_announce("ref_callback", port);
    int sig;
    sigwait(&set, &sig);
    server->Shutdown();
    return 0;
}
