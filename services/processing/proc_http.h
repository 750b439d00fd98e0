/* A small blocking HTTP/1.1 client for processing's webhooks: one POST per call, one connection
 * per call (Connection: close), http:// and https:// (OpenSSL; the peer is verified against the
 * system CA store, or a given CA file, and against the URL's host name or IP address).
 *
 * One timeout bounds the whole call: name resolution, connect, TLS handshake, sending the
 * request, and reading the status line and headers. Sockets are non-blocking and every wait is
 * a poll() against that deadline. Once the status and headers are in, the body is read (by
 * Content-Length, chunked, or until the server closes) within what is left of the same deadline;
 * the first PROC_HTTP_BODY_MAX bytes are kept and the rest is not read. Redirects are not
 * followed (a 3xx is returned like any other status), and no proxy is used.
 *
 * Ownership: proc_http_post fills a caller-provided proc_http_resp_t; release it with
 * proc_http_resp_free on every path (it accepts a zeroed or already freed one). A proc_http_t is
 * thread safe: several threads may post through one at once. SIGPIPE: the call blocks it on the
 * calling thread for its duration and discards one it raised, so a peer that closes early never
 * kills the process. */
#ifndef PROC_HTTP_H
#define PROC_HTTP_H

#include <stddef.h>

/* Bytes of response body kept; longer bodies are cut here (truncated set). */
#define PROC_HTTP_BODY_MAX 65536
/* Status line plus headers, at most; more is a malformed response. */
#define PROC_HTTP_HEAD_MAX 32768

typedef struct proc_http_s proc_http_t;

/* ca_file: PEM file of the CAs to trust instead of the system store (NULL: the system store).
 * Returns NULL and *err (CM_ETLS) when the TLS context cannot be set up. */
proc_http_t *proc_http_new(const char *ca_file, int *err);
void proc_http_free(proc_http_t *h);

/* A URL split into its parts (see proc_http_url_parse). */
typedef struct proc_http_url_s {
    int tls;          /* https */
    char host[256];   /* name or address, without the brackets of an IPv6 literal */
    char port[6];     /* the URL's, or 80 / 443 */
    int default_port; /* the port was not given (or was the scheme's default) */
    int ip;           /* host is an IPv4 or IPv6 literal */
    int ipv6;
    const char *path; /* into the URL: path and query, without the fragment; "" means "/" */
    size_t path_len;
} proc_http_url_t;

/* Parses "http[s]://host[:port][/path][?query][#fragment]"; host is a DNS name, a dotted IPv4
 * address or a bracketed IPv6 literal. User info (user:pass@), spaces and control characters
 * are refused. Returns 0, or CM_EINVAL with the reason in err. out->path points into url. */
int proc_http_url_parse(const char *url, proc_http_url_t *out, char *err, size_t cap);

typedef struct proc_http_resp_s {
    int status;              /* the final status (1xx interim answers are skipped); 0 if none */
    char *body;              /* NUL-terminated, body_len bytes; NULL when there was none */
    size_t body_len;
    int truncated;           /* the body was longer than PROC_HTTP_BODY_MAX */
    int complete;            /* the whole body was read (or kept up to the cut) */
    char errstr[256];        /* why: set when proc_http_post returns < 0, or the body came short */
} proc_http_resp_t;

/* POSTs body (len bytes) to url with the given extra header lines ("Name: value", no CR/LF;
 * Host, Content-Length and Connection are added here) within timeout_ms.
 *
 * Returns the HTTP status (100..599), or a negative code with resp->errstr saying why:
 * CM_EINVAL (bad URL or header), CM_ENOTFOUND (host name not resolved), CM_EIO (connection
 * refused, reset or closed early), CM_ETIMEOUT, CM_ETLS (handshake or peer verification failed),
 * CM_EDECODE (not an HTTP/1.x response). A status is returned even when reading the body then
 * failed (complete is 0 and errstr says why): the server has answered. Reasons name the host and
 * port, never the path or query (webhook URLs often carry secrets there). */
int proc_http_post(proc_http_t *h, const char *url, const char *const *headers, size_t n_headers, const char *body,
                   size_t len, int timeout_ms, proc_http_resp_t *resp);
void proc_http_resp_free(proc_http_resp_t *resp);

#endif
