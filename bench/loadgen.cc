// The one load generator `make bench` points at every server (ours and the grpc++ references),
// so differences come from the servers. Modes:
//   unary  --concurrency C --seconds S        closed loop, C calls outstanding; QPS, p50, p99
//          [--method /pkg.Svc/M --request-hex H]  the same, any unary method with a fixed serialised
//                                             request (GenericStub), e.g. a service's real RPC
//          [--bearer TOKEN]                   with `authorization: Bearer TOKEN` metadata
//   record --streams K --seconds S            client streams of single small Points; points/s
//   batch  --streams K --seconds S            client streams of PointBatch x100; points/s
//   idle   --streams N --channels M           opens N idle bidi streams, prints "ready", holds
//                                             them until stdin closes
// Prints one line of key=value results.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <functional>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "iot/testing/v1/echo.grpc.pb.h"

namespace pb = iot::testing::v1;
using Clock = std::chrono::steady_clock;

struct Opts {
    std::string target, mode = "unary", method, request_hex, bearer;
    int concurrency = 1, streams = 1, channels = 1;
    double seconds = 2.0, warmup = 0.5;
};

static std::shared_ptr<grpc::Channel> make_channel(const std::string &target, int index) {
    grpc::ChannelArguments args;
    args.SetInt("iot.bench.channel", index);  // distinct args: a connection per channel
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetMaxReceiveMessageSize(64 << 20);
    return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
}

template <class Resp>
struct UnaryCall {
    grpc::ClientContext ctx;
    Resp resp;
    grpc::Status status;
    std::unique_ptr<grpc::ClientAsyncResponseReader<Resp>> rpc;
    Clock::time_point start;
};

template <class Resp>
using Prepare = std::function<std::unique_ptr<grpc::ClientAsyncResponseReader<Resp>>(grpc::ClientContext *,
                                                                                     grpc::CompletionQueue *)>;

// Closed loop over one completion queue per thread; make_prepare builds each thread's call maker
// from its channel.
template <class Resp>
static int run_unary_with(const Opts &o, std::function<Prepare<Resp>(std::shared_ptr<grpc::Channel>)> make_prepare) {
    int nthreads = std::min(2, o.concurrency);
    std::vector<std::vector<double>> lat(nthreads);
    std::atomic<long> errors{0};
    auto t0 = Clock::now();
    auto measure_from = t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.warmup));
    auto end = measure_from + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.seconds));
    std::vector<std::thread> threads;
    std::string first_error;
    std::mutex mu;
    for (int t = 0; t < nthreads; t++) {
        int per = o.concurrency / nthreads + (t < o.concurrency % nthreads ? 1 : 0);
        threads.emplace_back([&, t, per] {
            auto prepare = make_prepare(make_channel(o.target, t));
            grpc::CompletionQueue cq;
            auto start_call = [&](UnaryCall<Resp> *c) {
                c->~UnaryCall<Resp>();
                new (c) UnaryCall<Resp>();
                c->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
                if (!o.bearer.empty()) c->ctx.AddMetadata("authorization", "Bearer " + o.bearer);
                c->start = Clock::now();
                c->rpc = prepare(&c->ctx, &cq);
                c->rpc->StartCall();
                c->rpc->Finish(&c->resp, &c->status, c);
            };
            std::vector<UnaryCall<Resp>> calls(per);
            lat[t].reserve(1 << 20);
            for (auto &c : calls) start_call(&c);
            int outstanding = per;
            void *tag;
            bool ok;
            while (outstanding > 0 && cq.Next(&tag, &ok)) {
                auto *c = static_cast<UnaryCall<Resp> *>(tag);
                auto now = Clock::now();
                if (!c->status.ok()) {
                    if (errors++ == 0) {
                        std::lock_guard<std::mutex> g(mu);
                        first_error = c->status.error_message();
                    }
                }
                if (now >= measure_from && now < end)
                    lat[t].push_back(std::chrono::duration<double, std::micro>(now - c->start).count());
                if (now < end)
                    start_call(c);
                else
                    outstanding--;
            }
            cq.Shutdown();
            while (cq.Next(&tag, &ok)) {
            }
        });
    }
    for (auto &th : threads) th.join();
    std::vector<double> all;
    for (auto &v : lat) all.insert(all.end(), v.begin(), v.end());
    std::sort(all.begin(), all.end());
    auto pct = [&](double p) { return all.empty() ? 0.0 : all[std::min(all.size() - 1, (size_t)(p * all.size()))]; };
    std::printf("qps=%.0f p50_us=%.1f p99_us=%.1f calls=%zu errors=%ld%s%s\n", all.size() / o.seconds, pct(0.50),
                pct(0.99), all.size(), errors.load(), errors ? " first_error=" : "", first_error.c_str());
    return errors ? 1 : 0;
}

static int run_unary(const Opts &o) {
    if (o.method.empty())
        return run_unary_with<pb::EchoResponse>(o, [](std::shared_ptr<grpc::Channel> ch) -> Prepare<pb::EchoResponse> {
            auto stub = std::shared_ptr<pb::Echo::Stub>(pb::Echo::NewStub(ch));
            auto req = std::make_shared<pb::EchoRequest>();
            req->set_message("hello, iotsuite");
            return [stub, req](grpc::ClientContext *ctx, grpc::CompletionQueue *cq) {
                return stub->PrepareAsyncUnary(ctx, *req, cq);
            };
        });
    std::string raw;
    for (size_t i = 0; i + 1 < o.request_hex.size(); i += 2) raw.push_back((char)std::stoi(o.request_hex.substr(i, 2), nullptr, 16));
    return run_unary_with<grpc::ByteBuffer>(o, [&o, raw](std::shared_ptr<grpc::Channel> ch) -> Prepare<grpc::ByteBuffer> {
        auto stub = std::make_shared<grpc::GenericStub>(ch);
        grpc::Slice slice(raw);
        auto req = std::make_shared<grpc::ByteBuffer>(&slice, 1);
        std::string method = o.method;
        return [stub, req, method](grpc::ClientContext *ctx, grpc::CompletionQueue *cq) {
            return stub->PrepareUnaryCall(ctx, method, *req, cq);
        };
    });
}

static int run_stream(const Opts &o, bool batch) {
    std::atomic<long> points{0}, errors{0};
    auto t0 = Clock::now();
    auto end = t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.seconds));
    std::vector<std::thread> threads;
    for (int t = 0; t < o.streams; t++) {
        threads.emplace_back([&, t] {
            auto stub = pb::Echo::NewStub(make_channel(o.target, t));
            grpc::ClientContext ctx;
            pb::StreamSummary sum;
            pb::Point p;
            p.set_metric("temperature");
            p.set_ts_ms(1700000000000);
            p.set_value(21.5);
            pb::PointBatch b;
            b.set_device_id("device-0001");
            for (int i = 0; i < 100; i++) {
                auto *q = b.add_points();
                q->set_metric("temperature");
                q->set_ts_ms(1700000000000 + i);
                q->set_value(20.0 + i * 0.01);
            }
            // Let the transport coalesce writes; every 64th write flushes.
            grpc::WriteOptions hint;
            hint.set_buffer_hint();
            long n = 0;
            if (batch) {
                auto w = stub->RecordBatch(&ctx, &sum);
                while (Clock::now() < end)
                    for (int k = 0; k < 64 && w->Write(b, k == 63 ? grpc::WriteOptions() : hint); k++) n++;
                w->WritesDone();
                auto st = w->Finish();
                if (!st.ok() || sum.messages() != n) errors++;
            } else {
                auto w = stub->Record(&ctx, &sum);
                while (Clock::now() < end)
                    for (int k = 0; k < 64 && w->Write(p, k == 63 ? grpc::WriteOptions() : hint); k++) n++;
                w->WritesDone();
                auto st = w->Finish();
                if (!st.ok() || sum.messages() != n) errors++;
            }
            points += sum.points();
        });
    }
    for (auto &th : threads) th.join();
    double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    std::printf("points_per_s=%.0f points=%ld seconds=%.2f errors=%ld\n", points / secs, points.load(), secs, errors.load());
    return errors ? 1 : 0;
}

struct IdleStream {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientAsyncReaderWriter<pb::EchoRequest, pb::EchoResponse>> rw;
    pb::EchoResponse resp;
    int state = 0;
};

static int run_idle(const Opts &o) {
    std::vector<std::unique_ptr<pb::Echo::Stub>> stubs;
    for (int i = 0; i < o.channels; i++) stubs.push_back(pb::Echo::NewStub(make_channel(o.target, i)));
    grpc::CompletionQueue cq;
    std::vector<std::unique_ptr<IdleStream>> streams;
    pb::EchoRequest req;
    req.set_message("hi");
    for (int i = 0; i < o.streams; i++) {
        streams.emplace_back(new IdleStream);
        auto *s = streams.back().get();
        s->rw = stubs[i % o.channels]->AsyncBidi(&s->ctx, &cq, s);
    }
    // Each stream: started -> one message written -> its echo read -> idle.
    int ready = 0, failed = 0;
    void *tag;
    bool ok;
    while (ready + failed < o.streams && cq.Next(&tag, &ok)) {
        auto *s = static_cast<IdleStream *>(tag);
        if (!ok) {
            failed++;
            continue;
        }
        if (s->state == 0) {
            s->state = 1;
            s->rw->Write(req, s);
        } else if (s->state == 1) {
            s->state = 2;
            s->rw->Read(&s->resp, s);
        } else {
            s->state = 3;
            ready++;
        }
    }
    std::printf("ready streams=%d failed=%d\n", ready, failed);
    std::fflush(stdout);
    std::string line;
    std::getline(std::cin, line);  // hold until the driver closes stdin
    for (auto &s : streams) s->ctx.TryCancel();
    for (auto &s : streams) {
        if (s->state != 3) continue;
        grpc::Status st;
        s->rw->Finish(&st, s.get());
    }
    cq.Shutdown();
    while (cq.Next(&tag, &ok)) {
    }
    return failed ? 1 : 0;
}

int main(int argc, char **argv) {
    Opts o;
    for (int i = 1; i + 1 < argc; i += 2) {
        std::string k = argv[i], v = argv[i + 1];
        if (k == "--target") o.target = v;
        else if (k == "--mode") o.mode = v;
        else if (k == "--concurrency") o.concurrency = std::stoi(v);
        else if (k == "--streams") o.streams = std::stoi(v);
        else if (k == "--channels") o.channels = std::stoi(v);
        else if (k == "--seconds") o.seconds = std::stod(v);
        else if (k == "--warmup") o.warmup = std::stod(v);
        else if (k == "--method") o.method = v;
        else if (k == "--request-hex") o.request_hex = v;
        else if (k == "--bearer") o.bearer = v;
        else {
            std::fprintf(stderr, "loadgen: unknown option %s\n", k.c_str());
            return 2;
        }
    }
    if (o.target.empty()) {
        std::fprintf(stderr, "usage: loadgen --target HOST:PORT --mode unary|record|batch|idle ...\n");
        return 2;
    }
    if (o.mode == "unary") return run_unary(o);
    if (o.mode == "record") return run_stream(o, false);
    if (o.mode == "batch") return run_stream(o, true);
    if (o.mode == "idle") return run_idle(o);
    std::fprintf(stderr, "loadgen: unknown mode %s\n", o.mode.c_str());
    return 2;
}
