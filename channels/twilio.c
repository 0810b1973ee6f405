/* SPDX-License-Identifier: MIT */
/*
 * The SMS channel on Twilio's Messages API: one form-encoded POST per
 * delivery to {url}/2010-04-01/Accounts/{sid}/Messages.json with HTTP
 * basic auth, through the shared asynchronous HTTPS client. Numbers are
 * checked as E.164 first; Twilio's answers become outcomes (a refused
 * number marks the phone unusable, an unsubscribed one turns SMS off in
 * the user's preferences), and a sender's rate per second is shared by
 * every instance through Redis.
 *
 * Threads: submit() runs on dispatcher threads; responses come back on
 * the HTTP client's thread. A worker thread of the channel does what may
 * block: rate decisions in Redis (a batch per round) and store writes
 * that follow a response, so neither thread ever waits on Redis or
 * PostgreSQL.
 */
#include "twilio.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "buf.h"
#include "fanout/common.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "urlenc.h"

#define TW_MOD "twilio"
#define TW_DEFAULT_TIMEOUT_MS 30000
#define TW_STOP_MS 5000
#define TW_CONNECTIONS 8
#define TW_LOG_MS 30000
/* Rate decisions per round: at most one second's worth. */
#define TW_BATCH_MAX 256
#define TW_SIG_LEN 29

/* Twilio error codes with a meaning of their own. */
#define TW_ERR_AUTH 20003
#define TW_ERR_TOO_MANY 20429
#define TW_ERR_INVALID_TO 21211
#define TW_ERR_UNSUBSCRIBED 21610
#define TW_ERR_NOT_MOBILE 21614

typedef struct twilio twilio;

/* One accepted delivery, from submit() to its completion. */
typedef struct tw_item {
  twilio *t;
  fo_delivery *d;
  struct tw_item *next;         /* in the rate queue */
  int64_t start_us;
} tw_item;

/* A store write that follows a response, done by the worker. */
typedef enum tw_action_kind {
  TW_PHONE_UNUSABLE = 0,
  TW_SMS_OFF
} tw_action_kind;

typedef struct tw_action {
  tw_action_kind kind;
  int64_t at_ms;
  char *user;
  char *phone;
  struct tw_action *next;
} tw_action;

struct twilio {
  fo_channel ch;
  fo_http *http;
  char *messages_url;
  char *userpwd;                /* secret: "sid:token" */
  char *sender_form;            /* "From=..." or "MessagingServiceSid=..." */
  char *callback_form;          /* "&StatusCallback=...", or "" */
  char *sender;                 /* the rate key's sender */
  int timeout_ms;
  int rate;
  int max_inflight;
  fo_store *store;
  fo_limiter *limits;

  pthread_mutex_t mu;
  pthread_cond_t wake;          /* the worker waits here */
  pthread_cond_t idle;          /* flush() waits here (monotonic) */
  tw_item *qhead, *qtail;       /* waiting for the rate */
  tw_action *ahead, *atail;
  int inflight;                 /* accepted, not completed */
  int64_t not_before_ms;        /* monotonic: the rate's next window */
  int64_t local_window_s;       /* the per-instance fallback window */
  int local_count;
  bool closed;                  /* refuse submits, drop the rate queue */
  bool stop;                    /* the worker ends once idle */
  bool shut;                    /* shutdown() ran */
  bool worker_started;
  pthread_t worker;

  atomic_bool auth_broken;      /* logged the auth failure already */
  fo_counter *auth_failures;
  fo_histogram *latency;
  fo_gauge *inflight_gauge;
};

static fo_ratelimit rl_redis;
static fo_ratelimit rl_store;
static fo_ratelimit rl_odd;

/* ---- E.164, forms and signatures ---- */

bool fo_twilio_e164(const char *phone) {
  size_t digits;

  if (phone == NULL || phone[0] != '+' || phone[1] < '1' || phone[1] > '9')
    return false;
  digits = strspn(phone + 1, "0123456789");
  return phone[1 + digits] == '\0' && digits >= 7 && digits <= 15;
}

void fo_twilio_form_clear(fo_twilio_form *f) {
  if (f == NULL)
    return;
  for (size_t i = 0; i < 2 * f->n; i++)
    free(f->kv[i]);
  free(f->kv);
  f->kv = NULL;
  f->n = 0;
}

int fo_twilio_form_parse(const char *body, size_t len,
                         fo_twilio_form *out) {
  fo_twilio_form f = {0, NULL};
  size_t pairs = 1, i = 0;
  int rc = FO_OK;

  for (size_t k = 0; k < len; k++)
    pairs += body[k] == '&';
  f.kv = calloc(2 * pairs, sizeof(*f.kv));
  if (f.kv == NULL)
    return FO_ENOMEM;

  while (i < len) {
    const char *seg = body + i;
    const char *amp = memchr(seg, '&', len - i);
    size_t sl = amp != NULL ? (size_t)(amp - seg) : len - i;
    const char *eq = memchr(seg, '=', sl);
    size_t nl = eq != NULL ? (size_t)(eq - seg) : sl;

    i += sl + 1;
    if (sl == 0)
      continue;
    f.kv[2 * f.n] = fo_url_unescape(seg, nl, true, &rc);
    if (f.kv[2 * f.n] == NULL)
      goto fail;
    f.kv[2 * f.n + 1] =
        eq != NULL ? fo_url_unescape(eq + 1, sl - nl - 1, true, &rc)
                   : fo_url_unescape("", 0, true, &rc);
    f.n++;
    if (f.kv[2 * f.n - 1] == NULL)
      goto fail;
  }
  *out = f;
  return FO_OK;

fail:
  fo_twilio_form_clear(&f);
  return rc;
}

const char *fo_twilio_form_get(const fo_twilio_form *f, const char *name) {
  for (size_t i = 0; i < f->n; i++) {
    if (strcmp(f->kv[2 * i], name) == 0)
      return f->kv[2 * i + 1];
  }
  return NULL;
}

/* Orders pair indexes by name, then value (a name given twice). */
static int tw_pair_cmp(const void *a, const void *b, void *arg) {
  const fo_twilio_form *f = arg;
  size_t x = *(const size_t *)a, y = *(const size_t *)b;
  int c = strcmp(f->kv[2 * x], f->kv[2 * y]);

  return c != 0 ? c : strcmp(f->kv[2 * x + 1], f->kv[2 * y + 1]);
}

int fo_twilio_signature(const char *auth_token, const char *url,
                        const fo_twilio_form *f, char *out, size_t cap) {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int maclen = 0;
  size_t *order = NULL, len = strlen(url), used;
  char *data = NULL;
  int rc = FO_ENOMEM;

  if (cap < TW_SIG_LEN)
    return FO_EINVAL;
  order = malloc((f->n + 1) * sizeof(*order));
  if (order == NULL)
    return FO_ENOMEM;
  for (size_t i = 0; i < f->n; i++) {
    order[i] = i;
    len += strlen(f->kv[2 * i]) + strlen(f->kv[2 * i + 1]);
  }
  qsort_r(order, f->n, sizeof(*order), tw_pair_cmp, (void *)f);

  data = malloc(len + 1);
  if (data == NULL)
    goto out;
  used = strlen(url);
  memcpy(data, url, used);
  for (size_t i = 0; i < f->n; i++) {
    const char *k = f->kv[2 * order[i]], *v = f->kv[2 * order[i] + 1];
    size_t kl = strlen(k), vl = strlen(v);

    memcpy(data + used, k, kl);
    used += kl;
    memcpy(data + used, v, vl);
    used += vl;
  }
  if (HMAC(EVP_sha1(), auth_token, (int)strlen(auth_token),
           (const unsigned char *)data, used, mac, &maclen) == NULL)
    goto out;
  EVP_EncodeBlock((unsigned char *)out, mac, (int)maclen);
  rc = FO_OK;

out:
  free(data);
  free(order);
  return rc;
}

bool fo_twilio_signature_ok(const char *auth_token, const char *url,
                            const fo_twilio_form *f, const char *header) {
  char want[TW_SIG_LEN + 3];

  if (header == NULL || auth_token == NULL || url == NULL ||
      strlen(header) != TW_SIG_LEN - 1)
    return false;
  if (fo_twilio_signature(auth_token, url, f, want, sizeof(want)) != FO_OK)
    return false;
  return CRYPTO_memcmp(want, header, TW_SIG_LEN - 1) == 0;
}

/* ---- request bodies ---- */

/* Appends `s` form-encoded: unreserved bytes as they are, the rest as
 * %XX (a space too, which both encodings accept). */
static void tw_form_escape(fo_buf *b, const char *s) {
  static const char hex[] = "0123456789ABCDEF";

  for (; *s != '\0'; s++) {
    unsigned char c = (unsigned char)*s;
    char e[3];

    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
        (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' ||
        c == '~') {
      fo_buf_append(b, (const char *)&c, 1);
      continue;
    }
    e[0] = '%';
    e[1] = hex[c >> 4];
    e[2] = hex[c & 15];
    fo_buf_append(b, e, 3);
  }
}

/* A new string "name=value", form-encoded; NULL when out of memory. */
static char *tw_param(const char *prefix, const char *name,
                      const char *value) {
  fo_buf b = FO_BUF_INIT;

  fo_buf_append_str(&b, prefix);
  fo_buf_append_str(&b, name);
  fo_buf_append(&b, "=", 1);
  tw_form_escape(&b, value);
  return fo_buf_take(&b, NULL);
}

static const char *tw_sms_text(const fo_event *ev) {
  const char *text = json_string_value(
      json_object_get(json_object_get(ev->root, "sms"), "text"));

  return text != NULL && text[0] != '\0' ? text : NULL;
}

static bool tw_has_text(const fo_event *ev) {
  return tw_sms_text(ev) != NULL || ev->title != NULL || ev->body != NULL;
}

/* The text of the message: the event's sms.text, else "title body",
 * else whichever of the two it has; NULL when it has none, or when out
 * of memory. */
static char *tw_text(const fo_event *ev) {
  const char *text = tw_sms_text(ev);
  char *out = NULL;

  if (text != NULL)
    return strdup(text);
  if (ev->title != NULL && ev->body != NULL) {
    if (asprintf(&out, "%s %s", ev->title, ev->body) < 0)
      return NULL;
    return out;
  }
  if (ev->title != NULL)
    return strdup(ev->title);
  if (ev->body != NULL)
    return strdup(ev->body);
  return NULL;
}

/* ---- completion ---- */

static void tw_item_done(tw_item *it, const fo_outcome *o) {
  twilio *t = it->t;

  fo_delivery_complete(it->d, o);
  free(it);
  pthread_mutex_lock(&t->mu);
  t->inflight--;
  fo_gauge_set(t->inflight_gauge, t->inflight);
  if (t->inflight == 0)
    pthread_cond_broadcast(&t->idle);
  pthread_mutex_unlock(&t->mu);
}

static void tw_fail(tw_item *it, bool retryable, const char *reason) {
  fo_outcome o;

  fo_outcome_init(&o, FO_STATUS_FAILED);
  o.retryable = retryable;
  snprintf(o.reason, sizeof(o.reason), "%s", reason);
  tw_item_done(it, &o);
}

/* Queues a store write for the worker. Copies the strings. */
static void tw_action_push(twilio *t, tw_action_kind kind, const char *user,
                           const char *phone) {
  tw_action *a;

  if (t->store == NULL)
    return;
  a = calloc(1, sizeof(*a));
  if (a != NULL) {
    a->user = strdup(user);
    a->phone = phone != NULL ? strdup(phone) : NULL;
  }
  if (a == NULL || a->user == NULL || (phone != NULL && a->phone == NULL)) {
    if (a != NULL) {
      free(a->user);
      free(a->phone);
      free(a);
    }
    fo_log_rl(&rl_store, TW_LOG_MS, FO_LOG_ERROR, TW_MOD,
              "out of memory: a refused number is not recorded",
              "user=\"%s\"", user);
    return;
  }
  a->kind = kind;
  a->at_ms = fo_wall_ms();
  pthread_mutex_lock(&t->mu);
  if (t->atail != NULL)
    t->atail->next = a;
  else
    t->ahead = a;
  t->atail = a;
  pthread_cond_signal(&t->wake);
  pthread_mutex_unlock(&t->mu);
}

/* Retry-After as delta-seconds or an HTTP date; 0 when absent or
 * unreadable. */
static int64_t tw_retry_after_ms(const char *v) {
  struct tm tm;
  const char *end;
  time_t when;

  if (v == NULL)
    return 0;
  while (*v == ' ')
    v++;
  if (*v >= '0' && *v <= '9') {
    long long s = strtoll(v, NULL, 10);

    return s > 0 && s < 86400 ? (int64_t)s * 1000 : 0;
  }
  memset(&tm, 0, sizeof(tm));
  end = strptime(v, "%a, %d %b %Y %H:%M:%S GMT", &tm);
  if (end == NULL)
    return 0;
  when = timegm(&tm);
  return when * 1000 > fo_wall_ms() ? when * 1000 - fo_wall_ms() : 0;
}

/* Twilio's error document: {"code", "message", "more_info", "status"}. */
static void tw_error_doc(const char *body, size_t len, long *code,
                         char *msg, size_t cap) {
  json_t *doc = body != NULL ? json_loadb(body, len, 0, NULL) : NULL;
  const char *m = json_string_value(json_object_get(doc, "message"));

  *code = (long)json_integer_value(json_object_get(doc, "code"));
  snprintf(msg, cap, "%s", m != NULL ? m : "");
  json_decref(doc);
}

static void tw_account(twilio *t, tw_item *it, long status) {
  char labels[64];

  if (status > 0)
    snprintf(labels, sizeof(labels), "channel=\"sms\",code=\"%ld\"",
             status);
  else
    snprintf(labels, sizeof(labels), "channel=\"sms\",code=\"error\"");
  fo_counter_add(fo_metrics_counter("fanout_provider_requests_total",
                                    "Provider requests by answer", labels),
                 1);
  fo_histogram_observe_us(t->latency, fo_now_us() - it->start_us);
}

static void tw_on_auth_failure(twilio *t, long status, long code) {
  fo_counter_add(t->auth_failures, 1);
  /* Every send fails the same way until the credentials are fixed:
   * one record says so, not one per message. */
  if (!atomic_exchange(&t->auth_broken, true))
    fo_log_error(TW_MOD,
                 "twilio refused the credentials; SMS deliveries fail "
                 "until [twilio] account_sid and auth_token are fixed",
                 "status=%ld code=%ld", status, code);
}

/* Turns Twilio's answer into the delivery's outcome. Runs on the HTTP
 * client's thread. */
static void tw_done(void *arg, const fo_http_response *r) {
  tw_item *it = arg;
  twilio *t = it->t;
  const fo_delivery *d = it->d;
  long status = fo_http_status(r), code = 0;
  size_t len = 0;
  const char *body = fo_http_body(r, &len);
  char msg[160], reason[128];
  fo_outcome o;

  tw_account(t, it, status);
  if (status == 0) {
    snprintf(reason, sizeof(reason), "twilio: %s",
             fo_http_timed_out(r) ? "timed out" : fo_http_error(r));
    tw_fail(it, true, reason);
    return;
  }
  if (status == 200 || status == 201) {
    json_t *doc = json_loadb(body, len, 0, NULL);
    const char *sid = json_string_value(json_object_get(doc, "sid"));

    atomic_store(&t->auth_broken, false);
    fo_outcome_init(&o, FO_STATUS_SENT);
    snprintf(o.provider_id, sizeof(o.provider_id), "%s",
             sid != NULL ? sid : "");
    if (sid == NULL)
      fo_log_rl(&rl_odd, TW_LOG_MS, FO_LOG_WARN, TW_MOD,
                "twilio accepted a message without a sid", "status=%ld",
                status);
    json_decref(doc);
    tw_item_done(it, &o);
    return;
  }

  tw_error_doc(body, len, &code, msg, sizeof(msg));
  if (status == 401 || code == TW_ERR_AUTH) {
    tw_on_auth_failure(t, status, code);
    snprintf(reason, sizeof(reason), "twilio %ld: %.100s", code,
             msg[0] != '\0' ? msg : "Authenticate");
    tw_fail(it, false, reason);
    return;
  }
  if (status == 429 || code == TW_ERR_TOO_MANY || status >= 500 ||
      status == 408) {
    fo_outcome_init(&o, FO_STATUS_FAILED);
    o.retryable = true;
    o.retry_after_ms = tw_retry_after_ms(fo_http_header(r, "Retry-After"));
    snprintf(o.reason, sizeof(o.reason), "twilio %ld: %.100s", status,
             msg[0] != '\0' ? msg : "try again later");
    tw_item_done(it, &o);
    return;
  }
  if (code == TW_ERR_INVALID_TO || code == TW_ERR_NOT_MOBILE ||
      code == TW_ERR_UNSUBSCRIBED) {
    bool unsub = code == TW_ERR_UNSUBSCRIBED;

    tw_action_push(t, unsub ? TW_SMS_OFF : TW_PHONE_UNUSABLE, d->user,
                   d->recipient != NULL ? d->recipient->phone : NULL);
    fo_outcome_init(&o, FO_STATUS_SUPPRESSED);
    o.suppress = unsub ? FO_SUP_OPTED_OUT : FO_SUP_NO_ADDRESS;
    snprintf(o.reason, sizeof(o.reason), "twilio %ld", code);
    tw_item_done(it, &o);
    return;
  }
  if (code != 0)
    snprintf(reason, sizeof(reason), "twilio %ld: %.100s", code, msg);
  else
    snprintf(reason, sizeof(reason), "twilio: HTTP %ld", status);
  tw_fail(it, false, reason);
}

/* ---- sending ---- */

/* Builds the request and hands it to the HTTP client; completes the
 * delivery itself when that fails. */
static void tw_send(twilio *t, tw_item *it) {
  const fo_delivery *d = it->d;
  static const char *const headers[] = {
      "Content-Type: application/x-www-form-urlencoded",
      "Accept: application/json", NULL};
  fo_buf b = FO_BUF_INIT;
  fo_http_request req;
  char *text = tw_text(d->event);
  int rc;

  if (text == NULL) {
    tw_fail(it, true, "out of memory");
    return;
  }
  fo_buf_append(&b, "To=", 3);
  tw_form_escape(&b, d->recipient->phone);
  fo_buf_append(&b, "&", 1);
  fo_buf_append_str(&b, t->sender_form);
  fo_buf_append(&b, "&Body=", 6);
  tw_form_escape(&b, text);
  fo_buf_append_str(&b, t->callback_form);
  free(text);
  if (b.oom) {
    fo_buf_free(&b);
    tw_fail(it, true, "out of memory");
    return;
  }

  memset(&req, 0, sizeof(req));
  req.method = "POST";
  req.url = t->messages_url;
  req.headers = headers;
  req.body = b.p;
  req.body_len = b.len;
  req.userpwd = t->userpwd;
  req.timeout_ms = t->timeout_ms;
  it->start_us = fo_now_us();
  rc = fo_http_send(t->http, &req, tw_done, it);
  fo_buf_free(&b);
  if (rc != FO_OK)
    tw_fail(it, true, rc == FO_ECLOSED ? "twilio: channel stopping"
                                       : "twilio: client queue full");
}

/* The per-instance fallback while Redis cannot count: at most `rate`
 * sends per wall-clock second from this instance. Lock held. */
static bool tw_local_allow(twilio *t, int64_t now_ms) {
  int64_t s = now_ms / 1000;

  if (s != t->local_window_s) {
    t->local_window_s = s;
    t->local_count = 0;
  }
  if (t->local_count >= t->rate)
    return false;
  t->local_count++;
  return true;
}

/*
 * One round of the rate: asks Redis about up to a second's worth of the
 * queue's head at once, sends what passes, and puts the rest back in
 * front, in order, until the next window. Runs on the worker with the
 * lock held; drops it around the round trip and the sends.
 */
static void tw_rate_round(twilio *t) {
  fo_limit_op ops[TW_BATCH_MAX];
  tw_item *batch[TW_BATCH_MAX];
  tw_item *keep_head = NULL, *keep_tail = NULL;
  size_t n = 0, limit = (size_t)t->rate;
  int64_t now = fo_wall_ms(), wait_ms = 0;
  int rc = FO_EIO;

  if (limit > TW_BATCH_MAX)
    limit = TW_BATCH_MAX;
  while (t->qhead != NULL && n < limit) {
    batch[n] = t->qhead;
    t->qhead = t->qhead->next;
    batch[n]->next = NULL;
    n++;
  }
  if (t->qhead == NULL)
    t->qtail = NULL;
  pthread_mutex_unlock(&t->mu);

  memset(ops, 0, n * sizeof(*ops));
  for (size_t i = 0; i < n; i++) {
    ops[i].kind = FO_LIMIT_RATE;
    ops[i].sender = t->sender;
    ops[i].rate = t->rate;
    ops[i].now_ms = now;
    ops[i].result = FO_LIMIT_UNAVAILABLE;
  }
  if (t->limits != NULL)
    rc = fo_limiter_decide(t->limits, ops, n);
  if (rc != FO_OK && t->limits != NULL)
    fo_log_rl(&rl_redis, TW_LOG_MS, FO_LOG_WARN, TW_MOD,
              "redis unavailable: the SMS rate is enforced per instance, "
              "not shared", "rate_per_second=%d", t->rate);

  pthread_mutex_lock(&t->mu);
  for (size_t i = 0; i < n; i++) {
    bool go = ops[i].result == FO_LIMIT_PASS;

    /* Without Redis each instance keeps to the rate on its own, so
     * several instances together may exceed it until Redis is back. */
    if (ops[i].result == FO_LIMIT_UNAVAILABLE)
      go = tw_local_allow(t, now);
    if (go) {
      batch[i]->next = NULL;
      continue;
    }
    if (ops[i].result == FO_LIMIT_THROTTLED && ops[i].retry_after_ms > 0)
      wait_ms = ops[i].retry_after_ms;
    else
      wait_ms = 1000 - now % 1000;
    if (keep_tail != NULL)
      keep_tail->next = batch[i];
    else
      keep_head = batch[i];
    keep_tail = batch[i];
    batch[i] = NULL;
  }
  if (keep_head != NULL) {
    keep_tail->next = t->qhead;
    t->qhead = keep_head;
    if (t->qtail == NULL)
      t->qtail = keep_tail;
    t->not_before_ms = fo_now_ms() + wait_ms;
  }
  pthread_mutex_unlock(&t->mu);

  for (size_t i = 0; i < n; i++) {
    if (batch[i] != NULL)
      tw_send(t, batch[i]);
  }
  pthread_mutex_lock(&t->mu);
}

static void tw_do_action(twilio *t, tw_action *a) {
  int rc;

  if (a->kind == TW_PHONE_UNUSABLE) {
    rc = a->phone != NULL
             ? fo_store_phone_unusable(t->store, a->user, a->phone, a->at_ms)
             : FO_ENOENT;
    if (rc == FO_OK)
      fo_log_info(TW_MOD, "phone marked unusable for SMS", "user=\"%s\"",
                  a->user);
  } else {
    rc = fo_store_channel_off(t->store, a->user, FO_CH_SMS);
    if (rc == FO_OK)
      fo_log_info(TW_MOD, "SMS turned off: the recipient unsubscribed",
                  "user=\"%s\"", a->user);
  }
  /* FO_ENOENT: the user or the number is gone or changed already. */
  if (rc != FO_OK && rc != FO_ENOENT)
    fo_log_rl(&rl_store, TW_LOG_MS, FO_LOG_WARN, TW_MOD,
              "cannot record what twilio said about a number",
              "user=\"%s\" error=\"%s\"", a->user, fo_strerror(rc));
  free(a->user);
  free(a->phone);
  free(a);
}

/* Waits on `cv` until `deadline_ms` (monotonic; 0: no deadline). */
static void tw_wait(pthread_cond_t *cv, pthread_mutex_t *mu,
                    int64_t deadline_ms) {
  struct timespec ts;

  if (deadline_ms == 0) {
    pthread_cond_wait(cv, mu);
    return;
  }
  ts.tv_sec = (time_t)(deadline_ms / 1000);
  ts.tv_nsec = (long)(deadline_ms % 1000) * 1000000;
  pthread_cond_timedwait(cv, mu, &ts);
}

static void *tw_worker(void *arg) {
  twilio *t = arg;

  pthread_mutex_lock(&t->mu);
  for (;;) {
    if (t->ahead != NULL) {
      tw_action *a = t->ahead;

      t->ahead = a->next;
      if (t->ahead == NULL)
        t->atail = NULL;
      pthread_mutex_unlock(&t->mu);
      tw_do_action(t, a);
      pthread_mutex_lock(&t->mu);
      continue;
    }
    if (t->closed && t->qhead != NULL) {
      tw_item *it = t->qhead;

      t->qhead = t->qtail = NULL;
      pthread_mutex_unlock(&t->mu);
      while (it != NULL) {
        tw_item *next = it->next;

        tw_fail(it, true, "twilio: channel stopping");
        it = next;
      }
      pthread_mutex_lock(&t->mu);
      continue;
    }
    if (t->qhead != NULL && fo_now_ms() >= t->not_before_ms) {
      tw_rate_round(t);
      continue;
    }
    if (t->stop)
      break;
    tw_wait(&t->wake, &t->mu, t->qhead != NULL ? t->not_before_ms : 0);
  }
  pthread_mutex_unlock(&t->mu);
  return NULL;
}

/* ---- the channel's ops ---- */

static int tw_submit(void *self, fo_delivery *d) {
  twilio *t = self;
  const char *phone = d->recipient != NULL ? d->recipient->phone : NULL;
  tw_item *it;
  fo_outcome o;
  bool closed;

  pthread_mutex_lock(&t->mu);
  closed = t->closed;
  pthread_mutex_unlock(&t->mu);
  if (closed)
    return FO_ECLOSED;

  if (!fo_twilio_e164(phone)) {
    fo_outcome_init(&o, FO_STATUS_SUPPRESSED);
    o.suppress = FO_SUP_NO_ADDRESS;
    fo_delivery_complete(d, &o);
    return FO_OK;
  }
  if (!tw_has_text(d->event)) {
    fo_outcome_init(&o, FO_STATUS_FAILED);
    snprintf(o.reason, sizeof(o.reason),
             "the event has no text for SMS (sms.text, title or body)");
    fo_delivery_complete(d, &o);
    return FO_OK;
  }
  it = calloc(1, sizeof(*it));
  if (it == NULL)
    return FO_ENOMEM;
  it->t = t;
  it->d = d;

  /* The bound is checked and taken in one section, so two workers never
   * share the last slot. */
  pthread_mutex_lock(&t->mu);
  if (t->closed || t->inflight >= t->max_inflight) {
    int rc = t->closed ? FO_ECLOSED : FO_EFULL;

    pthread_mutex_unlock(&t->mu);
    free(it);
    return rc;
  }
  t->inflight++;
  fo_gauge_set(t->inflight_gauge, t->inflight);
  if (t->rate > 0) {
    if (t->qtail != NULL)
      t->qtail->next = it;
    else
      t->qhead = it;
    t->qtail = it;
    pthread_cond_signal(&t->wake);
    it = NULL;
  }
  pthread_mutex_unlock(&t->mu);
  if (it != NULL)
    tw_send(t, it);
  return FO_OK;
}

static int tw_flush(void *self, int timeout_ms) {
  twilio *t = self;
  int64_t deadline = fo_now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
  int rc = FO_OK;

  pthread_mutex_lock(&t->mu);
  while (t->inflight > 0) {
    if (fo_now_ms() >= deadline) {
      rc = FO_ETIMEDOUT;
      break;
    }
    tw_wait(&t->idle, &t->mu, deadline);
  }
  pthread_mutex_unlock(&t->mu);
  return rc;
}

static void tw_shutdown(void *self) {
  twilio *t = self;

  if (t->shut)
    return;
  t->shut = true;
  /* The worker fails what waits for the rate (retryable: the engine
   * replays it after the restart); then the client ends what is
   * running; then the worker writes what those answers asked for. */
  pthread_mutex_lock(&t->mu);
  t->closed = true;
  pthread_cond_signal(&t->wake);
  pthread_mutex_unlock(&t->mu);
  fo_http_stop(t->http, TW_STOP_MS);
  pthread_mutex_lock(&t->mu);
  t->stop = true;
  pthread_cond_signal(&t->wake);
  pthread_mutex_unlock(&t->mu);
  if (t->worker_started) {
    pthread_join(t->worker, NULL);
    t->worker_started = false;
  }
}

static void tw_free(twilio *t) {
  if (t->http != NULL)
    fo_http_free(t->http);
  if (t->userpwd != NULL) {
    OPENSSL_cleanse(t->userpwd, strlen(t->userpwd));
    free(t->userpwd);
  }
  free(t->messages_url);
  free(t->sender_form);
  free(t->callback_form);
  free(t->sender);
  pthread_mutex_destroy(&t->mu);
  pthread_cond_destroy(&t->wake);
  pthread_cond_destroy(&t->idle);
  free(t);
}

static void tw_destroy(void *self) {
  twilio *t = self;

  tw_shutdown(t);
  tw_free(t);
}

static const fo_channel_ops tw_ops = {
    .name = "twilio",
    .submit = tw_submit,
    .flush = tw_flush,
    .shutdown = tw_shutdown,
    .destroy = tw_destroy,
};

/* ---- construction ---- */

static bool tw_set(const char *s) {
  return s != NULL && s[0] != '\0';
}

static int tw_check_conf(const fo_twilio_conf *c, char *err, size_t errlen) {
  const char *missing = NULL;

  if (!tw_set(c->url))
    missing = "url";
  else if (!tw_set(c->account_sid))
    missing = "account_sid";
  else if (!tw_set(c->auth_token))
    missing = "auth_token";
  else if (!tw_set(c->from) && !tw_set(c->messaging_service_sid))
    missing = "from (or messaging_service_sid)";
  if (missing != NULL) {
    snprintf(err, errlen, "[twilio] %s is required", missing);
    return FO_ECONFIG;
  }
  if (tw_set(c->from) && !tw_set(c->messaging_service_sid) &&
      !fo_twilio_e164(c->from)) {
    snprintf(err, errlen, "[twilio] from must be an E.164 number");
    return FO_ECONFIG;
  }
  if (c->rate_per_second < 0 || c->max_inflight < 0 || c->timeout_ms < 0) {
    snprintf(err, errlen, "[twilio] rate_per_second, max_inflight and "
                          "timeout_ms must not be negative");
    return FO_ECONFIG;
  }
  return FO_OK;
}

/* Strings derived from the configuration. */
static int tw_build_strings(twilio *t, const fo_twilio_conf *c) {
  size_t ul = strlen(c->url);
  bool mss = tw_set(c->messaging_service_sid);

  while (ul > 0 && c->url[ul - 1] == '/')
    ul--;
  if (asprintf(&t->messages_url, "%.*s/2010-04-01/Accounts/%s/Messages.json",
               (int)ul, c->url, c->account_sid) < 0) {
    t->messages_url = NULL;
    return FO_ENOMEM;
  }
  if (asprintf(&t->userpwd, "%s:%s", c->account_sid, c->auth_token) < 0) {
    t->userpwd = NULL;
    return FO_ENOMEM;
  }
  t->sender = strdup(mss ? c->messaging_service_sid : c->from);
  t->sender_form = tw_param("", mss ? "MessagingServiceSid" : "From",
                            mss ? c->messaging_service_sid : c->from);
  t->callback_form = tw_set(c->status_callback_url)
                         ? tw_param("&", "StatusCallback",
                                    c->status_callback_url)
                         : strdup("");
  if (t->sender == NULL || t->sender_form == NULL ||
      t->callback_form == NULL)
    return FO_ENOMEM;
  return FO_OK;
}

int fo_twilio_new(const fo_twilio_conf *c, fo_channel **out, char *err,
                  size_t errlen) {
  pthread_condattr_t ca;
  fo_http_conf hc;
  twilio *t;
  int rc;

  rc = tw_check_conf(c, err, errlen);
  if (rc != FO_OK)
    return rc;
  t = calloc(1, sizeof(*t));
  if (t == NULL) {
    snprintf(err, errlen, "twilio: out of memory");
    return FO_ENOMEM;
  }
  pthread_mutex_init(&t->mu, NULL);
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&t->idle, &ca);
  pthread_cond_init(&t->wake, &ca);
  pthread_condattr_destroy(&ca);
  atomic_init(&t->auth_broken, false);
  t->timeout_ms = c->timeout_ms > 0 ? c->timeout_ms : TW_DEFAULT_TIMEOUT_MS;
  t->rate = c->rate_per_second;
  t->max_inflight = c->max_inflight > 0 ? c->max_inflight : 64;
  t->store = c->store;
  t->limits = c->limits;
  t->auth_failures = fo_metrics_counter(
      "fanout_provider_auth_failures_total",
      "Provider requests refused for bad credentials", "channel=\"sms\"");
  t->latency = fo_metrics_histogram("fanout_provider_request_seconds",
                                    "Provider request latency",
                                    "channel=\"sms\"");
  t->inflight_gauge = fo_metrics_gauge(
      "fanout_provider_inflight",
      "Deliveries accepted by a channel, not yet completed",
      "channel=\"sms\"");

  rc = tw_build_strings(t, c);
  if (rc != FO_OK) {
    snprintf(err, errlen, "twilio: out of memory");
    goto fail;
  }

  memset(&hc, 0, sizeof(hc));
  hc.name = "twilio";
  hc.ca_file = tw_set(c->ca_file) ? c->ca_file : NULL;
  hc.max_inflight = t->max_inflight;
  hc.max_connections = TW_CONNECTIONS;
  rc = fo_http_new(&hc, &t->http);
  if (rc != FO_OK) {
    snprintf(err, errlen, "twilio: cannot start the HTTP client: %s",
             fo_strerror(rc));
    goto fail;
  }
  if (pthread_create(&t->worker, NULL, tw_worker, t) != 0) {
    snprintf(err, errlen, "twilio: cannot start the worker thread");
    rc = FO_ENOMEM;
    goto fail;
  }
  t->worker_started = true;

  t->ch.ops = &tw_ops;
  t->ch.self = t;
  fo_log_info(TW_MOD, "sms channel ready",
              "url=\"%s\" sender=\"%s\" rate_per_second=%d "
              "status_callback=%s",
              t->messages_url, t->sender, t->rate,
              tw_set(c->status_callback_url) ? "on" : "off");
  *out = &t->ch;
  return FO_OK;

fail:
  if (t->http != NULL)
    fo_http_stop(t->http, 0);
  tw_free(t);
  return rc;
}
