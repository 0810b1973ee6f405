/* SPDX-License-Identifier: MIT */
/*
 * Unit tests for the SendGrid channel: the address check, the request
 * body, SendGrid's error bodies and the split of duplicate addresses; then
 * the channel itself, driven by a real dispatcher and queue against an
 * in-process HTTP server (libmicrohttpd, plain HTTP) that answers as
 * scripted: batching, outcomes per status, a refusal naming one
 * recipient, the in-flight bound and shutdown.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <jansson.h>
#include <microhttpd.h>

#include "dispatch.h"
#include "fanout/channel.h"
#include "fanout/common.h"
#include "fanout/event.h"
#include "metrics.h"
#include "queue.h"
#include "sendgrid.h"
#include "store.h"

#define WAIT_MS 20000
#define MAX_OUTS 256
#define MAX_REQS 64

/* ---- pure helpers ---- */

static void test_email_check(void **state) {
  char long_ok[255], too_long[256];

  (void)state;
  assert_true(fo_sendgrid__email_ok("a@example.com"));
  assert_true(fo_sendgrid__email_ok("first.last+tag@mail.example.co.uk"));
  assert_false(fo_sendgrid__email_ok(NULL));
  assert_false(fo_sendgrid__email_ok(""));
  assert_false(fo_sendgrid__email_ok("example.com"));
  assert_false(fo_sendgrid__email_ok("@example.com"));
  assert_false(fo_sendgrid__email_ok("a@"));
  assert_false(fo_sendgrid__email_ok("a@localhost"));
  assert_false(fo_sendgrid__email_ok("a@.com"));
  assert_false(fo_sendgrid__email_ok("a@example."));
  assert_false(fo_sendgrid__email_ok("a@b@example.com"));
  assert_false(fo_sendgrid__email_ok("a b@example.com"));
  assert_false(fo_sendgrid__email_ok("a@exa\nmple.com"));
  assert_false(fo_sendgrid__email_ok("a@exa\x7Fmple.com"));

  /* 254 bytes is the most an address may have. */
  memset(long_ok, 'a', sizeof(long_ok));
  memcpy(long_ok + 254 - 12, "@example.com", 12);
  long_ok[254] = '\0';
  assert_true(fo_sendgrid__email_ok(long_ok));
  memset(too_long, 'a', sizeof(too_long));
  memcpy(too_long + 255 - 12, "@example.com", 12);
  too_long[255] = '\0';
  assert_false(fo_sendgrid__email_ok(too_long));
}

static fo_event *decode(const char *json) {
  fo_event *ev = NULL;
  fo_event_error err;

  memset(&err, 0, sizeof(err));
  assert_int_equal(fo_event_decode(json, strlen(json), 0, &ev, &err), FO_OK);
  return ev;
}

static void test_content_from_event(void **state) {
  fo_sendgrid_content c;
  char why[96];
  fo_event *ev;

  (void)state;
  /* Title and body stand in for a missing subject and text. */
  ev = decode("{\"id\":\"e\",\"category\":\"c\",\"to\":[\"u\"],"
              "\"title\":\"T\",\"body\":\"B\"}");
  assert_int_equal(fo_sendgrid__content(ev, &c, why, sizeof(why)), FO_OK);
  assert_string_equal(c.subject, "T");
  assert_string_equal(c.text, "B");
  assert_null(c.html);
  assert_null(c.template_id);
  fo_event_free(ev);

  /* The email object wins over them. */
  ev = decode("{\"id\":\"e\",\"category\":\"c\",\"to\":[\"u\"],"
              "\"title\":\"T\",\"body\":\"B\",\"email\":{\"subject\":\"S\","
              "\"text\":\"X\",\"html\":\"<p>H</p>\"}}");
  assert_int_equal(fo_sendgrid__content(ev, &c, why, sizeof(why)), FO_OK);
  assert_string_equal(c.subject, "S");
  assert_string_equal(c.text, "X");
  assert_string_equal(c.html, "<p>H</p>");
  fo_event_free(ev);

  /* A template needs neither subject nor content. */
  ev = decode("{\"id\":\"e\",\"category\":\"c\",\"to\":[\"u\"],"
              "\"email\":{\"template_id\":\"d-1\",\"template_data\":"
              "{\"k\":1}}}");
  assert_int_equal(fo_sendgrid__content(ev, &c, why, sizeof(why)), FO_OK);
  assert_string_equal(c.template_id, "d-1");
  assert_non_null(c.template_data);
  assert_null(c.subject);
  fo_event_free(ev);

  ev = decode("{\"id\":\"e\",\"category\":\"c\",\"to\":[\"u\"],"
              "\"body\":\"B\"}");
  assert_int_equal(fo_sendgrid__content(ev, &c, why, sizeof(why)),
                   FO_EINVAL);
  assert_non_null(strstr(why, "subject"));
  fo_event_free(ev);

  ev = decode("{\"id\":\"e\",\"category\":\"c\",\"to\":[\"u\"],"
              "\"title\":\"T\"}");
  assert_int_equal(fo_sendgrid__content(ev, &c, why, sizeof(why)),
                   FO_EINVAL);
  assert_non_null(strstr(why, "content"));
  fo_event_free(ev);
}

static void test_body_shape(void **state) {
  const char *to[] = {"a@example.com", "b@example.com"};
  fo_sendgrid_content c;
  json_t *doc, *ps, *content, *data;
  char *body;

  (void)state;
  memset(&c, 0, sizeof(c));
  c.subject = "Hello \"you\"";
  c.text = "plain";
  c.html = "<b>html</b>";
  body = fo_sendgrid__body(&c, "from@example.com", to, 2);
  assert_non_null(body);
  doc = json_loads(body, 0, NULL);
  free(body);
  assert_non_null(doc);
  ps = json_object_get(doc, "personalizations");
  assert_int_equal(json_array_size(ps), 2);
  assert_string_equal(json_string_value(json_object_get(
                          json_array_get(json_object_get(
                                             json_array_get(ps, 1), "to"),
                                         0),
                          "email")),
                      "b@example.com");
  assert_string_equal(json_string_value(json_object_get(
                          json_object_get(doc, "from"), "email")),
                      "from@example.com");
  assert_string_equal(json_string_value(json_object_get(doc, "subject")),
                      "Hello \"you\"");
  content = json_object_get(doc, "content");
  assert_int_equal(json_array_size(content), 2);
  assert_string_equal(json_string_value(json_object_get(
                          json_array_get(content, 0), "type")),
                      "text/plain");
  assert_string_equal(json_string_value(json_object_get(
                          json_array_get(content, 1), "value")),
                      "<b>html</b>");
  assert_null(json_object_get(doc, "template_id"));
  json_decref(doc);

  /* A template: its id, its data in every personalization, no content. */
  data = json_pack("{s:s}", "order", "1234");
  memset(&c, 0, sizeof(c));
  c.template_id = "d-abc";
  c.template_data = data;
  body = fo_sendgrid__body(&c, "from@example.com", to, 2);
  assert_non_null(body);
  doc = json_loads(body, 0, NULL);
  free(body);
  assert_string_equal(json_string_value(json_object_get(doc, "template_id")),
                      "d-abc");
  assert_null(json_object_get(doc, "content"));
  assert_null(json_object_get(doc, "subject"));
  for (size_t i = 0; i < 2; i++) {
    json_t *p = json_array_get(json_object_get(doc, "personalizations"), i);

    assert_true(json_equal(json_object_get(p, "dynamic_template_data"),
                           data));
  }
  json_decref(doc);
  json_decref(data);
}

static void test_error_bodies(void **state) {
  static const char named[] =
      "{\"errors\":[{\"message\":\"Does not contain a valid address.\","
      "\"field\":\"personalizations.2.to.0.email\",\"help\":null}]}";
  static const char whole[] =
      "{\"errors\":[{\"message\":\"The from email does not contain a "
      "valid address.\",\"field\":\"from.email\",\"help\":null},"
      "{\"message\":\"second\",\"field\":\"personalizations.0.to\"}]}";
  static const char out_of_range[] =
      "{\"errors\":[{\"message\":\"m\",\"field\":\"personalizations.9\"}]}";
  char reason[128];
  bool bad[3];

  (void)state;
  memset(bad, 0, sizeof(bad));
  assert_int_equal(fo_sendgrid__errors(named, strlen(named), reason,
                                       sizeof(reason), "HTTP 400", bad, 3),
                   0);
  assert_string_equal(reason, "Does not contain a valid address.");
  assert_false(bad[0]);
  assert_false(bad[1]);
  assert_true(bad[2]);

  memset(bad, 0, sizeof(bad));
  assert_int_equal(fo_sendgrid__errors(whole, strlen(whole), reason,
                                       sizeof(reason), "HTTP 400", bad, 3),
                   1);
  assert_string_equal(reason,
                      "The from email does not contain a valid address.");
  assert_true(bad[0]);

  memset(bad, 0, sizeof(bad));
  assert_int_equal(fo_sendgrid__errors(out_of_range, strlen(out_of_range),
                                       reason, sizeof(reason), "HTTP 400",
                                       bad, 3),
                   1);
  assert_false(bad[0] || bad[1] || bad[2]);

  /* No body, or one that is not SendGrid's: the fallback, nobody named. */
  assert_int_equal(fo_sendgrid__errors(NULL, 0, reason, sizeof(reason),
                                       "HTTP 413", bad, 3),
                   1);
  assert_string_equal(reason, "HTTP 413");
  assert_int_equal(fo_sendgrid__errors("<html>", 6, reason, sizeof(reason),
                                       "HTTP 400", bad, 3),
                   1);
  assert_string_equal(reason, "HTTP 400");
}

/* Checks that no group holds an address twice or more than `max`. */
static void check_split(const char *const *to, size_t n, size_t max,
                        const size_t *group, size_t groups) {
  for (size_t g = 0; g < groups; g++) {
    size_t count = 0;

    for (size_t i = 0; i < n; i++) {
      if (group[i] != g)
        continue;
      count++;
      for (size_t j = i + 1; j < n; j++)
        assert_false(group[j] == g && strcasecmp(to[i], to[j]) == 0);
    }
    assert_true(count >= 1 && count <= max);
  }
  for (size_t i = 0; i < n; i++)
    assert_true(group[i] < groups);
}

static void test_split_duplicates_and_size(void **state) {
  const char *unique[] = {"a@x.com", "b@x.com", "c@x.com", "d@x.com",
                          "e@x.com"};
  const char *dups[] = {"a@x.com", "b@x.com", "A@X.com", "c@x.com",
                        "a@x.com"};
  size_t group[5];

  (void)state;
  assert_int_equal(fo_sendgrid__split(unique, 5, 1000, group), 1);
  check_split(unique, 5, 1000, group, 1);

  /* Three copies of one address need three requests. */
  assert_int_equal(fo_sendgrid__split(dups, 5, 1000, group), 3);
  check_split(dups, 5, 1000, group, 3);
  assert_int_equal(group[1], 0);
  assert_int_equal(group[3], 0);

  assert_int_equal(fo_sendgrid__split(unique, 5, 2, group), 3);
  check_split(unique, 5, 2, group, 3);
  assert_int_equal(fo_sendgrid__split(unique, 0, 2, group), 0);
}

/* ---- an in-process provider ---- */

typedef struct srv_req {
  size_t personalizations;
  char first_to[128];
} srv_req;

typedef struct srv {
  struct MHD_Daemon *d;
  int port;
  pthread_mutex_t mu;
  int status;                   /* for the next `times` requests */
  int times;
  char header[128];             /* extra response header, "" for none */
  char body[512];
  int delay_ms;                 /* every request */
  int nreqs;
  srv_req reqs[MAX_REQS];
  char auth[256];               /* the last Authorization seen */
} srv;

typedef struct srv_conn {
  char *body;
  size_t len;
} srv_conn;

static void srv_sleep(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};

  nanosleep(&ts, NULL);
}

static enum MHD_Result srv_answer(srv *s, struct MHD_Connection *conn,
                                  srv_conn *c) {
  json_t *doc = json_loadb(c->body != NULL ? c->body : "", c->len, 0, NULL);
  json_t *ps = json_object_get(doc, "personalizations");
  const char *auth = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                 "Authorization");
  struct MHD_Response *resp;
  char id[64], header[128], body[512];
  int status = 202, delay, n;
  enum MHD_Result ret;

  pthread_mutex_lock(&s->mu);
  n = s->nreqs++;
  if (n < MAX_REQS) {
    s->reqs[n].personalizations = json_array_size(ps);
    snprintf(s->reqs[n].first_to, sizeof(s->reqs[n].first_to), "%s",
             json_string_value(json_object_get(
                 json_array_get(json_object_get(json_array_get(ps, 0),
                                                "to"),
                                0),
                 "email")));
  }
  snprintf(s->auth, sizeof(s->auth), "%s", auth != NULL ? auth : "");
  header[0] = '\0';
  body[0] = '\0';
  if (s->times > 0) {
    s->times--;
    status = s->status;
    snprintf(header, sizeof(header), "%s", s->header);
    snprintf(body, sizeof(body), "%s", s->body);
  }
  delay = s->delay_ms;
  pthread_mutex_unlock(&s->mu);
  json_decref(doc);

  if (delay > 0)
    srv_sleep(delay);
  resp = MHD_create_response_from_buffer(strlen(body), body,
                                         MHD_RESPMEM_MUST_COPY);
  if (status == 202) {
    snprintf(id, sizeof(id), "msg-%d", n);
    MHD_add_response_header(resp, "X-Message-Id", id);
  }
  if (header[0] != '\0') {
    char *colon = strchr(header, ':');

    *colon = '\0';
    MHD_add_response_header(resp, header, colon + 2);
  }
  ret = MHD_queue_response(conn, (unsigned)status, resp);
  MHD_destroy_response(resp);
  return ret;
}

static enum MHD_Result srv_access(void *cls, struct MHD_Connection *conn,
                                  const char *url, const char *method,
                                  const char *version, const char *data,
                                  size_t *size, void **req_cls) {
  srv_conn *c = *req_cls;

  (void)url;
  (void)method;
  (void)version;
  if (c == NULL) {
    c = calloc(1, sizeof(*c));
    *req_cls = c;
    return c != NULL ? MHD_YES : MHD_NO;
  }
  if (*size > 0) {
    char *grown = realloc(c->body, c->len + *size + 1);

    if (grown == NULL)
      return MHD_NO;
    c->body = grown;
    memcpy(c->body + c->len, data, *size);
    c->len += *size;
    c->body[c->len] = '\0';
    *size = 0;
    return MHD_YES;
  }
  return srv_answer(cls, conn, c);
}

static void srv_done(void *cls, struct MHD_Connection *conn, void **req_cls,
                     enum MHD_RequestTerminationCode toe) {
  srv_conn *c = *req_cls;

  (void)cls;
  (void)conn;
  (void)toe;
  if (c != NULL) {
    free(c->body);
    free(c);
  }
  *req_cls = NULL;
}

static srv *srv_start(void) {
  srv *s = calloc(1, sizeof(*s));
  const union MHD_DaemonInfo *info;

  assert_non_null(s);
  pthread_mutex_init(&s->mu, NULL);
  s->d = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD |
                              MHD_USE_THREAD_PER_CONNECTION,
                          0, NULL, NULL, srv_access, s,
                          MHD_OPTION_NOTIFY_COMPLETED, srv_done, s,
                          MHD_OPTION_END);
  assert_non_null(s->d);
  info = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
  assert_non_null(info);
  s->port = (int)info->port;
  return s;
}

static void srv_script(srv *s, int status, int times, const char *header,
                       const char *body) {
  pthread_mutex_lock(&s->mu);
  s->status = status;
  s->times = times;
  snprintf(s->header, sizeof(s->header), "%s", header != NULL ? header : "");
  snprintf(s->body, sizeof(s->body), "%s", body != NULL ? body : "");
  pthread_mutex_unlock(&s->mu);
}

static void srv_stop(srv *s) {
  MHD_stop_daemon(s->d);
  pthread_mutex_destroy(&s->mu);
  free(s);
}

/* ---- a dispatcher with a gate that gives each user an address ---- */

typedef struct out {
  char user[64];
  fo_status status;
  fo_suppress_reason suppress;
  bool retryable;
  int64_t retry_after_ms;
  uint32_t attempt;
  char reason[128];
  char provider_id[96];
} out;

typedef struct rig {
  fo_queue *q;
  fo_dispatch *d;
  fo_channel *ch;
  srv *s;
  pthread_mutex_t mu;
  size_t done;
  size_t nouts;
  out outs[MAX_OUTS];
  fo_recipient recips[MAX_OUTS];
  size_t nrecips;
} rig;

/* User "uN" has uN@example.com, "bad" an address without a dot in its
 * domain, "twin1" and "twin2" one shared address, anyone else none. */
static const char *address_of(const char *user) {
  if (strcmp(user, "bad") == 0)
    return "bad@localhost";
  if (strncmp(user, "twin", 4) == 0)
    return "twins@example.com";
  return NULL;
}

static void gate_check(void *self, fo_delivery *const *ds, size_t n,
                       fo_verdict *v) {
  rig *r = self;

  pthread_mutex_lock(&r->mu);
  for (size_t i = 0; i < n; i++) {
    fo_recipient *rc = &r->recips[r->nrecips++ % MAX_OUTS];
    char *email = NULL;

    free(rc->email);
    memset(rc, 0, sizeof(*rc));
    if (ds[i]->user[0] == 'u') {
      if (asprintf(&email, "%s@example.com", ds[i]->user) < 0)
        email = NULL;
    } else if (address_of(ds[i]->user) != NULL) {
      email = strdup(address_of(ds[i]->user));
    }
    rc->email = email;
    ds[i]->recipient = rc;
    memset(&v[i], 0, sizeof(v[i]));
    v[i].kind = FO_VERDICT_SEND;
  }
  pthread_mutex_unlock(&r->mu);
}

static void gate_final(void *self, const fo_delivery *d, const fo_outcome *o) {
  (void)self;
  (void)d;
  (void)o;
}

static void gate_release(void *self, fo_delivery *d) {
  (void)self;
  (void)d;
}

static void on_done(fo_event *ev, bool finished, void *arg) {
  rig *r = arg;

  (void)finished;
  pthread_mutex_lock(&r->mu);
  r->done++;
  pthread_mutex_unlock(&r->mu);
  fo_event_free(ev);
}

static void on_outcome(const fo_delivery *d, const fo_outcome *o, void *arg) {
  rig *r = arg;

  pthread_mutex_lock(&r->mu);
  if (r->nouts < MAX_OUTS) {
    out *x = &r->outs[r->nouts++];

    snprintf(x->user, sizeof(x->user), "%s", d->user);
    x->status = o->status;
    x->suppress = o->suppress;
    x->retryable = o->retryable;
    x->retry_after_ms = o->retry_after_ms;
    x->attempt = d->attempt;
    snprintf(x->reason, sizeof(x->reason), "%s", o->reason);
    snprintf(x->provider_id, sizeof(x->provider_id), "%s", o->provider_id);
  }
  pthread_mutex_unlock(&r->mu);
}

static rig *rig_new(const char *api_key, int max_inflight) {
  rig *r = calloc(1, sizeof(*r));
  fo_gate gate = {gate_check, gate_final, gate_release, NULL};
  fo_dispatch_conf conf = {
      .workers = 2,
      .retry_base_ms = 10,
      .retry_max_ms = 40,
      .on_done = on_done,
      .on_outcome = on_outcome,
  };
  fo_sendgrid_conf sc;
  char url[64], err[256];

  assert_non_null(r);
  pthread_mutex_init(&r->mu, NULL);
  r->s = srv_start();
  snprintf(url, sizeof(url), "http://127.0.0.1:%d/", r->s->port);
  memset(&sc, 0, sizeof(sc));
  sc.url = url;
  sc.api_key = api_key;
  sc.from = "notify@example.com";
  sc.max_inflight = max_inflight;
  sc.timeout_ms = 5000;
  assert_int_equal(fo_sendgrid_new(&sc, &r->ch, err, sizeof(err)), FO_OK);

  gate.self = r;
  conf.gate = &gate;
  conf.done_arg = r;
  conf.outcome_arg = r;
  r->q = fo_queue_new(100000, 1000);
  assert_non_null(r->q);
  r->d = fo_dispatch_new(r->q, &conf);
  assert_non_null(r->d);
  fo_dispatch_set_channel(r->d, FO_CH_EMAIL, r->ch);
  assert_int_equal(fo_dispatch_start(r->d), FO_OK);
  return r;
}

static void rig_push(rig *r, const char *json) {
  fo_event *ev = decode(json);

  ev->consumed_us = fo_now_us();
  ev->expires_ms = fo_wall_ms() + ev->ttl_s * 1000;
  atomic_store(&ev->pending, (uint_fast32_t)fo_event_items(ev));
  assert_int_equal(fo_queue_push(r->q, ev), FO_OK);
}

/* An e-mail event to `to` (a JSON array), with extra fields. */
static void rig_event(rig *r, const char *id, const char *to,
                      const char *extra) {
  char json[8192];

  snprintf(json, sizeof(json),
           "{\"id\":\"%s\",\"category\":\"c\",\"channels\":[\"email\"],"
           "\"title\":\"T\",\"body\":\"B\",\"to\":%s%s%s}",
           id, to, extra != NULL ? "," : "", extra != NULL ? extra : "");
  rig_push(r, json);
}

static void rig_free(rig *r) {
  assert_int_equal(fo_dispatch_drain(r->d, WAIT_MS), FO_OK);
  r->ch->ops->shutdown(r->ch->self);
  fo_dispatch_free(r->d);
  fo_queue_free(r->q);
  r->ch->ops->destroy(r->ch->self);
  srv_stop(r->s);
  for (size_t i = 0; i < MAX_OUTS; i++)
    free(r->recips[i].email);
  pthread_mutex_destroy(&r->mu);
  free(r);
}

/* "[\"u0\",\"u1\",...]" for n users. */
static void users_json(size_t n, char *buf, size_t cap) {
  size_t len = 0;

  len += (size_t)snprintf(buf + len, cap - len, "[");
  for (size_t i = 0; i < n; i++)
    len += (size_t)snprintf(buf + len, cap - len, "%s\"u%zu\"",
                            i > 0 ? "," : "", i);
  snprintf(buf + len, cap - len, "]");
}

static const out *out_of(rig *r, const char *user) {
  for (size_t i = 0; i < r->nouts; i++)
    if (strcmp(r->outs[i].user, user) == 0)
      return &r->outs[i];
  fail_msg("no outcome for %s", user);
  return NULL;
}

/* ---- the channel ---- */

static void test_one_request_per_event(void **state) {
  rig *r = rig_new("SG.key", 100);
  char to[2048];

  (void)state;
  users_json(30, to, sizeof(to));
  rig_event(r, "batch", to, NULL);
  assert_int_equal(fo_dispatch_drain(r->d, WAIT_MS), FO_OK);

  assert_int_equal(r->nouts, 30);
  assert_int_equal(r->s->nreqs, 1);
  assert_int_equal(r->s->reqs[0].personalizations, 30);
  assert_string_equal(r->s->auth, "Bearer SG.key");
  for (size_t i = 0; i < r->nouts; i++) {
    assert_int_equal(r->outs[i].status, FO_STATUS_SENT);
    assert_string_equal(r->outs[i].provider_id, "msg-0");
    assert_int_equal(r->outs[i].attempt, 1);
  }
  rig_free(r);
}

static void test_addresses_checked_and_shared(void **state) {
  rig *r = rig_new("SG.key", 100);
  const out *o;

  (void)state;
  rig_event(r, "addr", "[\"bad\",\"nobody\",\"twin1\",\"twin2\"]", NULL);
  assert_int_equal(fo_dispatch_drain(r->d, WAIT_MS), FO_OK);

  assert_int_equal(r->nouts, 4);
  o = out_of(r, "bad");
  assert_int_equal(o->status, FO_STATUS_SUPPRESSED);
  assert_int_equal(o->suppress, FO_SUP_NO_ADDRESS);
  o = out_of(r, "nobody");
  assert_int_equal(o->status, FO_STATUS_SUPPRESSED);
  assert_int_equal(o->suppress, FO_SUP_NO_ADDRESS);
  /* One address twice: two requests of one personalization each. */
  assert_int_equal(out_of(r, "twin1")->status, FO_STATUS_SENT);
  assert_int_equal(out_of(r, "twin2")->status, FO_STATUS_SENT);
  assert_int_equal(r->s->nreqs, 2);
  assert_int_equal(r->s->reqs[0].personalizations, 1);
  assert_int_equal(r->s->reqs[1].personalizations, 1);
  rig_free(r);
}

static void test_statuses_become_outcomes(void **state) {
  rig *r = rig_new("SG.key", 100);
  char reset[64];
  const out *o;

  (void)state;
  /* best_effort: a retryable failure is final, so we see it. */
  srv_script(r->s, 503, 1, NULL, NULL);
  rig_event(r, "e503", "[\"u1\"]", "\"delivery\":\"best_effort\"");
  assert_int_equal(fo_dispatch_drain(r->d, WAIT_MS), FO_OK);
  o = out_of(r, "u1");
  assert_int_equal(o->status, FO_STATUS_FAILED);
  assert_true(o->retryable);
  assert_string_equal(o->reason, "HTTP 503");
  rig_free(r);

  r = rig_new("SG.key", 100);
  snprintf(reset, sizeof(reset), "X-RateLimit-Reset: %lld",
           (long long)(fo_wall_ms() / 1000 + 3));
  srv_script(r->s, 429, 1, reset, NULL);
  rig_event(r, "e429", "[\"u1\"]", "\"delivery\":\"best_effort\"");
  assert_int_equal(fo_dispatch_drain(r->d, WAIT_MS), FO_OK);
  o = out_of(r, "u1");
  assert_int_equal(o->status, FO_STATUS_FAILED);
  assert_true(o->retryable);
  assert_true(o->retry_after_ms > 1000 && o->retry_after_ms <= 3000);
  rig_free(r);

  /* 400: SendGrid's message, not retried. */
  r = rig_new("SG.key", 100);
  srv_script(r->s, 400, 1, NULL,
             "{\"errors\":[{\"message\":\"The subject is required.\","
             "\"field\":\"subject\",\"help\":null}]}");
  rig_event(r, "e400", "[\"u1\",\"u2\"]", NULL);
  assert_int_equal(fo_dispatch_drain(r->d, WAIT_MS), FO_OK);
  assert_int_equal(r->nouts, 2);
  for (size_t i = 0; i < 2; i++) {
    assert_int_equal(r->outs[i].status, FO_STATUS_FAILED);
    assert_false(r->outs[i].retryable);
    assert_string_equal(r->outs[i].reason, "The subject is required.");
  }
  assert_int_equal(r->s->nreqs, 1);
  rig_free(r);

  /* 500 once, then accepted on the engine's retry. */
  r = rig_new("SG.key", 100);
  srv_script(r->s, 500, 1, NULL, NULL);
  rig_event(r, "e500", "[\"u1\"]", NULL);
  assert_int_equal(fo_dispatch_drain(r->d, WAIT_MS), FO_OK);
  o = out_of(r, "u1");
  assert_int_equal(o->status, FO_STATUS_SENT);
  assert_int_equal(o->attempt, 2);
  assert_string_equal(o->provider_id, "msg-1");
  rig_free(r);
}

static void test_auth_failure_counted_once_per_request(void **state) {
  rig *r = rig_new("SG.revoked", 100);
  fo_counter *c = fo_metrics_counter("fanout_provider_auth_failures_total",
                                     "", "channel=\"email\"");
  uint64_t before = fo_counter_value(c);

  (void)state;
  srv_script(r->s, 401, 2, NULL,
             "{\"errors\":[{\"field\":null,\"message\":\"The provided "
             "authorization grant is invalid, expired, or revoked\"}]}");
  rig_event(r, "a1", "[\"u1\",\"u2\",\"u3\"]", NULL);
  rig_event(r, "a2", "[\"u4\"]", NULL);
  assert_int_equal(fo_dispatch_drain(r->d, WAIT_MS), FO_OK);
  assert_int_equal(r->nouts, 4);
  for (size_t i = 0; i < r->nouts; i++) {
    assert_int_equal(r->outs[i].status, FO_STATUS_FAILED);
    assert_false(r->outs[i].retryable);
    assert_string_equal(r->outs[i].reason, "unauthorized");
  }
  assert_int_equal(fo_counter_value(c) - before, 2);
  rig_free(r);
}

static void test_refusal_naming_one_recipient(void **state) {
  rig *r = rig_new("SG.key", 100);
  size_t sent = 0, failed = 0;

  (void)state;
  srv_script(r->s, 400, 1, NULL,
             "{\"errors\":[{\"message\":\"Does not contain a valid "
             "address.\",\"field\":\"personalizations.0.to.0.email\"}]}");
  rig_event(r, "part", "[\"u1\",\"u2\",\"u3\"]", NULL);
  assert_int_equal(fo_dispatch_drain(r->d, WAIT_MS), FO_OK);
  assert_int_equal(r->nouts, 3);
  for (size_t i = 0; i < r->nouts; i++) {
    if (r->outs[i].status == FO_STATUS_SENT) {
      sent++;
      assert_int_equal(r->outs[i].attempt, 1);
    } else {
      failed++;
      /* The refused one is the first personalization of the request. */
      assert_int_equal(strncmp(r->outs[i].user, r->s->reqs[0].first_to,
                               strlen(r->outs[i].user)),
                       0);
      assert_int_equal(r->s->reqs[0].first_to[strlen(r->outs[i].user)],
                       '@');
      assert_string_equal(r->outs[i].reason,
                          "Does not contain a valid address.");
    }
  }
  assert_int_equal(sent, 2);
  assert_int_equal(failed, 1);
  assert_int_equal(r->s->nreqs, 2);
  assert_int_equal(r->s->reqs[0].personalizations, 3);
  assert_int_equal(r->s->reqs[1].personalizations, 2);
  rig_free(r);
}

/* With room for two deliveries, no request carries more than two, and
 * everything is still sent. */
static void test_inflight_bound(void **state) {
  rig *r = rig_new("SG.key", 2);
  char to[2048];

  (void)state;
  r->s->delay_ms = 50;
  users_json(10, to, sizeof(to));
  rig_event(r, "bound", to, NULL);
  assert_int_equal(fo_dispatch_drain(r->d, WAIT_MS), FO_OK);
  assert_int_equal(r->nouts, 10);
  for (size_t i = 0; i < r->nouts; i++)
    assert_int_equal(r->outs[i].status, FO_STATUS_SENT);
  assert_true(r->s->nreqs >= 5);
  for (int i = 0; i < r->s->nreqs; i++)
    assert_true(r->s->reqs[i].personalizations <= 2);
  rig_free(r);
}

static void test_config_and_shutdown(void **state) {
  fo_sendgrid_conf c;
  fo_channel *ch = NULL;
  fo_delivery d;
  char err[256];

  (void)state;
  memset(&c, 0, sizeof(c));
  c.url = "http://127.0.0.1:9";
  c.api_key = "SG.key";
  c.from = "no-dot@localhost";
  assert_int_equal(fo_sendgrid_new(&c, &ch, err, sizeof(err)), FO_ECONFIG);
  assert_non_null(strstr(err, "from"));
  c.from = "ok@example.com";
  c.api_key = "two\nlines";
  assert_int_equal(fo_sendgrid_new(&c, &ch, err, sizeof(err)), FO_ECONFIG);
  assert_non_null(strstr(err, "api_key"));
  assert_null(strstr(err, "lines"));
  c.api_key = "SG.key";
  c.url = NULL;
  assert_int_equal(fo_sendgrid_new(&c, &ch, err, sizeof(err)), FO_ECONFIG);
  assert_null(ch);

  c.url = "http://127.0.0.1:9";
  assert_int_equal(fo_sendgrid_new(&c, &ch, err, sizeof(err)), FO_OK);
  assert_int_equal(ch->ops->flush(ch->self, 100), FO_OK);
  ch->ops->shutdown(ch->self);
  /* Refused before the delivery is even looked at. */
  memset(&d, 0, sizeof(d));
  assert_int_equal(ch->ops->submit(ch->self, &d), FO_ECLOSED);
  ch->ops->shutdown(ch->self);
  ch->ops->destroy(ch->self);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_email_check),
      cmocka_unit_test(test_content_from_event),
      cmocka_unit_test(test_body_shape),
      cmocka_unit_test(test_error_bodies),
      cmocka_unit_test(test_split_duplicates_and_size),
      cmocka_unit_test(test_one_request_per_event),
      cmocka_unit_test(test_addresses_checked_and_shared),
      cmocka_unit_test(test_statuses_become_outcomes),
      cmocka_unit_test(test_auth_failure_counted_once_per_request),
      cmocka_unit_test(test_refusal_naming_one_recipient),
      cmocka_unit_test(test_inflight_bound),
      cmocka_unit_test(test_config_and_shutdown),
  };

  return cmocka_run_group_tests_name("sendgrid", tests, NULL, NULL);
}
