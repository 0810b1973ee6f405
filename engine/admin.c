/* SPDX-License-Identifier: MIT */
/*
 * The admin API's request core on libmicrohttpd: one access handler
 * takes each request through authentication, routing, path decoding and
 * body checks in a fixed order, hands it to the route's handler once the
 * body is in, and sends the reply the handler set, counting and timing
 * every request per route template. The routes themselves live in
 * admin_routes.c.
 *
 * Order of checks: bearer token (except /healthz, /metrics and Twilio's
 * signed callbacks), then
 * route (404), method (405), path ids (400), media type (415) and size
 * (413), all before any byte of the body is read; then the handler.
 */
#include "admin.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#include <microhttpd.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "admin_internal.h"
#include "fanout/common.h"
#include "log.h"
#include "metrics.h"
#include "urlenc.h"

#define FO_ADMIN_POOL_THREADS 2u
#define FO_ADMIN_CONN_LIMIT 1024u
/* Per-connection memory for the request line, headers and read buffer:
 * room for a device token of 4096 characters percent-encoded in a path. */
#define FO_ADMIN_CONN_MEMORY ((size_t)64 * 1024)
#define FO_ADMIN_DEFAULT_BODY ((size_t)1024 * 1024)
#define FO_ADMIN_DEFAULT_TIMEOUT_S 30
#define FO_ADMIN_DEFAULT_PUBLISH_MS 5000
#define FO_ADMIN_TOKEN_PARAM_MAX 4096
#define FO_ADMIN_ID_MAX 128
#define FO_ADMIN_BODY_CHUNK ((size_t)64 * 1024)

static const char fo_admin_json_type[] = "application/json";

/* ---- replies ---- */

bool fo_admin__utf8_valid(const char *s, size_t n) {
  const unsigned char *p = (const unsigned char *)s;
  size_t i = 0;

  while (i < n) {
    unsigned c = p[i];
    size_t len;
    uint32_t cp;

    if (c < 0x80) {
      i++;
      continue;
    }
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
      cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (n - i < len)
      return false;
    for (size_t k = 1; k < len; k++) {
      if ((p[i + k] & 0xC0) != 0x80)
        return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
      return false;
    i += len;
  }
  return true;
}

/* A JSON string of `s` with every byte of an invalid UTF-8 sequence
 * replaced by '?'. */
static json_t *fo_admin_jstr(const char *s) {
  size_t n = strlen(s);
  json_t *j;
  char *copy;

  if (fo_admin__utf8_valid(s, n))
    return json_stringn(s, n);
  copy = malloc(n + 1);
  if (copy == NULL)
    return NULL;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];

    copy[i] = c < 0x80 ? (char)c : '?';
  }
  copy[n] = '\0';
  j = json_stringn(copy, n);
  free(copy);
  return j;
}

static void fo_admin_reply_reset(fo_admin_req *r) {
  free(r->resp);
  r->resp = NULL;
  r->resp_len = 0;
  r->allow = NULL;
  r->www_authenticate = false;
}

void fo_admin__reply_raw(fo_admin_req *r, unsigned status,
                         const char *ctype, char *buf, size_t len) {
  fo_admin_reply_reset(r);
  r->replied = true;
  r->status = status;
  r->ctype = ctype;
  r->resp = buf;
  r->resp_len = len;
}

void fo_admin__reply_empty(fo_admin_req *r, unsigned status) {
  fo_admin__reply_raw(r, status, NULL, NULL, 0);
}

/* The last resort when even an error body cannot be built. */
static void fo_admin_reply_oom(fo_admin_req *r) {
  static const char body[] =
      "{\"error\":{\"code\":\"internal\",\"message\":\"out of memory\"}}";
  char *copy = malloc(sizeof(body));

  if (copy != NULL)
    memcpy(copy, body, sizeof(body));
  fo_admin__reply_raw(r, MHD_HTTP_INTERNAL_SERVER_ERROR, fo_admin_json_type,
                      copy, copy != NULL ? sizeof(body) - 1 : 0);
}

void fo_admin__reply_json(fo_admin_req *r, unsigned status, json_t *body) {
  size_t n;
  char *buf;

  if (body == NULL) {
    fo_admin_reply_oom(r);
    return;
  }
  /* Dumped into our own allocation, which libmicrohttpd frees. */
  n = json_dumpb(body, NULL, 0, JSON_COMPACT);
  buf = n > 0 ? malloc(n) : NULL;
  if (buf == NULL || json_dumpb(body, buf, n, JSON_COMPACT) != n) {
    free(buf);
    json_decref(body);
    fo_admin_reply_oom(r);
    return;
  }
  json_decref(body);
  fo_admin__reply_raw(r, status, fo_admin_json_type, buf, n);
}

void fo_admin__error(fo_admin_req *r, unsigned status, const char *code,
                     const char *field, const char *fmt, ...) {
  char msg[320];
  json_t *err;
  va_list ap;

  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);

  err = json_object();
  if (err == NULL ||
      json_object_set_new(err, "code", json_string(code)) != 0 ||
      json_object_set_new(err, "message", fo_admin_jstr(msg)) != 0 ||
      (field != NULL && *field != '\0' &&
       json_object_set_new(err, "field", fo_admin_jstr(field)) != 0)) {
    json_decref(err);
    fo_admin_reply_oom(r);
    return;
  }
  fo_admin__reply_json(r, status, json_pack("{s:o}", "error", err));
}

void fo_admin__store_error(fo_admin_req *r, int rc, const char *what) {
  switch (rc) {
  case FO_ENOENT:
    fo_admin__error(r, MHD_HTTP_NOT_FOUND, "not_found", NULL, "no such %s",
                    what);
    break;
  case FO_EINVAL:
    fo_admin__error(r, MHD_HTTP_UNPROCESSABLE_CONTENT, "invalid_input", NULL,
                    "the database refused the input");
    break;
  case FO_EIO:
    fo_admin__error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "unavailable", NULL,
                    "the database is unavailable; try again later");
    break;
  default:
    fo_admin__error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", NULL,
                    "%s", fo_strerror(rc));
    break;
  }
}

json_t *fo_admin__body_json(fo_admin_req *r) {
  json_error_t jerr;
  json_t *v;

  if (r->body_len == 0) {
    fo_admin__error(r, MHD_HTTP_BAD_REQUEST, "invalid_json", NULL,
                    "the request body is empty");
    return NULL;
  }
  v = json_loadb(r->body, r->body_len,
                JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
  if (v == NULL) {
    /* jerr.text may quote a token of the input: fo_admin__error keeps
     * the reply valid UTF-8 whatever it holds. */
    fo_admin__error(r, MHD_HTTP_BAD_REQUEST, "invalid_json", NULL,
                    "invalid JSON at line %d, column %d: %s", jerr.line,
                    jerr.column, jerr.text);
    return NULL;
  }
  return v;
}

/* ---- publishing with a parked connection ---- */

static void fo_admin_publish_done(int rc, void *arg) {
  fo_admin_req *r = arg;
  fo_admin *a = r->a;

  /* Nothing of `r` is touched after the unlock: once resumed, the
   * request may finish and be freed on a libmicrohttpd thread. */
  pthread_mutex_lock(&a->mu);
  r->pub_rc = rc;
  r->pub_state = FO_ADMIN_PUB_DONE;
  if (r->suspended) {
    r->suspended = false;
    MHD_resume_connection(r->conn);
  }
  pthread_mutex_unlock(&a->mu);
}

/* A request that published is counted until libmicrohttpd is done with
 * it, so that stopping lets its answer go out first. */
static void fo_admin_uncount(fo_admin *a) {
  pthread_mutex_lock(&a->mu);
  a->inflight--;
  if (a->inflight == 0)
    pthread_cond_broadcast(&a->cv);
  pthread_mutex_unlock(&a->mu);
}

int fo_admin__publish(fo_admin_req *r, const char *key, const void *value,
                      size_t len) {
  fo_admin *a = r->a;
  int rc;

  pthread_mutex_lock(&a->mu);
  if (a->stopping) {
    pthread_mutex_unlock(&a->mu);
    return FO_ECLOSED;
  }
  a->inflight++;
  r->pub_state = FO_ADMIN_PUB_WAITING;
  pthread_mutex_unlock(&a->mu);

  rc = fo_publish_send_async(a->publish, key, value, len,
                             a->publish_timeout_ms, fo_admin_publish_done,
                             r);
  if (rc != FO_OK) {
    pthread_mutex_lock(&a->mu);
    r->pub_state = FO_ADMIN_PUB_NONE;
    pthread_mutex_unlock(&a->mu);
    fo_admin_uncount(a);
  }
  return rc;
}

/* ---- authentication ---- */

static void fo_admin_sha256(const char *s, size_t n, unsigned char *out) {
  unsigned int len = 32;

  /* A digest failure leaves a buffer no token can match. */
  if (EVP_Digest(s, n, out, &len, EVP_sha256(), NULL) != 1)
    memset(out, 0xFF, 32);
}

/*
 * Compares digests rather than the tokens themselves, so the time taken
 * depends neither on where the first difference is nor on the length of
 * either token.
 */
static bool fo_admin_authorized(fo_admin *a, struct MHD_Connection *conn) {
  const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                              MHD_HTTP_HEADER_AUTHORIZATION);
  unsigned char got[32];

  if (h == NULL || strncasecmp(h, "Bearer ", 7) != 0)
    return false;
  h += 7;
  while (*h == ' ')
    h++;
  if (*h == '\0')
    return false;
  fo_admin_sha256(h, strlen(h), got);
  return CRYPTO_memcmp(got, a->token_sha256, sizeof(got)) == 0;
}

/* ---- routing ---- */

/* User and event ids: 1-128 bytes of UTF-8 without control characters
 * (C0, DEL, C1), the rule events apply to ids and recipients. "." and
 * ".." are refused as clients and proxies rewrite such segments. */
static bool fo_admin_id_ok(const char *s, size_t n) {
  const unsigned char *p = (const unsigned char *)s;

  if (n == 0 || n > FO_ADMIN_ID_MAX || !fo_admin__utf8_valid(s, n))
    return false;
  if (strcmp(s, ".") == 0 || strcmp(s, "..") == 0)
    return false;
  for (size_t i = 0; i < n; i++) {
    if (p[i] < 0x20 || p[i] == 0x7F)
      return false;
    if (p[i] == 0xC2 && i + 1 < n && p[i + 1] >= 0x80 && p[i + 1] <= 0x9F)
      return false;
  }
  return true;
}

/* Device tokens: 1-4096 visible ASCII characters. */
static bool fo_admin_token_ok(const char *s, size_t n) {
  if (n == 0 || n > FO_ADMIN_TOKEN_PARAM_MAX)
    return false;
  for (size_t i = 0; i < n; i++) {
    if (s[i] < 0x21 || s[i] > 0x7E)
      return false;
  }
  return true;
}

/* Splits the raw path (no query) into segments after the leading '/'.
 * Returns how many, or -1 when there are too many. */
static int fo_admin_split(const char *path, size_t pathlen,
                          const char **seg, size_t *seglen) {
  int n = 0;
  size_t i = 1;

  if (pathlen == 0 || path[0] != '/')
    return -1;
  for (;;) {
    size_t start = i;

    while (i < pathlen && path[i] != '/')
      i++;
    if (n == FO_ADMIN_MAX_SEGS)
      return -1;
    seg[n] = path + start;
    seglen[n] = i - start;
    n++;
    if (i >= pathlen)
      return n;
    i++;
  }
}

static const fo_admin_route *fo_admin_match(const char *path,
                                            const char **seg,
                                            size_t *seglen, int *nseg) {
  size_t pathlen = strcspn(path, "?#");

  *nseg = fo_admin_split(path, pathlen, seg, seglen);
  if (*nseg < 0)
    return NULL;
  for (size_t r = 0; r < fo_admin__nroutes; r++) {
    const fo_admin_route *rt = &fo_admin__routes[r];
    int k = 0;

    for (; k < *nseg && rt->segs[k] != NULL; k++) {
      const char *want = rt->segs[k];

      if (want[0] == '{')
        continue;
      if (strlen(want) != seglen[k] || memcmp(want, seg[k], seglen[k]) != 0)
        break;
    }
    if (k == *nseg && rt->segs[k] == NULL)
      return rt;
  }
  return NULL;
}

/* Decodes and checks the route's parameters into r->params; sets a 400
 * reply and returns false when one is not acceptable. */
static bool fo_admin_params(fo_admin_req *r, const char **seg,
                            const size_t *seglen) {
  int np = 0;

  for (int k = 0; r->route->segs[k] != NULL; k++) {
    const char *name = r->route->segs[k];
    bool token = strcmp(name, "{token}") == 0;
    int rc = FO_OK;
    char *v;

    if (name[0] != '{')
      continue;
    /* A malformed escape, and %00 (which no valid id or token holds),
     * is refused like any other invalid value. */
    v = fo_url_unescape(seg[k], seglen[k], false, &rc);
    if (v == NULL && rc == FO_ENOMEM) {
      fo_admin_reply_oom(r);
      return false;
    }
    if (v != NULL) {
      size_t len = strlen(v);

      r->params[np++] = v;
      if (token ? fo_admin_token_ok(v, len) : fo_admin_id_ok(v, len))
        continue;
    }
    if (token)
      fo_admin__error(r, MHD_HTTP_BAD_REQUEST, "invalid_path", "token",
                      "the device token in the path must be 1-%d visible "
                      "ASCII characters, percent-encoded as needed",
                      FO_ADMIN_TOKEN_PARAM_MAX);
    else
      fo_admin__error(r, MHD_HTTP_BAD_REQUEST, "invalid_path", "id",
                      "the id in the path must be 1-%d bytes of UTF-8 "
                      "without control characters, percent-encoded as "
                      "needed, and not \".\" or \"..\"",
                      FO_ADMIN_ID_MAX);
    return false;
  }
  return true;
}

/* True when the Content-Type names JSON ("application/json", any case,
 * with or without parameters), or merge-patch JSON where allowed. */
static bool fo_admin_json_ctype(const char *ct, bool merge_patch) {
  static const char json[] = "application/json";
  static const char patch[] = "application/merge-patch+json";
  size_t n;

  if (ct == NULL)
    return false;
  while (*ct == ' ' || *ct == '\t')
    ct++;
  n = strcspn(ct, "; \t");
  if (n == sizeof(json) - 1 && strncasecmp(ct, json, n) == 0)
    return true;
  return merge_patch && n == sizeof(patch) - 1 &&
         strncasecmp(ct, patch, n) == 0;
}

/* True when the Content-Type names a form body (Twilio's callbacks). */
static bool fo_admin_form_ctype(const char *ct) {
  static const char form[] = "application/x-www-form-urlencoded";
  size_t n;

  if (ct == NULL)
    return false;
  while (*ct == ' ' || *ct == '\t')
    ct++;
  n = strcspn(ct, "; \t");
  return n == sizeof(form) - 1 && strncasecmp(ct, form, n) == 0;
}

/* Reads Content-Length; false when absent or not a plain number. */
static bool fo_admin_content_length(struct MHD_Connection *conn,
                                    unsigned long long *out) {
  const char *v = MHD_lookup_connection_value(
      conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
  char *end;

  if (v == NULL || *v < '0' || *v > '9')
    return false;
  errno = 0;
  *out = strtoull(v, &end, 10);
  return errno == 0 && *end == '\0';
}

static void fo_admin_too_large(fo_admin_req *r) {
  fo_admin__error(r, MHD_HTTP_CONTENT_TOO_LARGE, "too_large", NULL,
                  "the request body is larger than %zu bytes",
                  r->body_limit);
}

/*
 * Everything decided from the request line and headers. Sets a reply
 * when the request is refused; otherwise prepares for its body.
 */
static void fo_admin_begin(fo_admin *a, fo_admin_req *r, const char *url) {
  const char *seg[FO_ADMIN_MAX_SEGS];
  size_t seglen[FO_ADMIN_MAX_SEGS];
  unsigned long long clen = 0;
  const char *method = r->method_name;
  bool has_clen, has_body;
  int nseg;

  r->route = fo_admin_match(url, seg, seglen, &nseg);

  /* Authentication comes first, so that a caller without the token
   * learns nothing, not even which routes exist. */
  if ((r->route == NULL || !r->route->open) &&
      !fo_admin_authorized(a, r->conn)) {
    fo_admin__error(r, MHD_HTTP_UNAUTHORIZED, "unauthorized", NULL,
                    "a valid \"Authorization: Bearer\" token is required");
    r->www_authenticate = true;
    return;
  }
  if (r->route == NULL) {
    fo_admin__error(r, MHD_HTTP_NOT_FOUND, "not_found", NULL,
                    "no such route");
    return;
  }
  /* HEAD is GET without the body; libmicrohttpd drops the body. */
  if (strcmp(method, MHD_HTTP_METHOD_HEAD) == 0)
    method = MHD_HTTP_METHOD_GET;
  for (const fo_admin_method *m = r->route->methods; m->name != NULL; m++) {
    if (strcmp(m->name, method) == 0) {
      r->method = m;
      break;
    }
  }
  if (r->method == NULL) {
    fo_admin__error(r, MHD_HTTP_METHOD_NOT_ALLOWED, "method_not_allowed",
                    NULL, "%s is not allowed here; allowed: %s",
                    r->method_name, r->route->allow);
    r->allow = r->route->allow;
    return;
  }
  if (!fo_admin_params(r, seg, seglen))
    return;

  has_clen = fo_admin_content_length(r->conn, &clen);
  has_body = (has_clen && clen > 0) ||
             MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND,
                                         MHD_HTTP_HEADER_TRANSFER_ENCODING) !=
                 NULL;
  r->keep_body = (r->method->flags & FO_ADMIN_BODY) != 0;
  r->body_limit = (r->method->flags & FO_ADMIN_EVENT_BODY) != 0
                      ? a->max_event_bytes
                      : a->max_body;
  if (has_body && r->keep_body &&
      (r->method->flags & FO_ADMIN_FORM_BODY) != 0) {
    if (!fo_admin_form_ctype(MHD_lookup_connection_value(
            r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_TYPE))) {
      fo_admin__error(r, MHD_HTTP_UNSUPPORTED_MEDIA_TYPE,
                      "unsupported_media_type", NULL,
                      "the body must be sent as "
                      "application/x-www-form-urlencoded");
      return;
    }
  } else if (has_body && r->keep_body &&
             !fo_admin_json_ctype(
                 MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND,
                                             MHD_HTTP_HEADER_CONTENT_TYPE),
                 (r->method->flags & FO_ADMIN_MERGE_PATCH) != 0)) {
    fo_admin__error(r, MHD_HTTP_UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type", NULL,
                    "the body must be sent as application/json%s",
                    (r->method->flags & FO_ADMIN_MERGE_PATCH) != 0
                        ? " or application/merge-patch+json"
                        : "");
    return;
  }
  /* Refused before reading a byte: the client is told at once (and an
   * "Expect: 100-continue" client never sends the body). */
  if (has_clen && clen > r->body_limit) {
    fo_admin_too_large(r);
    return;
  }
  /* Sized from Content-Length, but grown only as bytes arrive beyond
   * the first 64 KiB: a header alone never reserves a large buffer. */
  if (r->keep_body && has_clen && clen > 0) {
    r->body_cap = clen < FO_ADMIN_BODY_CHUNK ? (size_t)clen
                                             : FO_ADMIN_BODY_CHUNK;
    r->body = malloc(r->body_cap);
    if (r->body == NULL) {
      fo_admin_reply_oom(r);
      return;
    }
  }
}

/* Takes `n` bytes of the body. Returns false when the connection should
 * be dropped (a body far over the limit that keeps coming). */
static bool fo_admin_upload(fo_admin_req *r, const char *data, size_t n) {
  if (r->too_large || r->body_len + n > r->body_limit) {
    /* Without a Content-Length we learn the size only now; the reply
     * can be sent only after the body ends, so we drop what arrives, up
     * to once more the limit, and then hang up. */
    r->too_large = true;
    r->dropped += n;
    return r->dropped <= r->body_limit + FO_ADMIN_CONN_MEMORY;
  }
  if (!r->keep_body) {
    r->body_len += n;
    return true;
  }
  if (r->body_len + n > r->body_cap) {
    size_t cap = r->body_cap > 0 ? r->body_cap : 4096;
    char *nb;

    while (cap < r->body_len + n)
      cap *= 2;
    if (cap > r->body_limit)
      cap = r->body_limit;
    nb = realloc(r->body, cap);
    if (nb == NULL)
      return false;
    r->body = nb;
    r->body_cap = cap;
  }
  memcpy(r->body + r->body_len, data, n);
  r->body_len += n;
  return true;
}

/* ---- sending ---- */

static void fo_admin_account(fo_admin_req *r) {
  const char *route = r->route != NULL ? r->route->tmpl : "unmatched";
  int64_t us = fo_now_us() - r->start_us;
  char labels[160];

  snprintf(labels, sizeof(labels), "route=\"%s\",code=\"%u\"", route,
           r->status);
  fo_counter_add(fo_metrics_counter("fanout_admin_requests_total",
                                    "Admin API requests by route and status",
                                    labels),
                 1);
  snprintf(labels, sizeof(labels), "route=\"%s\"", route);
  fo_histogram_observe_us(
      fo_metrics_histogram("fanout_admin_request_seconds",
                           "Admin API request latency by route", labels),
      us);
  fo_log_debug("admin", "request", "method=%s route=\"%s\" status=%u us=%lld",
               r->method_name, route, r->status, (long long)us);
}

static enum MHD_Result fo_admin_send(fo_admin_req *r) {
  struct MHD_Response *resp;
  enum MHD_Result ret;

  resp = MHD_create_response_from_buffer(
      r->resp_len, r->resp,
      r->resp != NULL ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
  if (resp == NULL)
    return MHD_NO;
  r->resp = NULL;               /* libmicrohttpd frees it now */
  if ((r->ctype != NULL &&
       MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                               r->ctype) != MHD_YES) ||
      MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL,
                              "no-store") != MHD_YES ||
      (r->allow != NULL &&
       MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, r->allow) !=
           MHD_YES) ||
      (r->www_authenticate &&
       MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE,
                               "Bearer realm=\"fanout\"") != MHD_YES)) {
    MHD_destroy_response(resp);
    return MHD_NO;
  }
  ret = MHD_queue_response(r->conn, r->status, resp);
  MHD_destroy_response(resp);
  fo_admin_account(r);
  return ret;
}

/* Runs the handler once the body is complete; parks the connection when
 * it waits for Kafka. */
static enum MHD_Result fo_admin_run(fo_admin *a, fo_admin_req *r) {
  for (;;) {
    if (r->method->fn(a, r) == FO_ADMIN_DONE)
      return fo_admin_send(r);
    pthread_mutex_lock(&a->mu);
    if (r->pub_state == FO_ADMIN_PUB_DONE) {
      /* The acknowledgement came first: no need to park. */
      pthread_mutex_unlock(&a->mu);
      continue;
    }
    r->suspended = true;
    MHD_suspend_connection(r->conn);
    pthread_mutex_unlock(&a->mu);
    return MHD_YES;
  }
}

static enum MHD_Result fo_admin_access(void *cls, struct MHD_Connection *conn,
                                       const char *url, const char *method,
                                       const char *version,
                                       const char *upload_data,
                                       size_t *upload_data_size,
                                       void **con_cls) {
  fo_admin *a = cls;
  fo_admin_req *r = *con_cls;
  bool waiting;

  (void)version;
  if (r == NULL) {
    r = calloc(1, sizeof(*r));
    if (r == NULL)
      return MHD_NO;
    *con_cls = r;
    r->a = a;
    r->conn = conn;
    r->start_us = fo_now_us();
    snprintf(r->method_name, sizeof(r->method_name), "%s", method);
    fo_admin_begin(a, r, url);
    return r->replied ? fo_admin_send(r) : MHD_YES;
  }

  if (*upload_data_size > 0) {
    size_t n = *upload_data_size;

    *upload_data_size = 0;
    return fo_admin_upload(r, upload_data, n) ? MHD_YES : MHD_NO;
  }

  if (r->too_large) {
    fo_admin_too_large(r);
    return fo_admin_send(r);
  }
  pthread_mutex_lock(&a->mu);
  waiting = r->pub_state == FO_ADMIN_PUB_WAITING;
  pthread_mutex_unlock(&a->mu);
  if (waiting)
    return MHD_YES;             /* not ours to answer yet */
  return fo_admin_run(a, r);
}

static void fo_admin_completed(void *cls, struct MHD_Connection *conn,
                               void **con_cls,
                               enum MHD_RequestTerminationCode toe) {
  fo_admin_req *r = *con_cls;
  fo_admin *a = cls;

  (void)conn;
  if (r == NULL)
    return;
  /* The publish callback has run by now: a parked connection is never
   * completed before it is resumed. */
  if (r->pub_state != FO_ADMIN_PUB_NONE)
    fo_admin_uncount(a);
  if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && !r->replied)
    fo_log_debug("admin", "request abandoned", "method=%s route=\"%s\"",
                 r->method_name,
                 r->route != NULL ? r->route->tmpl : "unmatched");
  for (int i = 0; i < FO_ADMIN_MAX_PARAMS; i++)
    free(r->params[i]);
  free(r->body);
  free(r->resp);
  free(r->event_id);
  free(r);
  *con_cls = NULL;
}

/* Paths are decoded per segment by the router, so that "%2F" inside an
 * id stays part of the id; libmicrohttpd must leave them as sent. This
 * applies to query arguments too: a route that reads them decodes them
 * itself. */
static size_t fo_admin_no_unescape(void *cls, struct MHD_Connection *c,
                                   char *s) {
  (void)cls;
  (void)c;
  return strlen(s);
}

static void fo_admin_mhd_log(void *cls, const char *fmt, va_list ap) {
  static fo_ratelimit rl;
  char line[256];
  size_t n;

  (void)cls;
  vsnprintf(line, sizeof(line), fmt, ap);
  n = strlen(line);
  while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
    line[--n] = '\0';

  /* libmicrohttpd 0.9.75 says this of the thread pool's own daemons even
   * when the logger is the first option given; it is harmless. */
  if (strstr(line, "EXTERNAL_LOGGER is not the first") != NULL) {
    fo_log_debug("admin", "libmicrohttpd", "detail=\"%s\"", line);
    return;
  }
  fo_log_rl(&rl, 5000, FO_LOG_WARN, "admin", "libmicrohttpd",
            "detail=\"%s\"", line);
}

/* ---- start and stop ---- */

/* Parses "HOST:PORT" / "[V6]:PORT" into a socket address. */
static int fo_admin_resolve(const char *listen, struct sockaddr_storage *ss,
                            socklen_t *sslen, char *err, size_t errlen) {
  struct addrinfo hints, *res = NULL;
  char host[256];
  const char *port, *colon;
  size_t hlen;
  int gai;

  if (listen == NULL || *listen == '\0')
    goto bad;
  if (listen[0] == '[') {
    const char *close = strchr(listen, ']');

    if (close == NULL || close[1] != ':')
      goto bad;
    hlen = (size_t)(close - listen - 1);
    if (hlen == 0 || hlen >= sizeof(host))
      goto bad;
    memcpy(host, listen + 1, hlen);
    port = close + 2;
  } else {
    colon = strrchr(listen, ':');
    if (colon == NULL || memchr(listen, ':', (size_t)(colon - listen)))
      goto bad;
    hlen = (size_t)(colon - listen);
    if (hlen >= sizeof(host))
      goto bad;
    memcpy(host, listen, hlen);
    port = colon + 1;
  }
  host[hlen] = '\0';
  if (*port == '\0' || strspn(port, "0123456789") != strlen(port) ||
      strlen(port) > 5 || atoi(port) > 65535)
    goto bad;

  memset(&hints, 0, sizeof(hints));
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  gai = getaddrinfo(hlen > 0 ? host : NULL, port, &hints, &res);
  if (gai != 0 || res == NULL) {
    snprintf(err, errlen, "admin: listen %s: %s", listen,
             gai != 0 ? gai_strerror(gai) : "no address");
    if (res != NULL)
      freeaddrinfo(res);
    return FO_ECONFIG;
  }
  memcpy(ss, res->ai_addr, res->ai_addrlen);
  *sslen = res->ai_addrlen;
  freeaddrinfo(res);
  return FO_OK;

bad:
  snprintf(err, errlen, "admin: listen: expected HOST:PORT or [IPV6]:PORT, "
                        "got \"%s\"",
           listen != NULL ? listen : "");
  return FO_ECONFIG;
}

static void fo_admin_free(fo_admin *a) {
  if (a->twilio_auth_token != NULL)
    OPENSSL_cleanse(a->twilio_auth_token, strlen(a->twilio_auth_token));
  free(a->twilio_auth_token);
  free(a->twilio_callback_url);
  pthread_cond_destroy(&a->hcv);
  pthread_mutex_destroy(&a->hmu);
  pthread_cond_destroy(&a->cv);
  pthread_mutex_destroy(&a->mu);
  free(a);
}

int fo_admin_start(const fo_admin_conf *c, fo_admin **out, char *err,
                   size_t errlen) {
  struct sockaddr_storage ss;
  pthread_condattr_t ca;
  socklen_t sslen = 0;
  unsigned int flags;
  unsigned int timeout;
  uint16_t port;
  fo_admin *a;
  int rc;

  if (c->token == NULL || *c->token == '\0') {
    snprintf(err, errlen, "admin: a token is required");
    return FO_ECONFIG;
  }
  rc = fo_admin_resolve(c->listen, &ss, &sslen, err, errlen);
  if (rc != FO_OK)
    return rc;

  a = calloc(1, sizeof(*a));
  if (a == NULL) {
    snprintf(err, errlen, "admin: out of memory");
    return FO_ENOMEM;
  }
  a->store = c->store;
  a->limits = c->limits;
  a->publish = c->publish;
  a->max_body = c->max_body > 0 ? c->max_body : FO_ADMIN_DEFAULT_BODY;
  a->max_event_bytes =
      c->max_event_bytes > 0 ? c->max_event_bytes : FO_EVENT_BYTES_DEFAULT;
  a->publish_timeout_ms = c->publish_timeout_ms > 0
                              ? c->publish_timeout_ms
                              : FO_ADMIN_DEFAULT_PUBLISH_MS;
  snprintf(a->listen, sizeof(a->listen), "%s", c->listen);
  fo_admin_sha256(c->token, strlen(c->token), a->token_sha256);
  pthread_mutex_init(&a->mu, NULL);
  pthread_cond_init(&a->cv, NULL);
  pthread_mutex_init(&a->hmu, NULL);
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&a->hcv, &ca);
  pthread_condattr_destroy(&ca);
  if (c->twilio_auth_token != NULL && c->twilio_callback_url != NULL) {
    a->twilio_auth_token = strdup(c->twilio_auth_token);
    a->twilio_callback_url = strdup(c->twilio_callback_url);
    if (a->twilio_auth_token == NULL || a->twilio_callback_url == NULL) {
      snprintf(err, errlen, "admin: out of memory");
      fo_admin_free(a);
      return FO_ENOMEM;
    }
  }

  timeout = (unsigned int)(c->timeout_s > 0 ? c->timeout_s
                                            : FO_ADMIN_DEFAULT_TIMEOUT_S);
  flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_ALLOW_SUSPEND_RESUME |
          MHD_USE_ERROR_LOG;
  flags |= MHD_is_feature_supported(MHD_FEATURE_EPOLL) == MHD_YES
               ? MHD_USE_EPOLL
               : MHD_USE_POLL;
  if (ss.ss_family == AF_INET6) {
    flags |= MHD_USE_IPv6;
    port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
  } else {
    port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
  }
  /* The logger goes first, so that it sees what the other options say.
   * Known limitation: errors libmicrohttpd answers by itself (a malformed
   * request line, headers over the memory limit) carry its short HTML
   * body, not the JSON error shape. Known limitation: the timeout counts
   * idle time only, so a client trickling a byte at a time keeps its
   * connection, within the connection limit. Known limitation: store
   * calls block one of the pool's threads for their duration. */
  a->d = MHD_start_daemon(
      flags, port, NULL, NULL, fo_admin_access, a, MHD_OPTION_EXTERNAL_LOGGER,
      fo_admin_mhd_log, a, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
      MHD_OPTION_THREAD_POOL_SIZE, FO_ADMIN_POOL_THREADS,
      MHD_OPTION_CONNECTION_TIMEOUT, timeout, MHD_OPTION_CONNECTION_LIMIT,
      FO_ADMIN_CONN_LIMIT, MHD_OPTION_CONNECTION_MEMORY_LIMIT,
      FO_ADMIN_CONN_MEMORY, MHD_OPTION_NOTIFY_COMPLETED, fo_admin_completed,
      a, MHD_OPTION_UNESCAPE_CALLBACK, fo_admin_no_unescape, a,
      MHD_OPTION_END);
  if (a->d == NULL) {
    snprintf(err, errlen, "admin: cannot listen on %s", c->listen);
    fo_admin_free(a);
    return FO_EIO;
  }
  fo_log_info("admin", "listening", "listen=%s port=%d", a->listen,
              fo_admin_port(a));
  *out = a;
  return FO_OK;
}

int fo_admin_port(fo_admin *a) {
  const union MHD_DaemonInfo *info;

  info = MHD_get_daemon_info(a->d, MHD_DAEMON_INFO_BIND_PORT);
  return info != NULL ? (int)info->port : -1;
}

void fo_admin_stop(fo_admin *a) {
  if (a == NULL)
    return;
  pthread_mutex_lock(&a->mu);
  a->stopping = true;
  while (a->inflight > 0)
    pthread_cond_wait(&a->cv, &a->mu);
  pthread_mutex_unlock(&a->mu);

  MHD_stop_daemon(a->d);

  /* Probes use the store, Redis and Kafka handles, which the caller may
   * close right after this returns. */
  pthread_mutex_lock(&a->hmu);
  while (a->probes > 0)
    pthread_cond_wait(&a->hcv, &a->hmu);
  pthread_mutex_unlock(&a->hmu);
  fo_log_info("admin", "stopped", "listen=%s", a->listen);
  fo_admin_free(a);
}
