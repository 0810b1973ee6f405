/* SPDX-License-Identifier: MIT */
/*
 * SendGrid channel. submit() checks the address and files the delivery
 * under its event in a pending table; the HTTPS client's tick (every few
 * milliseconds) or a batch reaching 1,000 sends each event's pending
 * deliveries as one POST /v3/mail/send with a personalization per
 * recipient, so a fan-out to many users costs few requests while a single
 * delivery waits a few milliseconds at most. The response gives every
 * delivery of the request its outcome; when SendGrid names the
 * personalizations it refused, only those fail and the others go out
 * again.
 */
#include "sendgrid.h"

#include <ctype.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "fanout/common.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "store.h"
#include "version.h"

#define SG_MOD "sendgrid"
#define SG_CHANNEL "email"
#define SG_PATH "/v3/mail/send"
#define SG_TICK_MS 5
/* A group goes once no delivery joined it for SG_QUIET_MS, so that the
 * dispatcher's workers, which hand over one event's recipients in a few
 * bursts, fill one request; SG_LINGER_MS bounds the wait. */
#define SG_QUIET_MS 10
#define SG_LINGER_MS 100
#define SG_CONNECTIONS 16
#define SG_BUCKETS 256
#define SG_STOP_MS 5000
/* A 429's reset further away than this is not trusted to hold the whole
 * channel; the deliveries still carry the provider's own wait. */
#define SG_HOLD_MAX_MS 60000
#define SG_EMAIL_MAX 254

/* The pending deliveries of one event. */
typedef struct sg_group {
  const fo_event *ev;
  fo_delivery **ds;
  size_t n, cap;
  int64_t first_ms, last_ms;    /* monotonic: first and last filed */
  struct sg_group *next;
} sg_group;

typedef struct sendgrid sendgrid;

/* One request in flight and the deliveries it carries. */
typedef struct sg_req {
  sendgrid *sg;
  int64_t start_us;
  size_t n;
  fo_delivery *ds[];
} sg_req;

struct sendgrid {
  fo_channel ch;
  char *url;                    /* the Mail Send endpoint */
  char *auth;                   /* "Authorization: Bearer ..." */
  char *from;
  int timeout_ms;
  int max_inflight;
  fo_http *http;

  pthread_mutex_t mu;           /* guards the pending table and hold */
  sg_group *buckets[SG_BUCKETS];
  size_t pending;
  int64_t hold_until_ms;        /* monotonic; no request before it */

  atomic_int inflight;          /* accepted, not completed */
  atomic_bool closed;
  atomic_bool auth_failing;     /* the auth error was logged */
  pthread_mutex_t idle_mu;
  pthread_cond_t idle;

  fo_histogram *latency;
  fo_counter *auth_failures;
  fo_gauge *inflight_gauge;
};

/* ---- pure helpers ---- */

bool fo_sendgrid__email_ok(const char *s) {
  const char *at, *dot;
  size_t n;

  if (s == NULL)
    return false;
  n = strlen(s);
  if (n == 0 || n > SG_EMAIL_MAX)
    return false;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];

    if (c <= 0x20 || c == 0x7F)
      return false;
  }
  at = strchr(s, '@');
  if (at == NULL || at == s || strchr(at + 1, '@') != NULL)
    return false;
  /* The domain needs a dot with a label on both sides of it. */
  dot = strchr(at + 1, '.');
  return dot != NULL && dot > at + 1 && dot[1] != '\0' &&
         s[n - 1] != '.';
}

static const char *str_field(const json_t *o, const char *key) {
  const char *s = json_string_value(json_object_get(o, key));

  return s != NULL && s[0] != '\0' ? s : NULL;
}

int fo_sendgrid__content(const fo_event *ev, fo_sendgrid_content *c,
                         char *why, size_t whylen) {
  const json_t *email = json_object_get(ev->root, "email");
  const json_t *data = json_object_get(email, "template_data");

  memset(c, 0, sizeof(*c));
  c->subject = str_field(email, "subject");
  if (c->subject == NULL && ev->title != NULL && ev->title[0] != '\0')
    c->subject = ev->title;
  c->text = str_field(email, "text");
  if (c->text == NULL && ev->body != NULL && ev->body[0] != '\0')
    c->text = ev->body;
  c->html = str_field(email, "html");
  c->template_id = str_field(email, "template_id");
  c->template_data = json_is_object(data) ? data : NULL;

  /* A template carries its own subject and content. */
  if (c->template_id != NULL)
    return FO_OK;
  if (c->subject == NULL) {
    snprintf(why, whylen, "no subject: email.subject or title");
    return FO_EINVAL;
  }
  if (c->text == NULL && c->html == NULL) {
    snprintf(why, whylen, "no content: email.text, email.html or body");
    return FO_EINVAL;
  }
  return FO_OK;
}

static int add_content(json_t *root, const fo_sendgrid_content *c) {
  json_t *content;

  if (c->text == NULL && c->html == NULL)
    return 0;
  content = json_array();
  if (content == NULL || json_object_set_new(root, "content", content) < 0)
    return -1;
  /* SendGrid wants text/plain first, then text/html. */
  if (c->text != NULL &&
      json_array_append_new(content,
                            json_pack("{s:s, s:s}", "type", "text/plain",
                                      "value", c->text)) < 0)
    return -1;
  if (c->html != NULL &&
      json_array_append_new(content,
                            json_pack("{s:s, s:s}", "type", "text/html",
                                      "value", c->html)) < 0)
    return -1;
  return 0;
}

char *fo_sendgrid__body(const fo_sendgrid_content *c, const char *from,
                        const char *const *to, size_t n) {
  json_t *root, *ps, *data = NULL;
  char *out = NULL;

  root = json_pack("{s:{s:s}}", "from", "email", from);
  ps = json_array();
  if (root == NULL || ps == NULL ||
      json_object_set_new(root, "personalizations", ps) < 0)
    goto out;
  /* One copy of the template data per request, shared by every
   * personalization: the event's own tree is read by other threads. */
  if (c->template_data != NULL) {
    data = json_deep_copy(c->template_data);
    if (data == NULL)
      goto out;
  }
  for (size_t i = 0; i < n; i++) {
    json_t *p = json_pack("{s:[{s:s}]}", "to", "email", to[i]);

    if (p == NULL || json_array_append_new(ps, p) < 0)
      goto out;
    if (data != NULL &&
        json_object_set(p, "dynamic_template_data", data) < 0)
      goto out;
  }
  if (c->subject != NULL &&
      json_object_set_new(root, "subject", json_string(c->subject)) < 0)
    goto out;
  if (c->template_id != NULL &&
      json_object_set_new(root, "template_id",
                          json_string(c->template_id)) < 0)
    goto out;
  if (add_content(root, c) < 0)
    goto out;
  out = json_dumps(root, JSON_COMPACT);

out:
  json_decref(data);
  json_decref(root);
  return out;
}

/* The personalization a field such as "personalizations.3.to.0.email"
 * names, or -1. */
static long field_index(const char *field) {
  static const char pfx[] = "personalizations.";
  char *end;
  long i;

  if (field == NULL || strncmp(field, pfx, sizeof(pfx) - 1) != 0 ||
      !isdigit((unsigned char)field[sizeof(pfx) - 1]))
    return -1;
  i = strtol(field + sizeof(pfx) - 1, &end, 10);
  if (*end != '\0' && *end != '.')
    return -1;
  return i;
}

size_t fo_sendgrid__errors(const char *body, size_t len, char *reason,
                           size_t reasonlen, const char *fallback,
                           bool *bad, size_t n) {
  json_t *doc = NULL, *e;
  const char *first = NULL;
  size_t i, unnamed = 0, seen = 0;

  if (body != NULL && len > 0)
    doc = json_loadb(body, len, 0, NULL);
  json_array_foreach(json_object_get(doc, "errors"), i, e) {
    const char *msg = json_string_value(json_object_get(e, "message"));
    long idx = field_index(json_string_value(json_object_get(e, "field")));

    seen++;
    if (first == NULL && msg != NULL && msg[0] != '\0')
      first = msg;
    if (idx >= 0 && (size_t)idx < n)
      bad[idx] = true;
    else
      unnamed++;
  }
  snprintf(reason, reasonlen, "%s", first != NULL ? first : fallback);
  json_decref(doc);
  /* No error at all cannot single anyone out. */
  return seen == 0 ? 1 : unnamed;
}

typedef struct sg_sort {
  const char *const *to;
  size_t i;
} sg_sort;

static int by_address(const void *a, const void *b) {
  const sg_sort *x = a, *y = b;
  int c = strcasecmp(x->to[x->i], y->to[y->i]);

  if (c != 0)
    return c;
  return x->i < y->i ? -1 : x->i > y->i;
}

size_t fo_sendgrid__split(const char *const *to, size_t n, size_t max,
                          size_t *group) {
  sg_sort *s;
  size_t *count, *base, layers = 0, total = 0, k = 0;

  if (n == 0)
    return 0;
  s = malloc(n * sizeof(*s));
  count = calloc(n, sizeof(*count));
  base = calloc(n, sizeof(*base));
  if (s == NULL || count == NULL || base == NULL) {
    /* Out of memory: one request per address is always valid. */
    for (size_t i = 0; i < n; i++)
      group[i] = i;
    total = n;
    goto out;
  }

  /* The k-th copy of an address goes to layer k, so no layer holds an
   * address twice; group[] holds the layer for now. */
  for (size_t i = 0; i < n; i++)
    s[i] = (sg_sort){to, i};
  qsort(s, n, sizeof(*s), by_address);
  for (size_t i = 0; i < n; i++) {
    if (i > 0 && strcasecmp(to[s[i].i], to[s[i - 1].i]) == 0)
      k++;
    else
      k = 0;
    group[s[i].i] = k;
    count[k]++;
    if (k + 1 > layers)
      layers = k + 1;
  }

  /* Each layer is cut into requests of at most `max`, in input order. */
  for (size_t l = 0; l < layers; l++) {
    base[l] = total;
    total += (count[l] + max - 1) / max;
    count[l] = 0;
  }
  for (size_t i = 0; i < n; i++) {
    size_t l = group[i];

    group[i] = base[l] + count[l]++ / max;
  }

out:
  free(s);
  free(count);
  free(base);
  return total;
}

/* ---- completion ---- */

static void sg_done_one(sendgrid *sg, fo_delivery *d, const fo_outcome *o) {
  fo_delivery_complete(d, o);
  fo_gauge_add(sg->inflight_gauge, -1);
  if (atomic_fetch_sub(&sg->inflight, 1) == 1) {
    pthread_mutex_lock(&sg->idle_mu);
    pthread_cond_broadcast(&sg->idle);
    pthread_mutex_unlock(&sg->idle_mu);
  }
}

static void sg_fail(sendgrid *sg, fo_delivery *const *ds, size_t n,
                    bool retryable, int64_t after_ms, const char *why) {
  fo_outcome o;

  fo_outcome_init(&o, FO_STATUS_FAILED);
  o.retryable = retryable;
  o.retry_after_ms = after_ms;
  snprintf(o.reason, sizeof(o.reason), "%s", why);
  for (size_t i = 0; i < n; i++)
    sg_done_one(sg, ds[i], &o);
}

/* ---- the pending table ---- */

static size_t bucket_of(const fo_event *ev) {
  uintptr_t p = (uintptr_t)ev;

  return (size_t)((p >> 4) ^ (p >> 12)) % SG_BUCKETS;
}

/* Files `d` under its event; returns a group taken out of the table when
 * it reached a full batch, else NULL. Called with sg->mu held. */
static int file_locked(sendgrid *sg, fo_delivery *d, sg_group **full) {
  size_t b = bucket_of(d->event);
  sg_group *g;

  *full = NULL;
  for (g = sg->buckets[b]; g != NULL && g->ev != d->event; g = g->next)
    ;
  if (g == NULL) {
    g = calloc(1, sizeof(*g));
    if (g == NULL)
      return FO_ENOMEM;
    g->ev = d->event;
    g->first_ms = fo_now_ms();
    g->next = sg->buckets[b];
    sg->buckets[b] = g;
  }
  if (g->n == g->cap) {
    size_t cap = g->cap == 0 ? 8 : g->cap * 2;
    fo_delivery **ds = realloc(g->ds, cap * sizeof(*ds));

    if (ds == NULL)
      return FO_ENOMEM;
    g->ds = ds;
    g->cap = cap;
  }
  g->ds[g->n++] = d;
  g->last_ms = fo_now_ms();
  sg->pending++;

  /* A full batch goes at once, unless a rate limit holds the channel;
   * then it grows, and is cut into requests when it goes. */
  if (g->n >= FO_SENDGRID_BATCH_MAX && fo_now_ms() >= sg->hold_until_ms) {
    sg_group **pp = &sg->buckets[b];

    while (*pp != g)
      pp = &(*pp)->next;
    *pp = g->next;
    g->next = NULL;
    sg->pending -= g->n;
    *full = g;
  }
  return FO_OK;
}

/* Takes the pending groups out of the table, as one list: all of them,
 * or with `due` only those whose wait is over. Called with sg->mu held. */
static sg_group *take_locked(sendgrid *sg, bool due) {
  int64_t now = fo_now_ms();
  sg_group *all = NULL;

  for (size_t b = 0; b < SG_BUCKETS; b++) {
    sg_group **pp = &sg->buckets[b];

    while (*pp != NULL) {
      sg_group *g = *pp;

      if (due && now - g->last_ms < SG_QUIET_MS &&
          now - g->first_ms < SG_LINGER_MS) {
        pp = &g->next;
        continue;
      }
      *pp = g->next;
      sg->pending -= g->n;
      g->next = all;
      all = g;
    }
  }
  return all;
}

static void group_free(sg_group *g) {
  free(g->ds);
  free(g);
}

/* ---- requests ---- */

static void on_response(void *arg, const fo_http_response *r);

static void count_code(long status, const char *err) {
  char labels[64];

  if (status > 0)
    snprintf(labels, sizeof(labels), "channel=\"%s\",code=\"%ld\"",
             SG_CHANNEL, status);
  else
    snprintf(labels, sizeof(labels), "channel=\"%s\",code=\"%s\"",
             SG_CHANNEL, err);
  fo_counter_add(fo_metrics_counter("fanout_provider_requests_total",
                                    "Provider requests by answer",
                                    labels),
                 1);
}

/* Sends one request for `n` deliveries; completes them itself when the
 * request cannot be queued. Takes ownership of nothing. */
static void send_request(sendgrid *sg, const fo_sendgrid_content *c,
                         fo_delivery *const *ds, size_t n) {
  const char *headers[] = {sg->auth, "Content-Type: application/json",
                           "User-Agent: fanout/" FO_VERSION, NULL};
  const char **to = NULL;
  sg_req *req = NULL;
  fo_http_request hr;
  char *body = NULL;
  int rc = FO_ENOMEM;

  to = malloc(n * sizeof(*to));
  req = malloc(sizeof(*req) + n * sizeof(req->ds[0]));
  if (to == NULL || req == NULL)
    goto out;
  for (size_t i = 0; i < n; i++)
    to[i] = ds[i]->recipient->email;
  body = fo_sendgrid__body(c, sg->from, to, n);
  if (body == NULL)
    goto out;

  req->sg = sg;
  req->n = n;
  memcpy(req->ds, ds, n * sizeof(req->ds[0]));
  req->start_us = fo_now_us();
  memset(&hr, 0, sizeof(hr));
  hr.method = "POST";
  hr.url = sg->url;
  hr.headers = headers;
  hr.body = body;
  hr.body_len = strlen(body);
  hr.timeout_ms = sg->timeout_ms;
  rc = fo_http_send(sg->http, &hr, on_response, req);
  if (rc == FO_OK)
    req = NULL;

out:
  if (rc != FO_OK) {
    char why[64];

    /* Not the provider's answer: let the engine try again later. */
    snprintf(why, sizeof(why), "not sent: %s", fo_strerror(rc));
    sg_fail(sg, ds, n, true, 0, why);
  }
  free(body);
  free(to);
  free(req);
}

/* Sends the deliveries of one group, in as many requests as duplicate
 * addresses and the batch limit need, and frees the group. */
static void send_group(sendgrid *sg, sg_group *g) {
  fo_sendgrid_content c;
  const char **to = NULL;
  size_t *grp = NULL;
  fo_delivery **part = NULL;
  size_t ngroups;
  char why[96];

  if (fo_sendgrid__content(g->ev, &c, why, sizeof(why)) != FO_OK) {
    sg_fail(sg, g->ds, g->n, false, 0, why);
    goto out;
  }
  to = malloc(g->n * sizeof(*to));
  grp = malloc(g->n * sizeof(*grp));
  part = malloc(g->n * sizeof(*part));
  if (to == NULL || grp == NULL || part == NULL) {
    sg_fail(sg, g->ds, g->n, true, 0, "not sent: out of memory");
    goto out;
  }
  for (size_t i = 0; i < g->n; i++)
    to[i] = g->ds[i]->recipient->email;
  ngroups = fo_sendgrid__split(to, g->n, FO_SENDGRID_BATCH_MAX, grp);
  for (size_t k = 0; k < ngroups; k++) {
    size_t m = 0;

    for (size_t i = 0; i < g->n; i++)
      if (grp[i] == k)
        part[m++] = g->ds[i];
    if (m > 0)
      send_request(sg, &c, part, m);
  }

out:
  free(to);
  free(grp);
  free(part);
  group_free(g);
}

static void send_all(sendgrid *sg, sg_group *all) {
  while (all != NULL) {
    sg_group *next = all->next;

    send_group(sg, all);
    all = next;
  }
}

/* Wall-clock epoch seconds of a rate-limit reset, as milliseconds to
 * wait; 0 when the header is absent or already past. */
static int64_t wait_ms(const fo_http_response *r) {
  const char *reset = fo_http_header(r, "X-RateLimit-Reset");
  const char *after = fo_http_header(r, "Retry-After");
  int64_t ms = 0;

  if (reset != NULL) {
    long long s = strtoll(reset, NULL, 10);

    if (s > 0)
      ms = (int64_t)s * 1000 - fo_wall_ms();
  } else if (after != NULL) {
    long long s = strtoll(after, NULL, 10);

    if (s > 0)
      ms = (int64_t)s * 1000;
  }
  return ms > 0 ? ms : 0;
}

static void on_auth_failure(sendgrid *sg, long status) {
  fo_counter_add(sg->auth_failures, 1);
  if (!atomic_exchange(&sg->auth_failing, true))
    fo_log_error(SG_MOD,
                 "SendGrid refused the API key: every e-mail fails until "
                 "[sendgrid] api_key is fixed",
                 "channel=%s status=%ld", SG_CHANNEL, status);
}

static void on_rate_limit(sendgrid *sg, int64_t after_ms) {
  static fo_ratelimit rl;
  int64_t hold = after_ms < SG_HOLD_MAX_MS ? after_ms : SG_HOLD_MAX_MS;

  pthread_mutex_lock(&sg->mu);
  if (fo_now_ms() + hold > sg->hold_until_ms)
    sg->hold_until_ms = fo_now_ms() + hold;
  pthread_mutex_unlock(&sg->mu);
  fo_log_rl(&rl, 10000, FO_LOG_WARN, SG_MOD,
            "rate limited by SendGrid; holding requests", "wait_ms=%lld",
            (long long)after_ms);
}

/* A 4xx other than auth and rate limits: when SendGrid named the
 * personalizations it refused, only those fail and the rest are filed
 * again; otherwise the whole request fails with SendGrid's message. */
static void on_refused(sendgrid *sg, sg_req *req, const fo_http_response *r,
                       long status) {
  static fo_ratelimit rl;
  bool *bad = calloc(req->n, sizeof(*bad));
  char reason[128], fallback[32];
  size_t body_len = 0, nbad = 0, unnamed;
  const char *body = fo_http_body(r, &body_len);
  fo_outcome o;

  snprintf(fallback, sizeof(fallback), "HTTP %ld", status);
  if (bad == NULL) {
    sg_fail(sg, req->ds, req->n, false, 0, fallback);
    return;
  }
  unnamed = fo_sendgrid__errors(body, body_len, reason, sizeof(reason),
                                fallback, bad, req->n);
  for (size_t i = 0; i < req->n; i++)
    nbad += bad[i];
  fo_log_rl(&rl, 10000, FO_LOG_WARN, SG_MOD, "SendGrid refused a request",
            "status=%ld recipients=%zu refused=%zu reason=\"%s\"", status,
            req->n, unnamed > 0 ? req->n : nbad, reason);

  if (unnamed > 0 || nbad == 0 || nbad == req->n) {
    sg_fail(sg, req->ds, req->n, false, 0, reason);
    free(bad);
    return;
  }
  fo_outcome_init(&o, FO_STATUS_FAILED);
  snprintf(o.reason, sizeof(o.reason), "%s", reason);
  for (size_t i = 0; i < req->n; i++) {
    sg_group *full = NULL;
    int rc;

    if (bad[i]) {
      sg_done_one(sg, req->ds[i], &o);
      continue;
    }
    pthread_mutex_lock(&sg->mu);
    rc = file_locked(sg, req->ds[i], &full);
    pthread_mutex_unlock(&sg->mu);
    if (rc != FO_OK)
      sg_fail(sg, &req->ds[i], 1, true, 0, "not sent: out of memory");
    if (full != NULL)
      send_group(sg, full);
  }
  free(bad);
}

static void on_response(void *arg, const fo_http_response *r) {
  sg_req *req = arg;
  sendgrid *sg = req->sg;
  long status = fo_http_status(r);
  char why[128];

  fo_histogram_observe_us(sg->latency, fo_now_us() - req->start_us);
  count_code(status, fo_http_timed_out(r) ? "timeout" : "error");

  if (status >= 200 && status < 300) {
    const char *id = fo_http_header(r, "X-Message-Id");
    fo_outcome o;

    if (atomic_exchange(&sg->auth_failing, false))
      fo_log_info(SG_MOD, "SendGrid accepts the API key again",
                  "channel=%s", SG_CHANNEL);
    fo_outcome_init(&o, FO_STATUS_SENT);
    snprintf(o.provider_id, sizeof(o.provider_id), "%s",
             id != NULL ? id : "");
    for (size_t i = 0; i < req->n; i++)
      sg_done_one(sg, req->ds[i], &o);
  } else if (status == 401 || status == 403) {
    on_auth_failure(sg, status);
    sg_fail(sg, req->ds, req->n, false, 0, "unauthorized");
  } else if (status == 429) {
    int64_t after = wait_ms(r);

    on_rate_limit(sg, after);
    sg_fail(sg, req->ds, req->n, true, after, "rate limited (HTTP 429)");
  } else if (status >= 500) {
    static fo_ratelimit rl;

    fo_log_rl(&rl, 10000, FO_LOG_WARN, SG_MOD, "SendGrid server error",
              "status=%ld recipients=%zu", status, req->n);
    snprintf(why, sizeof(why), "HTTP %ld", status);
    sg_fail(sg, req->ds, req->n, true, wait_ms(r), why);
  } else if (status >= 400) {
    on_refused(sg, req, r, status);
  } else if (status == 0) {
    static fo_ratelimit rl;
    const char *err = fo_http_error(r);

    /* Known limitation: SendGrid may have accepted a request whose answer
     * never came, so its retry can send those e-mails twice. */
    fo_log_rl(&rl, 10000, FO_LOG_WARN, SG_MOD, "request to SendGrid failed",
              "error=\"%s\" recipients=%zu", err != NULL ? err : "?",
              req->n);
    snprintf(why, sizeof(why), "%s",
             fo_http_timed_out(r) ? "timeout"
                                  : (err != NULL ? err : "network error"));
    sg_fail(sg, req->ds, req->n, true, 0, why);
  } else {
    snprintf(why, sizeof(why), "unexpected HTTP %ld", status);
    sg_fail(sg, req->ds, req->n, false, 0, why);
  }
  free(req);
}

/* Runs on the client's thread: sends what is due unless a rate limit
 * holds the channel. When the in-flight bound is reached no delivery can
 * join a group any more, so waiting for one would only cost time. */
static void on_tick(void *arg) {
  sendgrid *sg = arg;
  sg_group *all = NULL;
  bool full = atomic_load(&sg->inflight) >= sg->max_inflight;

  pthread_mutex_lock(&sg->mu);
  if (sg->pending > 0 && fo_now_ms() >= sg->hold_until_ms)
    all = take_locked(sg, !full);
  pthread_mutex_unlock(&sg->mu);
  send_all(sg, all);
}

/* ---- channel ops ---- */

static bool take_slot(sendgrid *sg) {
  int n = atomic_load(&sg->inflight);

  do {
    if (n >= sg->max_inflight)
      return false;
  } while (!atomic_compare_exchange_weak(&sg->inflight, &n, n + 1));
  fo_gauge_add(sg->inflight_gauge, 1);
  return true;
}

static int sg_submit(void *self, fo_delivery *d) {
  sendgrid *sg = self;
  const char *email = d->recipient != NULL ? d->recipient->email : NULL;
  sg_group *full = NULL;
  int rc;

  if (atomic_load(&sg->closed))
    return FO_ECLOSED;
  if (!take_slot(sg))
    return FO_EFULL;

  if (!fo_sendgrid__email_ok(email)) {
    fo_outcome o;

    fo_outcome_init(&o, FO_STATUS_SUPPRESSED);
    o.suppress = FO_SUP_NO_ADDRESS;
    sg_done_one(sg, d, &o);
    return FO_OK;
  }

  pthread_mutex_lock(&sg->mu);
  rc = file_locked(sg, d, &full);
  pthread_mutex_unlock(&sg->mu);
  if (rc != FO_OK) {
    /* Not accepted: the dispatcher records the failure itself. */
    fo_gauge_add(sg->inflight_gauge, -1);
    atomic_fetch_sub(&sg->inflight, 1);
    return rc;
  }
  if (full != NULL)
    send_group(sg, full);
  return FO_OK;
}

static int sg_flush(void *self, int timeout_ms) {
  sendgrid *sg = self;
  int64_t deadline = fo_now_ms() + timeout_ms;
  sg_group *all;
  int rc = FO_OK;

  /* What waits for the next tick goes now, unless a rate limit holds. */
  pthread_mutex_lock(&sg->mu);
  all = fo_now_ms() >= sg->hold_until_ms ? take_locked(sg, false) : NULL;
  pthread_mutex_unlock(&sg->mu);
  send_all(sg, all);

  pthread_mutex_lock(&sg->idle_mu);
  while (atomic_load(&sg->inflight) > 0) {
    int64_t left = deadline - fo_now_ms();
    struct timespec ts;

    if (left <= 0) {
      rc = FO_ETIMEDOUT;
      break;
    }
    /* Short waits: the last completion may signal between our load and
     * the wait, and the hold may end without any completion. */
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += (left < 10 ? left : 10) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
      ts.tv_sec++;
      ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&sg->idle, &sg->idle_mu, &ts);
  }
  pthread_mutex_unlock(&sg->idle_mu);
  return rc;
}

static void sg_shutdown(void *self) {
  sendgrid *sg = self;
  sg_group *all;

  if (atomic_exchange(&sg->closed, true))
    return;
  pthread_mutex_lock(&sg->mu);
  all = take_locked(sg, false);
  pthread_mutex_unlock(&sg->mu);
  send_all(sg, all);
  fo_http_stop(sg->http, SG_STOP_MS);

  /* A partial refusal may have filed deliveries again while the client
   * stopped; they end here, for a replay later. */
  pthread_mutex_lock(&sg->mu);
  all = take_locked(sg, false);
  pthread_mutex_unlock(&sg->mu);
  while (all != NULL) {
    sg_group *next = all->next;

    sg_fail(sg, all->ds, all->n, true, 0, "not sent: channel closed");
    group_free(all);
    all = next;
  }
}

static void sg_destroy(void *self) {
  sendgrid *sg = self;

  if (sg == NULL)
    return;
  if (sg->http != NULL)
    fo_http_free(sg->http);
  for (size_t b = 0; b < SG_BUCKETS; b++) {
    while (sg->buckets[b] != NULL) {
      sg_group *g = sg->buckets[b];

      sg->buckets[b] = g->next;
      group_free(g);
    }
  }
  pthread_mutex_destroy(&sg->mu);
  pthread_mutex_destroy(&sg->idle_mu);
  pthread_cond_destroy(&sg->idle);
  free(sg->url);
  if (sg->auth != NULL) {
    /* The key should not linger in freed memory. */
    memset(sg->auth, 0, strlen(sg->auth));
    free(sg->auth);
  }
  free(sg->from);
  free(sg);
}

static const fo_channel_ops sg_ops = {
    .name = "sendgrid",
    .submit = sg_submit,
    .flush = sg_flush,
    .shutdown = sg_shutdown,
    .destroy = sg_destroy,
};

static bool printable(const char *s) {
  for (; *s != '\0'; s++)
    if ((unsigned char)*s < 0x20 || *s == 0x7F)
      return false;
  return true;
}

static int check_conf(const fo_sendgrid_conf *c, char *err, size_t errlen) {
  if (c->url == NULL || c->url[0] == '\0') {
    snprintf(err, errlen, "[sendgrid] url is required");
    return FO_ECONFIG;
  }
  if (c->api_key == NULL || c->api_key[0] == '\0' ||
      !printable(c->api_key)) {
    snprintf(err, errlen, "[sendgrid] api_key is required (one line)");
    return FO_ECONFIG;
  }
  if (!fo_sendgrid__email_ok(c->from)) {
    snprintf(err, errlen, "[sendgrid] from must be an e-mail address");
    return FO_ECONFIG;
  }
  return FO_OK;
}

int fo_sendgrid_new(const fo_sendgrid_conf *c, fo_channel **out, char *err,
                    size_t errlen) {
  fo_http_conf hc;
  sendgrid *sg;
  size_t ulen;
  int rc;

  rc = check_conf(c, err, errlen);
  if (rc != FO_OK)
    return rc;
  sg = calloc(1, sizeof(*sg));
  if (sg == NULL)
    goto nomem;
  pthread_mutex_init(&sg->mu, NULL);
  pthread_mutex_init(&sg->idle_mu, NULL);
  pthread_cond_init(&sg->idle, NULL);
  sg->ch.ops = &sg_ops;
  sg->ch.self = sg;
  sg->max_inflight = c->max_inflight > 0 ? c->max_inflight : 64;
  sg->timeout_ms = c->timeout_ms > 0 ? c->timeout_ms : 30000;

  ulen = strlen(c->url);
  while (ulen > 0 && c->url[ulen - 1] == '/')
    ulen--;
  if (asprintf(&sg->url, "%.*s%s", (int)ulen, c->url, SG_PATH) < 0) {
    sg->url = NULL;
    goto nomem;
  }
  if (asprintf(&sg->auth, "Authorization: Bearer %s", c->api_key) < 0) {
    sg->auth = NULL;
    goto nomem;
  }
  sg->from = strdup(c->from);
  if (sg->from == NULL)
    goto nomem;

  sg->latency = fo_metrics_histogram("fanout_provider_request_seconds",
                                     "Provider request latency",
                                     "channel=\"" SG_CHANNEL "\"");
  sg->auth_failures = fo_metrics_counter(
      "fanout_provider_auth_failures_total",
      "Provider requests refused for bad credentials",
      "channel=\"" SG_CHANNEL "\"");
  sg->inflight_gauge = fo_metrics_gauge(
      "fanout_provider_inflight", "Deliveries accepted by a channel, not "
      "yet completed", "channel=\"" SG_CHANNEL "\"");

  memset(&hc, 0, sizeof(hc));
  hc.name = "sendgrid";
  hc.ca_file = c->ca_file;
  /* Every request carries at least one delivery, so the client never
   * refuses one the channel accepted. */
  hc.max_inflight = sg->max_inflight;
  hc.max_connections = SG_CONNECTIONS;
  hc.tick_ms = SG_TICK_MS;
  hc.tick = on_tick;
  hc.tick_arg = sg;
  rc = fo_http_new(&hc, &sg->http);
  if (rc != FO_OK) {
    snprintf(err, errlen, "sendgrid: cannot start the HTTPS client: %s",
             fo_strerror(rc));
    sg_destroy(sg);
    return rc;
  }
  *out = &sg->ch;
  return FO_OK;

nomem:
  snprintf(err, errlen, "sendgrid: out of memory");
  sg_destroy(sg);
  return FO_ENOMEM;
}
