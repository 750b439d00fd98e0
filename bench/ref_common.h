// Shared bits of the grpc++ reference servers used by `make bench`. They implement the same
// iot.testing.v1.Echo methods the benchmark drives (Unary, Record, RecordBatch) with the same
// work per message as tests/support/echo_service.c, so that the comparison is of the RPC layers.
#pragma once

#include <pthread.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "iot/testing/v1/echo.pb.h"

inline int ref_threads() {
    const char *t = std::getenv("BENCH_THREADS");
    return t ? std::atoi(t) : 2;
}

// The per-message work of Record / RecordBatch, as in tests/support/echo_service.c.
inline void ref_count(iot::testing::v1::StreamSummary *sum, const iot::testing::v1::Point &p) {
    sum->set_messages(sum->messages() + 1);
    sum->set_points(sum->points() + 1);
    sum->set_value_sum(sum->value_sum() + p.value());
}

inline void ref_count(iot::testing::v1::StreamSummary *sum, const iot::testing::v1::PointBatch &b) {
    sum->set_messages(sum->messages() + 1);
    sum->set_points(sum->points() + b.points_size());
    double s = 0;
    for (const auto &p : b.points()) s += p.value();
    sum->set_value_sum(sum->value_sum() + s);
}

// Blocks SIGTERM/SIGINT before grpc starts threads; main then sigwait()s on the returned set.
inline sigset_t ref_block_signals() {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    return set;
}

// Prints the same "<name> grpc=<port> admin=0" line as cm_app so bench/run.sh reads ports alike.
inline void ref_announce(const char *name, int port) {
    std::printf("%s grpc=%d admin=0\n", name, port);
    std::fflush(stdout);
}
