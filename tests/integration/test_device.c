/* The device-mgmt binary against the real Postgres and Redis from tests/run.sh: CRUD and
 * validation, filters and paging under concurrent inserts, a 10,000-device batch and groups,
 * tokens through rotation and revocation, certificates checked with OpenSSL, shadows under
 * concurrent updates, commands over the watch stream, presence and the event stream. Each test
 * gets its own Postgres schema and Redis prefix. */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "cm_json.h"
#include "cm_redis.h"
#include "cm_rpc.h"
#include "iot/device/v1/device.pb-c.h"
#include "proc.h"
#include "test.h"

typedef struct dm_proc_s {
    test_proc_t p;
    cm_channel_t *ch;
} dm_proc_t;

static char schema_env[96], prefix_env[96], prefix[64];

static void fresh_names(const char *name) {
    snprintf(schema_env, sizeof schema_env, "IOT_DM_PG_SCHEMA=t_%s_%d", name, (int)getpid());
    snprintf(prefix, sizeof prefix, "{t-%s-%d}:", name, (int)getpid());
    snprintf(prefix_env, sizeof prefix_env, "IOT_DM_REDIS_PREFIX=%s", prefix);
}

static void dm_start(dm_proc_t *d, const char *extra) {
    static char bin[1024], pg_env[1024], redis_env[128], mig_env[1024];
    snprintf(bin, sizeof bin, "%s/services/device-mgmt/device-mgmt", test_env("IOT_BUILD_DIR"));
    snprintf(pg_env, sizeof pg_env, "IOT_PG_DSN=%s", test_env("IOT_TEST_PG"));
    snprintf(redis_env, sizeof redis_env, "IOT_REDIS_ADDR=%s", test_env("IOT_TEST_REDIS"));
    snprintf(mig_env, sizeof mig_env, "IOT_DM_MIGRATIONS=services/device-mgmt/migrations");
    char *argv[] = {bin, NULL};
    const char *env[] = {pg_env, redis_env, mig_env, schema_env, prefix_env, "IOT_GRPC_LISTEN=127.0.0.1:0",
                         "IOT_ADMIN_LISTEN=127.0.0.1:0", "IOT_DM_PRESENCE_INTERVAL=200ms", extra ? extra : "IOT_LOG_LEVEL=warn",
                         NULL};
    ASSERT_INT_EQ(test_proc_start(&d->p, argv, env, 1), 0);
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", d->p.grpc_port);
    d->ch = cm_channel_new(target, NULL, NULL);
}

static void dm_stop(dm_proc_t *d) {
    cm_channel_free(d->ch);
    test_proc_kill(&d->p, SIGTERM);
    ASSERT_INT_EQ(test_proc_wait(&d->p, 15000), 0);
}

static char last_msg[512];

/* Calls method; returns the status code; the message stays in last_msg. */
static int call_md(dm_proc_t *d, const char *method, const void *req, const ProtobufCMessageDescriptor *desc, void *resp,
                   const char *token) {
    cm_rpc_status_t st = {0};
    char auth[256];
    cm_md_t md = {"authorization", auth, 0};
    if (token) snprintf(auth, sizeof auth, "Bearer %s", token);
    cm_call_opts_t o = {.timeout_ms = 30000, .md = token ? &md : NULL, .n_md = token ? 1 : 0};
    char path[128];
    snprintf(path, sizeof path, "/iot.device.v1.DeviceManager/%s", method);
    int code = cm_channel_unary(d->ch, path, req, desc, (ProtobufCMessage **)resp, &o, &st);
    snprintf(last_msg, sizeof last_msg, "%s", st.message);
    cm_rpc_status_clear(&st);
    return code;
}

static int call(dm_proc_t *d, const char *method, const void *req, const ProtobufCMessageDescriptor *desc, void *resp) {
    return call_md(d, method, req, desc, resp, NULL);
}

static void pbfree(void *m) {
    if (m) protobuf_c_message_free_unpacked(m, NULL);
}

#define DEV_DESC (&iot__device__v1__device__descriptor)

static Iot__Device__V1__Device *create(dm_proc_t *d, const char *id, const char *type, const char *labels_kv) {
    Iot__Device__V1__Device dev = IOT__DEVICE__V1__DEVICE__INIT;
    dev.id = (char *)id;
    dev.name = (char *)"Boiler room sensor";
    dev.type = (char *)type;
    Iot__Device__V1__Device__LabelsEntry e = IOT__DEVICE__V1__DEVICE__LABELS_ENTRY__INIT, *ep = &e;
    char k[64], v[64];
    if (labels_kv) {
        sscanf(labels_kv, "%63[^=]=%63s", k, v);
        e.key = k;
        e.value = v;
        dev.labels = &ep;
        dev.n_labels = 1;
    }
    Iot__Device__V1__CreateDeviceRequest req = IOT__DEVICE__V1__CREATE_DEVICE_REQUEST__INIT;
    req.device = &dev;
    Iot__Device__V1__Device *out = NULL;
    int code = call(d, "CreateDevice", &req, DEV_DESC, &out);
    if (code != CM_STATUS_OK) TEST__FAIL("CreateDevice %s: %d %s", id, code, last_msg);
    return out;
}

static int get(dm_proc_t *d, const char *id, Iot__Device__V1__Device **out) {
    Iot__Device__V1__GetDeviceRequest req = IOT__DEVICE__V1__GET_DEVICE_REQUEST__INIT;
    req.id = (char *)id;
    *out = NULL;
    return call(d, "GetDevice", &req, DEV_DESC, out);
}

/* ---- devices ---- */

static void test_device_crud_and_validation(void) {
    fresh_names("crud");
    dm_proc_t d;
    dm_start(&d, NULL);
    Iot__Device__V1__Device *a = create(&d, "pump-1", "pump", "env=prod");
    ASSERT_STR_EQ(a->id, "pump-1");
    ASSERT_INT_EQ(a->status, IOT__DEVICE__V1__DEVICE_STATUS__DEVICE_STATUS_PROVISIONED);
    ASSERT(a->create_time && a->create_time->seconds > 1700000000);
    ASSERT(*a->etag);
    /* Generated id */
    Iot__Device__V1__Device *g = create(&d, "", "pump", NULL);
    ASSERT(strncmp(g->id, "d-", 2) == 0 && strlen(g->id) == 18);

    Iot__Device__V1__Device *got;
    ASSERT_INT_EQ(get(&d, "pump-1", &got), CM_STATUS_OK);
    ASSERT_STR_EQ(got->name, "Boiler room sensor");
    ASSERT_INT_EQ(got->n_labels, 1);
    ASSERT_STR_EQ(got->labels[0]->key, "env");
    ASSERT_STR_EQ(got->etag, a->etag);
    pbfree(got);

    /* Duplicate, unknown, invalid */
    Iot__Device__V1__Device dup = IOT__DEVICE__V1__DEVICE__INIT;
    dup.id = (char *)"pump-1";
    Iot__Device__V1__CreateDeviceRequest creq = IOT__DEVICE__V1__CREATE_DEVICE_REQUEST__INIT;
    creq.device = &dup;
    Iot__Device__V1__Device *none = NULL;
    ASSERT_INT_EQ(call(&d, "CreateDevice", &creq, DEV_DESC, &none), CM_STATUS_ALREADY_EXISTS);
    ASSERT(strstr(last_msg, "pump-1"));
    ASSERT_INT_EQ(get(&d, "nope", &got), CM_STATUS_NOT_FOUND);
    ASSERT_INT_EQ(get(&d, "bad id!", &got), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "id:"));
    dup.id = (char *)"x1";
    dup.type = (char *)"Pump Type";
    ASSERT_INT_EQ(call(&d, "CreateDevice", &creq, DEV_DESC, &none), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "device.type"));
    dup.type = (char *)"";
    dup.name = (char *)"bad\xff utf8";
    ASSERT_INT_EQ(call(&d, "CreateDevice", &creq, DEV_DESC, &none), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "device.name"));
    dup.name = (char *)"'; DROP TABLE devices; --";
    ASSERT_INT_EQ(call(&d, "CreateDevice", &creq, DEV_DESC, &none), CM_STATUS_OK);
    pbfree(none);

    /* Update with a field mask; stale etag refused with ABORTED; visible at once. */
    Iot__Device__V1__Device upd = IOT__DEVICE__V1__DEVICE__INIT;
    upd.id = (char *)"pump-1";
    upd.firmware_version = (char *)"2.0.1";
    upd.name = (char *)"ignored: not in the mask";
    upd.etag = a->etag;
    char *paths[] = {(char *)"firmware_version"};
    Google__Protobuf__FieldMask mask = GOOGLE__PROTOBUF__FIELD_MASK__INIT;
    mask.paths = paths;
    mask.n_paths = 1;
    Iot__Device__V1__UpdateDeviceRequest ureq = IOT__DEVICE__V1__UPDATE_DEVICE_REQUEST__INIT;
    ureq.device = &upd;
    ureq.update_mask = &mask;
    Iot__Device__V1__Device *u = NULL;
    ASSERT_INT_EQ(call(&d, "UpdateDevice", &ureq, DEV_DESC, &u), CM_STATUS_OK);
    ASSERT_STR_EQ(u->firmware_version, "2.0.1");
    ASSERT_STR_EQ(u->name, "Boiler room sensor");
    ASSERT(strcmp(u->etag, a->etag) != 0);
    ASSERT_INT_EQ(get(&d, "pump-1", &got), CM_STATUS_OK);
    ASSERT_STR_EQ(got->firmware_version, "2.0.1");
    ASSERT_STR_EQ(got->etag, u->etag);
    pbfree(got);
    Iot__Device__V1__Device *u2 = NULL;
    ASSERT_INT_EQ(call(&d, "UpdateDevice", &ureq, DEV_DESC, &u2), CM_STATUS_ABORTED);
    ASSERT(strstr(last_msg, "etag"));
    paths[0] = (char *)"id";
    ASSERT_INT_EQ(call(&d, "UpdateDevice", &ureq, DEV_DESC, &u2), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "update_mask"));

    /* Delete: gone from cache and database; the id can be reused. */
    Iot__Device__V1__DeleteDeviceRequest dreq = IOT__DEVICE__V1__DELETE_DEVICE_REQUEST__INIT;
    dreq.id = (char *)"pump-1";
    dreq.etag = a->etag;
    ProtobufCMessage *dr = NULL;
    ASSERT_INT_EQ(call(&d, "DeleteDevice", &dreq, &iot__device__v1__delete_device_response__descriptor, &dr),
                  CM_STATUS_ABORTED);
    dreq.etag = u->etag;
    ASSERT_INT_EQ(call(&d, "DeleteDevice", &dreq, &iot__device__v1__delete_device_response__descriptor, &dr), CM_STATUS_OK);
    pbfree(dr);
    ASSERT_INT_EQ(get(&d, "pump-1", &got), CM_STATUS_NOT_FOUND);
    ASSERT_INT_EQ(call(&d, "DeleteDevice", &dreq, &iot__device__v1__delete_device_response__descriptor, &dr),
                  CM_STATUS_NOT_FOUND);
    Iot__Device__V1__Device *again = create(&d, "pump-1", "valve", NULL);
    ASSERT_INT_EQ(get(&d, "pump-1", &got), CM_STATUS_OK);
    ASSERT_STR_EQ(got->type, "valve");
    pbfree(got);
    pbfree(again);
    pbfree(u);
    pbfree(a);
    pbfree(g);
    dm_stop(&d);
}

/* Lists every page; checks order and returns the ids seen (count in *n). */
static char **list_all(dm_proc_t *d, Iot__Device__V1__DeviceFilter *f, int page, size_t *n, void (*between)(int)) {
    char **ids = NULL;
    *n = 0;
    char token[512] = "";
    for (int pageno = 0;; pageno++) {
        Iot__Device__V1__ListDevicesRequest req = IOT__DEVICE__V1__LIST_DEVICES_REQUEST__INIT;
        req.filter = f;
        req.page_size = page;
        req.page_token = token;
        Iot__Device__V1__ListDevicesResponse *r = NULL;
        int code = call(d, "ListDevices", &req, &iot__device__v1__list_devices_response__descriptor, &r);
        if (code) TEST__FAIL("ListDevices: %d %s", code, last_msg);
        ids = realloc(ids, sizeof *ids * (*n + r->n_devices + 1));
        for (size_t i = 0; i < r->n_devices; i++) {
            if (*n) ASSERT(strcmp(ids[*n - 1], r->devices[i]->id) < 0); /* ordered, no duplicates */
            ids[(*n)++] = strdup(r->devices[i]->id);
        }
        snprintf(token, sizeof token, "%s", r->next_page_token);
        pbfree(r);
        if (!*token) break;
        if (between) between(pageno);
    }
    return ids;
}

static void free_ids(char **ids, size_t n) {
    for (size_t i = 0; i < n; i++) free(ids[i]);
    free(ids);
}

static dm_proc_t *g_dm;
static void add_during_paging(int pageno) {
    /* Rows added before and after the cursor while paging. */
    char id[32];
    snprintf(id, sizeof id, "a-new-%d", pageno);
    pbfree(create(g_dm, id, "meter", NULL));
    snprintf(id, sizeof id, "z-new-%d", pageno);
    pbfree(create(g_dm, id, "meter", NULL));
}

static void decommission(dm_proc_t *d, const char *id);

static Iot__Device__V1__CountDevicesResponse *count_devices(dm_proc_t *d, Iot__Device__V1__DeviceFilter *f, int want_code) {
    Iot__Device__V1__CountDevicesRequest req = IOT__DEVICE__V1__COUNT_DEVICES_REQUEST__INIT;
    req.filter = f;
    Iot__Device__V1__CountDevicesResponse *r = NULL;
    ASSERT_INT_EQ(call(d, "CountDevices", &req, &iot__device__v1__count_devices_response__descriptor, &r), want_code);
    return r;
}

static void test_list_filters_and_paging(void) {
    fresh_names("list");
    dm_proc_t d;
    dm_start(&d, NULL);
    char id[32];
    for (int i = 0; i < 60; i++) {
        snprintf(id, sizeof id, "m-%03d", i);
        pbfree(create(&d, id, i % 3 == 0 ? "meter" : "valve", i % 2 ? "zone=north" : "zone=south"));
    }
    Iot__Device__V1__DeviceFilter f = IOT__DEVICE__V1__DEVICE_FILTER__INIT;
    f.type = (char *)"meter";
    size_t n;
    char **ids = list_all(&d, &f, 7, &n, NULL);
    ASSERT_INT_EQ(n, 20);
    free_ids(ids, n);
    f.type = (char *)"";
    f.label_selector = (char *)"zone in (north), zone!=south";
    ids = list_all(&d, &f, 1000, &n, NULL);
    ASSERT_INT_EQ(n, 30);
    free_ids(ids, n);
    f.label_selector = (char *)"zone=north,!missing";
    f.type = (char *)"meter";
    ids = list_all(&d, &f, 4, &n, NULL);
    ASSERT_INT_EQ(n, 10);
    free_ids(ids, n);
    f.type = (char *)"";
    f.label_selector = (char *)"zone in (";
    Iot__Device__V1__ListDevicesRequest bad = IOT__DEVICE__V1__LIST_DEVICES_REQUEST__INIT;
    bad.filter = &f;
    Iot__Device__V1__ListDevicesResponse *r = NULL;
    ASSERT_INT_EQ(call(&d, "ListDevices", &bad, &iot__device__v1__list_devices_response__descriptor, &r),
                  CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "label_selector"));
    f.label_selector = (char *)"";
    f.name_contains = (char *)"%";
    ids = list_all(&d, &f, 10, &n, NULL);
    ASSERT_INT_EQ(n, 0); /* LIKE metacharacters are literal */
    free_ids(ids, n);
    f.name_contains = (char *)"";
    f.search = (char *)"M-04"; /* ids m-040..m-049 */
    ids = list_all(&d, &f, 4, &n, NULL);
    ASSERT_INT_EQ(n, 10);
    free_ids(ids, n);
    f.search = (char *)"";
    f.name_contains = (char *)"ROOM";
    bad.page_token = (char *)"zz";
    ASSERT_INT_EQ(call(&d, "ListDevices", &bad, &iot__device__v1__list_devices_response__descriptor, &r),
                  CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "page_token"));
    ids = list_all(&d, &f, 10, &n, NULL);
    ASSERT_INT_EQ(n, 60);
    free_ids(ids, n);

    /* CountDevices: the list's filters; the total and each status that has devices, in enum order. */
    decommission(&d, "m-000");
    decommission(&d, "m-003");
    Iot__Device__V1__DeviceFilter cf = IOT__DEVICE__V1__DEVICE_FILTER__INIT;
    cf.type = (char *)"meter";
    Iot__Device__V1__CountDevicesResponse *cr = count_devices(&d, &cf, CM_STATUS_OK);
    ASSERT_INT_EQ(cr->total, 20);
    ASSERT_INT_EQ(cr->n_by_status, 2);
    ASSERT_INT_EQ(cr->by_status[0]->status, IOT__DEVICE__V1__DEVICE_STATUS__DEVICE_STATUS_PROVISIONED);
    ASSERT_INT_EQ(cr->by_status[0]->count, 18);
    ASSERT_INT_EQ(cr->by_status[1]->status, IOT__DEVICE__V1__DEVICE_STATUS__DEVICE_STATUS_DECOMMISSIONED);
    ASSERT_INT_EQ(cr->by_status[1]->count, 2);
    pbfree(cr);
    cr = count_devices(&d, NULL, CM_STATUS_OK);
    ASSERT_INT_EQ(cr->total, 60);
    pbfree(cr);
    cf.type = (char *)"no-such-type";
    cr = count_devices(&d, &cf, CM_STATUS_OK);
    ASSERT_INT_EQ(cr->total, 0);
    ASSERT_INT_EQ(cr->n_by_status, 0);
    pbfree(cr);
    cf.label_selector = (char *)"zone in (";
    ASSERT(count_devices(&d, &cf, CM_STATUS_INVALID_ARGUMENT) == NULL);
    ASSERT(strstr(last_msg, "filter.label_selector"));

    /* Paging while rows are added: every device that existed throughout is seen exactly once. */
    Iot__Device__V1__DeviceFilter all = IOT__DEVICE__V1__DEVICE_FILTER__INIT;
    g_dm = &d;
    ids = list_all(&d, &all, 9, &n, add_during_paging);
    size_t orig = 0;
    for (size_t i = 0; i < n; i++) orig += strncmp(ids[i], "m-", 2) == 0;
    ASSERT_INT_EQ(orig, 60);
    free_ids(ids, n);
    dm_stop(&d);
}

static void test_batch_10000_and_groups(void) {
    fresh_names("batch");
    dm_proc_t d;
    dm_start(&d, NULL);
    enum { N = 10000 };
    Iot__Device__V1__Device *devs = calloc(N, sizeof *devs), **pd = calloc(N, sizeof *pd);
    Iot__Device__V1__Device__LabelsEntry *le = calloc(N, sizeof *le), **lep = calloc(N, sizeof *lep);
    char (*ids)[16] = calloc(N, 16);
    for (int i = 0; i < N; i++) {
        iot__device__v1__device__init(&devs[i]);
        snprintf(ids[i], 16, "b-%05d", i);
        devs[i].id = ids[i];
        devs[i].type = (char *)(i % 4 == 0 ? "thermostat" : "meter");
        iot__device__v1__device__labels_entry__init(&le[i]);
        le[i].key = (char *)"floor";
        le[i].value = (char *)(i % 5 == 0 ? "3" : "1");
        lep[i] = &le[i];
        devs[i].labels = &lep[i];
        devs[i].n_labels = 1;
        pd[i] = &devs[i];
    }
    Iot__Device__V1__BatchCreateDevicesRequest req = IOT__DEVICE__V1__BATCH_CREATE_DEVICES_REQUEST__INIT;
    req.devices = pd;
    req.n_devices = N;
    Iot__Device__V1__BatchCreateDevicesResponse *resp = NULL;
    ASSERT_INT_EQ(call(&d, "BatchCreateDevices", &req, &iot__device__v1__batch_create_devices_response__descriptor, &resp),
                  CM_STATUS_OK);
    ASSERT_INT_EQ(resp->n_devices, N);
    ASSERT_STR_EQ(resp->devices[1234]->id, "b-01234");
    ASSERT(*resp->devices[1234]->etag);
    pbfree(resp);
    /* All or nothing: one existing id fails the batch and names its index. */
    snprintf(ids[0], 16, "new-0");
    snprintf(ids[1], 16, "new-1");
    req.n_devices = 3; /* new-0, new-1, b-00002 (exists) */
    ASSERT_INT_EQ(call(&d, "BatchCreateDevices", &req, &iot__device__v1__batch_create_devices_response__descriptor, &resp),
                  CM_STATUS_ALREADY_EXISTS);
    ASSERT(strstr(last_msg, "devices[2]"));
    Iot__Device__V1__Device *got;
    ASSERT_INT_EQ(get(&d, "new-0", &got), CM_STATUS_NOT_FOUND);
    snprintf(ids[2], 16, "new-0");
    ASSERT_INT_EQ(call(&d, "BatchCreateDevices", &req, &iot__device__v1__batch_create_devices_response__descriptor, &resp),
                  CM_STATUS_ALREADY_EXISTS);
    ASSERT(strstr(last_msg, "devices[2]") && strstr(last_msg, "devices[0]"));

    /* A dynamic group by filter returns exactly the matching devices. */
    Iot__Device__V1__DeviceFilter f = IOT__DEVICE__V1__DEVICE_FILTER__INIT;
    f.type = (char *)"thermostat";
    f.label_selector = (char *)"floor=3";
    Iot__Device__V1__Group grp = IOT__DEVICE__V1__GROUP__INIT;
    grp.id = (char *)"third-floor-thermostats";
    grp.kind = IOT__DEVICE__V1__GROUP_KIND__GROUP_KIND_DYNAMIC;
    grp.filter = &f;
    Iot__Device__V1__CreateGroupRequest greq = IOT__DEVICE__V1__CREATE_GROUP_REQUEST__INIT;
    greq.group = &grp;
    Iot__Device__V1__Group *gout = NULL;
    ASSERT_INT_EQ(call(&d, "CreateGroup", &greq, &iot__device__v1__group__descriptor, &gout), CM_STATUS_OK);
    pbfree(gout);
    ASSERT_INT_EQ(call(&d, "CreateGroup", &greq, &iot__device__v1__group__descriptor, &gout), CM_STATUS_ALREADY_EXISTS);
    size_t n = 0;
    char token[512] = "";
    int expect_i = 0;
    for (;;) {
        Iot__Device__V1__ListGroupMembersRequest lr = IOT__DEVICE__V1__LIST_GROUP_MEMBERS_REQUEST__INIT;
        lr.group_id = grp.id;
        lr.page_size = 1000;
        lr.page_token = token;
        Iot__Device__V1__ListGroupMembersResponse *r = NULL;
        ASSERT_INT_EQ(call(&d, "ListGroupMembers", &lr, &iot__device__v1__list_group_members_response__descriptor, &r),
                      CM_STATUS_OK);
        for (size_t i = 0; i < r->n_devices; i++) {
            while (!(expect_i % 4 == 0 && expect_i % 5 == 0)) expect_i++;
            char want[16];
            snprintf(want, sizeof want, "b-%05d", expect_i++);
            ASSERT_STR_EQ(r->devices[i]->id, want);
            n++;
        }
        snprintf(token, sizeof token, "%s", r->next_page_token);
        pbfree(r);
        if (!*token) break;
    }
    ASSERT_INT_EQ(n, N / 20);

    /* Static group: add, list, remove; dynamic groups refuse explicit members. */
    Iot__Device__V1__Group sg = IOT__DEVICE__V1__GROUP__INIT;
    sg.id = (char *)"pilot";
    sg.kind = IOT__DEVICE__V1__GROUP_KIND__GROUP_KIND_STATIC;
    greq.group = &sg;
    ASSERT_INT_EQ(call(&d, "CreateGroup", &greq, &iot__device__v1__group__descriptor, &gout), CM_STATUS_OK);
    pbfree(gout);
    char *mem[] = {(char *)"b-00007", (char *)"b-00003", (char *)"b-00007"};
    Iot__Device__V1__GroupMembersRequest mr = IOT__DEVICE__V1__GROUP_MEMBERS_REQUEST__INIT;
    mr.group_id = sg.id;
    mr.device_ids = mem;
    mr.n_device_ids = 3;
    Iot__Device__V1__GroupMembersResponse *mresp = NULL;
    ASSERT_INT_EQ(call(&d, "AddGroupMembers", &mr, &iot__device__v1__group_members_response__descriptor, &mresp), CM_STATUS_OK);
    ASSERT_INT_EQ(mresp->changed, 2);
    pbfree(mresp);
    mem[0] = (char *)"ghost";
    ASSERT_INT_EQ(call(&d, "AddGroupMembers", &mr, &iot__device__v1__group_members_response__descriptor, &mresp),
                  CM_STATUS_NOT_FOUND);
    ASSERT(strstr(last_msg, "ghost"));
    mr.group_id = grp.id;
    ASSERT_INT_EQ(call(&d, "AddGroupMembers", &mr, &iot__device__v1__group_members_response__descriptor, &mresp),
                  CM_STATUS_FAILED_PRECONDITION);
    Iot__Device__V1__DeviceFilter byg = IOT__DEVICE__V1__DEVICE_FILTER__INIT;
    byg.group_id = (char *)"pilot";
    char **got_ids = list_all(&d, &byg, 100, &n, NULL);
    ASSERT_INT_EQ(n, 2);
    ASSERT_STR_EQ(got_ids[0], "b-00003");
    free_ids(got_ids, n);
    free(devs);
    free(pd);
    free(le);
    free(lep);
    free(ids);
    dm_stop(&d);
}

/* ---- tokens ---- */

/* UpdateDevice with mask ["status"]: the device becomes decommissioned. */
static void decommission(dm_proc_t *d, const char *id) {
    Iot__Device__V1__Device upd = IOT__DEVICE__V1__DEVICE__INIT;
    upd.id = (char *)id;
    upd.status = IOT__DEVICE__V1__DEVICE_STATUS__DEVICE_STATUS_DECOMMISSIONED;
    char *paths[] = {(char *)"status"};
    Google__Protobuf__FieldMask mask = GOOGLE__PROTOBUF__FIELD_MASK__INIT;
    mask.paths = paths;
    mask.n_paths = 1;
    Iot__Device__V1__UpdateDeviceRequest ureq = IOT__DEVICE__V1__UPDATE_DEVICE_REQUEST__INIT;
    ureq.device = &upd;
    ureq.update_mask = &mask;
    Iot__Device__V1__Device *u = NULL;
    ASSERT_INT_EQ(call(d, "UpdateDevice", &ureq, DEV_DESC, &u), CM_STATUS_OK);
    pbfree(u);
}

static int authenticate(dm_proc_t *d, const char *token, char *device_out) {
    Iot__Device__V1__AuthenticateDeviceRequest req = IOT__DEVICE__V1__AUTHENTICATE_DEVICE_REQUEST__INIT;
    req.token = (char *)token;
    Iot__Device__V1__AuthenticateDeviceResponse *r = NULL;
    int code = call(d, "AuthenticateDevice", &req, &iot__device__v1__authenticate_device_response__descriptor, &r);
    if (r && device_out) strcpy(device_out, r->device_id);
    pbfree(r);
    return code;
}

static Iot__Device__V1__IssueTokenResponse *issue(dm_proc_t *d, const char *device) {
    Iot__Device__V1__IssueTokenRequest req = IOT__DEVICE__V1__ISSUE_TOKEN_REQUEST__INIT;
    req.device_id = (char *)device;
    Iot__Device__V1__IssueTokenResponse *r = NULL;
    int code = call(d, "IssueToken", &req, &iot__device__v1__issue_token_response__descriptor, &r);
    if (code) TEST__FAIL("IssueToken: %d %s", code, last_msg);
    return r;
}

static void test_tokens_issue_rotate_revoke(void) {
    fresh_names("tok");
    dm_proc_t d;
    dm_start(&d, NULL);
    pbfree(create(&d, "cam-1", "camera", NULL));
    Iot__Device__V1__IssueTokenResponse *t = issue(&d, "cam-1");
    ASSERT(strlen(t->token) > 43 + 4);
    char dev[160];
    for (int i = 0; i < 3; i++) { /* miss then hits */
        ASSERT_INT_EQ(authenticate(&d, t->token, dev), CM_STATUS_OK);
        ASSERT_STR_EQ(dev, "cam-1");
    }
    /* A wrong secret with a right id, garbage, and an unknown device. */
    char wrong[256];
    snprintf(wrong, sizeof wrong, "%s", t->token);
    wrong[strlen(wrong) - 1] = wrong[strlen(wrong) - 1] == 'A' ? 'B' : 'A';
    ASSERT_INT_EQ(authenticate(&d, wrong, NULL), CM_STATUS_UNAUTHENTICATED);
    ASSERT_INT_EQ(authenticate(&d, "hello", NULL), CM_STATUS_UNAUTHENTICATED);
    Iot__Device__V1__IssueTokenRequest ir = IOT__DEVICE__V1__ISSUE_TOKEN_REQUEST__INIT;
    ir.device_id = (char *)"ghost";
    Iot__Device__V1__IssueTokenResponse *none = NULL;
    ASSERT_INT_EQ(call(&d, "IssueToken", &ir, &iot__device__v1__issue_token_response__descriptor, &none),
                  CM_STATUS_NOT_FOUND);

    /* Rotate: the new one works, the old one fails at once (its cache entry included). */
    Iot__Device__V1__RotateTokenRequest rr = IOT__DEVICE__V1__ROTATE_TOKEN_REQUEST__INIT;
    rr.token_id = t->token_id;
    Iot__Device__V1__IssueTokenResponse *t2 = NULL;
    ASSERT_INT_EQ(call(&d, "RotateToken", &rr, &iot__device__v1__issue_token_response__descriptor, &t2), CM_STATUS_OK);
    ASSERT_INT_EQ(authenticate(&d, t->token, NULL), CM_STATUS_UNAUTHENTICATED);
    ASSERT_INT_EQ(authenticate(&d, t2->token, dev), CM_STATUS_OK);
    ASSERT_INT_EQ(call(&d, "RotateToken", &rr, &iot__device__v1__issue_token_response__descriptor, &none),
                  CM_STATUS_FAILED_PRECONDITION);

    /* Revoke: fails immediately after RevokeToken returns, though it was cached. */
    Iot__Device__V1__RevokeTokenRequest vr = IOT__DEVICE__V1__REVOKE_TOKEN_REQUEST__INIT;
    vr.token_id = t2->token_id;
    ProtobufCMessage *ignored = NULL;
    ASSERT_INT_EQ(call(&d, "RevokeToken", &vr, &iot__device__v1__revoke_token_response__descriptor, &ignored), CM_STATUS_OK);
    pbfree(ignored);
    ASSERT_INT_EQ(authenticate(&d, t2->token, NULL), CM_STATUS_UNAUTHENTICATED);
    ASSERT(strstr(last_msg, "revoked"));
    vr.token_id = (char *)"tk-0000";
    ASSERT_INT_EQ(call(&d, "RevokeToken", &vr, &iot__device__v1__revoke_token_response__descriptor, &ignored),
                  CM_STATUS_NOT_FOUND);

    /* Decommissioning the device stops its tokens; deleting it and re-creating the id does not
     * bring the old tokens back. */
    Iot__Device__V1__IssueTokenResponse *t3 = issue(&d, "cam-1");
    ASSERT_INT_EQ(authenticate(&d, t3->token, NULL), CM_STATUS_OK);
    decommission(&d, "cam-1");
    ASSERT_INT_EQ(authenticate(&d, t3->token, NULL), CM_STATUS_UNAUTHENTICATED);
    ASSERT(strstr(last_msg, "decommissioned"));
    Iot__Device__V1__DeleteDeviceRequest dreq = IOT__DEVICE__V1__DELETE_DEVICE_REQUEST__INIT;
    dreq.id = (char *)"cam-1";
    ASSERT_INT_EQ(call(&d, "DeleteDevice", &dreq, &iot__device__v1__delete_device_response__descriptor, &ignored), CM_STATUS_OK);
    pbfree(ignored);
    pbfree(create(&d, "cam-1", "camera", NULL));
    ASSERT_INT_EQ(authenticate(&d, t3->token, NULL), CM_STATUS_UNAUTHENTICATED);
    pbfree(t);
    pbfree(t2);
    pbfree(t3);
    dm_stop(&d);
}

/* ---- certificates ---- */

static char *make_csr(EVP_PKEY **key_out) {
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509_REQ *req = X509_REQ_new();
    X509_REQ_set_pubkey(req, key);
    X509_NAME *nm = X509_REQ_get_subject_name(req);
    X509_NAME_add_entry_by_txt(nm, "CN", MBSTRING_ASC, (const unsigned char *)"not-the-device", -1, -1, 0);
    X509_REQ_sign(req, key, EVP_sha256());
    BIO *b = BIO_new(BIO_s_mem());
    PEM_write_bio_X509_REQ(b, req);
    char *data;
    long n = BIO_get_mem_data(b, &data);
    char *pem = strndup(data, (size_t)n);
    BIO_free(b);
    X509_REQ_free(req);
    *key_out = key;
    return pem;
}

static X509 *pem_cert(const char *pem) {
    BIO *b = BIO_new_mem_buf(pem, -1);
    X509 *x = PEM_read_bio_X509(b, NULL, NULL, NULL);
    BIO_free(b);
    return x;
}

static int verify(X509 *ca, X509 *leaf, X509_CRL *crl) {
    X509_STORE *st = X509_STORE_new();
    X509_STORE_add_cert(st, ca);
    if (crl) {
        X509_STORE_add_crl(st, crl);
        X509_STORE_set_flags(st, X509_V_FLAG_CRL_CHECK);
    }
    X509_STORE_CTX *ctx = X509_STORE_CTX_new();
    X509_STORE_CTX_init(ctx, st, leaf, NULL);
    X509_STORE_CTX_set_purpose(ctx, X509_PURPOSE_SSL_CLIENT);
    int ok = X509_verify_cert(ctx);
    int err = ok == 1 ? 0 : X509_STORE_CTX_get_error(ctx);
    X509_STORE_CTX_free(ctx);
    X509_STORE_free(st);
    return err;
}

/* SignCertificate for device_id with a PEM CSR; the status code, *out set on OK (caller frees). */
static int sign(dm_proc_t *d, const char *device_id, const char *csr, Iot__Device__V1__SignCertificateResponse **out) {
    Iot__Device__V1__SignCertificateRequest req = IOT__DEVICE__V1__SIGN_CERTIFICATE_REQUEST__INIT;
    req.device_id = (char *)device_id;
    req.csr_pem = (char *)csr;
    *out = NULL;
    return call(d, "SignCertificate", &req, &iot__device__v1__sign_certificate_response__descriptor, out);
}

static void test_certificates_sign_and_revoke(void) {
    fresh_names("cert");
    dm_proc_t d;
    dm_start(&d, NULL);
    pbfree(create(&d, "gw-9", "gateway", NULL));
    EVP_PKEY *key;
    char *csr = make_csr(&key);
    Iot__Device__V1__SignCertificateResponse *r = NULL;
    ASSERT_INT_EQ(sign(&d, "gw-9", csr, &r), CM_STATUS_OK);
    X509 *ca = pem_cert(r->ca_certificate_pem), *leaf = pem_cert(r->certificate->certificate_pem);
    ASSERT(ca && leaf);
    ASSERT_INT_EQ(verify(ca, leaf, NULL), 0);
    char cn[160];
    X509_NAME_get_text_by_NID(X509_get_subject_name(leaf), NID_commonName, cn, sizeof cn);
    ASSERT_STR_EQ(cn, "gw-9");
    /* The certificate carries the CSR's key. */
    ASSERT_INT_EQ(EVP_PKEY_eq(X509_get0_pubkey(leaf), key), 1);

    /* A second certificate stays valid when the first is revoked. */
    Iot__Device__V1__SignCertificateResponse *r2 = NULL;
    ASSERT_INT_EQ(sign(&d, "gw-9", csr, &r2), CM_STATUS_OK);
    X509 *leaf2 = pem_cert(r2->certificate->certificate_pem);
    Iot__Device__V1__RevokeCertificateRequest rv = IOT__DEVICE__V1__REVOKE_CERTIFICATE_REQUEST__INIT;
    rv.serial = r->certificate->serial;
    rv.reason = 1;
    ProtobufCMessage *ignored = NULL;
    ASSERT_INT_EQ(call(&d, "RevokeCertificate", &rv, &iot__device__v1__revoke_certificate_response__descriptor, &ignored),
                  CM_STATUS_OK);
    pbfree(ignored);
    Iot__Device__V1__GetRevocationListRequest lr = IOT__DEVICE__V1__GET_REVOCATION_LIST_REQUEST__INIT;
    Iot__Device__V1__GetRevocationListResponse *crl_resp = NULL;
    ASSERT_INT_EQ(call(&d, "GetRevocationList", &lr, &iot__device__v1__get_revocation_list_response__descriptor, &crl_resp),
                  CM_STATUS_OK);
    ASSERT_INT_EQ(crl_resp->n_revoked_serials, 1);
    ASSERT_STR_EQ(crl_resp->revoked_serials[0], r->certificate->serial);
    BIO *b = BIO_new_mem_buf(crl_resp->crl_pem, -1);
    X509_CRL *crl = PEM_read_bio_X509_CRL(b, NULL, NULL, NULL);
    BIO_free(b);
    ASSERT(crl);
    ASSERT_INT_EQ(X509_CRL_verify(crl, X509_get0_pubkey(ca)), 1);
    ASSERT_INT_EQ(verify(ca, leaf, crl), X509_V_ERR_CERT_REVOKED);
    ASSERT_INT_EQ(verify(ca, leaf2, crl), 0);

    /* Bad CSR, unknown device, unknown serial. */
    Iot__Device__V1__SignCertificateResponse *none = NULL;
    ASSERT_INT_EQ(sign(&d, "gw-9", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", &none),
                  CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "csr_pem"));
    ASSERT_INT_EQ(sign(&d, "ghost", csr, &none), CM_STATUS_NOT_FOUND);
    rv.serial = (char *)"abc123";
    ASSERT_INT_EQ(call(&d, "RevokeCertificate", &rv, &iot__device__v1__revoke_certificate_response__descriptor, &ignored),
                  CM_STATUS_NOT_FOUND);
    /* The CA survives a restart (kept in Postgres, not regenerated). */
    dm_stop(&d);
    dm_start(&d, NULL);
    Iot__Device__V1__GetRevocationListResponse *again = NULL;
    ASSERT_INT_EQ(call(&d, "GetRevocationList", &lr, &iot__device__v1__get_revocation_list_response__descriptor, &again),
                  CM_STATUS_OK);
    ASSERT_STR_EQ(again->ca_certificate_pem, r->ca_certificate_pem);
    pbfree(again);
    X509_CRL_free(crl);
    X509_free(ca);
    X509_free(leaf);
    X509_free(leaf2);
    EVP_PKEY_free(key);
    free(csr);
    pbfree(r);
    pbfree(r2);
    pbfree(crl_resp);
    dm_stop(&d);
}

/* ---- shadows ---- */

static Google__Protobuf__Struct *to_struct(const char *json) {
    char err[128];
    json_t *j = cm_json_parse(json, strlen(json), err, sizeof err);
    Google__Protobuf__Struct *s = NULL;
    if (!j || cm_json_to_struct(j, NULL, &s)) TEST__FAIL("bad test JSON %s", json);
    json_decref(j);
    return s;
}

static char *to_json(const Google__Protobuf__Struct *s) {
    json_t *j = cm_json_from_struct(s);
    char *t = cm_json_dump(j);
    json_decref(j);
    return t;
}

static int update_shadow(dm_proc_t *d, const char *method, const char *patch, int64_t expected, const char *token,
                         Iot__Device__V1__Shadow **out) {
    Iot__Device__V1__UpdateShadowRequest req = IOT__DEVICE__V1__UPDATE_SHADOW_REQUEST__INIT;
    req.device_id = (char *)"thermo-1";
    req.patch = to_struct(patch);
    req.expected_version = expected;
    *out = NULL;
    int code = call_md(d, method, &req, &iot__device__v1__shadow__descriptor, out, token);
    protobuf_c_message_free_unpacked(&req.patch->base, NULL);
    return code;
}

typedef struct shadow_arg_s {
    dm_proc_t *d;
    int n;
    int64_t versions[50];
    int ok;
} shadow_arg_t;

static void *shadow_writer(void *p) {
    shadow_arg_t *a = p;
    for (int i = 0; i < a->n; i++) {
        char patch[64];
        snprintf(patch, sizeof patch, "{\"counter\": %d}", i);
        Iot__Device__V1__Shadow *sh;
        if (update_shadow(a->d, "UpdateDesired", patch, 0, NULL, &sh) == CM_STATUS_OK) {
            a->versions[a->ok++] = sh->version;
            pbfree(sh);
        }
    }
    return NULL;
}

static void test_shadow_delta_and_versions(void) {
    fresh_names("shadow");
    dm_proc_t d;
    dm_start(&d, NULL);
    pbfree(create(&d, "thermo-1", "thermostat", NULL));
    Iot__Device__V1__IssueTokenResponse *t = issue(&d, "thermo-1");
    Iot__Device__V1__Shadow *sh;
    ASSERT_INT_EQ(update_shadow(&d, "UpdateDesired", "{\"temp\": 21, \"mode\": {\"fan\": \"auto\", \"eco\": true}}", 0, NULL, &sh),
                  CM_STATUS_OK);
    ASSERT_INT_EQ(sh->version, 1);
    char *delta = to_json(sh->delta);
    ASSERT_STR_EQ(delta, "{\"mode\":{\"eco\":true,\"fan\":\"auto\"},\"temp\":21}");
    free(delta);
    pbfree(sh);
    /* Reported by the device (its token required). */
    ASSERT_INT_EQ(update_shadow(&d, "ReportState", "{\"temp\": 19.5, \"mode\": {\"fan\": \"auto\"}}", 0, NULL, &sh),
                  CM_STATUS_UNAUTHENTICATED);
    ASSERT_INT_EQ(update_shadow(&d, "ReportState", "{\"temp\": 19.5, \"mode\": {\"fan\": \"auto\"}, \"rssi\": -70}", 0,
                                t->token, &sh),
                  CM_STATUS_OK);
    ASSERT_INT_EQ(sh->version, 2);
    delta = to_json(sh->delta);
    ASSERT_STR_EQ(delta, "{\"mode\":{\"eco\":true},\"temp\":21}");
    free(delta);
    pbfree(sh);
    /* Merge patch: null removes; stale expected_version is ABORTED. */
    ASSERT_INT_EQ(update_shadow(&d, "UpdateDesired", "{\"mode\": null, \"temp\": 19.5}", 2, NULL, &sh), CM_STATUS_OK);
    delta = to_json(sh->delta);
    ASSERT_STR_EQ(delta, "{}");
    free(delta);
    char *des = to_json(sh->desired);
    ASSERT_STR_EQ(des, "{\"temp\":19.5}");
    free(des);
    pbfree(sh);
    ASSERT_INT_EQ(update_shadow(&d, "UpdateDesired", "{\"temp\": 1}", 2, NULL, &sh), CM_STATUS_ABORTED);
    ASSERT(strstr(last_msg, "version 3"));

    /* Concurrent writers: every successful update gets its own version, increasing per writer. */
    shadow_arg_t a[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        memset(&a[i], 0, sizeof a[i]);
        a[i].d = &d;
        a[i].n = 25;
        pthread_create(&th[i], NULL, shadow_writer, &a[i]);
    }
    int seen[200] = {0};
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        ASSERT_INT_EQ(a[i].ok, 25);
        for (int k = 0; k < 25; k++) {
            if (k) ASSERT(a[i].versions[k] > a[i].versions[k - 1]);
            ASSERT(a[i].versions[k] >= 4 && a[i].versions[k] < 104);
            ASSERT_INT_EQ(seen[a[i].versions[k]]++, 0);
        }
    }
    Iot__Device__V1__GetShadowRequest gr = IOT__DEVICE__V1__GET_SHADOW_REQUEST__INIT;
    gr.device_id = (char *)"thermo-1";
    ASSERT_INT_EQ(call(&d, "GetShadow", &gr, &iot__device__v1__shadow__descriptor, &sh), CM_STATUS_OK);
    ASSERT_INT_EQ(sh->version, 103);
    pbfree(sh);
    gr.device_id = (char *)"ghost";
    ASSERT_INT_EQ(call(&d, "GetShadow", &gr, &iot__device__v1__shadow__descriptor, &sh), CM_STATUS_NOT_FOUND);
    pbfree(t);
    dm_stop(&d);
}

/* ---- commands ---- */

static Iot__Device__V1__Command *send_cmd(dm_proc_t *d, const char *name, int ttl) {
    Iot__Device__V1__SendCommandRequest req = IOT__DEVICE__V1__SEND_COMMAND_REQUEST__INIT;
    req.device_id = (char *)"valve-7";
    req.name = (char *)name;
    req.ttl_seconds = ttl;
    req.payload = to_struct("{\"percent\": 40}");
    Iot__Device__V1__Command *c = NULL;
    int code = call(d, "SendCommand", &req, &iot__device__v1__command__descriptor, &c);
    protobuf_c_message_free_unpacked(&req.payload->base, NULL);
    if (code) TEST__FAIL("SendCommand: %d %s", code, last_msg);
    return c;
}

static cm_stream_t *watch(dm_proc_t *d, const char *token) {
    static char auth[256];
    snprintf(auth, sizeof auth, "Bearer %s", token);
    static cm_md_t md;
    md = (cm_md_t){"authorization", auth, 0};
    cm_call_opts_t o = {.timeout_ms = 20000, .md = &md, .n_md = 1};
    cm_stream_t *s = cm_stream_open(d->ch, "/iot.device.v1.DeviceManager/WatchCommands", &o);
    Iot__Device__V1__WatchCommandsRequest req = IOT__DEVICE__V1__WATCH_COMMANDS_REQUEST__INIT;
    req.device_id = (char *)"valve-7";
    cm_stream_send(s, &req.base);
    cm_stream_close_send(s);
    return s;
}

static void test_commands_watch_ack_expire(void) {
    fresh_names("cmd");
    dm_proc_t d;
    dm_start(&d, NULL);
    pbfree(create(&d, "valve-7", "valve", NULL));
    pbfree(create(&d, "valve-8", "valve", NULL));
    Iot__Device__V1__IssueTokenResponse *t = issue(&d, "valve-7"), *other = issue(&d, "valve-8");
    Iot__Device__V1__Command *c1 = send_cmd(&d, "open", 60), *c2 = send_cmd(&d, "close", 1), *c3 = send_cmd(&d, "open", 60);
    ASSERT(atoll(c1->id) < atoll(c2->id) && atoll(c2->id) < atoll(c3->id));
    ASSERT_INT_EQ(c1->status, IOT__DEVICE__V1__COMMAND_STATUS__COMMAND_STATUS_PENDING);
    sleep(2); /* c2 expires */

    /* Another device's token is refused. */
    cm_stream_t *bad = watch(&d, other->token);
    ProtobufCMessage *m = NULL;
    ASSERT(cm_stream_recv(bad, &iot__device__v1__command__descriptor, &m) <= 0);
    ASSERT_INT_EQ(cm_stream_finish(bad, NULL), CM_STATUS_PERMISSION_DENIED);

    cm_stream_t *s = watch(&d, t->token);
    Iot__Device__V1__Command *got = NULL;
    ASSERT_INT_EQ(cm_stream_recv(s, &iot__device__v1__command__descriptor, (ProtobufCMessage **)&got), 1);
    ASSERT_STR_EQ(got->id, c1->id);
    ASSERT_INT_EQ(got->status, IOT__DEVICE__V1__COMMAND_STATUS__COMMAND_STATUS_DELIVERED);
    pbfree(got);
    ASSERT_INT_EQ(cm_stream_recv(s, &iot__device__v1__command__descriptor, (ProtobufCMessage **)&got), 1);
    ASSERT_STR_EQ(got->id, c3->id); /* c2 expired: not delivered */
    pbfree(got);
    /* New commands arrive live, in order. */
    Iot__Device__V1__Command *c4 = send_cmd(&d, "throttle", 60), *c5 = send_cmd(&d, "shutdown", 60);
    ASSERT_INT_EQ(cm_stream_recv(s, &iot__device__v1__command__descriptor, (ProtobufCMessage **)&got), 1);
    ASSERT_STR_EQ(got->id, c4->id);
    pbfree(got);
    ASSERT_INT_EQ(cm_stream_recv(s, &iot__device__v1__command__descriptor, (ProtobufCMessage **)&got), 1);
    ASSERT_STR_EQ(got->id, c5->id);
    ASSERT_STR_EQ(got->name, "shutdown");
    pbfree(got);

    /* Ack: success recorded; repeating it is fine; the opposite outcome or an expired one is not. */
    Iot__Device__V1__AckCommandRequest ar = IOT__DEVICE__V1__ACK_COMMAND_REQUEST__INIT;
    ar.device_id = (char *)"valve-7";
    ar.command_id = c1->id;
    ar.success = 1;
    ar.result = to_struct("{\"position\": 40}");
    Iot__Device__V1__Command *acked = NULL;
    ASSERT_INT_EQ(call_md(&d, "AckCommand", &ar, &iot__device__v1__command__descriptor, &acked, t->token), CM_STATUS_OK);
    ASSERT_INT_EQ(acked->status, IOT__DEVICE__V1__COMMAND_STATUS__COMMAND_STATUS_SUCCEEDED);
    pbfree(acked);
    ASSERT_INT_EQ(call_md(&d, "AckCommand", &ar, &iot__device__v1__command__descriptor, &acked, t->token), CM_STATUS_OK);
    pbfree(acked);
    ar.success = 0;
    ASSERT_INT_EQ(call_md(&d, "AckCommand", &ar, &iot__device__v1__command__descriptor, &acked, t->token),
                  CM_STATUS_FAILED_PRECONDITION);
    ar.command_id = c2->id;
    ASSERT_INT_EQ(call_md(&d, "AckCommand", &ar, &iot__device__v1__command__descriptor, &acked, t->token),
                  CM_STATUS_FAILED_PRECONDITION);
    ASSERT(strstr(last_msg, "expired"));
    ASSERT_INT_EQ(call_md(&d, "AckCommand", &ar, &iot__device__v1__command__descriptor, &acked, other->token),
                  CM_STATUS_PERMISSION_DENIED);
    protobuf_c_message_free_unpacked(&ar.result->base, NULL);
    cm_stream_cancel(s);
    cm_stream_finish(s, NULL);

    /* A reconnect gets the delivered-but-unacknowledged ones again, not the acknowledged one. */
    s = watch(&d, t->token);
    ASSERT_INT_EQ(cm_stream_recv(s, &iot__device__v1__command__descriptor, (ProtobufCMessage **)&got), 1);
    ASSERT_STR_EQ(got->id, c3->id);
    pbfree(got);
    cm_stream_cancel(s);
    cm_stream_finish(s, NULL);

    Iot__Device__V1__GetCommandRequest gr = IOT__DEVICE__V1__GET_COMMAND_REQUEST__INIT;
    gr.id = c2->id;
    ASSERT_INT_EQ(call(&d, "GetCommand", &gr, &iot__device__v1__command__descriptor, &got), CM_STATUS_OK);
    ASSERT_INT_EQ(got->status, IOT__DEVICE__V1__COMMAND_STATUS__COMMAND_STATUS_EXPIRED);
    pbfree(got);
    Iot__Device__V1__ListCommandsRequest lr = IOT__DEVICE__V1__LIST_COMMANDS_REQUEST__INIT;
    lr.device_id = (char *)"valve-7";
    lr.page_size = 2;
    Iot__Device__V1__ListCommandsResponse *lresp = NULL;
    ASSERT_INT_EQ(call(&d, "ListCommands", &lr, &iot__device__v1__list_commands_response__descriptor, &lresp), CM_STATUS_OK);
    ASSERT_INT_EQ(lresp->n_commands, 2);
    ASSERT_STR_EQ(lresp->commands[0]->id, c5->id); /* newest first */
    ASSERT(*lresp->next_page_token);
    pbfree(lresp);
    Iot__Device__V1__SendCommandRequest sr = IOT__DEVICE__V1__SEND_COMMAND_REQUEST__INIT;
    sr.device_id = (char *)"ghost";
    sr.name = (char *)"open";
    ASSERT_INT_EQ(call(&d, "SendCommand", &sr, &iot__device__v1__command__descriptor, &got), CM_STATUS_NOT_FOUND);
    pbfree(c1);
    pbfree(c2);
    pbfree(c3);
    pbfree(c4);
    pbfree(c5);
    pbfree(t);
    pbfree(other);
    dm_stop(&d);
}

/* ---- presence and events ---- */

static void test_presence_online_offline_and_events(void) {
    fresh_names("presence");
    dm_proc_t d;
    dm_start(&d, "IOT_DM_OFFLINE_AFTER=1s");
    pbfree(create(&d, "tag-1", "tag", NULL));
    pbfree(create(&d, "tag-2", "tag", NULL));
    Iot__Device__V1__Device *got;
    ASSERT_INT_EQ(get(&d, "tag-1", &got), CM_STATUS_OK); /* cached now */
    pbfree(got);
    Iot__Device__V1__Sighting s1 = IOT__DEVICE__V1__SIGHTING__INIT, s2 = IOT__DEVICE__V1__SIGHTING__INIT,
                              s3 = IOT__DEVICE__V1__SIGHTING__INIT;
    s1.device_id = (char *)"tag-1";
    s2.device_id = (char *)"tag-1";
    s3.device_id = (char *)"nobody";
    Iot__Device__V1__Sighting *ss[] = {&s1, &s2, &s3};
    Iot__Device__V1__ReportSeenRequest req = IOT__DEVICE__V1__REPORT_SEEN_REQUEST__INIT;
    req.sightings = ss;
    req.n_sightings = 3;
    Iot__Device__V1__ReportSeenResponse *r = NULL;
    ASSERT_INT_EQ(call(&d, "ReportSeen", &req, &iot__device__v1__report_seen_response__descriptor, &r), CM_STATUS_OK);
    ASSERT_INT_EQ(r->updated, 1);
    ASSERT_INT_EQ(r->unknown, 1);
    pbfree(r);
    ASSERT_INT_EQ(get(&d, "tag-1", &got), CM_STATUS_OK);
    ASSERT_INT_EQ(got->status, IOT__DEVICE__V1__DEVICE_STATUS__DEVICE_STATUS_ONLINE);
    ASSERT(got->last_seen_time && got->last_seen_time->seconds >= time(NULL) - 5);
    pbfree(got);
    /* Silent for longer than IOT_DM_OFFLINE_AFTER: offline. */
    int offline = 0;
    for (int i = 0; i < 50 && !offline; i++) {
        usleep(100000);
        ASSERT_INT_EQ(get(&d, "tag-1", &got), CM_STATUS_OK);
        offline = got->status == IOT__DEVICE__V1__DEVICE_STATUS__DEVICE_STATUS_OFFLINE;
        pbfree(got);
    }
    ASSERT(offline);
    /* Future sightings are refused. */
    Google__Protobuf__Timestamp future = GOOGLE__PROTOBUF__TIMESTAMP__INIT;
    future.seconds = time(NULL) + 3600;
    s1.time = &future;
    req.n_sightings = 1;
    ASSERT_INT_EQ(call(&d, "ReportSeen", &req, &iot__device__v1__report_seen_response__descriptor, &r),
                  CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "sightings[0].time"));

    /* The event stream: created x2, online, offline for tag-1, in order, with event ids. */
    cm_redis_t *rd = cm_redis_new(test_env("IOT_TEST_REDIS"), 2000, NULL);
    char key[96];
    snprintf(key, sizeof key, "%sevents", prefix);
    const char *want[][2] = {{"created", "tag-1"}, {"created", "tag-2"}, {"online", "tag-1"}, {"offline", "tag-1"}};
    int matched = 0;
    for (int tries = 0; tries < 30 && matched < 4; tries++) {
        redisReply *rep = cm_redis_cmdv(rd, "XRANGE", key, "-", "+", NULL);
        ASSERT(rep && rep->type == REDIS_REPLY_ARRAY);
        matched = 0;
        long long last_id = 0;
        for (size_t i = 0; i < rep->elements && matched < 4; i++) {
            redisReply *f = rep->element[i]->element[1];
            const char *type = NULL, *dev = NULL;
            long long eid = 0;
            for (size_t k = 0; k + 1 < f->elements; k += 2) {
                if (!strcmp(f->element[k]->str, "type")) type = f->element[k + 1]->str;
                if (!strcmp(f->element[k]->str, "device_id")) dev = f->element[k + 1]->str;
                if (!strcmp(f->element[k]->str, "event_id")) eid = atoll(f->element[k + 1]->str);
            }
            ASSERT(type && dev && eid > last_id);
            last_id = eid;
            if (!strcmp(type, want[matched][0]) && !strcmp(dev, want[matched][1])) matched++;
        }
        freeReplyObject(rep);
        if (matched < 4) usleep(100000);
    }
    ASSERT_INT_EQ(matched, 4);
    cm_redis_free(rd);
    dm_stop(&d);
}

/* ---- regressions: races made deterministic with the test's own Postgres connection ---- */

/* Runs sql on the test's own connection; fails the test unless it succeeded. Caller PQclears. */
static PGresult *pg(PGconn *c, const char *sql, int n, const char *const *p) {
    PGresult *r = PQexecParams(c, sql, n, NULL, p, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", PQresultErrorMessage(r));
        PQclear(r);
        TEST__FAIL("%s: %s", sql, msg);
    }
    return r;
}

static void pg_run(PGconn *c, const char *sql, int n, const char *const *p) { PQclear(pg(c, sql, n, p)); }

/* The first column of the first row as an integer. */
static long long pg_int(PGconn *c, const char *sql, int n, const char *const *p) {
    PGresult *r = pg(c, sql, n, p);
    long long v = PQntuples(r) ? atoll(PQgetvalue(r, 0, 0)) : -1;
    PQclear(r);
    return v;
}

/* A connection of the test's own to the service's schema (after dm_start: the service makes it). */
static PGconn *pg_open(void) {
    PGconn *c = PQconnectdb(test_env("IOT_TEST_PG"));
    if (PQstatus(c) != CONNECTION_OK) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s", PQerrorMessage(c));
        PQfinish(c);
        TEST__FAIL("postgres: %s", msg);
    }
    const char *p[] = {strchr(schema_env, '=') + 1};
    pg_run(c, "SELECT set_config('search_path', $1, false)", 1, p);
    return c;
}

static void redis_ok(cm_redis_t *rd, const char *a, const char *b, const char *c, const char *d) {
    redisReply *rep = cm_redis_cmdv(rd, a, b, c, d, NULL);
    ASSERT(rep && rep->type != REDIS_REPLY_ERROR);
    freeReplyObject(rep);
}

/* 1 when the device event stream holds an entry with this event_id. */
static int stream_has_event(cm_redis_t *rd, const char *event_id) {
    char key[96];
    snprintf(key, sizeof key, "%sevents", prefix);
    redisReply *rep = cm_redis_cmdv(rd, "XRANGE", key, "-", "+", NULL);
    ASSERT(rep && rep->type == REDIS_REPLY_ARRAY);
    int found = 0;
    for (size_t i = 0; i < rep->elements && !found; i++) {
        redisReply *f = rep->element[i]->element[1];
        for (size_t k = 0; k + 1 < f->elements; k += 2)
            if (!strcmp(f->element[k]->str, "event_id") && !strcmp(f->element[k + 1]->str, event_id)) found = 1;
    }
    freeReplyObject(rep);
    return found;
}

/* An outbox row that takes its id, then commits only after the relay has read (and is publishing)
 * a higher one: the relay must publish it later, not delete it with the ones it published. */
static void test_relay_keeps_late_committed_events(void) {
    fresh_names("relay");
    dm_proc_t d;
    dm_start(&d, NULL);
    PGconn *late = pg_open(), *other = pg_open();
    cm_redis_t *rd = cm_redis_new(test_env("IOT_TEST_REDIS"), 5000, NULL);
    pg_run(late, "BEGIN", 0, NULL);
    char late_id[24], early_id[24];
    snprintf(late_id, sizeof late_id, "%lld",
             pg_int(late, "INSERT INTO events (type, device_id, status, version) VALUES ('updated', 'late', 1, 1) RETURNING id",
                    0, NULL));
    /* Writes wait in Redis, so the relay stops between reading the outbox and deleting from it. */
    redis_ok(rd, "CLIENT", "PAUSE", "3000", "WRITE");
    snprintf(early_id, sizeof early_id, "%lld",
             pg_int(other, "INSERT INTO events (type, device_id, status, version) VALUES ('updated', 'early', 1, 2) RETURNING id",
                    0, NULL));
    ASSERT(atoll(early_id) > atoll(late_id));
    /* The relay has read the outbox and waits on XADD: idle in its transaction after the SELECT,
     * for longer than a pass that found nothing would be. */
    int reading = 0;
    for (int i = 0; i < 200 && !reading; i++) {
        reading = pg_int(other,
                         "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
                         "AND query LIKE 'SELECT id, type, device_id%FROM events%' "
                         "AND state_change < clock_timestamp() - interval '200 milliseconds'",
                         0, NULL) > 0;
        if (!reading) usleep(20000);
    }
    ASSERT(reading);
    pg_run(late, "COMMIT", 0, NULL);
    redis_ok(rd, "CLIENT", "UNPAUSE", NULL, NULL);
    int published = 0;
    for (int i = 0; i < 100 && !published; i++) {
        published = stream_has_event(rd, early_id) && stream_has_event(rd, late_id);
        if (!published) usleep(50000);
    }
    ASSERT(published);
    long long left = -1;
    for (int i = 0; i < 100 && left != 0; i++) {
        left = pg_int(other, "SELECT count(*) FROM events", 0, NULL);
        if (left) usleep(50000);
    }
    ASSERT_INT_EQ(left, 0);
    cm_redis_free(rd);
    PQfinish(late);
    PQfinish(other);
    dm_stop(&d);
}

/* A command whose id is below one already delivered on the stream, committed after it. */
static void test_watch_delivers_late_committed_command(void) {
    fresh_names("cmdlate");
    dm_proc_t d;
    dm_start(&d, NULL);
    pbfree(create(&d, "valve-7", "valve", NULL));
    Iot__Device__V1__IssueTokenResponse *t = issue(&d, "valve-7");
    PGconn *late = pg_open();
    pg_run(late, "BEGIN", 0, NULL);
    char late_id[24];
    snprintf(late_id, sizeof late_id, "%lld",
             pg_int(late,
                    "INSERT INTO commands (device_id, name, expires_at) VALUES ('valve-7', 'late', now() + interval '1 hour') "
                    "RETURNING id",
                    0, NULL));
    cm_stream_t *s = watch(&d, t->token);
    Iot__Device__V1__Command *b = send_cmd(&d, "early", 60), *got = NULL;
    ASSERT(atoll(b->id) > atoll(late_id));
    ASSERT_INT_EQ(cm_stream_recv(s, &iot__device__v1__command__descriptor, (ProtobufCMessage **)&got), 1);
    ASSERT_STR_EQ(got->id, b->id);
    pbfree(got);
    pg_run(late, "COMMIT", 0, NULL);
    /* The next notification's pass finds it (it is open and was not sent on this stream), and
     * does not send b again. */
    Iot__Device__V1__Command *c = send_cmd(&d, "after", 60);
    ASSERT_INT_EQ(cm_stream_recv(s, &iot__device__v1__command__descriptor, (ProtobufCMessage **)&got), 1);
    ASSERT_STR_EQ(got->id, late_id);
    ASSERT_STR_EQ(got->name, "late");
    ASSERT_INT_EQ(got->status, IOT__DEVICE__V1__COMMAND_STATUS__COMMAND_STATUS_DELIVERED);
    pbfree(got);
    ASSERT_INT_EQ(cm_stream_recv(s, &iot__device__v1__command__descriptor, (ProtobufCMessage **)&got), 1);
    ASSERT_STR_EQ(got->id, c->id);
    pbfree(got);
    /* Marked delivered in storage too (just after it was sent, so perhaps a moment later). */
    const char *p[] = {late_id};
    long long st = 0;
    for (int i = 0; i < 100 && st != 2; i++) {
        st = pg_int(late, "SELECT status FROM commands WHERE id = $1::int8", 1, p);
        if (st != 2) usleep(20000);
    }
    ASSERT_INT_EQ(st, 2);
    cm_stream_cancel(s);
    cm_stream_finish(s, NULL);
    pbfree(b);
    pbfree(c);
    pbfree(t);
    PQfinish(late);
    dm_stop(&d);
}

/* A backlog far larger than the per-call send queue (1024) is delivered, in order, as the device
 * reads; a device that stops reading is still cut off. */
static void test_watch_backlog_over_send_queue(void) {
    fresh_names("backlog");
    dm_proc_t d;
    dm_start(&d, "IOT_DM_COMMAND_POLL=1s");
    pbfree(create(&d, "valve-7", "valve", NULL));
    Iot__Device__V1__IssueTokenResponse *t = issue(&d, "valve-7");
    PGconn *c = pg_open();
    enum { N = 3000 };
    char n[16];
    snprintf(n, sizeof n, "%d", N);
    const char *p[] = {n};
    pg_run(c,
           "INSERT INTO commands (device_id, name, payload, expires_at) "
           "SELECT 'valve-7', 'c' || g, jsonb_build_object('blob', repeat('x', 4000)), now() + interval '1 hour' "
           "FROM generate_series(1, $1::int) g",
           1, p);
    cm_stream_t *s = watch(&d, t->token);
    usleep(500000); /* not reading yet: the transport window and the send queue fill up */
    long long last = 0;
    int got_n = 0;
    for (; got_n < N; got_n++) {
        Iot__Device__V1__Command *got = NULL;
        int rc = cm_stream_recv(s, &iot__device__v1__command__descriptor, (ProtobufCMessage **)&got);
        if (rc != 1) break;
        ASSERT(atoll(got->id) > last); /* oldest first, none twice */
        last = atoll(got->id);
        pbfree(got);
    }
    ASSERT_INT_EQ(got_n, N);
    cm_stream_cancel(s);
    cm_stream_finish(s, NULL);

    /* All of them are delivered and unacknowledged now: a new watch gets them again. One that
     * never reads is ended once its queue has stayed full, taking nothing, for a poll interval. */
    s = watch(&d, t->token);
    sleep(4);
    cm_rpc_status_t st = {0};
    ASSERT_INT_EQ(cm_stream_finish(s, &st), CM_STATUS_RESOURCE_EXHAUSTED);
    cm_rpc_status_clear(&st);
    pbfree(t);
    PQfinish(c);
    dm_stop(&d);
}

typedef struct sign_arg_s {
    dm_proc_t *d;
    const char *device_id;
    const char *csr;
    int code;
    atomic_int done;
} sign_arg_t;

static void *sign_thread(void *p) {
    sign_arg_t *a = p;
    Iot__Device__V1__SignCertificateResponse *r = NULL;
    a->code = sign(a->d, a->device_id, a->csr, &r);
    pbfree(r);
    atomic_store(&a->done, 1);
    return NULL;
}

/* SignCertificate racing with a decommissioning or a deletion that has locked the device row and
 * not yet committed: it must wait for it and then refuse, not issue a certificate for a device
 * that is gone by the time the certificate exists. */
static void test_sign_certificate_waits_for_device_change(void) {
    fresh_names("signrace");
    dm_proc_t d;
    dm_start(&d, NULL);
    EVP_PKEY *key;
    char *csr = make_csr(&key);
    PGconn *hold = pg_open(), *look = pg_open();
    static const struct {
        const char *id, *sql;
        int want;
    } cases[] = {
        {"gw-decom", "UPDATE devices SET status = 6, version = nextval('version_seq') WHERE id = $1",
         CM_STATUS_FAILED_PRECONDITION},
        {"gw-gone", "DELETE FROM devices WHERE id = $1", CM_STATUS_NOT_FOUND},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        pbfree(create(&d, cases[k].id, "gateway", NULL));
        const char *p[] = {cases[k].id};
        /* What UpdateDevice and DeleteDevice do: lock the row, change it, commit later. */
        pg_run(hold, "BEGIN", 0, NULL);
        pg_run(hold, "SELECT 1 FROM devices WHERE id = $1 FOR UPDATE", 1, p);
        pg_run(hold, cases[k].sql, 1, p);
        sign_arg_t a = {.d = &d, .device_id = cases[k].id, .csr = csr};
        atomic_init(&a.done, 0);
        pthread_t th;
        pthread_create(&th, NULL, sign_thread, &a);
        /* Commit once the signer is waiting for the row (or, wrongly, has already answered). */
        int waiting = 0;
        for (int i = 0; i < 250 && !waiting && !atomic_load(&a.done); i++) {
            waiting = pg_int(look,
                             "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                             "AND query LIKE '%FROM devices WHERE id = $1 FOR SHARE%'",
                             0, NULL) > 0;
            if (!waiting) usleep(20000);
        }
        pg_run(hold, "COMMIT", 0, NULL);
        pthread_join(th, NULL);
        ASSERT_INT_EQ(a.code, cases[k].want);
        ASSERT_INT_EQ(pg_int(look, "SELECT count(*) FROM certificates WHERE device_id = $1", 1, p), 0);
    }
    /* The plain rule, without a race: a decommissioned device gets no certificate. */
    pbfree(create(&d, "gw-old", "gateway", NULL));
    decommission(&d, "gw-old");
    sign_arg_t a = {.d = &d, .device_id = "gw-old", .csr = csr};
    sign_thread(&a);
    ASSERT_INT_EQ(a.code, CM_STATUS_FAILED_PRECONDITION);
    ASSERT(strstr(last_msg, "decommissioned"));
    EVP_PKEY_free(key);
    free(csr);
    PQfinish(hold);
    PQfinish(look);
    dm_stop(&d);
}

/* The window this guards (after IssueToken/RotateToken commit, before their cache write, a
 * DeleteDevice tombstones the new token) cannot be held open from outside the process, so the
 * rule is checked instead: the write-through of a new token is SET ... NX, which never replaces
 * a tombstone, while revoking the old one on rotation overwrites. Redis MONITOR shows both. */
static int monitor_find_set(cm_redis_t *mon, const char *token, char *line, size_t cap) {
    unsigned char md[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)token, strlen(token), md);
    char want[200];
    int o = snprintf(want, sizeof want, "\"SET\" \"%st:", prefix);
    for (size_t i = 0; i < sizeof md; i++) o += snprintf(want + o, sizeof want - (size_t)o, "%02x", md[i]);
    for (int i = 0; i < 1000; i++) {
        redisReply *rep = NULL;
        if (cm_redis_get_reply(mon, &rep) != 0) return 0;
        int hit = rep->type == REDIS_REPLY_STATUS && strstr(rep->str, want);
        if (hit) snprintf(line, cap, "%s", rep->str);
        freeReplyObject(rep);
        if (hit) return 1;
    }
    return 0;
}

static void test_token_write_through_keeps_tombstone(void) {
    fresh_names("tokcache");
    dm_proc_t d;
    dm_start(&d, NULL);
    pbfree(create(&d, "cam-2", "camera", NULL));
    cm_redis_t *mon = cm_redis_new(test_env("IOT_TEST_REDIS"), 5000, NULL);
    redis_ok(mon, "MONITOR", NULL, NULL, NULL);
    Iot__Device__V1__IssueTokenResponse *t = issue(&d, "cam-2");
    char line[1024];
    ASSERT(monitor_find_set(mon, t->token, line, sizeof line));
    ASSERT(strstr(line, "\"NX\""));
    Iot__Device__V1__RotateTokenRequest rr = IOT__DEVICE__V1__ROTATE_TOKEN_REQUEST__INIT;
    rr.token_id = t->token_id;
    Iot__Device__V1__IssueTokenResponse *t2 = NULL;
    ASSERT_INT_EQ(call(&d, "RotateToken", &rr, &iot__device__v1__issue_token_response__descriptor, &t2), CM_STATUS_OK);
    ASSERT(monitor_find_set(mon, t2->token, line, sizeof line));
    ASSERT(strstr(line, "\"NX\""));
    ASSERT(monitor_find_set(mon, t->token, line, sizeof line)); /* the old one's tombstone */
    ASSERT(strstr(line, "\"-\"") && !strstr(line, "\"NX\""));
    cm_redis_free(mon);
    /* And the outcome the rule protects: the new token works, then dies with its device. */
    ASSERT_INT_EQ(authenticate(&d, t2->token, NULL), CM_STATUS_OK);
    Iot__Device__V1__DeleteDeviceRequest dreq = IOT__DEVICE__V1__DELETE_DEVICE_REQUEST__INIT;
    dreq.id = (char *)"cam-2";
    ProtobufCMessage *ignored = NULL;
    ASSERT_INT_EQ(call(&d, "DeleteDevice", &dreq, &iot__device__v1__delete_device_response__descriptor, &ignored), CM_STATUS_OK);
    pbfree(ignored);
    pbfree(create(&d, "cam-2", "camera", NULL));
    ASSERT_INT_EQ(authenticate(&d, t2->token, NULL), CM_STATUS_UNAUTHENTICATED);
    pbfree(t);
    pbfree(t2);
    dm_stop(&d);
}

static void test_revoke_reason_remove_from_crl_refused(void) {
    fresh_names("crlreason");
    dm_proc_t d;
    dm_start(&d, NULL);
    pbfree(create(&d, "gw-5", "gateway", NULL));
    EVP_PKEY *key;
    char *csr = make_csr(&key);
    Iot__Device__V1__SignCertificateResponse *r = NULL;
    ASSERT_INT_EQ(sign(&d, "gw-5", csr, &r), CM_STATUS_OK);
    Iot__Device__V1__RevokeCertificateRequest rv = IOT__DEVICE__V1__REVOKE_CERTIFICATE_REQUEST__INIT;
    rv.serial = r->certificate->serial;
    ProtobufCMessage *ignored = NULL;
    static const int refused[] = {8, 7, 11, -1};
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        rv.reason = refused[i];
        ASSERT_INT_EQ(call(&d, "RevokeCertificate", &rv, &iot__device__v1__revoke_certificate_response__descriptor, &ignored),
                      CM_STATUS_INVALID_ARGUMENT);
        ASSERT(strstr(last_msg, "reason") && strstr(last_msg, "cessationOfOperation"));
    }
    rv.reason = 9; /* privilegeWithdrawn: valid in a full CRL */
    ASSERT_INT_EQ(call(&d, "RevokeCertificate", &rv, &iot__device__v1__revoke_certificate_response__descriptor, &ignored),
                  CM_STATUS_OK);
    pbfree(ignored);
    Iot__Device__V1__GetRevocationListRequest lr = IOT__DEVICE__V1__GET_REVOCATION_LIST_REQUEST__INIT;
    Iot__Device__V1__GetRevocationListResponse *crl = NULL;
    ASSERT_INT_EQ(call(&d, "GetRevocationList", &lr, &iot__device__v1__get_revocation_list_response__descriptor, &crl),
                  CM_STATUS_OK);
    ASSERT_INT_EQ(crl->n_revoked_serials, 1);
    pbfree(crl);
    pbfree(r);
    EVP_PKEY_free(key);
    free(csr);
    dm_stop(&d);
}

static char *hex_token(const char *raw, size_t n) {
    char *out = malloc(2 * n + 1);
    for (size_t i = 0; i < n; i++) snprintf(out + 2 * i, 3, "%02x", (unsigned char)raw[i]);
    return out;
}

static void test_forged_page_token_invalid_argument(void) {
    fresh_names("forged");
    dm_proc_t d;
    dm_start(&d, NULL);
    pbfree(create(&d, "m-1", "meter", NULL));
    /* The right shape for "no filter" (hash 00000000), with a last id that is not an id: invalid
     * UTF-8, and text that is valid UTF-8 but no id either. */
    static const char forged1[] = "00000000:m-\xc3\x28", forged2[] = "00000000:m 1'";
    const char *forged[] = {forged1, forged2};
    size_t lens[] = {sizeof forged1 - 1, sizeof forged2 - 1};
    for (int i = 0; i < 2; i++) {
        char *tok = hex_token(forged[i], lens[i]);
        Iot__Device__V1__ListDevicesRequest req = IOT__DEVICE__V1__LIST_DEVICES_REQUEST__INIT;
        req.page_token = tok;
        Iot__Device__V1__ListDevicesResponse *r = NULL;
        int code = call(&d, "ListDevices", &req, &iot__device__v1__list_devices_response__descriptor, &r);
        pbfree(r);
        Iot__Device__V1__ListGroupsRequest greq = IOT__DEVICE__V1__LIST_GROUPS_REQUEST__INIT;
        greq.page_token = tok;
        Iot__Device__V1__ListGroupsResponse *gr = NULL;
        int gcode = call(&d, "ListGroups", &greq, &iot__device__v1__list_groups_response__descriptor, &gr);
        pbfree(gr);
        free(tok);
        ASSERT_INT_EQ(code, CM_STATUS_INVALID_ARGUMENT);
        ASSERT_INT_EQ(gcode, CM_STATUS_INVALID_ARGUMENT);
        ASSERT(strstr(last_msg, "page_token"));
    }
    /* A token the service issued still pages. */
    Iot__Device__V1__DeviceFilter all = IOT__DEVICE__V1__DEVICE_FILTER__INIT;
    pbfree(create(&d, "m-2", "meter", NULL));
    size_t n;
    char **ids = list_all(&d, &all, 1, &n, NULL);
    ASSERT_INT_EQ(n, 2);
    free_ids(ids, n);
    dm_stop(&d);
}

static void test_update_group_cannot_drop_filter(void) {
    fresh_names("grpfilter");
    dm_proc_t d;
    dm_start(&d, NULL);
    pbfree(create(&d, "m-1", "meter", NULL));
    pbfree(create(&d, "v-1", "valve", NULL));
    Iot__Device__V1__DeviceFilter f = IOT__DEVICE__V1__DEVICE_FILTER__INIT;
    f.type = (char *)"meter";
    Iot__Device__V1__Group grp = IOT__DEVICE__V1__GROUP__INIT;
    grp.id = (char *)"meters";
    grp.kind = IOT__DEVICE__V1__GROUP_KIND__GROUP_KIND_DYNAMIC;
    grp.filter = &f;
    Iot__Device__V1__CreateGroupRequest greq = IOT__DEVICE__V1__CREATE_GROUP_REQUEST__INIT;
    greq.group = &grp;
    Iot__Device__V1__Group *gout = NULL;
    ASSERT_INT_EQ(call(&d, "CreateGroup", &greq, &iot__device__v1__group__descriptor, &gout), CM_STATUS_OK);
    pbfree(gout);
    Iot__Device__V1__Group upd = IOT__DEVICE__V1__GROUP__INIT;
    upd.id = (char *)"meters";
    char *paths[] = {(char *)"filter"};
    Google__Protobuf__FieldMask mask = GOOGLE__PROTOBUF__FIELD_MASK__INIT;
    mask.paths = paths;
    mask.n_paths = 1;
    Iot__Device__V1__UpdateGroupRequest ureq = IOT__DEVICE__V1__UPDATE_GROUP_REQUEST__INIT;
    ureq.group = &upd;
    ureq.update_mask = &mask;
    ASSERT_INT_EQ(call(&d, "UpdateGroup", &ureq, &iot__device__v1__group__descriptor, &gout), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "group.filter"));
    /* Still the meters only. */
    Iot__Device__V1__DeviceFilter byg = IOT__DEVICE__V1__DEVICE_FILTER__INIT;
    byg.group_id = (char *)"meters";
    size_t n;
    char **ids = list_all(&d, &byg, 10, &n, NULL);
    ASSERT_INT_EQ(n, 1);
    ASSERT_STR_EQ(ids[0], "m-1");
    free_ids(ids, n);
    /* Replacing the filter with another one is fine. */
    Iot__Device__V1__DeviceFilter f2 = IOT__DEVICE__V1__DEVICE_FILTER__INIT;
    f2.type = (char *)"valve";
    upd.filter = &f2;
    ASSERT_INT_EQ(call(&d, "UpdateGroup", &ureq, &iot__device__v1__group__descriptor, &gout), CM_STATUS_OK);
    pbfree(gout);
    ids = list_all(&d, &byg, 10, &n, NULL);
    ASSERT_INT_EQ(n, 1);
    ASSERT_STR_EQ(ids[0], "v-1");
    free_ids(ids, n);
    dm_stop(&d);
}

typedef struct reqid_arg_s {
    dm_proc_t *d;
    int code;
    char id[32];
} reqid_arg_t;

/* One of several identical SendCommands racing each other. */
static void *reqid_sender(void *arg) {
    reqid_arg_t *a = arg;
    Iot__Device__V1__SendCommandRequest req = IOT__DEVICE__V1__SEND_COMMAND_REQUEST__INIT;
    req.device_id = (char *)"valve-7";
    req.name = (char *)"shutdown";
    req.request_id = (char *)"race-1";
    Iot__Device__V1__Command *c = NULL;
    cm_call_opts_t o = {.timeout_ms = 30000};
    a->code = cm_channel_unary(a->d->ch, "/iot.device.v1.DeviceManager/SendCommand", &req.base,
                               &iot__device__v1__command__descriptor, (ProtobufCMessage **)&c, &o, NULL);
    if (c) snprintf(a->id, sizeof a->id, "%s", c->id);
    pbfree(c);
    return NULL;
}

static void test_send_command_request_id_queues_once(void) {
    fresh_names("reqid");
    dm_proc_t d;
    dm_start(&d, NULL);
    pbfree(create(&d, "valve-7", "valve", NULL));
    Iot__Device__V1__SendCommandRequest req = IOT__DEVICE__V1__SEND_COMMAND_REQUEST__INIT;
    req.device_id = (char *)"valve-7";
    req.name = (char *)"shutdown";
    req.request_id = (char *)"alert-42";
    Iot__Device__V1__Command *a = NULL, *b = NULL, *c = NULL;
    ASSERT_INT_EQ(call(&d, "SendCommand", &req, &iot__device__v1__command__descriptor, &a), 0);
    req.name = (char *)"throttle"; /* other fields do not matter for a repeat */
    ASSERT_INT_EQ(call(&d, "SendCommand", &req, &iot__device__v1__command__descriptor, &b), 0);
    ASSERT_STR_EQ(a->id, b->id);
    ASSERT_STR_EQ(b->name, "shutdown");
    req.request_id = (char *)"alert-43";
    ASSERT_INT_EQ(call(&d, "SendCommand", &req, &iot__device__v1__command__descriptor, &c), 0);
    ASSERT(strcmp(a->id, c->id) != 0);
    Iot__Device__V1__ListCommandsRequest lr = IOT__DEVICE__V1__LIST_COMMANDS_REQUEST__INIT;
    lr.device_id = (char *)"valve-7";
    Iot__Device__V1__ListCommandsResponse *l = NULL;
    ASSERT_INT_EQ(call(&d, "ListCommands", &lr, &iot__device__v1__list_commands_response__descriptor, &l), 0);
    ASSERT_INT_EQ(l->n_commands, 2);
    pbfree(l);
    l = NULL;
    /* Concurrent identical requests (a sender retrying while its first call is still in flight)
     * all get the one command the winner queued. */
    reqid_arg_t ra[8];
    pthread_t th[8];
    for (int i = 0; i < 8; i++) {
        memset(&ra[i], 0, sizeof ra[i]);
        ra[i].d = &d;
        pthread_create(&th[i], NULL, reqid_sender, &ra[i]);
    }
    for (int i = 0; i < 8; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 8; i++) {
        ASSERT_INT_EQ(ra[i].code, CM_STATUS_OK);
        ASSERT_STR_EQ(ra[i].id, ra[0].id);
    }
    ASSERT_INT_EQ(call(&d, "ListCommands", &lr, &iot__device__v1__list_commands_response__descriptor, &l), 0);
    ASSERT_INT_EQ(l->n_commands, 3);
    /* The same request_id on another device is another command. */
    pbfree(create(&d, "valve-8", "valve", NULL));
    req.device_id = (char *)"valve-8";
    req.request_id = (char *)"alert-42";
    Iot__Device__V1__Command *other = NULL;
    ASSERT_INT_EQ(call(&d, "SendCommand", &req, &iot__device__v1__command__descriptor, &other), 0);
    ASSERT(strcmp(other->id, a->id) != 0);
    pbfree(other);
    req.device_id = (char *)"valve-7";
    /* Too long, or not printable ASCII: INVALID_ARGUMENT naming the field. */
    req.request_id = (char *)"tab\there";
    ProtobufCMessage *bad = NULL;
    ASSERT_INT_EQ(call(&d, "SendCommand", &req, &iot__device__v1__command__descriptor, &bad), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "request_id"));
    char big[200];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = 0;
    req.request_id = big;
    ProtobufCMessage *none = NULL;
    ASSERT_INT_EQ(call(&d, "SendCommand", &req, &iot__device__v1__command__descriptor, &none), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "request_id"));
    pbfree(a);
    pbfree(b);
    pbfree(c);
    pbfree(l);
    dm_stop(&d);
}

static void test_help_and_bad_config(void) {
    char bin[1024];
    snprintf(bin, sizeof bin, "%s/services/device-mgmt/device-mgmt", test_env("IOT_BUILD_DIR"));
    test_proc_t p;
    char *argv[] = {bin, (char *)"--help", NULL};
    ASSERT_INT_EQ(test_proc_start(&p, argv, NULL, 0), 0);
    char line[512];
    int found = 0;
    while (test_proc_read_line(&p, line, sizeof line, 5000) == 0)
        if (strstr(line, "IOT_DM_OFFLINE_AFTER")) found = 1;
    ASSERT(found);
    ASSERT_INT_EQ(test_proc_wait(&p, 5000), 0);
    char *argv2[] = {bin, NULL};
    const char *env[] = {"IOT_DM_CA_CERT=/nonexistent", NULL};
    ASSERT_INT_EQ(test_proc_start(&p, argv2, env, 0), 0);
    ASSERT_INT_EQ(test_proc_wait(&p, 5000), 2);
}

TEST_MAIN(TEST_ENTRY(test_device_crud_and_validation), TEST_ENTRY(test_list_filters_and_paging),
          TEST_ENTRY(test_batch_10000_and_groups), TEST_ENTRY(test_tokens_issue_rotate_revoke),
          TEST_ENTRY(test_certificates_sign_and_revoke), TEST_ENTRY(test_shadow_delta_and_versions),
          TEST_ENTRY(test_commands_watch_ack_expire), TEST_ENTRY(test_presence_online_offline_and_events),
          TEST_ENTRY(test_relay_keeps_late_committed_events), TEST_ENTRY(test_watch_delivers_late_committed_command),
          TEST_ENTRY(test_watch_backlog_over_send_queue), TEST_ENTRY(test_sign_certificate_waits_for_device_change),
          TEST_ENTRY(test_token_write_through_keeps_tombstone), TEST_ENTRY(test_revoke_reason_remove_from_crl_refused),
          TEST_ENTRY(test_forged_page_token_invalid_argument), TEST_ENTRY(test_update_group_cannot_drop_filter),
          TEST_ENTRY(test_send_command_request_id_queues_once), TEST_ENTRY(test_help_and_bad_config))
