/* SPDX-License-Identifier: MIT */
/*
 * The admin API's routes: the table the request core matches against,
 * and one handler per (route, method). A handler runs once the request is
 * authenticated, its path ids are decoded and checked and its body is in;
 * it validates the body, calls the store (or the Kafka publisher) and
 * sets the reply. Validation errors are 422 and name the field.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <microhttpd.h>

#include "admin_internal.h"
#include "fanout/common.h"
#include "fanout/event.h"
#include "log.h"
#include "metrics.h"
#include "prefs.h"
#include "twilio.h"

#define FO_ADMIN_EMAIL_MAX 254
#define FO_ADMIN_LOCALE_MAX 35
#define FO_ADMIN_DEVICE_TOKEN_MAX 4096
#define FO_ADMIN_APP_MAX 64
#define FO_ADMIN_HEALTH_MS 2000

static const char fo_admin_metrics_type[] =
    "text/plain; version=0.0.4; charset=utf-8";

/* ---- shared checks ---- */

static bool fo_admin_need_store(fo_admin *a, fo_admin_req *r) {
  if (a->store != NULL)
    return true;
  fo_admin__error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "unavailable", NULL,
                  "no database is configured");
  return false;
}

static void fo_admin_invalid(fo_admin_req *r, const char *field,
                             const char *message) {
  fo_admin__error(r, MHD_HTTP_UNPROCESSABLE_CONTENT, "invalid_field", field,
                  "%s: %s", field, message);
}

/* The body as a JSON object, or NULL with the reply set. */
static json_t *fo_admin_body_object(fo_admin_req *r) {
  json_t *doc = fo_admin__body_json(r);

  if (doc != NULL && !json_is_object(doc)) {
    fo_admin__error(r, MHD_HTTP_UNPROCESSABLE_CONTENT, "not_object", NULL,
                    "the body must be a JSON object");
    json_decref(doc);
    return NULL;
  }
  return doc;
}

/*
 * Reads the members of `doc` named in `names` (NULL-terminated) into
 * `vals` (NULL when absent or null). Any other member, and any value that
 * is not a string or null, is a 422 naming it.
 */
static bool fo_admin_string_members(fo_admin_req *r, json_t *doc,
                                    const char *const *names,
                                    const char **vals) {
  const char *key;
  json_t *v;

  json_object_foreach(doc, key, v) {
    size_t i = 0;

    while (names[i] != NULL && strcmp(names[i], key) != 0)
      i++;
    if (names[i] == NULL) {
      fo_admin_invalid(r, key, "unknown field");
      return false;
    }
    if (json_is_null(v))
      continue;
    if (!json_is_string(v)) {
      fo_admin_invalid(r, key, "must be a string or null");
      return false;
    }
    vals[i] = json_string_value(v);
  }
  return true;
}

static bool fo_admin_email_ok(const char *s) {
  const char *at = strchr(s, '@');
  size_t n = strlen(s);

  if (n > FO_ADMIN_EMAIL_MAX || at == NULL || at == s || at[1] == '\0' ||
      strchr(at + 1, '@') != NULL)
    return false;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];

    if (c <= 0x20 || c == 0x7F)
      return false;
  }
  return true;
}

/* E.164: "+", a non-zero digit, then 6 to 14 digits. */
static bool fo_admin_phone_ok(const char *s) {
  size_t digits;

  if (s[0] != '+' || s[1] < '1' || s[1] > '9')
    return false;
  digits = strspn(s + 1, "0123456789");
  return s[1 + digits] == '\0' && digits >= 7 && digits <= 15;
}

static bool fo_admin_charset_ok(const char *s, size_t max,
                                const char *extra) {
  size_t n = strlen(s);

  if (n == 0 || n > max)
    return false;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];

    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (c >= '0' && c <= '9') || strchr(extra, c) != NULL))
      return false;
  }
  return true;
}

static bool fo_admin_device_token_ok(const char *s) {
  size_t n = strlen(s);

  if (n == 0 || n > FO_ADMIN_DEVICE_TOKEN_MAX)
    return false;
  for (size_t i = 0; i < n; i++) {
    if (s[i] < 0x21 || s[i] > 0x7E)
      return false;
  }
  return true;
}

/* ---- /healthz and /metrics ---- */

enum { FO_ADMIN_PROBE_KAFKA = 0, FO_ADMIN_PROBE_PG, FO_ADMIN_PROBE_REDIS };

typedef struct fo_admin_probe {
  fo_admin *a;
  int kind;
} fo_admin_probe;

static bool fo_admin_probe_run(fo_admin *a, int kind) {
  switch (kind) {
  case FO_ADMIN_PROBE_KAFKA:
    return fo_publish_healthy(a->publish);
  case FO_ADMIN_PROBE_PG:
    return fo_store_ping(a->store);
  default:
    return fo_limiter_ping(a->limits);
  }
}

static void *fo_admin_probe_thread(void *arg) {
  fo_admin_probe *p = arg;
  fo_admin *a = p->a;
  int kind = p->kind;
  bool ok;

  free(p);
  ok = fo_admin_probe_run(a, kind);
  pthread_mutex_lock(&a->hmu);
  a->probe_ok[kind] = ok;
  a->probe_gen[kind]++;
  a->probing[kind] = false;
  a->probes--;
  pthread_cond_broadcast(&a->hcv);
  pthread_mutex_unlock(&a->hmu);
  return NULL;
}

/*
 * With hmu held: starts a probe of `kind` unless one is running already,
 * and returns the probe generation whose result answers this request, or
 * 0 when no probe could start (then the dependency is reported down).
 */
static uint64_t fo_admin_probe_start(fo_admin *a, int kind) {
  fo_admin_probe *p;
  pthread_attr_t attr;
  pthread_t t;
  int rc;

  if (a->probing[kind])
    return a->probe_gen[kind] + 1;
  p = malloc(sizeof(*p));
  if (p == NULL)
    return 0;
  p->a = a;
  p->kind = kind;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  rc = pthread_create(&t, &attr, fo_admin_probe_thread, p);
  pthread_attr_destroy(&attr);
  if (rc != 0) {
    free(p);
    return 0;
  }
  a->probing[kind] = true;
  a->probes++;
  return a->probe_gen[kind] + 1;
}

/*
 * The checks run on threads of their own, side by side, and the answer
 * waits for them at most FO_ADMIN_HEALTH_MS: a dependency that has not
 * answered by then is reported down. A check still running from an
 * earlier request is waited for rather than doubled, so a hung
 * dependency costs one thread, not one per request.
 */
static fo_admin_next fo_admin_health(fo_admin *a, fo_admin_req *r) {
  static const char *const names[FO_ADMIN_PROBES] = {"kafka", "postgres",
                                                     "redis"};
  const bool have[FO_ADMIN_PROBES] = {a->publish != NULL, a->store != NULL,
                                      a->limits != NULL};
  uint64_t want[FO_ADMIN_PROBES] = {0, 0, 0};
  bool ok[FO_ADMIN_PROBES] = {false, false, false};
  bool all = true;
  struct timespec deadline;
  json_t *out;

  clock_gettime(CLOCK_MONOTONIC, &deadline);
  deadline.tv_sec += FO_ADMIN_HEALTH_MS / 1000;
  deadline.tv_nsec += (long)(FO_ADMIN_HEALTH_MS % 1000) * 1000000;
  if (deadline.tv_nsec >= 1000000000) {
    deadline.tv_sec++;
    deadline.tv_nsec -= 1000000000;
  }

  pthread_mutex_lock(&a->hmu);
  for (int k = 0; k < FO_ADMIN_PROBES; k++) {
    if (have[k])
      want[k] = fo_admin_probe_start(a, k);
  }
  for (;;) {
    bool pending = false;

    for (int k = 0; k < FO_ADMIN_PROBES; k++)
      pending = pending || (want[k] > 0 && a->probe_gen[k] < want[k]);
    if (!pending ||
        pthread_cond_timedwait(&a->hcv, &a->hmu, &deadline) == ETIMEDOUT)
      break;
  }
  for (int k = 0; k < FO_ADMIN_PROBES; k++)
    ok[k] = want[k] > 0 && a->probe_gen[k] >= want[k] && a->probe_ok[k];
  pthread_mutex_unlock(&a->hmu);

  out = json_object();
  for (int k = 0; k < FO_ADMIN_PROBES; k++) {
    if (!have[k])
      continue;
    all = all && ok[k];
    json_object_set_new(out, names[k], json_boolean(ok[k]));
  }
  json_object_set_new(out, "status", json_string(all ? "ok" : "degraded"));
  fo_admin__reply_json(r, all ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE,
                       out);
  return FO_ADMIN_DONE;
}

static fo_admin_next fo_admin_metrics(fo_admin *a, fo_admin_req *r) {
  char *text = NULL;
  size_t len = 0;

  (void)a;
  if (fo_metrics_render(&text, &len) != FO_OK) {
    fo_admin__error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", NULL,
                    "out of memory");
    return FO_ADMIN_DONE;
  }
  fo_admin__reply_raw(r, MHD_HTTP_OK, fo_admin_metrics_type, text, len);
  return FO_ADMIN_DONE;
}

/* ---- users ---- */

static fo_admin_next fo_admin_user_put(fo_admin *a, fo_admin_req *r) {
  static const char *const names[] = {"email", "phone", "timezone",
                                      "locale", NULL};
  const char *v[4] = {NULL, NULL, NULL, NULL};
  json_t *doc, *out = NULL;
  bool created = false;
  int rc;

  if (!fo_admin_need_store(a, r))
    return FO_ADMIN_DONE;
  doc = fo_admin_body_object(r);
  if (doc == NULL)
    return FO_ADMIN_DONE;
  if (!fo_admin_string_members(r, doc, names, v))
    goto out;
  if (v[0] != NULL && !fo_admin_email_ok(v[0])) {
    fo_admin_invalid(r, "email", "must be one address with text on both "
                                 "sides of a single @ and no spaces");
    goto out;
  }
  if (v[1] != NULL && !fo_admin_phone_ok(v[1])) {
    fo_admin_invalid(r, "phone", "must be in E.164 form, e.g. "
                                 "+33612345678");
    goto out;
  }
  if (v[2] != NULL && !fo_tz_valid(v[2])) {
    fo_admin__error(r, MHD_HTTP_UNPROCESSABLE_CONTENT, "invalid_field",
                    "timezone", "timezone: unknown time zone \"%.64s\"",
                    v[2]);
    goto out;
  }
  if (v[3] != NULL && !fo_admin_charset_ok(v[3], FO_ADMIN_LOCALE_MAX, "-_")) {
    fo_admin_invalid(r, "locale", "must be a language tag such as en-US");
    goto out;
  }

  rc = fo_store_user_put(a->store, r->params[0], v[0], v[1], v[2], v[3],
                         &out, &created);
  if (rc != FO_OK) {
    fo_admin__store_error(r, rc, "user");
    goto out;
  }
  fo_admin__reply_json(r, MHD_HTTP_OK, out);

out:
  json_decref(doc);
  return FO_ADMIN_DONE;
}

static fo_admin_next fo_admin_user_get(fo_admin *a, fo_admin_req *r) {
  json_t *out = NULL;
  int rc;

  if (!fo_admin_need_store(a, r))
    return FO_ADMIN_DONE;
  rc = fo_store_user_get(a->store, r->params[0], &out);
  if (rc != FO_OK)
    fo_admin__store_error(r, rc, "user");
  else
    fo_admin__reply_json(r, MHD_HTTP_OK, out);
  return FO_ADMIN_DONE;
}

static fo_admin_next fo_admin_user_delete(fo_admin *a, fo_admin_req *r) {
  int rc;

  if (!fo_admin_need_store(a, r))
    return FO_ADMIN_DONE;
  rc = fo_store_user_delete(a->store, r->params[0]);
  if (rc != FO_OK)
    fo_admin__store_error(r, rc, "user");
  else
    fo_admin__reply_empty(r, MHD_HTTP_NO_CONTENT);
  return FO_ADMIN_DONE;
}

/* ---- devices ---- */

static fo_admin_next fo_admin_device_post(fo_admin *a, fo_admin_req *r) {
  static const char *const names[] = {"platform", "token", "app", NULL};
  const char *v[3] = {NULL, NULL, NULL};
  json_t *doc, *out = NULL;
  int rc;

  if (!fo_admin_need_store(a, r))
    return FO_ADMIN_DONE;
  doc = fo_admin_body_object(r);
  if (doc == NULL)
    return FO_ADMIN_DONE;
  if (!fo_admin_string_members(r, doc, names, v))
    goto out;
  if (v[0] == NULL || (strcmp(v[0], "apns") != 0 &&
                       strcmp(v[0], "fcm") != 0)) {
    fo_admin_invalid(r, "platform", "must be \"apns\" or \"fcm\"");
    goto out;
  }
  if (v[1] == NULL || !fo_admin_device_token_ok(v[1])) {
    fo_admin_invalid(r, "token", "must be 1-4096 visible ASCII characters");
    goto out;
  }
  if (v[2] != NULL && !fo_admin_charset_ok(v[2], FO_ADMIN_APP_MAX, "-_.")) {
    fo_admin_invalid(r, "app", "must be 1-64 characters of letters, digits, "
                               "'-', '_' and '.'");
    goto out;
  }

  rc = fo_store_device_add(a->store, r->params[0], v[0], v[1], v[2], &out);
  if (rc != FO_OK) {
    fo_admin__store_error(r, rc, "user");
    goto out;
  }
  fo_admin__reply_json(r, MHD_HTTP_CREATED, out);

out:
  json_decref(doc);
  return FO_ADMIN_DONE;
}

static fo_admin_next fo_admin_device_list(fo_admin *a, fo_admin_req *r) {
  json_t *out = NULL;
  int rc;

  if (!fo_admin_need_store(a, r))
    return FO_ADMIN_DONE;
  rc = fo_store_device_list(a->store, r->params[0], &out);
  if (rc != FO_OK)
    fo_admin__store_error(r, rc, "user");
  else
    fo_admin__reply_json(r, MHD_HTTP_OK, out);
  return FO_ADMIN_DONE;
}

static fo_admin_next fo_admin_device_delete(fo_admin *a, fo_admin_req *r) {
  int rc;

  if (!fo_admin_need_store(a, r))
    return FO_ADMIN_DONE;
  rc = fo_store_device_delete(a->store, r->params[0], r->params[1]);
  if (rc != FO_OK)
    fo_admin__store_error(r, rc, "device");
  else
    fo_admin__reply_empty(r, MHD_HTTP_NO_CONTENT);
  return FO_ADMIN_DONE;
}

/* ---- preferences ---- */

/* Replies with the canonical form of `p` (defaults made explicit). */
static void fo_admin_reply_prefs(fo_admin_req *r, const fo_prefs *p) {
  fo_admin__reply_json(r, MHD_HTTP_OK, fo_prefs_to_json(p));
}

static void fo_admin_prefs_invalid(fo_admin_req *r, int rc,
                                   const fo_prefs_error *pe) {
  if (rc == FO_ENOMEM) {
    fo_admin__error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", NULL,
                    "out of memory");
    return;
  }
  fo_admin__error(r, MHD_HTTP_UNPROCESSABLE_CONTENT, "invalid_field",
                  pe->field, "%s", pe->message);
}

static fo_admin_next fo_admin_prefs_get(fo_admin *a, fo_admin_req *r) {
  fo_prefs_error pe;
  json_t *doc = NULL;
  fo_prefs p;
  int rc;

  if (!fo_admin_need_store(a, r))
    return FO_ADMIN_DONE;
  rc = fo_store_prefs_get(a->store, r->params[0], &doc);
  if (rc != FO_OK) {
    fo_admin__store_error(r, rc, "user");
    return FO_ADMIN_DONE;
  }
  rc = fo_prefs_parse(doc, &p, &pe);
  if (rc == FO_OK) {
    fo_admin_reply_prefs(r, &p);
    fo_prefs_clear(&p);
    json_decref(doc);
  } else if (rc == FO_ENOMEM) {
    fo_admin_prefs_invalid(r, rc, &pe);
    json_decref(doc);
  } else {
    /* Valid when stored, refused now (say, a time zone a newer ICU
     * dropped): show what is stored rather than hide it. */
    fo_log_warn("admin", "stored preferences no longer valid",
                "field=\"%s\"", pe.field);
    fo_admin__reply_json(r, MHD_HTTP_OK, doc);
  }
  return FO_ADMIN_DONE;
}

static fo_admin_next fo_admin_prefs_put(fo_admin *a, fo_admin_req *r) {
  fo_prefs_error pe;
  fo_prefs p;
  json_t *doc;
  int rc;

  if (!fo_admin_need_store(a, r))
    return FO_ADMIN_DONE;
  doc = fo_admin_body_object(r);
  if (doc == NULL)
    return FO_ADMIN_DONE;
  rc = fo_prefs_parse(doc, &p, &pe);
  if (rc != FO_OK) {
    fo_admin_prefs_invalid(r, rc, &pe);
    json_decref(doc);
    return FO_ADMIN_DONE;
  }
  rc = fo_store_prefs_put(a->store, r->params[0], doc);
  if (rc != FO_OK)
    fo_admin__store_error(r, rc, "user");
  else
    fo_admin_reply_prefs(r, &p);
  fo_prefs_clear(&p);
  json_decref(doc);
  return FO_ADMIN_DONE;
}

typedef struct fo_admin_patch {
  const json_t *patch;
  fo_prefs prefs;               /* the result, when `parsed` */
  bool parsed;
  bool invalid;                 /* the result was refused: see `err` */
  fo_prefs_error err;
} fo_admin_patch;

/* Runs inside the store's transaction with the row locked. */
static json_t *fo_admin_patch_apply(const json_t *current, void *arg,
                                    int *fn_rc) {
  fo_admin_patch *pa = arg;
  json_t *doc;
  fo_prefs p;
  int rc;

  doc = current != NULL ? json_deep_copy(current) : json_object();
  if (doc != NULL)
    doc = fo_json_merge_patch(doc, pa->patch);
  if (doc == NULL) {
    *fn_rc = FO_ENOMEM;
    return NULL;
  }
  if (!json_is_object(doc)) {
    pa->invalid = true;
    snprintf(pa->err.field, sizeof(pa->err.field), "%s", "");
    snprintf(pa->err.message, sizeof(pa->err.message),
             "the patched preferences must be a JSON object");
    json_decref(doc);
    *fn_rc = FO_EINVAL;
    return NULL;
  }
  rc = fo_prefs_parse(doc, &p, &pa->err);
  if (rc != FO_OK) {
    pa->invalid = rc == FO_EINVAL;
    json_decref(doc);
    *fn_rc = rc;
    return NULL;
  }
  /* The store may run the update again after a serialization retry. */
  if (pa->parsed)
    fo_prefs_clear(&pa->prefs);
  pa->prefs = p;
  pa->parsed = true;
  return doc;
}

static fo_admin_next fo_admin_prefs_patch(fo_admin *a, fo_admin_req *r) {
  fo_admin_patch pa = {.patch = NULL, .parsed = false, .invalid = false};
  json_t *patch, *out = NULL;
  int rc;

  if (!fo_admin_need_store(a, r))
    return FO_ADMIN_DONE;
  patch = fo_admin__body_json(r);
  if (patch == NULL)
    return FO_ADMIN_DONE;
  pa.patch = patch;
  rc = fo_store_prefs_update(a->store, r->params[0], fo_admin_patch_apply,
                             &pa, &out);
  if (rc == FO_OK && pa.parsed)
    fo_admin_reply_prefs(r, &pa.prefs);
  else if (rc == FO_OK)
    fo_admin__error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", NULL,
                    "the update did not run");
  else if (pa.invalid)
    fo_admin__error(r, MHD_HTTP_UNPROCESSABLE_CONTENT, "invalid_field",
                    pa.err.field, "%s", pa.err.message);
  else
    fo_admin__store_error(r, rc, "user");
  json_decref(out);
  if (pa.parsed)
    fo_prefs_clear(&pa.prefs);
  json_decref(patch);
  return FO_ADMIN_DONE;
}

/* ---- events ---- */

static void fo_admin_event_published(fo_admin *a, fo_admin_req *r) {
  switch (r->pub_rc) {
  case FO_OK:
    fo_admin__reply_json(r, MHD_HTTP_ACCEPTED,
                         json_pack("{s:s}", "id", r->event_id));
    break;
  case FO_ETIMEDOUT:
    fo_admin__error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "kafka_timeout", NULL,
                    "Kafka did not acknowledge the event within %d ms; it "
                    "may still be delivered, and sending it again with the "
                    "same id is safe",
                    a->publish_timeout_ms);
    break;
  default:
    fo_admin__error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "kafka_unavailable",
                    NULL, "Kafka refused the event: %s",
                    fo_strerror(r->pub_rc));
    break;
  }
}

static fo_admin_next fo_admin_event_post(fo_admin *a, fo_admin_req *r) {
  fo_event_error ee;
  fo_event *ev = NULL;
  int rc;

  if (r->pub_state == FO_ADMIN_PUB_DONE) {
    fo_admin_event_published(a, r);
    return FO_ADMIN_DONE;
  }
  if (a->publish == NULL) {
    fo_admin__error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "unavailable", NULL,
                    "no Kafka producer is configured");
    return FO_ADMIN_DONE;
  }

  /* The same decoder as the Kafka consumer's, so an event accepted here
   * is never dead-lettered there. */
  rc = fo_event_decode(r->body, r->body_len, a->max_event_bytes, &ev, &ee);
  if (rc == FO_ENOMEM) {
    fo_admin__error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", NULL,
                    "out of memory");
    return FO_ADMIN_DONE;
  }
  if (rc != FO_OK) {
    unsigned status = ee.reason == FO_EVR_TOO_LARGE ? MHD_HTTP_CONTENT_TOO_LARGE
                      : ee.reason == FO_EVR_INVALID_JSON
                          ? MHD_HTTP_BAD_REQUEST
                          : MHD_HTTP_UNPROCESSABLE_CONTENT;

    fo_admin__error(r, status, fo_event_reason_name(ee.reason), ee.field,
                    "%s", ee.message);
    return FO_ADMIN_DONE;
  }
  r->event_id = strdup(ev->id);
  fo_event_free(ev);
  if (r->event_id == NULL) {
    fo_admin__error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", NULL,
                    "out of memory");
    return FO_ADMIN_DONE;
  }

  /* The original bytes go to Kafka, exactly as a producer would send
   * them; the id is the key, so retries of one event share a partition. */
  rc = fo_admin__publish(r, r->event_id, r->body, r->body_len);
  if (rc == FO_OK)
    return FO_ADMIN_WAIT;
  if (rc == FO_ECLOSED)
    fo_admin__error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "unavailable", NULL,
                    "the server is shutting down");
  else
    fo_admin__error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "kafka_unavailable",
                    NULL, "Kafka refused the event: %s", fo_strerror(rc));
  return FO_ADMIN_DONE;
}

static fo_admin_next fo_admin_event_get(fo_admin *a, fo_admin_req *r) {
  json_t *out = NULL;
  int rc;

  if (!fo_admin_need_store(a, r))
    return FO_ADMIN_DONE;
  rc = fo_store_event_get(a->store, r->params[0], &out);
  if (rc == FO_ENOENT)
    fo_admin__error(r, MHD_HTTP_NOT_FOUND, "not_found", NULL,
                    "no delivery is recorded for this event");
  else if (rc != FO_OK)
    fo_admin__store_error(r, rc, "event");
  else
    fo_admin__reply_json(r, MHD_HTTP_OK, out);
  return FO_ADMIN_DONE;
}

/* ---- provider callbacks ---- */

/*
 * Twilio's SMS status callback. Twilio cannot send the bearer token, so
 * the route is open and the request must carry Twilio's signature over
 * the configured public URL and the form parameters. Final statuses
 * update the delivery log by the message's sid; the others (queued,
 * sending, sent) change nothing.
 */
static fo_admin_next fo_admin_twilio_callback(fo_admin *a, fo_admin_req *r) {
  fo_twilio_form f = {0, NULL};
  const char *sid, *st, *status, *reason = NULL;
  int rc;

  if (a->twilio_auth_token == NULL) {
    fo_admin__error(r, MHD_HTTP_NOT_FOUND, "not_found", NULL,
                    "no such route");
    return FO_ADMIN_DONE;
  }
  rc = fo_twilio_form_parse(r->body != NULL ? r->body : "", r->body_len,
                            &f);
  if (rc != FO_OK) {
    if (rc == FO_ENOMEM)
      fo_admin__error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", NULL,
                      "out of memory");
    else
      fo_admin__error(r, MHD_HTTP_BAD_REQUEST, "invalid_form", NULL,
                      "the body is not a valid form encoding");
    return FO_ADMIN_DONE;
  }
  if (!fo_twilio_signature_ok(
          a->twilio_auth_token, a->twilio_callback_url, &f,
          MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND,
                                      "X-Twilio-Signature"))) {
    fo_admin__error(r, MHD_HTTP_FORBIDDEN, "forbidden", NULL,
                    "a valid X-Twilio-Signature is required");
    goto out;
  }
  sid = fo_twilio_form_get(&f, "MessageSid");
  st = fo_twilio_form_get(&f, "MessageStatus");
  if (sid == NULL || sid[0] == '\0' || st == NULL) {
    fo_admin__error(r, MHD_HTTP_BAD_REQUEST, "missing_field",
                    sid == NULL || sid[0] == '\0' ? "MessageSid"
                                                  : "MessageStatus",
                    "MessageSid and MessageStatus are required");
    goto out;
  }
  if (strcmp(st, "delivered") == 0) {
    status = "delivered";
  } else if (strcmp(st, "undelivered") == 0 || strcmp(st, "failed") == 0) {
    status = "undelivered";
    reason = fo_twilio_form_get(&f, "ErrorCode");
    if (reason != NULL && reason[0] == '\0')
      reason = NULL;
  } else {
    fo_admin__reply_empty(r, MHD_HTTP_NO_CONTENT);
    goto out;
  }
  if (!fo_admin_need_store(a, r))
    goto out;
  rc = fo_store_delivery_update_by_provider(a->store, FO_CH_SMS, sid, status,
                                            reason);
  if (rc == FO_OK)
    fo_admin__reply_empty(r, MHD_HTTP_NO_CONTENT);
  else if (rc == FO_ENOENT)
    fo_admin__error(r, MHD_HTTP_NOT_FOUND, "not_found", NULL,
                    "no SMS delivery has this MessageSid");
  else
    fo_admin__store_error(r, rc, "message");

out:
  fo_twilio_form_clear(&f);
  return FO_ADMIN_DONE;
}

/* ---- the table ---- */

/* Routes of the design served by the in-app relay (inbox, conversations)
 * are not here yet: they answer 404 like any unknown path. */
const fo_admin_route fo_admin__routes[] = {
    {"/healthz", {"healthz", NULL}, true, "GET, HEAD",
     {{"GET", fo_admin_health, 0}, {NULL, NULL, 0}}},
    {"/metrics", {"metrics", NULL}, true, "GET, HEAD",
     {{"GET", fo_admin_metrics, 0}, {NULL, NULL, 0}}},
    {"/v1/users/{id}", {"v1", "users", "{id}", NULL}, false,
     "GET, HEAD, PUT, DELETE",
     {{"GET", fo_admin_user_get, 0},
      {"PUT", fo_admin_user_put, FO_ADMIN_BODY},
      {"DELETE", fo_admin_user_delete, 0},
      {NULL, NULL, 0}}},
    {"/v1/users/{id}/devices", {"v1", "users", "{id}", "devices", NULL},
     false, "GET, HEAD, POST",
     {{"GET", fo_admin_device_list, 0},
      {"POST", fo_admin_device_post, FO_ADMIN_BODY},
      {NULL, NULL, 0}}},
    {"/v1/users/{id}/devices/{token}",
     {"v1", "users", "{id}", "devices", "{token}", NULL}, false, "DELETE",
     {{"DELETE", fo_admin_device_delete, 0}, {NULL, NULL, 0}}},
    {"/v1/users/{id}/preferences",
     {"v1", "users", "{id}", "preferences", NULL}, false,
     "GET, HEAD, PUT, PATCH",
     {{"GET", fo_admin_prefs_get, 0},
      {"PUT", fo_admin_prefs_put, FO_ADMIN_BODY},
      {"PATCH", fo_admin_prefs_patch, FO_ADMIN_BODY | FO_ADMIN_MERGE_PATCH},
      {NULL, NULL, 0}}},
    {"/v1/events", {"v1", "events", NULL}, false, "POST",
     {{"POST", fo_admin_event_post, FO_ADMIN_BODY | FO_ADMIN_EVENT_BODY},
      {NULL, NULL, 0}}},
    {"/v1/events/{id}", {"v1", "events", "{id}", NULL}, false, "GET, HEAD",
     {{"GET", fo_admin_event_get, 0}, {NULL, NULL, 0}}},
    {"/v1/callbacks/twilio", {"v1", "callbacks", "twilio", NULL}, true,
     "POST",
     {{"POST", fo_admin_twilio_callback, FO_ADMIN_BODY | FO_ADMIN_FORM_BODY},
      {NULL, NULL, 0}}},
};

const size_t fo_admin__nroutes =
    sizeof(fo_admin__routes) / sizeof(fo_admin__routes[0]);
