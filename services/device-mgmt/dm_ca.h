/* The suite's device certificate authority, over OpenSSL: makes or loads a CA, signs device
 * certificate requests into client certificates whose subject CN is the device id, and produces
 * signed revocation lists. Pure crypto: where the CA and the issued serials are stored is
 * dm_store's business.
 *
 * Keys are ECDSA P-256, signatures SHA-256. The CA certificate has basicConstraints CA:TRUE
 * (critical), keyUsage keyCertSign + cRLSign (critical), a subject key identifier. Device
 * certificates: basicConstraints CA:FALSE, keyUsage digitalSignature (critical), extendedKeyUsage
 * clientAuth, subject and authority key identifiers, subject exactly "CN=<device id>" whatever the
 * request asked for; the request's public key must be EC (P-256 or P-384) or RSA >= 2048 bits and
 * the request's self-signature must verify.
 *
 * Ownership: strings returned through char ** are malloc'd (cm_alloc) and free()d by the caller.
 * A dm_ca_t is immutable after dm_ca_load() and safe to use from several threads at once. */
#ifndef DM_CA_H
#define DM_CA_H

#include <stddef.h>
#include <stdint.h>

typedef struct dm_ca_s dm_ca_t;

/* Makes a new self-signed CA: key and certificate as PEM (the key as unencrypted PKCS#8).
 * subject_cn e.g. "iotsuite device CA". Returns 0 or CM_EIO with a reason in err. */
int dm_ca_generate(const char *subject_cn, int valid_days, char **cert_pem, char **key_pem, char *err, size_t err_cap);

/* Loads a CA from PEM text. Checks that the key matches the certificate and that the certificate
 * is a CA. NULL with a reason in err on failure. */
dm_ca_t *dm_ca_load(const char *cert_pem, const char *key_pem, char *err, size_t err_cap);
void dm_ca_free(dm_ca_t *ca);
const char *dm_ca_cert_pem(const dm_ca_t *ca);

typedef struct dm_cert_s {
    char *cert_pem;
    char serial_hex[41];       /* lowercase hex, no leading zeros beyond what the DER has */
    int64_t not_before_unix;   /* seconds */
    int64_t not_after_unix;
} dm_cert_t;

/* Signs a PEM certificate request for device_id, valid from now (minus 5 minutes for clock skew)
 * for valid_days, with a fresh random positive 127-bit serial. Returns 0; CM_EINVAL when the CSR
 * is unreadable, its signature does not verify, or its key is unacceptable (reason in err, for
 * the caller to return as INVALID_ARGUMENT); CM_EIO on an OpenSSL failure. out->cert_pem is the
 * caller's to free. */
int dm_ca_sign_csr(const dm_ca_t *ca, const char *csr_pem, const char *device_id, int valid_days, dm_cert_t *out,
                   char *err, size_t err_cap);

typedef struct dm_revoked_s {
    const char *serial_hex;
    int64_t revoked_unix;
    int reason; /* RFC 5280 CRLReason code: 0 unspecified, 1 keyCompromise, 4 superseded, 5 cessationOfOperation */
} dm_revoked_t;

/* 1 when dm_ca_crl accepts reason in a CRL entry: an RFC 5280 CRLReason valid in a full CRL
 * (DM_CA_REASONS); 0 for 7 (unassigned), 8 (removeFromCRL: delta CRLs only) and anything else.
 * RevokeCertificate checks with it, so that a stored reason can never make the CRL unbuildable. */
int dm_ca_reason_ok(int reason);
#define DM_CA_REASONS                                                                                            \
    "0 unspecified, 1 keyCompromise, 2 cACompromise, 3 affiliationChanged, 4 superseded, "                      \
    "5 cessationOfOperation, 6 certificateHold, 9 privilegeWithdrawn, 10 aACompromise"

/* A CRL (v2, with a CRL number extension and the authority key identifier) listing the revoked
 * serials, thisUpdate now, nextUpdate now + next_update_hours. Returns 0 and a PEM in *crl_pem,
 * CM_EINVAL for a malformed serial, CM_EIO on failure. */
int dm_ca_crl(const dm_ca_t *ca, const dm_revoked_t *revoked, size_t n, int64_t crl_number, int next_update_hours,
              char **crl_pem, char *err, size_t err_cap);

#endif
