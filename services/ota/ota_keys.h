/* Ed25519 signing keys for artifact manifests (OpenSSL).
 *
 * Private keys live only in files: every "*.pem" in IOT_OTA_KEYS_DIR is loaded at start (in
 * Kubernetes, a mounted Secret). A key's id is the lowercase hex of the first 8 bytes of
 * sha256(raw public key), so it follows from the key itself. One key signs new artifacts
 * (IOT_OTA_SIGNING_KEY, or the only one); the others stay loaded. Public keys are written to
 * Postgres (signing_keys) so that ListSigningKeys can serve every key that ever signed, after its
 * private half is gone: rotating adds a file, switches IOT_OTA_SIGNING_KEY and restarts; nothing
 * is re-signed. Thread safe after load. */
#ifndef OTA_KEYS_H
#define OTA_KEYS_H

#include <stddef.h>
#include <stdint.h>

#include "cm_pg.h"
#include "ota_config.h"

#define OTA_KEY_ID_LEN 16
#define OTA_SIG_LEN 64
#define OTA_PUB_LEN 32

typedef struct ota_keys_s ota_keys_t;

/* Loads the directory (creating a key first when it holds none and cfg->generate_key), and picks
 * the signing key. NULL with the reason in err. */
ota_keys_t *ota_keys_load(const ota_config_t *cfg, char *err, size_t errlen);
void ota_keys_free(ota_keys_t *k);
/* Records every loaded public key in signing_keys (idempotent). 0, or CM_EPG (logged). */
int ota_keys_register(ota_keys_t *k, cm_pg_t *pg);
/* The id of the key that signs. */
const char *ota_keys_active(const ota_keys_t *k);
/* 1 when this process holds the private key. */
int ota_keys_loaded(const ota_keys_t *k, const char *key_id);
/* Signs msg with the active key into sig; 0, or CM_EIO. */
int ota_keys_sign(const ota_keys_t *k, const uint8_t *msg, size_t n, uint8_t sig[OTA_SIG_LEN]);
/* SubjectPublicKeyInfo PEM of a raw Ed25519 public key; NULL if it is not one. Caller cm_free()s. */
char *ota_keys_pem(const uint8_t *raw, size_t n);

#endif
