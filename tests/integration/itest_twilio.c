/* SPDX-License-Identifier: MIT */
/*
 * The SMS channel end to end: fanoutd with the private PostgreSQL and
 * Redis and the development broker, sending through fake-twilio over
 * HTTPS. Users are made through the REST API, events go through Kafka,
 * and each case checks both ends: what the fake saw (requests, accepted
 * messages and their arrival times, status callbacks and their answers)
 * and what fanoutd recorded (delivery log, users, preferences, logs,
 * metrics).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include <jansson.h>

#include "fanout/common.h"
#include "itest.h"
#include "limiter.h"
#include "twilio.h"

#define SID "AC0123456789abcdef0123456789abcdef"
#define AUTH "test-twilio-auth-token-0123456789"
#define FROM "+15550001111"
#define WAIT_MS 15000

typedef itest_node node;

static char g_dsn[512];
static char g_bootstrap[256];
static char g_pfx[32];
static itest_proc g_broker;
static itest_fake g_fake;
static node g_node;
static bool g_node_up;
static int g_admin_port;

/* ---- HTTP to the fake (HTTPS, its own CA) and to the admin API ---- */

/* One request; `ca` NULL for plain HTTP; `hdr` one extra header or NULL.
 * Returns the status, the body in *resp (free()). */
static long http_call(const char *method, const char *url, const char *ca,
                      const char *hdr, const char *ctype, const char *body,
                      char **resp) {
  const char *headers[3] = {NULL, NULL, NULL};
  char line[128];
  size_t n = 0;

  if (hdr != NULL)
    headers[n++] = hdr;
  if (ctype != NULL) {
    snprintf(line, sizeof(line), "Content-Type: %s", ctype);
    headers[n++] = line;
  }
  return itest_http_raw(method, url, ca, headers, body, resp);
}

static long fake_call(const char *method, const char *path,
                      const char *body, char **resp) {
  return itest_fake_call(&g_fake, method, path, body, resp);
}

static void fake_reset(void) {
  assert_int_equal(fake_call("POST", "/_fake/reset", "", NULL), 200);
}

static void fake_script(const char *steps) {
  assert_int_equal(fake_call("POST", "/_fake/script", steps, NULL), 200);
}

/* GET /_fake/accepted, parsed; the caller json_decref()s it. */
static json_t *fake_state(void) {
  char *resp = NULL;
  json_t *doc;

  assert_int_equal(fake_call("GET", "/_fake/accepted", NULL, &resp), 200);
  doc = json_loads(resp, 0, NULL);
  free(resp);
  assert_non_null(doc);
  return doc;
}

static long fake_requests(void) {
  json_t *doc = fake_state();
  long n = (long)json_integer_value(json_object_get(doc, "requests"));

  json_decref(doc);
  return n;
}

/* The accepted messages to `phone`, in arrival order (new reference). */
static json_t *fake_items_to(const char *phone) {
  json_t *doc = fake_state(), *out = json_array(), *it;
  size_t i;

  json_array_foreach(json_object_get(doc, "items"), i, it) {
    if (strcmp(json_string_value(json_object_get(it, "to")), phone) == 0)
      json_array_append(out, it);
  }
  json_decref(doc);
  return out;
}

/* Waits until the fake accepted `want` messages to `phone`. */
static json_t *fake_wait_items(const char *phone, size_t want) {
  json_t *items = NULL;

  for (int i = 0; i < WAIT_MS / 100; i++) {
    json_decref(items);
    items = fake_items_to(phone);
    if (json_array_size(items) >= want)
      break;
    itest_sleep_ms(100);
  }
  assert_int_equal(json_array_size(items), want);
  return items;
}

/* ---- fanoutd ---- */

/* Starts a fanoutd with the SMS channel; `redis` NULL means the test
 * services' Redis. */
static void start_node_redis(node *n, const char *name, int admin_port,
                             int rate, const char *extra, const char *redis) {
  char cfg[2048];
  int port = admin_port > 0 ? admin_port : itest_free_port();

  /* Short timeouts and backoff keep the retry cases quick. The record
   * sink of the base configuration lists sms too: [twilio] wins. */
  snprintf(cfg, sizeof(cfg),
           "[engine]\nretry_base_ms = 200\nretry_max_ms = 1000\n"
           "[twilio]\nurl = %s\naccount_sid = " SID "\n"
           "auth_token = " AUTH "\nfrom = " FROM "\nca_file = %s\n"
           "status_callback_url = http://127.0.0.1:%d/v1/callbacks/twilio\n"
           "timeout_ms = 2000\nrate_per_second = %d\n%s",
           g_fake.url, g_fake.ca, port, rate, extra != NULL ? extra : "");
  assert_int_equal(itest_node_start(n, name, port, g_bootstrap, g_dsn,
                                    redis, cfg),
                   0);
  assert_int_equal(
      itest_wait_log(&n->proc, "channel sends through Twilio", 1000), 0);
}

static void start_node(node *n, const char *name, int admin_port, int rate,
                       const char *extra) {
  start_node_redis(n, name, admin_port, rate, extra, NULL);
}

/* Every case but the rate ones shares one fanoutd, started by the first,
 * on the admin port the fake was told about. */
static node *shared_node(void) {
  if (!g_node_up) {
    start_node(&g_node, "twilio-node", g_admin_port, 0, NULL);
    g_node_up = true;
  }
  fake_reset();
  return &g_node;
}

static void stop_shared_node(void) {
  if (g_node_up)
    assert_int_equal(WEXITSTATUS(itest_stop(&g_node.proc, SIGTERM, 20000)),
                     0);
  g_node_up = false;
}

static void put_user(node *n, const char *user, const char *phone) {
  char path[256], body[256];
  char *resp = NULL;
  int st;

  snprintf(path, sizeof(path), "/v1/users/%s-%s", g_pfx, user);
  snprintf(body, sizeof(body), "{\"phone\":\"%s\"}", phone);
  st = itest_api(n, "PUT", path, body, &resp);
  if (st != 200)
    fail_msg("PUT %s: %d %s", path, st, resp);
  free(resp);
}

/* Produces one SMS event to `user` (a name without the prefix), with
 * extra top-level JSON `fields` (may be NULL). */
static void send_event(const char *id, const char *user,
                       const char *fields) {
  char ev[2048];
  const char *one[1] = {ev};

  snprintf(ev, sizeof(ev),
           "{\"id\":\"%s-%s\",\"category\":\"order_update\","
           "\"to\":[\"%s-%s\"],\"channels\":[\"sms\"]%s%s}",
           g_pfx, id, g_pfx, user, fields != NULL ? "," : "",
           fields != NULL ? fields : "");
  assert_int_equal(itest_produce(g_bootstrap, "notifications", one, 1), 0);
}

/* The SMS delivery of `event` to `user` in the delivery log (new
 * reference), or NULL. */
static json_t *delivery(node *n, const char *event, const char *user) {
  char ev[128], who[128];

  snprintf(ev, sizeof(ev), "%s-%s", g_pfx, event);
  snprintf(who, sizeof(who), "%s-%s", g_pfx, user);
  return itest_delivery(n, ev, who, "sms");
}

/* Waits until the delivery's "status[:reason]" starts with `want`, and
 * returns it (new reference). */
static json_t *expect(node *n, const char *event, const char *user,
                      const char *want) {
  char ev[128], who[128], got[256];
  json_t *d;

  snprintf(ev, sizeof(ev), "%s-%s", g_pfx, event);
  snprintf(who, sizeof(who), "%s-%s", g_pfx, user);
  d = itest_wait_outcome(n, ev, who, "sms", want, true, WAIT_MS, got,
                         sizeof(got));
  if (d == NULL)
    fail_msg("%s/%s: want %s, got %s", event, user, want, got);
  return d;
}

/* Waits until the delivery went out: "sent", or "delivered" once the
 * fake's callback came back. */
static json_t *expect_sent(node *n, const char *event, const char *user) {
  json_t *d = expect(n, event, user, "");

  for (int i = 0; i < WAIT_MS / 100; i++) {
    const char *st = json_string_value(json_object_get(d, "status"));

    if (strcmp(st, "sent") == 0 || strcmp(st, "delivered") == 0)
      return d;
    json_decref(d);
    itest_sleep_ms(100);
    d = expect(n, event, user, "");
  }
  fail_msg("%s/%s: never sent", event, user);
  return d;
}

static long attempts_of(json_t *d) {
  return (long)json_integer_value(json_object_get(d, "attempts"));
}

/* Waits until `sql` (a count) reaches `want`. */
static void wait_sql(const char *sql, long want) {
  long got = -1;

  for (int i = 0; i < WAIT_MS / 100; i++) {
    got = itest_sql(g_dsn, sql);
    if (got == want)
      return;
    itest_sleep_ms(100);
  }
  fail_msg("%s: want %ld, got %ld", sql, want, got);
}

/* ---- cases ---- */

/* 201: sent with the message's sid; the text is sms.text, else title and
 * body; the fake's signed callback then marks it delivered. */
static void test_sent_with_sid_then_delivered(void **state) {
  node *n = shared_node();
  json_t *d, *items, *cbs, *doc;
  const char *sid;

  (void)state;
  put_user(n, "ok", "+15551230001");
  send_event("ok1", "ok", "\"title\":\"Shipped\",\"body\":\"Tuesday\","
                          "\"sms\":{\"text\":\"Order 1234 & co shipped\"}");
  d = expect_sent(n, "ok1", "ok");
  items = fake_wait_items("+15551230001", 1);
  sid = json_string_value(json_object_get(json_array_get(items, 0), "sid"));
  assert_string_equal(json_string_value(json_object_get(d, "provider_id")),
                      sid);
  assert_int_equal(attempts_of(d), 1);
  assert_string_equal(json_string_value(json_object_get(
                          json_array_get(items, 0), "body")),
                      "Order 1234 & co shipped");
  assert_string_equal(json_string_value(json_object_get(
                          json_array_get(items, 0), "from")),
                      FROM);
  assert_non_null(strstr(json_string_value(json_object_get(
                             json_array_get(items, 0), "status_callback")),
                         "/v1/callbacks/twilio"));
  json_decref(d);

  /* The fake reports "delivered" about a second later. */
  json_decref(expect(n, "ok1", "ok", "delivered"));
  doc = fake_state();
  cbs = json_object_get(doc, "callbacks");
  assert_int_equal(json_array_size(cbs), 1);
  assert_string_equal(
      json_string_value(json_object_get(json_array_get(cbs, 0), "sid")), sid);
  assert_int_equal(
      json_integer_value(json_object_get(json_array_get(cbs, 0), "answer")),
      204);
  json_decref(doc);
  json_decref(items);

  /* No sms.text: title and body. */
  send_event("ok2", "ok", "\"title\":\"Shipped\",\"body\":\"Tuesday\"");
  json_decref(expect_sent(n, "ok2", "ok"));
  items = fake_wait_items("+15551230001", 2);
  assert_string_equal(json_string_value(json_object_get(
                          json_array_get(items, 1), "body")),
                      "Shipped Tuesday");
  json_decref(items);
}

/* 21211 and 21614: no_address, and the phone is no address afterwards
 * (no request) until the user is given another number. */
static void test_refused_number_becomes_unusable(void **state) {
  node *n = shared_node();
  char sql[256];
  long before;

  (void)state;
  put_user(n, "bad", "+15005550001");
  send_event("bad1", "bad", "\"title\":\"t\"");
  json_decref(expect(n, "bad1", "bad", "suppressed:no_address"));
  assert_int_equal(fake_requests(), 1);
  snprintf(sql, sizeof(sql),
           "SELECT count(*) FROM users WHERE id = '%s-bad' AND"
           " sms_unusable_since IS NOT NULL",
           g_pfx);
  wait_sql(sql, 1);
  /* The NOTIFY of that change reaches the policy's cache. */
  itest_sleep_ms(500);

  before = fake_requests();
  send_event("bad2", "bad", "\"title\":\"t\"");
  json_decref(expect(n, "bad2", "bad", "suppressed:no_address"));
  itest_sleep_ms(300);
  assert_int_equal(fake_requests(), before);

  /* A new number is usable again. */
  put_user(n, "bad", "+15551230002");
  wait_sql(sql, 0);
  itest_sleep_ms(500);
  send_event("bad3", "bad", "\"title\":\"t\"");
  json_decref(expect_sent(n, "bad3", "bad"));

  /* Not a mobile number: the same. */
  put_user(n, "landline", "+15005550009");
  send_event("land1", "landline", "\"title\":\"t\"");
  json_decref(expect(n, "land1", "landline", "suppressed:no_address"));
  snprintf(sql, sizeof(sql),
           "SELECT count(*) FROM users WHERE id = '%s-landline' AND"
           " sms_unusable_since IS NOT NULL",
           g_pfx);
  wait_sql(sql, 1);
}

/* 21610: opted_out, and SMS is turned off in the user's preferences. */
static void test_unsubscribed_turns_sms_off(void **state) {
  node *n = shared_node();
  char path[256];
  bool off = false;

  (void)state;
  put_user(n, "unsub", "+15005550004");
  send_event("unsub1", "unsub", "\"title\":\"t\"");
  json_decref(expect(n, "unsub1", "unsub", "suppressed:opted_out"));
  snprintf(path, sizeof(path), "/v1/users/%s-unsub/preferences", g_pfx);
  for (int i = 0; i < WAIT_MS / 100 && !off; i++) {
    char *resp = NULL;
    json_t *doc;

    assert_int_equal(itest_api(n, "GET", path, NULL, &resp), 200);
    doc = json_loads(resp, 0, NULL);
    free(resp);
    off = json_is_false(
        json_object_get(json_object_get(doc, "channels"), "sms"));
    assert_true(json_is_true(
        json_object_get(json_object_get(doc, "channels"), "push")));
    json_decref(doc);
    if (!off)
      itest_sleep_ms(100);
  }
  assert_true(off);

  /* The policy now stops it before the channel. */
  itest_sleep_ms(500);
  send_event("unsub2", "unsub", "\"title\":\"t\"");
  json_decref(expect(n, "unsub2", "unsub", "suppressed:opted_out"));
  assert_int_equal(fake_requests(), 1);
}

/* 429 with Retry-After, then 201: sent on the second attempt, not before
 * the second Twilio asked for. */
static void test_429_then_sent(void **state) {
  node *n = shared_node();
  struct timespec t0, t1;
  json_t *d;
  long ms;

  (void)state;
  put_user(n, "busy", "+15551230003");
  fake_script("[{\"status\":429,\"headers\":{\"Retry-After\":\"1\"}}]");
  clock_gettime(CLOCK_MONOTONIC, &t0);
  send_event("busy1", "busy", "\"title\":\"t\"");
  d = expect_sent(n, "busy1", "busy");
  clock_gettime(CLOCK_MONOTONIC, &t1);
  ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
  assert_int_equal(attempts_of(d), 2);
  assert_int_equal(fake_requests(), 2);
  assert_true(ms >= 1000);
  json_decref(d);
}

/* 5xx and a timeout (a stall past timeout_ms) are retried. */
static void test_server_errors_retried(void **state) {
  node *n = shared_node();
  json_t *d;

  (void)state;
  put_user(n, "flaky", "+15551230004");
  fake_script("[{\"status\":500},{\"delay_ms\":3000},{\"status\":503}]");
  send_event("flaky1", "flaky", "\"title\":\"t\"");
  d = expect_sent(n, "flaky1", "flaky");
  assert_int_equal(attempts_of(d), 4);
  assert_int_equal(fake_requests(), 4);
  json_decref(d);
}

/* Another 4xx fails at once with Twilio's code and message. */
static void test_other_4xx_fails_with_message(void **state) {
  node *n = shared_node();
  json_t *d;

  (void)state;
  put_user(n, "region", "+15551230005");
  fake_script("[{\"status\":400,\"body\":{\"code\":21408,\"message\":"
              "\"Permission to send an SMS has not been enabled\","
              "\"more_info\":\"https://www.twilio.com/docs/errors/21408\","
              "\"status\":400}}]");
  send_event("region1", "region", "\"title\":\"t\"");
  d = expect(n, "region1", "region",
             "failed:twilio 21408: Permission to send an SMS");
  assert_int_equal(attempts_of(d), 1);
  itest_sleep_ms(500);
  assert_int_equal(fake_requests(), 1);
  json_decref(d);
}

/* 401: every delivery fails, not retried; one error record, and the
 * metric counts each. */
static void test_auth_failure_logged_once(void **state) {
  node *n = shared_node();
  char *metrics = NULL;
  json_t *d;

  (void)state;
  put_user(n, "auth", "+15551230006");
  fake_script("[{\"status\":401,\"count\":3}]");
  for (int i = 0; i < 3; i++) {
    char id[32];

    snprintf(id, sizeof(id), "auth%d", i);
    send_event(id, "auth", "\"title\":\"t\"");
    d = expect(n, id, "auth", "failed:twilio 20003: Authenticate");
    assert_int_equal(attempts_of(d), 1);
    json_decref(d);
  }
  assert_int_equal(fake_requests(), 3);
  assert_int_equal(
      itest_count_lines(n->proc.log, "twilio refused the credentials"), 1);
  assert_int_equal(itest_count_lines(n->proc.log, AUTH), 0);
  assert_int_equal(itest_api(n, "GET", "/metrics", NULL, &metrics), 200);
  assert_non_null(strstr(
      metrics, "fanout_provider_auth_failures_total{channel=\"sms\"} 3"));
  free(metrics);

  /* Working credentials again: sent. */
  send_event("auth9", "auth", "\"title\":\"t\"");
  json_decref(expect_sent(n, "auth9", "auth"));
}

/* A number that is not E.164 is no address, and costs no request; so
 * does an event without a text. */
static void test_bad_number_sends_nothing(void **state) {
  node *n = shared_node();
  char sql[256];

  (void)state;
  put_user(n, "local", "+15551230007");
  /* The REST API refuses such a number; older rows may hold one. */
  snprintf(sql, sizeof(sql),
           "UPDATE users SET phone = '0612 345 678' WHERE id = '%s-local'",
           g_pfx);
  assert_int_equal(itest_sql(g_dsn, sql), 1);
  itest_sleep_ms(500);
  send_event("local1", "local", "\"title\":\"t\"");
  json_decref(expect(n, "local1", "local", "suppressed:no_address"));

  /* An event with nothing to say fails before any request too. */
  put_user(n, "mute", "+15551230012");
  send_event("mute1", "mute", NULL);
  json_decref(expect(n, "mute1", "mute",
                     "failed:the event has no text for SMS"));
  itest_sleep_ms(300);
  assert_int_equal(fake_requests(), 0);
}

/* The callback route: no bearer token, Twilio's signature instead. */
static void test_status_callback_checks_signature(void **state) {
  node *n = shared_node();
  char url[128], cb_url[128], hdr[128], sig[64], body[256];
  fo_twilio_form f;
  json_t *items, *d;
  const char *sid;

  (void)state;
  snprintf(url, sizeof(url), "http://127.0.0.1:%d/v1/callbacks/twilio",
           n->port);
  snprintf(cb_url, sizeof(cb_url), "%s", url);

  /* An undelivered report, with its error code. */
  put_user(n, "cb", "+15551230008");
  fake_script("[{\"callback\":{\"MessageStatus\":\"undelivered\","
              "\"ErrorCode\":\"30003\"}}]");
  send_event("cb1", "cb", "\"title\":\"t\"");
  json_decref(expect(n, "cb1", "cb", "undelivered:30003"));
  items = fake_wait_items("+15551230008", 1);
  sid = json_string_value(json_object_get(json_array_get(items, 0), "sid"));

  /* Forged, missing, or over other parameters: 403, nothing changes. */
  snprintf(body, sizeof(body), "MessageSid=%s&MessageStatus=delivered",
           sid);
  assert_int_equal(http_call("POST", url, NULL,
                             "X-Twilio-Signature: "
                             "0/KCTR6DLpKmkAf8muzZqo1nDgQ=",
                             "application/x-www-form-urlencoded", body,
                             NULL),
                   403);
  assert_int_equal(http_call("POST", url, NULL, NULL,
                             "application/x-www-form-urlencoded", body,
                             NULL),
                   403);
  assert_int_equal(fo_twilio_form_parse(body, strlen(body), &f), FO_OK);
  assert_int_equal(fo_twilio_signature("wrong-token", cb_url, &f, sig,
                                       sizeof(sig)),
                   FO_OK);
  snprintf(hdr, sizeof(hdr), "X-Twilio-Signature: %s", sig);
  assert_int_equal(http_call("POST", url, NULL, hdr,
                             "application/x-www-form-urlencoded", body,
                             NULL),
                   403);
  fo_twilio_form_clear(&f);
  d = delivery(n, "cb1", "cb");
  assert_string_equal(json_string_value(json_object_get(d, "status")),
                      "undelivered");
  json_decref(d);

  /* Signed properly: "sent" changes nothing, an unknown sid is 404,
   * "delivered" is recorded. */
  snprintf(body, sizeof(body), "MessageSid=%s&MessageStatus=sent", sid);
  assert_int_equal(fo_twilio_form_parse(body, strlen(body), &f), FO_OK);
  assert_int_equal(
      fo_twilio_signature(AUTH, cb_url, &f, sig, sizeof(sig)), FO_OK);
  fo_twilio_form_clear(&f);
  snprintf(hdr, sizeof(hdr), "X-Twilio-Signature: %s", sig);
  assert_int_equal(http_call("POST", url, NULL, hdr,
                             "application/x-www-form-urlencoded", body,
                             NULL),
                   204);

  snprintf(body, sizeof(body),
           "MessageSid=SM00000000000000000000000000000000"
           "&MessageStatus=delivered");
  assert_int_equal(fo_twilio_form_parse(body, strlen(body), &f), FO_OK);
  assert_int_equal(
      fo_twilio_signature(AUTH, cb_url, &f, sig, sizeof(sig)), FO_OK);
  fo_twilio_form_clear(&f);
  snprintf(hdr, sizeof(hdr), "X-Twilio-Signature: %s", sig);
  assert_int_equal(http_call("POST", url, NULL, hdr,
                             "application/x-www-form-urlencoded", body,
                             NULL),
                   404);

  snprintf(body, sizeof(body), "MessageStatus=delivered&MessageSid=%s",
           sid);
  assert_int_equal(fo_twilio_form_parse(body, strlen(body), &f), FO_OK);
  assert_int_equal(
      fo_twilio_signature(AUTH, cb_url, &f, sig, sizeof(sig)), FO_OK);
  fo_twilio_form_clear(&f);
  snprintf(hdr, sizeof(hdr), "X-Twilio-Signature: %s", sig);
  assert_int_equal(http_call("POST", url, NULL, hdr, "application/json",
                             body, NULL),
                   415);
  assert_int_equal(http_call("POST", url, NULL, hdr,
                             "application/x-www-form-urlencoded", body,
                             NULL),
                   204);
  json_decref(expect(n, "cb1", "cb", "delivered"));
  json_decref(items);
}

/* The shared rate, straight against Redis: five per second per sender,
 * the rest told when the next second starts. */
static void test_rate_decisions(void **state) {
  fo_limiter *l = NULL;
  fo_limit_op ops[7];
  char sender[64];
  int64_t now = fo_wall_ms();

  (void)state;
  snprintf(sender, sizeof(sender), "+1555%d", (int)getpid());
  assert_int_equal(fo_limiter_open(getenv("FANOUT_REDIS_URL"), false, &l),
                   FO_OK);
  memset(ops, 0, sizeof(ops));
  for (int i = 0; i < 7; i++) {
    ops[i].kind = FO_LIMIT_RATE;
    ops[i].sender = sender;
    ops[i].rate = 5;
    ops[i].now_ms = now;
  }
  assert_int_equal(fo_limiter_decide(l, ops, 7), FO_OK);
  for (int i = 0; i < 5; i++)
    assert_int_equal(ops[i].result, FO_LIMIT_PASS);
  for (int i = 5; i < 7; i++) {
    assert_int_equal(ops[i].result, FO_LIMIT_THROTTLED);
    assert_int_equal(ops[i].retry_after_ms, 1000 - now % 1000);
  }
  /* The next second is a new window. */
  ops[0].now_ms = now + 1000;
  assert_int_equal(fo_limiter_decide(l, ops, 1), FO_OK);
  assert_int_equal(ops[0].result, FO_LIMIT_PASS);
  /* A rate op needs a sender and a positive rate. */
  ops[0].sender = NULL;
  assert_int_equal(fo_limiter_decide(l, ops, 1), FO_EINVAL);
  fo_limiter_close(l);

  /* Redis unreachable: the caller is told so, and decides. */
  assert_int_equal(fo_limiter_open("redis://127.0.0.1:1", false, &l), FO_OK);
  ops[0].sender = sender;
  assert_int_equal(fo_limiter_decide(l, ops, 1), FO_EIO);
  assert_int_equal(ops[0].result, FO_LIMIT_UNAVAILABLE);
  fo_limiter_close(l);
}

/* Arrival times of `items`: span first to last, the most in any 1 s. */
static void spread(json_t *items, int64_t *span, size_t *max_in_1s) {
  size_t n = json_array_size(items);

  *span = json_integer_value(
              json_object_get(json_array_get(items, n - 1), "ts_ms")) -
          json_integer_value(json_object_get(json_array_get(items, 0),
                                             "ts_ms"));
  *max_in_1s = 0;
  for (size_t i = 0; i < n; i++) {
    int64_t t = json_integer_value(
        json_object_get(json_array_get(items, i), "ts_ms"));
    size_t k = 0;

    for (size_t j = i; j < n; j++)
      k += json_integer_value(json_object_get(json_array_get(items, j),
                                              "ts_ms")) < t + 1000;
    if (k > *max_in_1s)
      *max_in_1s = k;
  }
}

/* rate_per_second = 5 and 20 messages: fixed 1-second windows let 5
 * through per window, so they need 4 windows: more than 2 s from first
 * to last (less a little network jitter; without the limit they all
 * arrive within a few hundred ms), and never more than two windows'
 * worth (10) in any second. */
static void test_rate_spreads_sends(void **state) {
  enum { N = 20, RATE = 5 };
  node n;
  json_t *items;
  int64_t span;
  size_t max1;

  (void)state;
  stop_shared_node();
  fake_reset();
  start_node(&n, "twilio-rate", 0, RATE, NULL);
  put_user(&n, "rate", "+15551230009");
  for (int i = 0; i < N; i++) {
    char id[32];

    snprintf(id, sizeof(id), "rate%d", i);
    send_event(id, "rate", "\"title\":\"t\"");
  }
  items = fake_wait_items("+15551230009", N);
  spread(items, &span, &max1);
  print_message("%d messages at %d/s: span %lld ms, at most %zu in 1 s\n",
                N, RATE, (long long)span, max1);
  assert_true(span > 1800);
  assert_true(max1 <= 2 * RATE);
  for (int i = 0; i < N; i++) {
    char id[32];

    snprintf(id, sizeof(id), "rate%d", i);
    json_decref(expect_sent(&n, id, "rate"));
  }
  json_decref(items);
  assert_int_equal(WEXITSTATUS(itest_stop(&n.proc, SIGTERM, 20000)), 0);
}

/* Two instances share the sender's rate through Redis: 30 messages at
 * 5/s need 6 windows whoever sends them, more than 4 s (less jitter);
 * two instances each keeping 5/s on their own would need 3 windows,
 * under 3 s. */
static void test_rate_shared_by_instances(void **state) {
  enum { N = 30, RATE = 5 };
  node a, b;
  json_t *items;
  int64_t span;
  size_t max1;

  (void)state;
  stop_shared_node();
  fake_reset();
  start_node(&a, "twilio-share-a", 0, RATE, "[kafka]\ngroup = share\n");
  start_node(&b, "twilio-share-b", 0, RATE, "[kafka]\ngroup = share\n");
  /* Let the group settle with both members. */
  itest_sleep_ms(6000);
  put_user(&a, "share", "+15551230010");
  for (int i = 0; i < N; i++) {
    char id[32];

    snprintf(id, sizeof(id), "share%d", i);
    send_event(id, "share", "\"title\":\"t\"");
  }
  items = fake_wait_items("+15551230010", N);
  spread(items, &span, &max1);
  print_message("%d messages at %d/s over 2 instances: span %lld ms, at "
                "most %zu in 1 s\n",
                N, RATE, (long long)span, max1);
  assert_true(span > 3500);
  assert_true(max1 <= 2 * RATE);
  assert_true(itest_count_lines(a.proc.log, "partitions assigned") > 0);
  assert_true(itest_count_lines(b.proc.log, "partitions assigned") > 0);
  json_decref(items);
  itest_stop(&a.proc, SIGTERM, 20000);
  itest_stop(&b.proc, SIGTERM, 20000);
}

/* With Redis down, each instance still keeps to the rate on its own: 15
 * messages at 5/s need 3 windows, more than 1 s from first to last (less
 * jitter). */
static void test_rate_held_locally_without_redis(void **state) {
  enum { N = 15, RATE = 5 };
  node n;
  json_t *items;
  int64_t span;
  size_t max1;

  (void)state;
  stop_shared_node();
  fake_reset();
  start_node_redis(&n, "twilio-noredis", 0, RATE, NULL,
                   "redis://127.0.0.1:1");
  put_user(&n, "local-rate", "+15551230011");
  for (int i = 0; i < N; i++) {
    char id[32];

    snprintf(id, sizeof(id), "norate%d", i);
    send_event(id, "local-rate", "\"title\":\"t\"");
  }
  items = fake_wait_items("+15551230011", N);
  spread(items, &span, &max1);
  print_message("%d messages at %d/s without Redis: span %lld ms, at most "
                "%zu in 1 s\n",
                N, RATE, (long long)span, max1);
  assert_true(span > 800);
  assert_true(max1 <= 2 * RATE);
  assert_true(itest_count_lines(n.proc.log,
                                "the SMS rate is enforced per instance") >
              0);
  json_decref(items);
  assert_int_equal(WEXITSTATUS(itest_stop(&n.proc, SIGTERM, 20000)), 0);
}

/* ---- setup ---- */

static int start_fake(void) {
  char cb[128];
  const char *const args[] = {"--account-sid", SID, "--auth-token", AUTH,
                              "--callback-url", cb, "--callback-delay-ms",
                              "700", NULL};

  snprintf(cb, sizeof(cb), "http://127.0.0.1:%d/v1/callbacks/twilio",
           g_admin_port);
  return itest_fake_start(&g_fake, "fake-twilio", "twilio-fake", args);
}

static int setup(void **state) {
  char dir[512];

  (void)state;
  snprintf(g_pfx, sizeof(g_pfx), "tw%d", (int)getpid());
  g_admin_port = itest_free_port();
  if (itest_db_create("twilio", g_dsn, sizeof(g_dsn)) != 0)
    return -1;
  if (itest_tmpdir("twilio-broker", dir, sizeof(dir)) != 0)
    return -1;
  if (itest_start_broker(&g_broker, dir, 4, g_bootstrap,
                         sizeof(g_bootstrap)) != 0)
    return -1;
  return start_fake();
}

static int teardown(void **state) {
  (void)state;
  if (g_node_up)
    itest_stop(&g_node.proc, SIGTERM, 20000);
  itest_stop(&g_fake.proc, SIGTERM, 5000);
  itest_stop(&g_broker, SIGTERM, 5000);
  itest_db_drop(g_dsn);
  return 0;
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_sent_with_sid_then_delivered),
      cmocka_unit_test(test_refused_number_becomes_unusable),
      cmocka_unit_test(test_unsubscribed_turns_sms_off),
      cmocka_unit_test(test_429_then_sent),
      cmocka_unit_test(test_server_errors_retried),
      cmocka_unit_test(test_other_4xx_fails_with_message),
      cmocka_unit_test(test_auth_failure_logged_once),
      cmocka_unit_test(test_bad_number_sends_nothing),
      cmocka_unit_test(test_status_callback_checks_signature),
      cmocka_unit_test(test_rate_decisions),
      cmocka_unit_test(test_rate_spreads_sends),
      cmocka_unit_test(test_rate_shared_by_instances),
      cmocka_unit_test(test_rate_held_locally_without_redis),
  };

  return cmocka_run_group_tests(tests, setup, teardown);
}
