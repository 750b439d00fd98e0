/* The device CA (dm_ca.c), checked with OpenSSL itself: signatures, chain verification for TLS
 * client use, the certificate profile, CSR refusal, CRLs and revocation, concurrent signing. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include "cm_err.h"
#include "dm_ca.h"
#include "test.h"

enum { KEY_P256, KEY_P384, KEY_P521, KEY_RSA1024, KEY_RSA2048, KEY_ED25519 };

static EVP_PKEY *make_key(int kind) {
    switch (kind) {
    case KEY_P256: return EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    case KEY_P384: return EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-384");
    case KEY_P521: return EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-521");
    case KEY_RSA1024: return EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)1024);
    case KEY_RSA2048: return EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
    default: return EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    }
}

static char *bio_str(BIO *bio) {
    char *p = NULL;
    long n = BIO_get_mem_data(bio, &p);
    char *s = malloc((size_t)n + 1);
    memcpy(s, p, (size_t)n);
    s[n] = '\0';
    return s;
}

static char *req_pem(X509_REQ *req) {
    BIO *bio = BIO_new(BIO_s_mem());
    PEM_write_bio_X509_REQ(bio, req);
    char *s = bio_str(bio);
    BIO_free(bio);
    return s;
}

/* An unsigned request with subject CN=cn for key; the caller signs (or not). */
static X509_REQ *new_req(EVP_PKEY *key, const char *cn) {
    X509_REQ *req = X509_REQ_new();
    X509_NAME *name = X509_NAME_new();
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, (const unsigned char *)cn, -1, -1, 0);
    X509_REQ_set_version(req, X509_REQ_VERSION_1);
    X509_REQ_set_subject_name(req, name);
    X509_REQ_set_pubkey(req, key);
    X509_NAME_free(name);
    return req;
}

/* A signed CSR (PEM, free()) for a new key of kind; the key is returned through key_out if asked. */
static char *make_csr(int kind, const char *cn, EVP_PKEY **key_out) {
    EVP_PKEY *key = make_key(kind);
    if (!key) return NULL;
    X509_REQ *req = new_req(key, cn);
    /* Ed25519 signs without a separate digest. */
    X509_REQ_sign(req, key, kind == KEY_ED25519 ? NULL : EVP_sha256());
    char *pem = req_pem(req);
    X509_REQ_free(req);
    if (key_out) *key_out = key;
    else EVP_PKEY_free(key);
    return pem;
}

static X509 *pem_cert(const char *pem) {
    BIO *bio = BIO_new_mem_buf(pem, -1);
    X509 *x = PEM_read_bio_X509(bio, NULL, NULL, NULL);
    BIO_free(bio);
    return x;
}

static X509_CRL *pem_crl(const char *pem) {
    BIO *bio = BIO_new_mem_buf(pem, -1);
    X509_CRL *crl = PEM_read_bio_X509_CRL(bio, NULL, NULL, NULL);
    BIO_free(bio);
    return crl;
}

static int64_t asn1_unix(const ASN1_TIME *t) {
    struct tm tm;
    if (!ASN1_TIME_to_tm(t, &tm)) return -1;
    return (int64_t)timegm(&tm);
}

static void cn_of(X509_NAME *name, char *buf, int cap) {
    buf[0] = '\0';
    X509_NAME_get_text_by_NID(name, NID_commonName, buf, cap);
}

/* X509_V_OK or the verification error for leaf under the single trust anchor ca, for TLS client
 * use, strict RFC 5280 checks, and with crl (if given) checked. */
static int verify_chain(X509 *ca, X509 *leaf, X509_CRL *crl) {
    X509_STORE *store = X509_STORE_new();
    X509_STORE_add_cert(store, ca);
    X509_STORE_CTX *ctx = X509_STORE_CTX_new();
    X509_STORE_CTX_init(ctx, store, leaf, NULL);
    X509_STORE_CTX_set_purpose(ctx, X509_PURPOSE_SSL_CLIENT);
    unsigned long flags = X509_V_FLAG_X509_STRICT;
    STACK_OF(X509_CRL) *crls = NULL;
    if (crl) {
        flags |= X509_V_FLAG_CRL_CHECK;
        crls = sk_X509_CRL_new_null();
        sk_X509_CRL_push(crls, crl);
        X509_STORE_CTX_set0_crls(ctx, crls);
    }
    X509_STORE_CTX_set_flags(ctx, flags);
    int ok = X509_verify_cert(ctx);
    int e = X509_STORE_CTX_get_error(ctx);
    X509_STORE_CTX_free(ctx);
    X509_STORE_free(store);
    sk_X509_CRL_free(crls); /* the stack only; the CRL is the caller's */
    if (ok == 1) return X509_V_OK;
    return e == X509_V_OK ? -1 : e;
}

/* A CA generated and loaded, kept for one test; release with ca_done(). */
typedef struct {
    char *cert_pem, *key_pem;
    dm_ca_t *ca;
    X509 *cert;
} test_ca_t;

static void ca_make(test_ca_t *t) {
    char err[256];
    memset(t, 0, sizeof *t);
    ASSERT_INT_EQ(dm_ca_generate("iotsuite test CA", 3650, &t->cert_pem, &t->key_pem, err, sizeof err), 0);
    t->ca = dm_ca_load(t->cert_pem, t->key_pem, err, sizeof err);
    if (!t->ca) TEST__FAIL("dm_ca_load: %s", err);
    t->cert = pem_cert(t->cert_pem);
    ASSERT(t->cert != NULL);
}

static void ca_done(test_ca_t *t) {
    dm_ca_free(t->ca);
    X509_free(t->cert);
    free(t->cert_pem);
    free(t->key_pem);
}

static int has_critical_ext(X509 *x, int nid) {
    int i = X509_get_ext_by_NID(x, nid, -1);
    return i >= 0 && X509_EXTENSION_get_critical(X509_get_ext(x, i));
}

static void test_generate_and_load(void) {
    test_ca_t t;
    ca_make(&t);
    ASSERT(strstr(t.cert_pem, "-----BEGIN CERTIFICATE-----") != NULL);
    ASSERT(strstr(t.key_pem, "-----BEGIN PRIVATE KEY-----") != NULL); /* PKCS#8, unencrypted */
    ASSERT_STR_EQ(dm_ca_cert_pem(t.ca), t.cert_pem);

    X509 *c = t.cert;
    char cn[128];
    cn_of(X509_get_subject_name(c), cn, sizeof cn);
    ASSERT_STR_EQ(cn, "iotsuite test CA");
    ASSERT_INT_EQ(X509_NAME_cmp(X509_get_subject_name(c), X509_get_issuer_name(c)), 0);
    ASSERT_INT_EQ(X509_get_version(c), X509_VERSION_3);
    ASSERT_INT_EQ(X509_check_ca(c), 1);
    ASSERT(has_critical_ext(c, NID_basic_constraints));
    ASSERT(has_critical_ext(c, NID_key_usage));
    ASSERT_INT_EQ(X509_get_key_usage(c), KU_KEY_CERT_SIGN | KU_CRL_SIGN);
    ASSERT(X509_get0_subject_key_id(c) != NULL);
    ASSERT_INT_EQ(X509_get_signature_nid(c), NID_ecdsa_with_SHA256);

    EVP_PKEY *pub = X509_get0_pubkey(c);
    ASSERT(EVP_PKEY_is_a(pub, "EC"));
    char group[64];
    size_t glen = 0;
    ASSERT(EVP_PKEY_get_group_name(pub, group, sizeof group, &glen));
    ASSERT_INT_EQ(OBJ_txt2nid(group), NID_X9_62_prime256v1);
    ASSERT_INT_EQ(X509_verify(c, pub), 1); /* self-signed */
    ASSERT_INT_EQ(X509_self_signed(c, 1), 1);

    int64_t now = (int64_t)time(NULL);
    int64_t nb = asn1_unix(X509_get0_notBefore(c)), na = asn1_unix(X509_get0_notAfter(c));
    ASSERT(nb <= now && nb >= now - 400);
    ASSERT(na >= now + 3650LL * 86400 - 60 && na <= now + 3650LL * 86400 + 60);
    ca_done(&t);
}

static void test_generate_rejects_bad_arguments(void) {
    char *c = (char *)1, *k = (char *)1, err[256];
    ASSERT_INT_EQ(dm_ca_generate("", 10, &c, &k, err, sizeof err), CM_EINVAL);
    ASSERT(c == NULL && k == NULL);
    ASSERT_INT_EQ(dm_ca_generate("x", 0, &c, &k, err, sizeof err), CM_EINVAL);
    char long_cn[100];
    memset(long_cn, 'a', 99);
    long_cn[99] = '\0';
    ASSERT_INT_EQ(dm_ca_generate(long_cn, 10, &c, &k, err, sizeof err), CM_EINVAL);
    ASSERT(err[0] != '\0');
    ASSERT(c == NULL && k == NULL);
}

static void test_load_rejects_mismatched_key(void) {
    test_ca_t a, b;
    ca_make(&a);
    ca_make(&b);
    char err[256] = "";
    ASSERT(dm_ca_load(a.cert_pem, b.key_pem, err, sizeof err) == NULL);
    ASSERT(err[0] != '\0');
    ASSERT(strstr(err, "does not belong") != NULL);
    ca_done(&a);
    ca_done(&b);
}

static void test_load_rejects_non_ca(void) {
    test_ca_t t;
    ca_make(&t);
    char err[256] = "";

    /* A device certificate with its own key: the key matches but CA:FALSE. */
    EVP_PKEY *dev_key = NULL;
    char *csr = make_csr(KEY_P256, "x", &dev_key);
    dm_cert_t cert;
    ASSERT_INT_EQ(dm_ca_sign_csr(t.ca, csr, "dev-1", 30, &cert, err, sizeof err), 0);
    BIO *bio = BIO_new(BIO_s_mem());
    PEM_write_bio_PrivateKey(bio, dev_key, NULL, NULL, 0, NULL, NULL);
    char *dev_key_pem = bio_str(bio);
    BIO_free(bio);
    dm_ca_t *bad = dm_ca_load(cert.cert_pem, dev_key_pem, err, sizeof err);
    int refused = bad == NULL, mentions_ca = strstr(err, "not a CA") != NULL;
    dm_ca_free(bad);

    /* A v1 self-signed certificate (no extensions at all): OpenSSL would tolerate it as a root, we
     * do not. */
    X509 *v1 = X509_new();
    X509_set_version(v1, X509_VERSION_1);
    ASN1_INTEGER_set(X509_get_serialNumber(v1), 1);
    X509_NAME *name = X509_NAME_new();
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, (const unsigned char *)"v1 root", -1, -1, 0);
    X509_set_subject_name(v1, name);
    X509_set_issuer_name(v1, name);
    X509_NAME_free(name);
    X509_gmtime_adj(X509_getm_notBefore(v1), 0);
    X509_gmtime_adj(X509_getm_notAfter(v1), 86400);
    X509_set_pubkey(v1, dev_key);
    X509_sign(v1, dev_key, EVP_sha256());
    bio = BIO_new(BIO_s_mem());
    PEM_write_bio_X509(bio, v1);
    char *v1_pem = bio_str(bio);
    BIO_free(bio);
    X509_free(v1);
    char err2[256] = "";
    dm_ca_t *bad2 = dm_ca_load(v1_pem, dev_key_pem, err2, sizeof err2);
    int refused2 = bad2 == NULL;
    dm_ca_free(bad2);

    free(v1_pem);
    free(dev_key_pem);
    free(cert.cert_pem);
    free(csr);
    EVP_PKEY_free(dev_key);
    ca_done(&t);
    ASSERT(refused);
    ASSERT(mentions_ca);
    ASSERT(refused2);
    ASSERT(err2[0] != '\0');
}

static void test_load_rejects_garbage_and_encrypted_keys(void) {
    test_ca_t t;
    ca_make(&t);
    char err[256] = "";
    ASSERT(dm_ca_load("not a pem", t.key_pem, err, sizeof err) == NULL);
    ASSERT(strstr(err, "certificate PEM") != NULL);
    err[0] = '\0';
    ASSERT(dm_ca_load(t.cert_pem, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", err,
                      sizeof err) == NULL);
    ASSERT(strstr(err, "key PEM") != NULL);
    ASSERT(dm_ca_load(NULL, t.key_pem, err, sizeof err) == NULL);

    /* An encrypted key is refused rather than prompting for a passphrase. */
    BIO *in = BIO_new_mem_buf(t.key_pem, -1);
    EVP_PKEY *key = PEM_read_bio_PrivateKey(in, NULL, NULL, NULL);
    BIO_free(in);
    BIO *bio = BIO_new(BIO_s_mem());
    PEM_write_bio_PrivateKey(bio, key, EVP_aes_256_cbc(), (const unsigned char *)"secret", 6, NULL, NULL);
    char *enc = bio_str(bio);
    BIO_free(bio);
    EVP_PKEY_free(key);
    dm_ca_t *ca = dm_ca_load(t.cert_pem, enc, err, sizeof err);
    int refused = ca == NULL;
    dm_ca_free(ca);
    free(enc);
    ca_done(&t);
    ASSERT(refused);
}

static void test_sign_csr_verifies(void) {
    test_ca_t t;
    ca_make(&t);
    char err[256] = "";
    EVP_PKEY *dev_key = NULL;
    char *csr = make_csr(KEY_P256, "something-else", &dev_key);
    dm_cert_t out;
    int rc = dm_ca_sign_csr(t.ca, csr, "dev-42", 90, &out, err, sizeof err);
    if (rc != 0) TEST__FAIL("dm_ca_sign_csr: %d %s", rc, err);
    int64_t now = (int64_t)time(NULL);
    X509 *x = pem_cert(out.cert_pem);
    ASSERT(x != NULL);

    /* Signature by the CA key, and the whole chain for a TLS client, strictly. */
    ASSERT_INT_EQ(X509_verify(x, X509_get0_pubkey(t.cert)), 1);
    ASSERT_INT_EQ(verify_chain(t.cert, x, NULL), X509_V_OK);
    ASSERT_INT_EQ(X509_check_purpose(x, X509_PURPOSE_SSL_CLIENT, 0), 1);
    ASSERT(X509_check_purpose(x, X509_PURPOSE_SSL_SERVER, 0) != 1);

    /* Subject is the device id only; the request's CN is ignored. */
    X509_NAME *subj = X509_get_subject_name(x);
    ASSERT_INT_EQ(X509_NAME_entry_count(subj), 1);
    char cn[128];
    cn_of(subj, cn, sizeof cn);
    ASSERT_STR_EQ(cn, "dev-42");
    ASSERT_INT_EQ(X509_NAME_cmp(X509_get_issuer_name(x), X509_get_subject_name(t.cert)), 0);
    ASSERT_INT_EQ(EVP_PKEY_eq(X509_get0_pubkey(x), dev_key), 1);
    ASSERT_INT_EQ(X509_get_version(x), X509_VERSION_3);
    ASSERT_INT_EQ(X509_get_signature_nid(x), NID_ecdsa_with_SHA256);

    /* Serial: positive, 127 bits, and serial_hex is its lowercase hex. */
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(x), NULL);
    ASSERT(!BN_is_negative(bn));
    int bits = BN_num_bits(bn);
    char *hex = BN_bn2hex(bn);
    for (char *p = hex; *p; p++) *p = (char)(*p >= 'A' && *p <= 'F' ? *p - 'A' + 'a' : *p);
    int same = strcmp(hex, out.serial_hex) == 0;
    OPENSSL_free(hex);
    BN_free(bn);
    ASSERT_INT_EQ(bits, 127);
    ASSERT(same);
    ASSERT_INT_EQ(strlen(out.serial_hex), 32);

    /* Validity: now minus 5 minutes for skew, for 90 days, as reported. */
    ASSERT_INT_EQ(asn1_unix(X509_get0_notBefore(x)), out.not_before_unix);
    ASSERT_INT_EQ(asn1_unix(X509_get0_notAfter(x)), out.not_after_unix);
    ASSERT(out.not_before_unix >= now - 300 - 5 && out.not_before_unix <= now - 300);
    ASSERT_INT_EQ(out.not_after_unix - out.not_before_unix, 90LL * 86400 + 300);

    /* Extensions. */
    ASSERT_INT_EQ(X509_check_ca(x), 0);
    int crit = -1;
    BASIC_CONSTRAINTS *bc = X509_get_ext_d2i(x, NID_basic_constraints, &crit, NULL);
    ASSERT(bc != NULL);
    int is_ca = bc->ca;
    BASIC_CONSTRAINTS_free(bc);
    ASSERT(!is_ca);
    ASSERT(has_critical_ext(x, NID_key_usage));
    ASSERT_INT_EQ(X509_get_key_usage(x), KU_DIGITAL_SIGNATURE);
    ASSERT(X509_get_extension_flags(x) & EXFLAG_XKUSAGE);
    ASSERT_INT_EQ(X509_get_extended_key_usage(x), XKU_SSL_CLIENT);
    ASSERT(X509_get0_subject_key_id(x) != NULL);
    const ASN1_OCTET_STRING *akid = X509_get0_authority_key_id(x);
    ASSERT(akid != NULL);
    ASSERT_INT_EQ(ASN1_OCTET_STRING_cmp(akid, X509_get0_subject_key_id(t.cert)), 0);

    X509_free(x);
    free(out.cert_pem);
    free(csr);
    EVP_PKEY_free(dev_key);
    ca_done(&t);
}

static void test_sign_accepts_p384_and_rsa2048(void) {
    test_ca_t t;
    ca_make(&t);
    char err[256] = "";
    int kinds[2] = {KEY_P384, KEY_RSA2048};
    for (int i = 0; i < 2; i++) {
        char *csr = make_csr(kinds[i], "ignored", NULL);
        dm_cert_t out;
        int rc = dm_ca_sign_csr(t.ca, csr, "dev-7", 1, &out, err, sizeof err);
        free(csr);
        if (rc != 0) TEST__FAIL("key kind %d: %d %s", kinds[i], rc, err);
        X509 *x = pem_cert(out.cert_pem);
        free(out.cert_pem);
        int v = verify_chain(t.cert, x, NULL);
        X509_free(x);
        ASSERT_INT_EQ(v, X509_V_OK);
    }
    ca_done(&t);
}

static void test_sign_rejects_tampered_csr(void) {
    test_ca_t t;
    ca_make(&t);
    char err[256] = "";
    EVP_PKEY *key = make_key(KEY_P256);
    X509_REQ *req = new_req(key, "dev");
    X509_REQ_sign(req, key, EVP_sha256());

    /* The last DER byte is inside the signature: the request still parses, the signature fails. */
    unsigned char *der = NULL;
    int len = i2d_X509_REQ(req, &der);
    der[len - 1] ^= 0x01;
    const unsigned char *p = der;
    X509_REQ *bad = d2i_X509_REQ(NULL, &p, len);
    OPENSSL_free(der);
    char *bad_pem = bad ? req_pem(bad) : NULL;
    X509_REQ_free(bad);

    /* Another way: the subject changed after signing. */
    X509_NAME *other = X509_NAME_new();
    X509_NAME_add_entry_by_txt(other, "CN", MBSTRING_UTF8, (const unsigned char *)"evil", -1, -1, 0);
    X509_REQ_set_subject_name(req, other);
    X509_NAME_free(other);
    char *changed_pem = req_pem(req);
    X509_REQ_free(req);
    EVP_PKEY_free(key);

    dm_cert_t out = {0};
    int rc1 = bad_pem ? dm_ca_sign_csr(t.ca, bad_pem, "dev-1", 30, &out, err, sizeof err) : 999;
    int says_signature = strstr(err, "signature") != NULL;
    int null_out = out.cert_pem == NULL;
    int rc2 = dm_ca_sign_csr(t.ca, changed_pem, "dev-1", 30, &out, err, sizeof err);
    free(bad_pem);
    free(changed_pem);
    ca_done(&t);
    ASSERT_INT_EQ(rc1, CM_EINVAL);
    ASSERT(says_signature);
    ASSERT(null_out);
    ASSERT_INT_EQ(rc2, CM_EINVAL);
}

static void test_sign_rejects_weak_or_other_keys(void) {
    test_ca_t t;
    ca_make(&t);
    int kinds[3] = {KEY_RSA1024, KEY_P521, KEY_ED25519};
    const char *want[3] = {"RSA key of 1024 bits", "not accepted", "key type"};
    for (int i = 0; i < 3; i++) {
        char err[256] = "";
        char *csr = make_csr(kinds[i], "dev", NULL);
        ASSERT(csr != NULL);
        dm_cert_t out;
        int rc = dm_ca_sign_csr(t.ca, csr, "dev-1", 30, &out, err, sizeof err);
        free(csr);
        if (rc == 0) free(out.cert_pem);
        ASSERT_INT_EQ(rc, CM_EINVAL);
        ASSERT(out.cert_pem == NULL);
        if (!strstr(err, want[i])) TEST__FAIL("kind %d: err \"%s\" lacks \"%s\"", kinds[i], err, want[i]);
    }
    ca_done(&t);
}

static void test_sign_rejects_garbage_and_bad_ids(void) {
    test_ca_t t;
    ca_make(&t);
    char err[256] = "";
    dm_cert_t out;
    ASSERT_INT_EQ(dm_ca_sign_csr(t.ca, "garbage", "dev-1", 30, &out, err, sizeof err), CM_EINVAL);
    ASSERT(strstr(err, "PEM") != NULL);
    ASSERT_INT_EQ(dm_ca_sign_csr(t.ca, "", "dev-1", 30, &out, err, sizeof err), CM_EINVAL);
    ASSERT_INT_EQ(dm_ca_sign_csr(t.ca,
                                 "-----BEGIN CERTIFICATE REQUEST-----\nMIIBADCBpwIBADAO\n"
                                 "-----END CERTIFICATE REQUEST-----\n",
                                 "dev-1", 30, &out, err, sizeof err),
                  CM_EINVAL);
    /* A certificate is not a request. */
    ASSERT_INT_EQ(dm_ca_sign_csr(t.ca, t.cert_pem, "dev-1", 30, &out, err, sizeof err), CM_EINVAL);
    ASSERT_INT_EQ(dm_ca_sign_csr(t.ca, NULL, "dev-1", 30, &out, err, sizeof err), CM_EINVAL);

    char *csr = make_csr(KEY_P256, "dev", NULL);
    char long_id[70];
    memset(long_id, 'd', 65);
    long_id[65] = '\0';
    int rc_empty = dm_ca_sign_csr(t.ca, csr, "", 30, &out, err, sizeof err);
    int rc_long = dm_ca_sign_csr(t.ca, csr, long_id, 30, &out, err, sizeof err);
    int rc_ctrl = dm_ca_sign_csr(t.ca, csr, "dev\n1", 30, &out, err, sizeof err);
    int rc_days = dm_ca_sign_csr(t.ca, csr, "dev-1", 0, &out, err, sizeof err);
    long_id[64] = '\0'; /* exactly the RFC 5280 limit is fine */
    int rc_64 = dm_ca_sign_csr(t.ca, csr, long_id, 30, &out, err, sizeof err);
    if (rc_64 == 0) free(out.cert_pem);
    free(csr);
    ca_done(&t);
    ASSERT_INT_EQ(rc_empty, CM_EINVAL);
    ASSERT_INT_EQ(rc_long, CM_EINVAL);
    ASSERT_INT_EQ(rc_ctrl, CM_EINVAL);
    ASSERT_INT_EQ(rc_days, CM_EINVAL);
    ASSERT_INT_EQ(rc_64, 0);
}

static void test_crl_revokes(void) {
    test_ca_t t;
    ca_make(&t);
    char err[256] = "";
    char *csr = make_csr(KEY_P256, "dev", NULL);
    dm_cert_t c1, c2;
    ASSERT_INT_EQ(dm_ca_sign_csr(t.ca, csr, "dev-1", 30, &c1, err, sizeof err), 0);
    ASSERT_INT_EQ(dm_ca_sign_csr(t.ca, csr, "dev-2", 30, &c2, err, sizeof err), 0);
    free(csr);
    X509 *x1 = pem_cert(c1.cert_pem), *x2 = pem_cert(c2.cert_pem);

    int64_t now = (int64_t)time(NULL), when = now - 3600;
    dm_revoked_t rev[2] = {{c1.serial_hex, when, 1}, {"0123456789abcdef", when - 10, 0}};
    char *pem = NULL;
    ASSERT_INT_EQ(dm_ca_crl(t.ca, rev, 2, 7, 24, &pem, err, sizeof err), 0);
    X509_CRL *crl = pem_crl(pem);
    free(pem);
    ASSERT(crl != NULL);

    ASSERT_INT_EQ(X509_CRL_verify(crl, X509_get0_pubkey(t.cert)), 1);
    ASSERT_INT_EQ(X509_CRL_get_version(crl), X509_CRL_VERSION_2);
    ASSERT_INT_EQ(X509_NAME_cmp(X509_CRL_get_issuer(crl), X509_get_subject_name(t.cert)), 0);
    int64_t last = asn1_unix(X509_CRL_get0_lastUpdate(crl)), next = asn1_unix(X509_CRL_get0_nextUpdate(crl));
    ASSERT(last >= now - 5 && last <= now + 5);
    ASSERT_INT_EQ(next - last, 24 * 3600);

    ASN1_INTEGER *num = X509_CRL_get_ext_d2i(crl, NID_crl_number, NULL, NULL);
    ASSERT(num != NULL);
    long n = ASN1_INTEGER_get(num);
    ASN1_INTEGER_free(num);
    ASSERT_INT_EQ(n, 7);
    AUTHORITY_KEYID *akid = X509_CRL_get_ext_d2i(crl, NID_authority_key_identifier, NULL, NULL);
    ASSERT(akid != NULL);
    int akid_ok = akid->keyid && ASN1_OCTET_STRING_cmp(akid->keyid, X509_get0_subject_key_id(t.cert)) == 0;
    AUTHORITY_KEYID_free(akid);
    ASSERT(akid_ok);

    /* Entry for c1: revocation time and reason keyCompromise. */
    X509_REVOKED *entry = NULL;
    ASSERT_INT_EQ(X509_CRL_get0_by_serial(crl, &entry, X509_get0_serialNumber(x1)), 1);
    ASSERT_INT_EQ(asn1_unix(X509_REVOKED_get0_revocationDate(entry)), when);
    ASN1_ENUMERATED *reason = X509_REVOKED_get_ext_d2i(entry, NID_crl_reason, NULL, NULL);
    ASSERT(reason != NULL);
    long r = ASN1_ENUMERATED_get(reason);
    ASN1_ENUMERATED_free(reason);
    ASSERT_INT_EQ(r, 1);
    /* The "unspecified" entry carries no reason extension (RFC 5280 5.3.1). */
    ASSERT_INT_EQ(sk_X509_REVOKED_num(X509_CRL_get_REVOKED(crl)), 2);
    for (int i = 0; i < 2; i++) {
        X509_REVOKED *e = sk_X509_REVOKED_value(X509_CRL_get_REVOKED(crl), i);
        if (e != entry) ASSERT_INT_EQ(X509_REVOKED_get_ext_by_NID(e, NID_crl_reason, -1), -1);
    }
    ASSERT_INT_EQ(X509_CRL_get0_by_serial(crl, &entry, X509_get0_serialNumber(x2)), 0);

    /* Chain verification with the CRL: c1 revoked, c2 fine. */
    ASSERT_INT_EQ(verify_chain(t.cert, x1, crl), X509_V_ERR_CERT_REVOKED);
    ASSERT_INT_EQ(verify_chain(t.cert, x2, crl), X509_V_OK);

    /* An empty CRL is valid and revokes nothing. */
    X509_CRL *empty = NULL;
    ASSERT_INT_EQ(dm_ca_crl(t.ca, NULL, 0, 8, 1, &pem, err, sizeof err), 0);
    empty = pem_crl(pem);
    free(pem);
    int v_empty = verify_chain(t.cert, x1, empty);
    X509_CRL_free(empty);
    ASSERT_INT_EQ(v_empty, X509_V_OK);

    X509_CRL_free(crl);
    X509_free(x1);
    X509_free(x2);
    free(c1.cert_pem);
    free(c2.cert_pem);
    ca_done(&t);
}

static void test_crl_rejects_bad_input(void) {
    test_ca_t t;
    ca_make(&t);
    char err[256] = "";
    char *pem = (char *)1;
    const char *bad[] = {"", "xyz", "-1", "00", "0x12", "12 34", "00112233445566778899aabbccddeeff001122334"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        dm_revoked_t r = {bad[i], 0, 0};
        int rc = dm_ca_crl(t.ca, &r, 1, 1, 24, &pem, err, sizeof err);
        if (rc != CM_EINVAL) TEST__FAIL("serial \"%s\": rc %d", bad[i], rc);
        ASSERT(pem == NULL);
        ASSERT(strstr(err, "malformed serial") != NULL);
    }
    dm_revoked_t r = {NULL, 0, 0};
    ASSERT_INT_EQ(dm_ca_crl(t.ca, &r, 1, 1, 24, &pem, err, sizeof err), CM_EINVAL);
    dm_revoked_t reason7 = {"01", 0, 7};
    ASSERT_INT_EQ(dm_ca_crl(t.ca, &reason7, 1, 1, 24, &pem, err, sizeof err), CM_EINVAL);
    dm_revoked_t ok = {"ABCDEF", 0, 4}; /* upper case accepted */
    ASSERT_INT_EQ(dm_ca_crl(t.ca, &ok, 1, -1, 24, &pem, err, sizeof err), CM_EINVAL);
    ASSERT_INT_EQ(dm_ca_crl(t.ca, &ok, 1, 1, 0, &pem, err, sizeof err), CM_EINVAL);
    ASSERT_INT_EQ(dm_ca_crl(t.ca, &ok, 1, 1, 24, &pem, err, sizeof err), 0);
    free(pem);
    ca_done(&t);
}

enum { SIGN_THREADS = 2, SIGN_PER_THREAD = 50 };

typedef struct {
    const dm_ca_t *ca;
    const char *csr;
    char serials[SIGN_PER_THREAD][41];
    int failures;
    char err[256];
} signer_t;

static void *signer_main(void *arg) {
    signer_t *s = arg;
    for (int i = 0; i < SIGN_PER_THREAD; i++) {
        dm_cert_t out;
        char id[32];
        snprintf(id, sizeof id, "dev-%d", i);
        if (dm_ca_sign_csr(s->ca, s->csr, id, 30, &out, s->err, sizeof s->err) != 0) {
            s->failures++;
            continue;
        }
        memcpy(s->serials[i], out.serial_hex, sizeof out.serial_hex);
        free(out.cert_pem);
    }
    return NULL;
}

static int cmp_serial(const void *a, const void *b) { return strcmp(a, b); }

static void test_concurrent_signing(void) {
    test_ca_t t;
    ca_make(&t);
    char *csr = make_csr(KEY_P256, "dev", NULL);
    signer_t s[SIGN_THREADS];
    pthread_t th[SIGN_THREADS];
    for (int i = 0; i < SIGN_THREADS; i++) {
        memset(&s[i], 0, sizeof s[i]);
        s[i].ca = t.ca;
        s[i].csr = csr;
        ASSERT_INT_EQ(pthread_create(&th[i], NULL, signer_main, &s[i]), 0);
    }
    for (int i = 0; i < SIGN_THREADS; i++) pthread_join(th[i], NULL);
    free(csr);
    ca_done(&t);

    static char all[SIGN_THREADS * SIGN_PER_THREAD][41];
    for (int i = 0; i < SIGN_THREADS; i++) {
        if (s[i].failures) TEST__FAIL("thread %d: %d failures, last: %s", i, s[i].failures, s[i].err);
        memcpy(all[i * SIGN_PER_THREAD], s[i].serials, sizeof s[i].serials);
    }
    qsort(all, SIGN_THREADS * SIGN_PER_THREAD, sizeof all[0], cmp_serial);
    for (int i = 0; i < SIGN_THREADS * SIGN_PER_THREAD; i++) {
        ASSERT_INT_EQ(strlen(all[i]), 32);
        if (i > 0 && strcmp(all[i - 1], all[i]) == 0) TEST__FAIL("duplicate serial %s", all[i]);
    }
}

TEST_MAIN(TEST_ENTRY(test_generate_and_load), TEST_ENTRY(test_generate_rejects_bad_arguments),
          TEST_ENTRY(test_load_rejects_mismatched_key), TEST_ENTRY(test_load_rejects_non_ca),
          TEST_ENTRY(test_load_rejects_garbage_and_encrypted_keys), TEST_ENTRY(test_sign_csr_verifies),
          TEST_ENTRY(test_sign_accepts_p384_and_rsa2048), TEST_ENTRY(test_sign_rejects_tampered_csr),
          TEST_ENTRY(test_sign_rejects_weak_or_other_keys), TEST_ENTRY(test_sign_rejects_garbage_and_bad_ids),
          TEST_ENTRY(test_crl_revokes), TEST_ENTRY(test_crl_rejects_bad_input), TEST_ENTRY(test_concurrent_signing))
