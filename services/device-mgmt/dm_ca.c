/* The device certificate authority over OpenSSL 3: the certificate profile is described in
 * dm_ca.h. Every OpenSSL object is created and released inside one call, on every path; the only
 * long-lived ones are the CA certificate and key owned by a dm_ca_t, which are never modified after
 * dm_ca_load() so that several threads may sign with them at once (each X509_sign() makes its own
 * digest context).
 *
 * Ownership: the char * results (PEM text) come from cm_malloc and are the caller's to free();
 * dm_ca_cert_pem() returns memory owned by the dm_ca_t. */
#include "dm_ca.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/conf.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_err.h"

enum {
    /* Devices with a slightly slow clock must not see a certificate that is "not yet valid". */
    DM__SKEW_SECONDS = 300,
    /* Far enough for any real CA, small enough that the arithmetic and ASN1_TIME never overflow. */
    DM__MAX_VALID_DAYS = 36500,
    DM__MAX_NEXT_UPDATE_HOURS = 24 * 3650,
    DM__SERIAL_BYTES = 16,
    /* RFC 5280 4.1.2.2: a serial is at most 20 octets. */
    DM__SERIAL_MAX_BYTES = 20,
    DM__RSA_MIN_BITS = 2048,
};

/* 9999-12-31T23:59:59Z, the last instant a GeneralizedTime can hold. */
#define DM__MAX_UNIX INT64_C(253402300799)

struct dm_ca_s {
    X509 *cert;
    EVP_PKEY *key;
    char *cert_pem;
};

/* Every public function starts here: a stale error left on this thread's OpenSSL queue by someone
 * else must not be reported as the reason for our failure. */
static void dm__begin(char *err, size_t err_cap) {
    ERR_clear_error();
    if (err && err_cap) err[0] = '\0';
}

/* Writes the message, then ": <OpenSSL's first queued error>" when there is one, so that the person
 * reading the log sees both what we were doing and what OpenSSL objected to. Always empties the
 * queue. */
static void dm__fail(char *err, size_t err_cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void dm__fail(char *err, size_t err_cap, const char *fmt, ...) {
    unsigned long e = ERR_get_error();
    if (err && err_cap) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(err, err_cap, fmt, ap);
        va_end(ap);
        if (e && n >= 0 && (size_t)n < err_cap) {
            char why[256];
            ERR_error_string_n(e, why, sizeof why);
            snprintf(err + n, err_cap - (size_t)n, ": %s", why);
        }
    }
    ERR_clear_error();
}

/* With no callback OpenSSL would prompt on the controlling terminal for an encrypted key; a
 * service must fail instead. */
static int dm__no_password(char *buf, int size, int rwflag, void *u) {
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return -1;
}

/* A common name is checked for length and UTF-8 by OpenSSL; control characters are refused here
 * because a device id ends up in logs and in subject strings that people read. */
static int dm__cn_chars_ok(const char *cn) {
    if (!cn || !cn[0]) return 0;
    for (const unsigned char *p = (const unsigned char *)cn; *p; p++)
        if (*p < 0x20 || *p == 0x7f) return 0;
    return 1;
}

/* "CN=<cn>" and nothing else; NULL when OpenSSL refuses the value (too long, not UTF-8). */
static X509_NAME *dm__cn_name(const char *cn) {
    X509_NAME *name = X509_NAME_new();
    if (!name) return NULL;
    if (!X509_NAME_add_entry_by_NID(name, NID_commonName, MBSTRING_UTF8, (const unsigned char *)cn, -1, -1, 0)) {
        X509_NAME_free(name);
        return NULL;
    }
    return name;
}

static char *dm__bio_to_str(BIO *bio) {
    char *p = NULL;
    long n = BIO_get_mem_data(bio, &p);
    if (n <= 0 || !p) return NULL;
    return cm_strndup(p, (size_t)n);
}

static char *dm__cert_to_pem(X509 *x) {
    BIO *bio = BIO_new(BIO_s_mem());
    char *s = NULL;
    if (bio && PEM_write_bio_X509(bio, x)) s = dm__bio_to_str(bio);
    BIO_free(bio);
    return s;
}

/* A fresh serial of exactly 127 bits: the top bit clear keeps it positive without a 0x00 pad, and
 * the next bit set fixes its length at 16 octets (32 hex digits), leaving 126 random bits, well
 * above the 64 that the CA/Browser Forum asks for. */
static int dm__random_serial(X509 *x) {
    unsigned char b[DM__SERIAL_BYTES];
    if (RAND_bytes(b, sizeof b) != 1) return -1;
    b[0] = (unsigned char)((b[0] & 0x7f) | 0x40);
    BIGNUM *bn = BN_bin2bn(b, sizeof b, NULL);
    int ok = bn && BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)) != NULL;
    BN_free(bn);
    return ok ? 0 : -1;
}

/* Lowercase hex of the serial's DER content octets (a 0x00 pad included when the DER has one). */
static int dm__serial_hex(const ASN1_INTEGER *sn, char out[41]) {
    const unsigned char *d = ASN1_STRING_get0_data(sn);
    int len = ASN1_STRING_length(sn);
    if (!d || len <= 0 || ASN1_STRING_type(sn) != V_ASN1_INTEGER) return -1;
    int pad = d[0] & 0x80 ? 1 : 0;
    if (len + pad > DM__SERIAL_MAX_BYTES) return -1;
    size_t o = 0;
    if (pad) {
        out[o++] = '0';
        out[o++] = '0';
    }
    cm_hex(out + o, d, (size_t)len);
    return 0;
}

/* Parses a serial as dm_cert_t.serial_hex spells it (either case accepted). NULL when it is not
 * 1..40 hex digits of a positive number of at most 20 octets. */
static ASN1_INTEGER *dm__parse_serial(const char *hex) {
    if (!hex) return NULL;
    size_t len = strspn(hex, "0123456789abcdefABCDEF");
    if (len == 0 || hex[len] != '\0' || len > 2 * DM__SERIAL_MAX_BYTES) return NULL;
    BIGNUM *bn = NULL;
    ASN1_INTEGER *sn = NULL;
    if (BN_hex2bn(&bn, hex) == (int)len && !BN_is_zero(bn) && BN_num_bytes(bn) <= DM__SERIAL_MAX_BYTES)
        sn = BN_to_ASN1_INTEGER(bn, NULL);
    BN_free(bn);
    return sn;
}

static int dm__set_validity(X509 *x, int64_t not_before, int64_t not_after) {
    return ASN1_TIME_set(X509_getm_notBefore(x), (time_t)not_before) &&
                   ASN1_TIME_set(X509_getm_notAfter(x), (time_t)not_after)
               ? 0
               : -1;
}

static int dm__add_ext(X509 *x, X509V3_CTX *ctx, int nid, const char *value) {
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, ctx, nid, value);
    if (!ext) return -1;
    int ok = X509_add_ext(x, ext, -1);
    X509_EXTENSION_free(ext);
    return ok ? 0 : -1;
}

int dm_ca_generate(const char *subject_cn, int valid_days, char **cert_pem, char **key_pem, char *err, size_t err_cap) {
    EVP_PKEY *key = NULL;
    X509 *x = NULL;
    X509_NAME *name = NULL;
    BIO *bio = NULL;
    char *cert_s = NULL, *key_s = NULL;
    int rc = CM_EIO;

    dm__begin(err, err_cap);
    if (cert_pem) *cert_pem = NULL;
    if (key_pem) *key_pem = NULL;
    if (!cert_pem || !key_pem || !dm__cn_chars_ok(subject_cn) || valid_days <= 0 || valid_days > DM__MAX_VALID_DAYS) {
        dm__fail(err, err_cap, "CA generate: need a printable subject CN, 1..%d valid days and two outputs",
                 DM__MAX_VALID_DAYS);
        return CM_EINVAL;
    }
    if (!(name = dm__cn_name(subject_cn))) {
        dm__fail(err, err_cap, "CA generate: subject CN refused");
        return CM_EINVAL;
    }

    if (!(key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256"))) {
        dm__fail(err, err_cap, "CA generate: P-256 key generation failed");
        goto out;
    }
    int64_t now = (int64_t)time(NULL);
    X509V3_CTX ctx;
    if (!(x = X509_new()) || !X509_set_version(x, X509_VERSION_3) || dm__random_serial(x) != 0 ||
        !X509_set_subject_name(x, name) || !X509_set_issuer_name(x, name) ||
        dm__set_validity(x, now - DM__SKEW_SECONDS, now + (int64_t)valid_days * 86400) != 0 ||
        !X509_set_pubkey(x, key)) {
        dm__fail(err, err_cap, "CA generate: building the certificate failed");
        goto out;
    }
    memset(&ctx, 0, sizeof ctx);
    X509V3_set_ctx(&ctx, x, x, NULL, NULL, 0);
    if (dm__add_ext(x, &ctx, NID_basic_constraints, "critical,CA:TRUE") != 0 ||
        dm__add_ext(x, &ctx, NID_key_usage, "critical,keyCertSign,cRLSign") != 0 ||
        dm__add_ext(x, &ctx, NID_subject_key_identifier, "hash") != 0) {
        dm__fail(err, err_cap, "CA generate: adding extensions failed");
        goto out;
    }
    if (X509_sign(x, key, EVP_sha256()) <= 0) {
        dm__fail(err, err_cap, "CA generate: self-signing failed");
        goto out;
    }
    if (!(cert_s = dm__cert_to_pem(x))) {
        dm__fail(err, err_cap, "CA generate: writing the certificate PEM failed");
        goto out;
    }
    /* PEM_write_bio_PrivateKey writes PKCS#8 ("BEGIN PRIVATE KEY"); with no cipher it is unencrypted. */
    if (!(bio = BIO_new(BIO_s_mem())) || !PEM_write_bio_PrivateKey(bio, key, NULL, NULL, 0, NULL, NULL) ||
        !(key_s = dm__bio_to_str(bio))) {
        dm__fail(err, err_cap, "CA generate: writing the key PEM failed");
        goto out;
    }
    *cert_pem = cert_s;
    *key_pem = key_s;
    cert_s = key_s = NULL;
    rc = 0;
out:
    if (key_s) OPENSSL_cleanse(key_s, strlen(key_s));
    cm_free(key_s);
    cm_free(cert_s);
    BIO_free(bio);
    X509_NAME_free(name);
    X509_free(x);
    EVP_PKEY_free(key);
    return rc;
}

dm_ca_t *dm_ca_load(const char *cert_pem, const char *key_pem, char *err, size_t err_cap) {
    X509 *cert = NULL;
    EVP_PKEY *key = NULL;
    BIO *bio = NULL;
    char *pem = NULL;
    dm_ca_t *ca = NULL;

    dm__begin(err, err_cap);
    if (!cert_pem || !key_pem) {
        dm__fail(err, err_cap, "CA load: certificate and key PEM are both required");
        return NULL;
    }
    if (!(bio = BIO_new_mem_buf(cert_pem, -1)) || !(cert = PEM_read_bio_X509(bio, NULL, dm__no_password, NULL))) {
        dm__fail(err, err_cap, "CA load: cannot read the certificate PEM");
        goto out;
    }
    BIO_free(bio);
    if (!(bio = BIO_new_mem_buf(key_pem, -1)) || !(key = PEM_read_bio_PrivateKey(bio, NULL, dm__no_password, NULL))) {
        dm__fail(err, err_cap, "CA load: cannot read the key PEM (it must be unencrypted)");
        goto out;
    }
    /* Signing always uses SHA-256, which rules out EdDSA keys; refuse them now rather than at the
     * first signature. */
    if (!EVP_PKEY_is_a(key, "EC") && !EVP_PKEY_is_a(key, "RSA")) {
        dm__fail(err, err_cap, "CA load: key type %s not supported (want EC or RSA)", EVP_PKEY_get0_type_name(key));
        goto out;
    }
    if (X509_check_private_key(cert, key) != 1) {
        dm__fail(err, err_cap, "CA load: the key does not belong to the certificate");
        goto out;
    }
    /* X509_check_ca() also fills the certificate's extension cache, so that later readers (several
     * signing threads) only ever read it. 1 means basicConstraints CA:TRUE; the other non-zero
     * answers are legacy guesses (v1 self-signed, Netscape types) that we do not accept. */
    if (X509_check_ca(cert) != 1 || (X509_get_extension_flags(cert) & EXFLAG_INVALID)) {
        dm__fail(err, err_cap, "CA load: the certificate is not a CA (no valid basicConstraints CA:TRUE)");
        goto out;
    }
    /* The CA signs CRLs too; without cRLSign relying parties would reject every CRL it makes. */
    uint32_t ku = X509_get_key_usage(cert);
    if (ku != UINT32_MAX && (ku & (KU_KEY_CERT_SIGN | KU_CRL_SIGN)) != (KU_KEY_CERT_SIGN | KU_CRL_SIGN)) {
        dm__fail(err, err_cap, "CA load: the certificate's keyUsage lacks keyCertSign or cRLSign");
        goto out;
    }
    /* Re-encoded rather than copied, so that the stored PEM is exactly this one certificate. */
    if (!(pem = dm__cert_to_pem(cert))) {
        dm__fail(err, err_cap, "CA load: writing the certificate PEM failed");
        goto out;
    }
    ca = cm_calloc(1, sizeof *ca);
    ca->cert = cert;
    ca->key = key;
    ca->cert_pem = pem;
    cert = NULL;
    key = NULL;
    pem = NULL;
out:
    cm_free(pem);
    BIO_free(bio);
    X509_free(cert);
    EVP_PKEY_free(key);
    return ca;
}

void dm_ca_free(dm_ca_t *ca) {
    if (!ca) return;
    X509_free(ca->cert);
    EVP_PKEY_free(ca->key);
    cm_free(ca->cert_pem);
    cm_free(ca);
}

const char *dm_ca_cert_pem(const dm_ca_t *ca) { return ca ? ca->cert_pem : NULL; }

/* 0 when a device may use this key; otherwise -1 with the reason in why. */
static int dm__device_key_ok(EVP_PKEY *pub, char *why, size_t why_cap) {
    if (EVP_PKEY_is_a(pub, "EC")) {
        char group[80];
        size_t len = 0;
        /* Explicit curve parameters have no group name; they are refused like any unknown curve. */
        if (!EVP_PKEY_get_group_name(pub, group, sizeof group, &len)) {
            snprintf(why, why_cap, "EC key without a named curve");
            return -1;
        }
        int nid = OBJ_txt2nid(group);
        if (nid == NID_undef) nid = EC_curve_nist2nid(group);
        if (nid == NID_X9_62_prime256v1 || nid == NID_secp384r1) return 0;
        snprintf(why, why_cap, "EC curve %s not accepted (want P-256 or P-384)", group);
        return -1;
    }
    if (EVP_PKEY_is_a(pub, "RSA")) {
        int bits = EVP_PKEY_get_bits(pub);
        if (bits >= DM__RSA_MIN_BITS) return 0;
        snprintf(why, why_cap, "RSA key of %d bits not accepted (want at least %d)", bits, DM__RSA_MIN_BITS);
        return -1;
    }
    const char *type = EVP_PKEY_get0_type_name(pub);
    snprintf(why, why_cap, "key type %s not accepted (want EC P-256/P-384 or RSA)", type ? type : "unknown");
    return -1;
}

int dm_ca_sign_csr(const dm_ca_t *ca, const char *csr_pem, const char *device_id, int valid_days, dm_cert_t *out,
                   char *err, size_t err_cap) {
    X509_REQ *req = NULL;
    X509 *x = NULL;
    X509_NAME *name = NULL;
    BIO *bio = NULL;
    int rc = CM_EIO;

    dm__begin(err, err_cap);
    if (out) memset(out, 0, sizeof *out);
    if (!ca || !out || !csr_pem) {
        dm__fail(err, err_cap, "sign CSR: CA, CSR and output are required");
        return CM_EINVAL;
    }
    if (!dm__cn_chars_ok(device_id)) {
        dm__fail(err, err_cap, "sign CSR: the device id must be non-empty printable text");
        return CM_EINVAL;
    }
    if (valid_days <= 0 || valid_days > DM__MAX_VALID_DAYS) {
        dm__fail(err, err_cap, "sign CSR: valid_days must be 1..%d", DM__MAX_VALID_DAYS);
        return CM_EINVAL;
    }

    if (!(bio = BIO_new_mem_buf(csr_pem, -1))) {
        dm__fail(err, err_cap, "sign CSR: out of memory");
        goto out;
    }
    if (!(req = PEM_read_bio_X509_REQ(bio, NULL, NULL, NULL))) {
        dm__fail(err, err_cap, "sign CSR: cannot read the certificate request PEM");
        rc = CM_EINVAL;
        goto out;
    }
    EVP_PKEY *pub = X509_REQ_get0_pubkey(req);
    if (!pub) {
        dm__fail(err, err_cap, "sign CSR: the request's public key cannot be decoded");
        rc = CM_EINVAL;
        goto out;
    }
    /* The key policy is checked before the signature so that an unacceptable (say, huge RSA) key
     * costs nothing to refuse. */
    char why[160];
    if (dm__device_key_ok(pub, why, sizeof why) != 0) {
        dm__fail(err, err_cap, "sign CSR: %s", why);
        rc = CM_EINVAL;
        goto out;
    }
    /* Proof that the requester holds the private key; 0 is a bad signature, <0 an undecodable one. */
    if (X509_REQ_verify(req, pub) != 1) {
        dm__fail(err, err_cap, "sign CSR: the request's signature does not verify");
        rc = CM_EINVAL;
        goto out;
    }
    /* The requested subject and extensions are ignored on purpose: the CA, not the device, decides
     * who the certificate names and what it may do (a request must not obtain CA:TRUE). */
    if (!(name = dm__cn_name(device_id))) {
        dm__fail(err, err_cap, "sign CSR: device id refused as a common name");
        rc = CM_EINVAL;
        goto out;
    }

    int64_t now = (int64_t)time(NULL);
    int64_t not_before = now - DM__SKEW_SECONDS, not_after = now + (int64_t)valid_days * 86400;
    X509V3_CTX ctx;
    if (!(x = X509_new()) || !X509_set_version(x, X509_VERSION_3) || dm__random_serial(x) != 0 ||
        !X509_set_issuer_name(x, X509_get_subject_name(ca->cert)) || !X509_set_subject_name(x, name) ||
        dm__set_validity(x, not_before, not_after) != 0 || !X509_set_pubkey(x, pub)) {
        dm__fail(err, err_cap, "sign CSR: building the certificate failed");
        goto out;
    }
    memset(&ctx, 0, sizeof ctx);
    X509V3_set_ctx(&ctx, ca->cert, x, NULL, NULL, 0);
    /* authorityKeyIdentifier: the CA's key id, or its issuer and serial when the CA has none. */
    if (dm__add_ext(x, &ctx, NID_basic_constraints, "CA:FALSE") != 0 ||
        dm__add_ext(x, &ctx, NID_key_usage, "critical,digitalSignature") != 0 ||
        dm__add_ext(x, &ctx, NID_ext_key_usage, "clientAuth") != 0 ||
        dm__add_ext(x, &ctx, NID_subject_key_identifier, "hash") != 0 ||
        dm__add_ext(x, &ctx, NID_authority_key_identifier, "keyid,issuer") != 0) {
        dm__fail(err, err_cap, "sign CSR: adding extensions failed");
        goto out;
    }
    if (X509_sign(x, ca->key, EVP_sha256()) <= 0) {
        dm__fail(err, err_cap, "sign CSR: signing failed");
        goto out;
    }
    if (dm__serial_hex(X509_get0_serialNumber(x), out->serial_hex) != 0 || !(out->cert_pem = dm__cert_to_pem(x))) {
        dm__fail(err, err_cap, "sign CSR: writing the certificate failed");
        goto out;
    }
    out->not_before_unix = not_before;
    out->not_after_unix = not_after;
    rc = 0;
out:
    if (rc != 0 && out) {
        cm_free(out->cert_pem);
        memset(out, 0, sizeof *out);
    }
    BIO_free(bio);
    X509_REQ_free(req);
    X509_NAME_free(name);
    X509_free(x);
    return rc;
}

/* RFC 5280 5.3.1 reason codes valid in a full CRL: 7 is unassigned and 8 (removeFromCRL) only
 * belongs in delta CRLs. */
int dm_ca_reason_ok(int reason) { return reason >= 0 && reason <= 10 && reason != 7 && reason != 8; }

/* One CRL entry; CM_EINVAL for bad input, CM_EIO when OpenSSL fails. */
static int dm__add_revoked(X509_CRL *crl, const dm_revoked_t *r, size_t i, char *err, size_t err_cap) {
    ASN1_INTEGER *sn = NULL;
    ASN1_TIME *when = NULL;
    ASN1_ENUMERATED *reason = NULL;
    X509_REVOKED *rev = NULL;
    int rc = CM_EIO;

    if (!(sn = dm__parse_serial(r->serial_hex))) {
        dm__fail(err, err_cap, "CRL: entry %zu: malformed serial \"%.48s\"", i, r->serial_hex ? r->serial_hex : "");
        return CM_EINVAL;
    }
    if (r->revoked_unix < 0 || r->revoked_unix > DM__MAX_UNIX || !dm_ca_reason_ok(r->reason)) {
        dm__fail(err, err_cap, "CRL: entry %zu: revocation time or reason code %d out of range", i, r->reason);
        ASN1_INTEGER_free(sn);
        return CM_EINVAL;
    }
    if (!(rev = X509_REVOKED_new()) || !X509_REVOKED_set_serialNumber(rev, sn) ||
        !(when = ASN1_TIME_set(NULL, (time_t)r->revoked_unix)) || !X509_REVOKED_set_revocationDate(rev, when)) {
        dm__fail(err, err_cap, "CRL: entry %zu: building failed", i);
        goto out;
    }
    /* RFC 5280 5.3.1: "unspecified" (0) is expressed by leaving the extension out. */
    if (r->reason != 0 && (!(reason = ASN1_ENUMERATED_new()) || !ASN1_ENUMERATED_set(reason, r->reason) ||
                           !X509_REVOKED_add1_ext_i2d(rev, NID_crl_reason, reason, 0, 0))) {
        dm__fail(err, err_cap, "CRL: entry %zu: adding the reason failed", i);
        goto out;
    }
    if (!X509_CRL_add0_revoked(crl, rev)) {
        dm__fail(err, err_cap, "CRL: entry %zu: adding to the list failed", i);
        goto out;
    }
    rev = NULL; /* the CRL owns it now */
    rc = 0;
out:
    X509_REVOKED_free(rev);
    ASN1_ENUMERATED_free(reason);
    ASN1_TIME_free(when);
    ASN1_INTEGER_free(sn);
    return rc;
}

int dm_ca_crl(const dm_ca_t *ca, const dm_revoked_t *revoked, size_t n, int64_t crl_number, int next_update_hours,
              char **crl_pem, char *err, size_t err_cap) {
    X509_CRL *crl = NULL;
    ASN1_TIME *this_update = NULL, *next_update = NULL;
    ASN1_INTEGER *number = NULL;
    X509_EXTENSION *aki = NULL;
    BIO *bio = NULL;
    int rc = CM_EIO;

    dm__begin(err, err_cap);
    if (crl_pem) *crl_pem = NULL;
    if (!ca || !crl_pem || (n > 0 && !revoked)) {
        dm__fail(err, err_cap, "CRL: CA, output and the revoked list are required");
        return CM_EINVAL;
    }
    if (crl_number < 0 || next_update_hours <= 0 || next_update_hours > DM__MAX_NEXT_UPDATE_HOURS) {
        dm__fail(err, err_cap, "CRL: the CRL number must be >= 0 and next_update_hours 1..%d",
                 DM__MAX_NEXT_UPDATE_HOURS);
        return CM_EINVAL;
    }

    int64_t now = (int64_t)time(NULL);
    if (!(crl = X509_CRL_new()) || !X509_CRL_set_version(crl, X509_CRL_VERSION_2) ||
        !X509_CRL_set_issuer_name(crl, X509_get_subject_name(ca->cert)) ||
        !(this_update = ASN1_TIME_set(NULL, (time_t)now)) ||
        !(next_update = ASN1_TIME_set(NULL, (time_t)(now + (int64_t)next_update_hours * 3600))) ||
        !X509_CRL_set1_lastUpdate(crl, this_update) || !X509_CRL_set1_nextUpdate(crl, next_update)) {
        dm__fail(err, err_cap, "CRL: building failed");
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        if ((rc = dm__add_revoked(crl, &revoked[i], i, err, err_cap)) != 0) goto out;
    rc = CM_EIO;
    /* Sorted by serial so that relying parties can search it; must happen before signing. */
    X509_CRL_sort(crl);

    X509V3_CTX ctx;
    memset(&ctx, 0, sizeof ctx);
    X509V3_set_ctx(&ctx, ca->cert, NULL, NULL, crl, 0);
    if (!(number = ASN1_INTEGER_new()) || !ASN1_INTEGER_set_int64(number, crl_number) ||
        !X509_CRL_add1_ext_i2d(crl, NID_crl_number, number, 0, 0) ||
        !(aki = X509V3_EXT_conf_nid(NULL, &ctx, NID_authority_key_identifier, "keyid,issuer")) ||
        !X509_CRL_add_ext(crl, aki, -1)) {
        dm__fail(err, err_cap, "CRL: adding extensions failed");
        goto out;
    }
    if (X509_CRL_sign(crl, ca->key, EVP_sha256()) <= 0) {
        dm__fail(err, err_cap, "CRL: signing failed");
        goto out;
    }
    if (!(bio = BIO_new(BIO_s_mem())) || !PEM_write_bio_X509_CRL(bio, crl) || !(*crl_pem = dm__bio_to_str(bio))) {
        dm__fail(err, err_cap, "CRL: writing the PEM failed");
        goto out;
    }
    rc = 0;
out:
    BIO_free(bio);
    X509_EXTENSION_free(aki);
    ASN1_INTEGER_free(number);
    ASN1_TIME_free(this_update);
    ASN1_TIME_free(next_update);
    X509_CRL_free(crl);
    return rc;
}
