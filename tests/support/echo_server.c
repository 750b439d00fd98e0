/* Standalone Echo server on the framework, for interop tests, drain tests and the benchmark. */
#include "cm_app.h"
#include "echo_service.h"

int main(int argc, char **argv) {
    cm_app_t app;
    int rc = cm_app_init(&app, "echo", NULL, 0, argc, argv,
                         "iot.testing.v1.Echo test server on the libs/common gRPC layer.", "127.0.0.1:0",
                         "127.0.0.1:0");
    if (rc) return rc > 0 ? 0 : 2;
    echo_ctx_t ctx = {0};
    cm_service_t svc;
    echo_service_init(&svc, &ctx);
    const cm_service_t *svcs[] = {&svc};
    if (cm_app_start(&app, svcs, 1)) {
        cm_app_stop(&app);
        return 1;
    }
    cm_app_wait(&app);
    cm_app_stop(&app);
    return 0;
}
