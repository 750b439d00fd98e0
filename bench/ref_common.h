// Shared bits of the grpc++ reference servers used by `make bench`. They implement the same
// iot.testing.v1.Echo methods the benchmark drives (Unary, Record, RecordBatch) with the same
// work per message as tests/support/echo_service.c, so that the comparison is of the RPC layers.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

inline int ref_threads() {
    const char *t = std::getenv("BENCH_THREADS");
    return t ? std::atoi(t) : 2;
}

// Prints the same "<name> grpc=<port> admin=0" line as cm_app so bench/run.sh reads ports alike.
inline void ref_announce(const char *name, int port) {
    std::printf("%s grpc=%d admin=0\n", name, port);
    std::fflush(stdout);
}
