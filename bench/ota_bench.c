/* Benchmark driver for ota (bench/run.sh runs it; every figure is printed next to its reference).
 *
 *   ota_bench upload ADDR MB NAME VERSION
 *        uploads MB MiB of pseudo-random content (generated before the clock starts) as NAME VERSION
 *        over UploadArtifact: the header, then 1 MiB chunks; the clock runs from opening the stream
 *        to the stored Artifact's arrival (hashed, chunked into Postgres, committed and signed)
 *   ota_bench download ADDR TOKENS ID MB
 *        downloads artifact ID whole over one DownloadArtifact stream with the token of the first
 *        device in TOKENS ("id token" lines, as ingest_bench setup writes them); checks every
 *        message's offset and bytes against the content upload sends, and the total size
 *   ota_bench tcp up|down MB
 *        reference: the same MB MiB copied once over a loopback TCP connection to a thread of this
 *        process, 1 MiB per write and read. up: this side writes, the thread reads and drops; the
 *        clock stops when the thread has read everything. down: the thread writes, this side reads
 *        and checks the bytes as download does
 *   ota_bench echo ADDR MB
 *        our gRPC layer alone: the test Echo server's paced ServerStream sends MB MiB from memory
 *        in 256 KiB messages, paced like DownloadArtifact; the difference to download is Postgres
 *   ota_bench many ADDR TOKENS ID MB N PID
 *        N downloads of ID at once, a thread and a stream each over 4 channels; checks that every
 *        download received exactly MB MiB at the right offsets (and the first 64 bytes of each
 *        message); samples the VmRSS of process PID (ota) every 50 ms until the last one ends
 *
 * Output lines are "name key=value ..." for bench/run.sh to pick apart; MB/s are 10^6 bytes. */
#include <arpa/inet.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"
#include "cm_rpc.h"
#include "cm_time.h"
#include "iot/ota/v1/ota.pb-c.h"
#include "iot/testing/v1/echo.pb-c.h"

#define OTA "/iot.ota.v1.Ota/"
#define MIB (1024 * 1024)
#define SEED 0x07a5eedULL
#define CHANNELS 4

static double secs_since(int64_t t0) { return (double)(cm_mono_ns() - t0) / 1e9; }

static double mbps(int64_t bytes, double s) { return s > 0 ? (double)bytes / 1e6 / s : 0; }

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* The content: MB MiB of pseudo-random bytes (splitmix64 over 8-byte words), the same in every
 * subcommand, so that downloads can be checked against it. */
static uint8_t *content_new(int64_t size) {
    uint8_t *buf = malloc((size_t)size);
    if (!buf) return NULL;
    for (int64_t i = 0; i < size; i += 8) {
        uint64_t x = (uint64_t)(i / 8) * 0x9E3779B97F4A7C15ULL + SEED;
        x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
        x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
        x ^= x >> 31;
        memcpy(buf + i, &x, size - i < 8 ? (size_t)(size - i) : 8);
    }
    return buf;
}

/* "Bearer <token>" of the first device in a TOKENS file; 0 on success. */
static int read_auth(const char *file, char *auth, size_t len) {
    FILE *f = fopen(file, "r");
    char id[64], tok[160];
    int ok = f && fscanf(f, "%63s %159s", id, tok) == 2;
    if (f) fclose(f);
    if (!ok) {
        fprintf(stderr, "no token in %s\n", file);
        return 1;
    }
    snprintf(auth, len, "Bearer %s", tok);
    return 0;
}

/* ---- upload ----------------------------------------------------------------------------------- */

static int cmd_upload(const char *addr, long mb, const char *name, const char *version) {
    int64_t size = (int64_t)mb * MIB;
    uint8_t *buf = content_new(size);
    cm_channel_t *ch = cm_channel_new(addr, NULL, NULL);
    if (!buf || !ch || cm_channel_wait_ready(ch, 10000)) {
        fprintf(stderr, "upload: cannot reach %s\n", addr);
        free(buf);
        cm_channel_free(ch);
        return 1;
    }
    Iot__Ota__V1__ArtifactHeader h = IOT__OTA__V1__ARTIFACT_HEADER__INIT;
    char *models[] = {(char *)"bench-model"};
    h.name = (char *)name;
    h.version = (char *)version;
    h.n_models = 1;
    h.models = models;
    h.size = size;
    Iot__Ota__V1__UploadArtifactRequest m = IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__INIT;
    m.part_case = IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__PART_HEADER;
    m.header = &h;
    cm_call_opts_t o = {.timeout_ms = 600000};
    int64_t t0 = cm_mono_ns();
    cm_stream_t *s = cm_stream_open(ch, OTA "UploadArtifact", &o);
    int sent = s && cm_stream_send(s, &m.base) == 0;
    for (int64_t off = 0; sent && off < size; off += MIB) {
        m.part_case = IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__PART_CHUNK;
        m.chunk.data = buf + off;
        m.chunk.len = size - off < MIB ? (size_t)(size - off) : MIB;
        sent = cm_stream_send(s, &m.base) == 0; /* otherwise the server ended the call: read why */
    }
    Iot__Ota__V1__Artifact *a = NULL;
    cm_rpc_status_t st = {0};
    int code = CM_STATUS_UNKNOWN;
    if (s) {
        cm_stream_close_send(s);
        if (cm_stream_recv(s, &iot__ota__v1__artifact__descriptor, (ProtobufCMessage **)&a) != 1) a = NULL;
        code = cm_stream_finish(s, &st);
    }
    double secs = secs_since(t0);
    int rc = 0;
    if (code || !a || a->size != size) {
        fprintf(stderr, "upload %s %s: %s %s\n", name, version, cm_status_name(code), st.message);
        rc = 1;
    } else {
        printf("upload version=%s id=%s bytes=%" PRId64 " seconds=%.3f mbps=%.1f\n", version, a->id, size, secs,
               mbps(size, secs));
    }
    if (a) protobuf_c_message_free_unpacked(&a->base, NULL);
    cm_rpc_status_clear(&st);
    cm_channel_free(ch);
    free(buf);
    return rc;
}

/* ---- downloads -------------------------------------------------------------------------------- */

typedef struct dl_s {
    pthread_t th;
    cm_channel_t *ch;
    const char *auth, *id;
    const uint8_t *want; /* the content */
    int64_t size;        /* its length */
    int full_check;      /* compare every byte (else the first 64 of each message) */
    int64_t bytes;
    int code, bad;
    char msg[512];
} dl_t;

/* Reads one whole download, checking offsets and bytes; the result in d. */
static void *dl_main(void *arg) {
    dl_t *d = arg;
    cm_md_t md = {"authorization", d->auth, 0};
    cm_call_opts_t o = {.timeout_ms = 600000, .md = &md, .n_md = 1};
    cm_stream_t *s = cm_stream_open(d->ch, OTA "DownloadArtifact", &o);
    if (!s) {
        d->code = CM_STATUS_INVALID_ARGUMENT;
        return NULL;
    }
    Iot__Ota__V1__DownloadArtifactRequest req = IOT__OTA__V1__DOWNLOAD_ARTIFACT_REQUEST__INIT;
    req.artifact_id = (char *)d->id;
    cm_stream_send(s, &req.base);
    cm_stream_close_send(s);
    /* As a bulk client would: each message decoded in place (cm_stream_recv_view), no allocation. */
    cm_arena_t arena;
    cm_arena_init(&arena, NULL, 0);
    Iot__Ota__V1__DownloadArtifactResponse *m = NULL;
    while (cm_stream_recv_view(s, &iot__ota__v1__download_artifact_response__descriptor, &arena, (ProtobufCMessage **)&m) ==
           1) {
        int64_t n = (int64_t)m->data.len;
        if (m->offset != d->bytes || d->bytes + n > d->size)
            d->bad++;
        else if (n && memcmp(m->data.data, d->want + d->bytes, (size_t)(d->full_check || n < 64 ? n : 64)) != 0)
            d->bad++;
        d->bytes += n;
        cm_arena_reset(&arena);
    }
    cm_arena_free(&arena);
    cm_rpc_status_t st = {0};
    d->code = cm_stream_finish(s, &st);
    snprintf(d->msg, sizeof d->msg, "%s", st.message);
    cm_rpc_status_clear(&st);
    return NULL;
}

static int dl_ok(const dl_t *d) { return d->code == 0 && d->bad == 0 && d->bytes == d->size; }

static void dl_report(const dl_t *d) {
    fprintf(stderr, "download %s: %s %s (%" PRId64 " of %" PRId64 " bytes, %d bad messages)\n", d->id,
            cm_status_name(d->code), d->msg, d->bytes, d->size, d->bad);
}

static int cmd_download(const char *addr, const char *tokens, const char *id, long mb) {
    char auth[192];
    if (read_auth(tokens, auth, sizeof auth)) return 1;
    dl_t d = {.auth = auth, .id = id, .size = (int64_t)mb * MIB, .full_check = 1};
    uint8_t *want = content_new(d.size);
    d.want = want;
    d.ch = cm_channel_new(addr, NULL, NULL);
    if (!want || !d.ch || cm_channel_wait_ready(d.ch, 10000)) {
        fprintf(stderr, "download: cannot reach %s\n", addr);
        free(want);
        cm_channel_free(d.ch);
        return 1;
    }
    int64_t t0 = cm_mono_ns();
    dl_main(&d);
    double secs = secs_since(t0);
    int ok = dl_ok(&d);
    if (ok)
        printf("download id=%s bytes=%" PRId64 " seconds=%.3f mbps=%.1f\n", id, d.bytes, secs, mbps(d.bytes, secs));
    else
        dl_report(&d);
    cm_channel_free(d.ch);
    free(want);
    return !ok;
}

static int cmd_many(const char *addr, const char *tokens, const char *id, long mb, int n, long pid) {
    char auth[192];
    if (n <= 0 || read_auth(tokens, auth, sizeof auth)) return 1;
    int64_t size = (int64_t)mb * MIB;
    uint8_t *want = content_new(size);
    dl_t *d = calloc((size_t)n, sizeof *d);
    char *joined = calloc((size_t)n, 1);
    cm_channel_t *ch[CHANNELS] = {0};
    int started = 0, ok = 0, reported = 0;
    for (int i = 0; i < CHANNELS; i++) {
        cm_channel_opts_t co = {.own_connection = 1};
        ch[i] = cm_channel_new(addr, &co, NULL);
        if (!ch[i] || cm_channel_wait_ready(ch[i], 10000)) {
            fprintf(stderr, "many: cannot reach %s\n", addr);
            goto out;
        }
    }
    if (!want || !d || !joined) goto out;
    long before = bench_rss_kb(pid), peak = before;
    int64_t t0 = cm_mono_ns();
    for (; started < n; started++) {
        d[started] = (dl_t){.ch = ch[started % CHANNELS], .auth = auth, .id = id, .want = want, .size = size};
        if (pthread_create(&d[started].th, NULL, dl_main, &d[started])) {
            fprintf(stderr, "many: cannot start thread %d\n", started);
            break;
        }
    }
    /* Sample ota's RSS until every download has ended. */
    for (int left = started; left > 0;) {
        long kb = bench_rss_kb(pid);
        if (kb > peak) peak = kb;
        sleep_ms(50);
        for (int i = 0; i < started; i++)
            if (!joined[i] && pthread_tryjoin_np(d[i].th, NULL) == 0) {
                joined[i] = 1;
                left--;
            }
    }
    double secs = secs_since(t0);
    int64_t total = 0;
    for (int i = 0; i < started; i++) {
        total += d[i].bytes;
        if (dl_ok(&d[i]))
            ok++;
        else if (reported++ < 3)
            dl_report(&d[i]);
    }
    printf("many downloads=%d ok=%d bytes=%" PRId64 " seconds=%.3f mbps=%.1f rss_before_kb=%ld rss_peak_kb=%ld "
           "grew_kb=%ld per_download_kb=%.0f\n",
           n, ok, total, secs, mbps(total, secs), before, peak, peak - before, (double)(peak - before) / n);
out:
    for (int i = 0; i < CHANNELS; i++) cm_channel_free(ch[i]);
    free(joined);
    free(d);
    free(want);
    return ok == n ? 0 : 1;
}

/* ---- raw TCP (reference) ---------------------------------------------------------------------- */

typedef struct tcp_peer_s {
    pthread_t th;
    int lfd;
    const uint8_t *buf; /* down: what to write */
    int64_t size;
    int64_t moved; /* bytes read (up) or written (down) */
} tcp_peer_t;

static void *tcp_peer_main(void *arg) {
    tcp_peer_t *p = arg;
    int fd = accept(p->lfd, NULL, NULL);
    if (fd < 0) return NULL;
    if (p->buf) { /* down */
        while (p->moved < p->size) {
            size_t k = p->size - p->moved < MIB ? (size_t)(p->size - p->moved) : MIB;
            ssize_t w = write(fd, p->buf + p->moved, k);
            if (w <= 0) break;
            p->moved += w;
        }
    } else { /* up: read and drop */
        uint8_t *sink = malloc(MIB);
        ssize_t r;
        while (sink && (r = read(fd, sink, MIB)) > 0) p->moved += r;
        free(sink);
    }
    close(fd);
    return NULL;
}

static int cmd_tcp(const char *dir, long mb) {
    int up = strcmp(dir, "up") == 0;
    if (!up && strcmp(dir, "down") != 0) {
        fprintf(stderr, "tcp: up or down, not %s\n", dir);
        return 2;
    }
    int64_t size = (int64_t)mb * MIB;
    uint8_t *content = content_new(size), *rbuf = malloc(MIB);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof sa;
    tcp_peer_t p = {.lfd = socket(AF_INET, SOCK_STREAM, 0), .buf = up ? NULL : content, .size = size};
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (!content || !rbuf || p.lfd < 0 || fd < 0 || bind(p.lfd, (struct sockaddr *)&sa, sizeof sa) ||
        listen(p.lfd, 1) || getsockname(p.lfd, (struct sockaddr *)&sa, &sl)) {
        perror("tcp");
        if (fd >= 0) close(fd);
        if (p.lfd >= 0) close(p.lfd);
        free(rbuf);
        free(content);
        return 1;
    }
    pthread_create(&p.th, NULL, tcp_peer_main, &p);
    int64_t t0 = cm_mono_ns(), moved = 0;
    int bad = connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0;
    while (!bad && moved < size) {
        size_t k = size - moved < MIB ? (size_t)(size - moved) : MIB;
        ssize_t r = up ? write(fd, content + moved, k) : read(fd, rbuf, k);
        if (r <= 0) break;
        if (!up && memcmp(rbuf, content + moved, (size_t)r) != 0) bad = 1;
        moved += r;
    }
    if (up) shutdown(fd, SHUT_WR);
    pthread_join(p.th, NULL);
    double secs = secs_since(t0);
    close(fd);
    close(p.lfd);
    int ok = !bad && moved == size && p.moved == size;
    if (ok)
        printf("tcp dir=%s bytes=%" PRId64 " seconds=%.4f mbps=%.1f\n", dir, size, secs, mbps(size, secs));
    else
        fprintf(stderr, "tcp %s: moved %" PRId64 " and %" PRId64 " of %" PRId64 " bytes%s\n", dir, moved, p.moved, size,
                bad ? ", content differs or connect failed" : "");
    free(rbuf);
    free(content);
    return !ok;
}

/* Our gRPC layer alone, from memory: the test Echo server's paced ServerStream (the same
 * writable() pacing DownloadArtifact uses) sends mb MiB as 256 KiB messages; the bytes are checked
 * as they come, as download does. What DownloadArtifact adds on top of it is Postgres. */
static int cmd_echo(const char *addr, long mb) {
    enum { PIECE = 256 * 1024 };
    uint8_t *piece = content_new(PIECE);
    cm_channel_opts_t co = {.own_connection = 1};
    cm_channel_t *ch = cm_channel_new(addr, &co, NULL);
    if (!piece || !ch || cm_channel_wait_ready(ch, 10000)) {
        fprintf(stderr, "echo: cannot reach %s\n", addr);
        free(piece);
        cm_channel_free(ch);
        return 1;
    }
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.message = (char *)"ota-bench";
    req.paced = 1;
    req.repeat = (int32_t)(mb * MIB / PIECE);
    req.payload.data = piece;
    req.payload.len = PIECE;
    int64_t t0 = cm_mono_ns(), bytes = 0;
    int bad = 0;
    cm_call_opts_t o = {.timeout_ms = 300000};
    cm_stream_t *s = cm_stream_open(ch, "/iot.testing.v1.Echo/ServerStream", &o);
    cm_stream_send(s, &req.base);
    cm_stream_close_send(s);
    cm_arena_t arena; /* the download's client path: messages decoded in place */
    cm_arena_init(&arena, NULL, 0);
    Iot__Testing__V1__EchoResponse *m = NULL;
    while (cm_stream_recv_view(s, &iot__testing__v1__echo_response__descriptor, &arena, (ProtobufCMessage **)&m) == 1) {
        if (m->payload.len != PIECE || memcmp(m->payload.data, piece, PIECE) != 0) bad++;
        bytes += (int64_t)m->payload.len;
        cm_arena_reset(&arena);
    }
    cm_arena_free(&arena);
    int code = cm_stream_finish(s, NULL);
    double secs = secs_since(t0);
    cm_channel_free(ch);
    free(piece);
    if (code || bad || bytes != (int64_t)req.repeat * PIECE) {
        fprintf(stderr, "echo: %s, %d bad messages, %" PRId64 " bytes\n", cm_status_name(code), bad, bytes);
        return 1;
    }
    printf("echo bytes=%" PRId64 " seconds=%.3f mbps=%.1f\n", bytes, secs, mbps(bytes, secs));
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 6 && strcmp(argv[1], "upload") == 0) return cmd_upload(argv[2], atol(argv[3]), argv[4], argv[5]);
    if (argc >= 6 && strcmp(argv[1], "download") == 0) return cmd_download(argv[2], argv[3], argv[4], atol(argv[5]));
    if (argc >= 4 && strcmp(argv[1], "tcp") == 0) return cmd_tcp(argv[2], atol(argv[3]));
    if (argc >= 4 && strcmp(argv[1], "echo") == 0) return cmd_echo(argv[2], atol(argv[3]));
    if (argc >= 8 && strcmp(argv[1], "many") == 0)
        return cmd_many(argv[2], argv[3], argv[4], atol(argv[5]), atoi(argv[6]), atol(argv[7]));
    fprintf(stderr, "usage: see the header of bench/ota_bench.c\n");
    return 2;
}
