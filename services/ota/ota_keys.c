/* Ed25519 signing keys (see ota_keys.h). */
#include "ota_keys.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/sha.h>

#include "cm_alloc.h"
#include "cm_err.h"
#include "cm_log.h"

#define OTA__MAX_KEYS 64

typedef struct ota__key_s {
    char id[OTA_KEY_ID_LEN + 1];
    uint8_t pub[OTA_PUB_LEN];
    EVP_PKEY *pkey;
} ota__key_t;

struct ota_keys_s {
    ota__key_t keys[OTA__MAX_KEYS];
    int n;
    int active;
};

static int ota__key_fill(ota__key_t *k, EVP_PKEY *p) {
    size_t len = OTA_PUB_LEN;
    if (EVP_PKEY_get_raw_public_key(p, k->pub, &len) != 1 || len != OTA_PUB_LEN) return -1;
    uint8_t d[SHA256_DIGEST_LENGTH];
    SHA256(k->pub, OTA_PUB_LEN, d);
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < OTA_KEY_ID_LEN / 2; i++) {
        k->id[2 * i] = hex[d[i] >> 4];
        k->id[2 * i + 1] = hex[d[i] & 15];
    }
    k->id[OTA_KEY_ID_LEN] = 0;
    k->pkey = p;
    return 0;
}

/* A new key written as <dir>/<key id>.pem, readable by the owner only. */
static int ota__generate(const char *dir, char *err, size_t errlen) {
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        snprintf(err, errlen, "cannot create %s: %s", dir, strerror(errno));
        return -1;
    }
    EVP_PKEY *p = NULL;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_id(EVP_PKEY_ED25519, NULL);
    if (!ctx || EVP_PKEY_keygen_init(ctx) != 1 || EVP_PKEY_keygen(ctx, &p) != 1) {
        EVP_PKEY_CTX_free(ctx);
        snprintf(err, errlen, "Ed25519 key generation failed");
        return -1;
    }
    EVP_PKEY_CTX_free(ctx);
    ota__key_t k;
    ota__key_fill(&k, p);
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.pem", dir, k.id);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    int ok = f && PEM_write_PrivateKey(f, p, NULL, NULL, 0, NULL, NULL) == 1;
    if (f)
        ok = fclose(f) == 0 && ok;
    else if (fd >= 0)
        close(fd);
    EVP_PKEY_free(p);
    if (!ok) {
        snprintf(err, errlen, "cannot write %s: %s", path, strerror(errno));
        return -1;
    }
    cm_log_kv(CM_LOG_WARN, "generated a signing key (IOT_OTA_GENERATE_KEY); keep it, or devices cannot verify after a loss",
              "path", path, "key_id", k.id, NULL);
    return 0;
}

static int ota__load_dir(ota_keys_t *k, const char *dir, char *err, size_t errlen) {
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? 0 : (snprintf(err, errlen, "cannot read %s: %s", dir, strerror(errno)), -1);
    struct dirent *e;
    int rc = 0;
    while (!rc && (e = readdir(d))) {
        size_t n = strlen(e->d_name);
        if (n < 5 || strcmp(e->d_name + n - 4, ".pem") != 0) continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        FILE *f = fopen(path, "r");
        EVP_PKEY *p = f ? PEM_read_PrivateKey(f, NULL, NULL, NULL) : NULL;
        if (f) fclose(f);
        if (!p || EVP_PKEY_get_id(p) != EVP_PKEY_ED25519) {
            EVP_PKEY_free(p);
            snprintf(err, errlen, "%s: not an Ed25519 private key in PEM", path);
            rc = -1;
        } else if (k->n == OTA__MAX_KEYS) {
            EVP_PKEY_free(p);
            snprintf(err, errlen, "%s: more than %d keys", dir, OTA__MAX_KEYS);
            rc = -1;
        } else {
            ota__key_fill(&k->keys[k->n], p);
            int dup = 0;
            for (int i = 0; i < k->n; i++) dup |= strcmp(k->keys[i].id, k->keys[k->n].id) == 0;
            if (dup)
                EVP_PKEY_free(p); /* the same key under two names */
            else
                k->n++;
        }
    }
    closedir(d);
    return rc;
}

ota_keys_t *ota_keys_load(const ota_config_t *cfg, char *err, size_t errlen) {
    ota_keys_t *k = cm_calloc(1, sizeof *k);
    k->active = -1;
    int rc = ota__load_dir(k, cfg->keys_dir, err, errlen);
    if (!rc && k->n == 0) {
        if (!cfg->generate_key) {
            snprintf(err, errlen, "no *.pem key in %s (and IOT_OTA_GENERATE_KEY is off)", cfg->keys_dir);
            rc = -1;
        } else {
            rc = ota__generate(cfg->keys_dir, err, errlen);
            if (!rc) rc = ota__load_dir(k, cfg->keys_dir, err, errlen);
        }
    }
    for (int i = 0; !rc && i < k->n; i++)
        if (*cfg->signing_key ? strcmp(k->keys[i].id, cfg->signing_key) == 0 : k->n == 1) k->active = i;
    if (!rc && k->active < 0) {
        if (*cfg->signing_key)
            snprintf(err, errlen, "IOT_OTA_SIGNING_KEY=%s is none of the %d keys in %s", cfg->signing_key, k->n, cfg->keys_dir);
        else
            snprintf(err, errlen, "%s holds %d keys: set IOT_OTA_SIGNING_KEY to the id of the one that signs", cfg->keys_dir, k->n);
        rc = -1;
    }
    if (rc) {
        ota_keys_free(k);
        return NULL;
    }
    return k;
}

void ota_keys_free(ota_keys_t *k) {
    if (!k) return;
    for (int i = 0; i < k->n; i++) EVP_PKEY_free(k->keys[i].pkey);
    cm_free(k);
}

int ota_keys_register(ota_keys_t *k, cm_pg_t *pg) {
    cm_pg_conn_t *c = cm_pg_acquire(pg, 5000);
    if (!c) {
        cm_log_kv(CM_LOG_ERROR, "cannot record signing keys: no Postgres connection", "error", cm_pg_last_error(pg), NULL);
        return CM_EPG;
    }
    int rc = 0;
    for (int i = 0; !rc && i < k->n; i++) {
        const char *p[2] = {k->keys[i].id, (const char *)k->keys[i].pub};
        int len[2] = {0, OTA_PUB_LEN}, fmt[2] = {0, 1};
        rc = cm_pg_exec_bin(c, NULL, "INSERT INTO signing_keys (key_id, public_key) VALUES ($1, $2) ON CONFLICT DO NOTHING", 2,
                            p, len, fmt, 0);
        if (rc) cm_log_kv(CM_LOG_ERROR, "cannot record a signing key", "error", cm_pg_error(c), NULL);
    }
    cm_pg_release(pg, c);
    return rc;
}

const char *ota_keys_active(const ota_keys_t *k) { return k->keys[k->active].id; }

int ota_keys_loaded(const ota_keys_t *k, const char *key_id) {
    for (int i = 0; i < k->n; i++)
        if (strcmp(k->keys[i].id, key_id) == 0) return 1;
    return 0;
}

int ota_keys_sign(const ota_keys_t *k, const uint8_t *msg, size_t n, uint8_t sig[OTA_SIG_LEN]) {
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    size_t len = OTA_SIG_LEN;
    /* Ed25519 signs the message itself (no digest step): md is NULL. */
    int ok = ctx && EVP_DigestSignInit(ctx, NULL, NULL, NULL, k->keys[k->active].pkey) == 1 &&
             EVP_DigestSign(ctx, sig, &len, msg, n) == 1 && len == OTA_SIG_LEN;
    EVP_MD_CTX_free(ctx);
    return ok ? 0 : CM_EIO;
}

char *ota_keys_pem(const uint8_t *raw, size_t n) {
    EVP_PKEY *p = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, raw, n);
    BIO *b = p ? BIO_new(BIO_s_mem()) : NULL;
    char *out = NULL;
    if (b && PEM_write_bio_PUBKEY(b, p) == 1) {
        char *data;
        long len = BIO_get_mem_data(b, &data);
        out = cm_malloc((size_t)len + 1);
        memcpy(out, data, (size_t)len);
        out[len] = 0;
    }
    BIO_free(b);
    EVP_PKEY_free(p);
    return out;
}
