#ifndef XTS_P11_SHIM_H
#define XTS_P11_SHIM_H
// The PKCS#11 provider's C side: p11-kit parses the RFC 7512 URI and loads the module;
// this file only sequences the PKCS#11 calls (whose constants are macros Swift cannot
// import, and whose GCM parameters are a C struct). Every function returns one of the
// XTS_P11_* codes and leaves the raw CK_RV in *rv for the message.
#include <p11-kit/p11-kit.h>
#include <p11-kit/uri.h>
#include <p11-kit/pkcs11.h>
#include <string.h>
#include <stdlib.h>

enum {
    XTS_P11_OK = 0,
    XTS_P11_BAD_URI = 1,
    XTS_P11_NO_MODULE = 2,
    XTS_P11_NO_TOKEN = 3,
    XTS_P11_MANY_TOKENS = 4,
    XTS_P11_PIN_INCORRECT = 5,
    XTS_P11_PIN_LOCKED = 6,
    XTS_P11_NO_KEY = 7,
    XTS_P11_MANY_KEYS = 8,
    XTS_P11_KEY_EXISTS = 9,
    XTS_P11_EXTRACTABLE = 10,
    XTS_P11_WRONG_KEY = 11,
    XTS_P11_FAILED = 12,
    XTS_P11_PIN_IN_URI = 13,
    XTS_P11_NO_OBJECT = 14,
};

typedef struct {
    CK_FUNCTION_LIST **modules;   /* registered modules, or NULL */
    CK_FUNCTION_LIST *single;     /* an explicit module, or NULL */
    CK_FUNCTION_LIST *module;     /* the one holding the token */
    CK_SESSION_HANDLE session;
    CK_OBJECT_HANDLE key;
    int has_session;
    char token_label[33];
} xts_p11;

/* Loads the module(s), finds exactly one token matching `uri_text` (by label and the
   other token attributes the URI names, never by slot number), opens a session and
   logs in with the PIN. */
static inline int xts_p11_open(xts_p11 *ctx, const char *uri_text, const char *module_path,
                               const unsigned char *pin, unsigned long pin_len, unsigned long *rv) {
    memset(ctx, 0, sizeof *ctx);
    *rv = 0;
    P11KitUri *uri = p11_kit_uri_new();
    if (p11_kit_uri_parse(uri_text, P11_KIT_URI_FOR_ANY, uri) != P11_KIT_URI_OK) { p11_kit_uri_free(uri); return XTS_P11_BAD_URI; }
    if (p11_kit_uri_get_pin_value(uri) != NULL) { p11_kit_uri_free(uri); return XTS_P11_PIN_IN_URI; }
    CK_FUNCTION_LIST *one[2] = { NULL, NULL };
    CK_FUNCTION_LIST **list;
    if (module_path && *module_path) {
        ctx->single = p11_kit_module_load(module_path, 0);
        if (!ctx->single) { p11_kit_uri_free(uri); return XTS_P11_NO_MODULE; }
        *rv = p11_kit_module_initialize(ctx->single);
        if (*rv != CKR_OK) { p11_kit_module_release(ctx->single); ctx->single = NULL; p11_kit_uri_free(uri); return XTS_P11_NO_MODULE; }
        one[0] = ctx->single;
        list = one;
    } else {
        ctx->modules = p11_kit_modules_load_and_initialize(0);
        if (!ctx->modules || !ctx->modules[0]) { p11_kit_uri_free(uri); return XTS_P11_NO_MODULE; }
        list = ctx->modules;
    }
    int found = 0;
    CK_SLOT_ID slot = 0;
    for (int m = 0; list[m]; m++) {
        CK_INFO minfo;
        if (list[m]->C_GetInfo(&minfo) != CKR_OK || !p11_kit_uri_match_module_info(uri, &minfo)) continue;
        CK_ULONG n = 0;
        if (list[m]->C_GetSlotList(CK_TRUE, NULL, &n) != CKR_OK || n == 0) continue;
        CK_SLOT_ID *slots = calloc(n, sizeof *slots);
        if (!slots) continue;
        if (list[m]->C_GetSlotList(CK_TRUE, slots, &n) == CKR_OK) {
            for (CK_ULONG i = 0; i < n; i++) {
                CK_TOKEN_INFO info;
                if (list[m]->C_GetTokenInfo(slots[i], &info) != CKR_OK) continue;
                if (!p11_kit_uri_match_token_info(uri, &info)) continue;
                found++;
                ctx->module = list[m];
                slot = slots[i];
                memcpy(ctx->token_label, info.label, 32);
                ctx->token_label[32] = 0;
                for (int k = 31; k >= 0 && ctx->token_label[k] == ' '; k--) ctx->token_label[k] = 0;
            }
        }
        free(slots);
    }
    p11_kit_uri_free(uri);
    if (found == 0) return XTS_P11_NO_TOKEN;
    if (found > 1) return XTS_P11_MANY_TOKENS;
    *rv = ctx->module->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &ctx->session);
    if (*rv != CKR_OK) return XTS_P11_FAILED;
    ctx->has_session = 1;
    *rv = ctx->module->C_Login(ctx->session, CKU_USER, (unsigned char *)pin, pin_len);
    if (*rv == CKR_PIN_INCORRECT) return XTS_P11_PIN_INCORRECT;
    if (*rv == CKR_PIN_LOCKED) return XTS_P11_PIN_LOCKED;
    if (*rv != CKR_OK && *rv != CKR_USER_ALREADY_LOGGED_IN) return XTS_P11_FAILED;
    *rv = 0;
    return XTS_P11_OK;
}

/* Builds the search template of an AES secret key named by the URI's object label and id. */
static inline int xts_p11_template(P11KitUri *uri, CK_ATTRIBUTE *t, CK_OBJECT_CLASS *cls, CK_KEY_TYPE *kt) {
    int n = 0;
    t[n].type = CKA_CLASS; t[n].pValue = cls; t[n].ulValueLen = sizeof *cls; n++;
    t[n].type = CKA_KEY_TYPE; t[n].pValue = kt; t[n].ulValueLen = sizeof *kt; n++;
    CK_ATTRIBUTE *label = p11_kit_uri_get_attribute(uri, CKA_LABEL);
    CK_ATTRIBUTE *id = p11_kit_uri_get_attribute(uri, CKA_ID);
    if (label) t[n++] = *label;
    if (id) t[n++] = *id;
    return (label || id) ? n : -1;
}

static inline int xts_p11_find_key(xts_p11 *ctx, const char *uri_text, unsigned long *rv) {
    *rv = 0;
    P11KitUri *uri = p11_kit_uri_new();
    if (p11_kit_uri_parse(uri_text, P11_KIT_URI_FOR_ANY, uri) != P11_KIT_URI_OK) { p11_kit_uri_free(uri); return XTS_P11_BAD_URI; }
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_ATTRIBUTE t[4];
    int n = xts_p11_template(uri, t, &cls, &kt);
    if (n < 0) { p11_kit_uri_free(uri); return XTS_P11_NO_OBJECT; }
    CK_OBJECT_HANDLE found[2];
    CK_ULONG count = 0;
    *rv = ctx->module->C_FindObjectsInit(ctx->session, t, (CK_ULONG)n);
    if (*rv == CKR_OK) {
        *rv = ctx->module->C_FindObjects(ctx->session, found, 2, &count);
        ctx->module->C_FindObjectsFinal(ctx->session);
    }
    p11_kit_uri_free(uri);
    if (*rv != CKR_OK) return XTS_P11_FAILED;
    if (count == 0) return XTS_P11_NO_KEY;
    if (count > 1) return XTS_P11_MANY_KEYS;
    ctx->key = found[0];
    return XTS_P11_OK;
}

/* Refuses a key that may leave the token. */
static inline int xts_p11_check_key(xts_p11 *ctx, unsigned long *rv) {
    CK_BBOOL extractable = CK_TRUE, sensitive = CK_FALSE;
    CK_ATTRIBUTE t[2] = { { CKA_EXTRACTABLE, &extractable, sizeof extractable }, { CKA_SENSITIVE, &sensitive, sizeof sensitive } };
    *rv = ctx->module->C_GetAttributeValue(ctx->session, ctx->key, t, 2);
    if (*rv != CKR_OK) return XTS_P11_FAILED;
    if (extractable || !sensitive) return XTS_P11_EXTRACTABLE;
    return XTS_P11_OK;
}

/* Creates a non-extractable, sensitive AES-256 key in the token, labelled by the URI. */
static inline int xts_p11_generate(xts_p11 *ctx, const char *uri_text, unsigned long *rv) {
    int r = xts_p11_find_key(ctx, uri_text, rv);
    if (r == XTS_P11_OK || r == XTS_P11_MANY_KEYS) return XTS_P11_KEY_EXISTS;
    if (r != XTS_P11_NO_KEY) return r;
    P11KitUri *uri = p11_kit_uri_new();
    if (p11_kit_uri_parse(uri_text, P11_KIT_URI_FOR_ANY, uri) != P11_KIT_URI_OK) { p11_kit_uri_free(uri); return XTS_P11_BAD_URI; }
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_ULONG len = 32;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE t[14];
    int n = xts_p11_template(uri, t, &cls, &kt);
    if (n < 0) { p11_kit_uri_free(uri); return XTS_P11_NO_OBJECT; }
    t[n].type = CKA_VALUE_LEN; t[n].pValue = &len; t[n].ulValueLen = sizeof len; n++;
    t[n].type = CKA_TOKEN; t[n].pValue = &yes; t[n].ulValueLen = 1; n++;
    t[n].type = CKA_PRIVATE; t[n].pValue = &yes; t[n].ulValueLen = 1; n++;
    t[n].type = CKA_SENSITIVE; t[n].pValue = &yes; t[n].ulValueLen = 1; n++;
    t[n].type = CKA_EXTRACTABLE; t[n].pValue = &no; t[n].ulValueLen = 1; n++;
    t[n].type = CKA_ENCRYPT; t[n].pValue = &yes; t[n].ulValueLen = 1; n++;
    t[n].type = CKA_DECRYPT; t[n].pValue = &yes; t[n].ulValueLen = 1; n++;
    CK_MECHANISM mech = { CKM_AES_KEY_GEN, NULL, 0 };
    /* The class and key type come from the mechanism: skip the first two entries. */
    *rv = ctx->module->C_GenerateKey(ctx->session, &mech, t + 2, (CK_ULONG)(n - 2), &ctx->key);
    p11_kit_uri_free(uri);
    return *rv == CKR_OK ? XTS_P11_OK : XTS_P11_FAILED;
}

/* AES-GCM in the token with a 128-bit tag; `aad` binds the result to the volume. */
static inline int xts_p11_gcm(xts_p11 *ctx, int encrypt, unsigned char *iv, unsigned char *aad, unsigned long aad_len,
                              const unsigned char *in, unsigned long in_len, unsigned char *out, unsigned long *out_len,
                              unsigned long *rv) {
    CK_GCM_PARAMS gcm = { iv, 12, 96, aad, aad_len, 128 };
    CK_MECHANISM mech = { CKM_AES_GCM, &gcm, sizeof gcm };
    CK_ULONG olen = *out_len;
    if (encrypt) {
        *rv = ctx->module->C_EncryptInit(ctx->session, &mech, ctx->key);
        if (*rv == CKR_OK) *rv = ctx->module->C_Encrypt(ctx->session, (unsigned char *)in, in_len, out, &olen);
    } else {
        *rv = ctx->module->C_DecryptInit(ctx->session, &mech, ctx->key);
        if (*rv == CKR_OK) *rv = ctx->module->C_Decrypt(ctx->session, (unsigned char *)in, in_len, out, &olen);
    }
    *out_len = olen;
    if (*rv == CKR_ENCRYPTED_DATA_INVALID || *rv == CKR_ENCRYPTED_DATA_LEN_RANGE) return XTS_P11_WRONG_KEY;
    return *rv == CKR_OK ? XTS_P11_OK : XTS_P11_FAILED;
}

static inline void xts_p11_close(xts_p11 *ctx) {
    if (ctx->has_session && ctx->module) {
        ctx->module->C_Logout(ctx->session);
        ctx->module->C_CloseSession(ctx->session);
    }
    if (ctx->single) { p11_kit_module_finalize(ctx->single); p11_kit_module_release(ctx->single); }
    if (ctx->modules) p11_kit_modules_finalize_and_release(ctx->modules);
    memset(ctx, 0, sizeof *ctx);
}
#endif
