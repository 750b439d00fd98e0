/* iot-health-probe: asks a gRPC server for its grpc.health.v1 status, for container HEALTHCHECKs
 * and scripts. Prints one line and exits
 *   0  SERVING
 *   1  the server answered, but not SERVING: NOT_SERVING, UNKNOWN, or an unknown service name
 *      (NOT_FOUND), or another error status from the server (e.g. UNIMPLEMENTED: no health service)
 *   2  no answer: connection refused or failed, or the timeout passed
 *   3  bad usage
 *
 * Without -addr the address follows IOT_GRPC_LISTEN (a wildcard host becomes 127.0.0.1), so that
 * the HEALTHCHECK baked into an image keeps working when a deployment moves the gRPC port. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_config.h"
#include "cm_log.h"
#include "cm_rpc.h"
#include "grpc/health/v1/health.pb-c.h"

#define PROBE_OK 0
#define PROBE_UNHEALTHY 1
#define PROBE_NO_ANSWER 2
#define PROBE_USAGE 3

static void usage(FILE *f) {
    fprintf(f,
            "Usage: iot-health-probe [-addr HOST:PORT] [-service NAME] [-timeout 2s]\n"
            "                        [-tls-ca FILE [-tls-cert FILE -tls-key FILE] [-tls-authority NAME]]\n"
            "\n"
            "Calls grpc.health.v1.Health/Check and prints one line.\n"
            "  -addr       server address (default: IOT_GRPC_LISTEN with a wildcard host made 127.0.0.1)\n"
            "  -service    service name to check (default \"\": the whole server)\n"
            "  -timeout    deadline for the whole check, e.g. 500ms, 2s (default 2s)\n"
            "  -tls-ca     TLS: CA file to verify the server with (enables TLS)\n"
            "  -tls-cert   TLS: client certificate, for servers that require one (with -tls-key)\n"
            "  -tls-authority  TLS: name to verify instead of the address's host\n"
            "Exit status: 0 SERVING, 1 answered but not SERVING (or unknown service), 2 no answer\n"
            "(connection failed or timed out), 3 bad usage.\n");
}

/* "0.0.0.0:7002" -> "127.0.0.1:7002": a wildcard listen address is not an address to dial. */
static int addr_from_listen(const char *listen, char *out, size_t cap) {
    const char *colon = strrchr(listen, ':');
    if (!colon || !colon[1]) return -1;
    size_t hlen = (size_t)(colon - listen);
    int wildcard = hlen == 0 || (hlen == 7 && strncmp(listen, "0.0.0.0", 7) == 0) ||
                   (hlen == 4 && strncmp(listen, "[::]", 4) == 0);
    int n = wildcard ? snprintf(out, cap, "127.0.0.1%s", colon) : snprintf(out, cap, "%s", listen);
    return n > 0 && (size_t)n < cap ? 0 : -1;
}

static const char *status_name(int s) {
    switch (s) {
    case GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING: return "SERVING";
    case GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING: return "NOT_SERVING";
    case GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN: return "SERVICE_UNKNOWN";
    default: return "UNKNOWN";
    }
}

int main(int argc, char **argv) {
    const char *addr = NULL, *service = "", *timeout_s = "2s";
    cm_tls_files_t tls = {0};
    const char *authority = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0 || strcmp(a, "-help") == 0) {
            usage(stdout);
            return PROBE_OK;
        }
        if (a[0] == '-' && a[1] == '-') a++; /* --addr works as well as -addr */
        const char **dest = strcmp(a, "-addr") == 0             ? &addr
                            : strcmp(a, "-service") == 0        ? &service
                            : strcmp(a, "-timeout") == 0        ? &timeout_s
                            : strcmp(a, "-tls-ca") == 0         ? &tls.ca_file
                            : strcmp(a, "-tls-cert") == 0       ? &tls.cert_file
                            : strcmp(a, "-tls-key") == 0        ? &tls.key_file
                            : strcmp(a, "-tls-authority") == 0  ? &authority
                                                                : NULL;
        if (!dest || i + 1 == argc) {
            fprintf(stderr, "iot-health-probe: %s \"%s\"\n", dest ? "missing value for" : "unknown option", argv[i]);
            usage(stderr);
            return PROBE_USAGE;
        }
        *dest = argv[++i];
    }

    int64_t timeout_ms;
    if (cm_config_parse_duration(timeout_s, &timeout_ms) != 0 || timeout_ms <= 0) {
        fprintf(stderr, "iot-health-probe: -timeout \"%s\" is not a positive duration (500ms, 2s, 1m)\n", timeout_s);
        return PROBE_USAGE;
    }
    char target[512];
    if (!addr) {
        const char *listen = getenv("IOT_GRPC_LISTEN");
        if (!listen || !*listen) {
            fprintf(stderr, "iot-health-probe: no -addr given and IOT_GRPC_LISTEN is not set\n");
            return PROBE_USAGE;
        }
        if (addr_from_listen(listen, target, sizeof target) != 0) {
            fprintf(stderr, "iot-health-probe: IOT_GRPC_LISTEN=\"%s\" is not HOST:PORT\n", listen);
            return PROBE_USAGE;
        }
        addr = target;
    }
    if (!tls.ca_file && (tls.cert_file || tls.key_file || authority)) {
        fprintf(stderr, "iot-health-probe: -tls-cert, -tls-key and -tls-authority need -tls-ca\n");
        return PROBE_USAGE;
    }
    if (!tls.cert_file != !tls.key_file) {
        fprintf(stderr, "iot-health-probe: -tls-cert and -tls-key go together\n");
        return PROBE_USAGE;
    }

    /* One line of output is the contract: keep the library's JSON logs and grpc's own logging
     * (connection failures) off stderr. */
    cm_log_init("iot-health-probe", CM_LOG_OFF);
    setenv("GRPC_VERBOSITY", "NONE", 0);

    cm_channel_opts_t copts = {.tls = tls.ca_file ? &tls : NULL, .authority = authority};
    cm_channel_t *ch = cm_channel_new(addr, &copts, NULL);
    if (!ch) {
        fprintf(stderr, "iot-health-probe: cannot read the TLS files\n");
        return PROBE_USAGE;
    }
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = (char *)service;
    ProtobufCMessage *resp = NULL;
    /* Fail fast (no wait_for_ready): a refused connection is reported at once instead of at the
     * deadline. Check is idempotent, but one attempt is what a probe should report. */
    cm_call_opts_t opts = {.timeout_ms = timeout_ms};
    cm_rpc_status_t st = {0};
    int code = cm_channel_unary(ch, "/grpc.health.v1.Health/Check", &req.base,
                                &grpc__health__v1__health_check_response__descriptor, &resp, &opts, &st);
    const char *what = *service ? service : "(server)";
    int rc;
    if (code == CM_STATUS_OK) {
        int s = ((Grpc__Health__V1__HealthCheckResponse *)resp)->status;
        rc = s == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING ? PROBE_OK : PROBE_UNHEALTHY;
        printf("%s %s at %s\n", what, status_name(s), addr);
    } else if (code == CM_STATUS_NOT_FOUND) {
        rc = PROBE_UNHEALTHY;
        printf("%s unknown to the server at %s (NOT_FOUND)\n", what, addr);
    } else if (code == CM_STATUS_DEADLINE_EXCEEDED) {
        rc = PROBE_NO_ANSWER;
        printf("no answer from %s within %s (DEADLINE_EXCEEDED)\n", addr, timeout_s);
    } else if (code == CM_STATUS_UNAVAILABLE) {
        rc = PROBE_NO_ANSWER;
        printf("no answer from %s: UNAVAILABLE%s%s\n", addr, st.message[0] ? ": " : "", st.message);
    } else {
        rc = PROBE_UNHEALTHY;
        printf("%s at %s: health check failed with %s%s%s\n", what, addr, cm_status_name(code),
               st.message[0] ? ": " : "", st.message);
    }
    if (resp) protobuf_c_message_free_unpacked(resp, NULL);
    cm_rpc_status_clear(&st);
    cm_channel_free(ch);
    return rc;
}
