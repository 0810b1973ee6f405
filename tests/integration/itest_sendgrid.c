/* SPDX-License-Identifier: MIT */
/*
 * The e-mail channel end to end: fanoutd with the private PostgreSQL and
 * Redis and the development broker, sending through fake-sendgrid over
 * HTTPS. Users are made through the REST API, events go through Kafka,
 * and each case checks both ends: what the fake accepted (and in how many
 * requests) and what the delivery log says (status, reason, attempts,
 * provider id).
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

#include "itest.h"

#define API_KEY "SG.test-key-0123456789"
#define WAIT_MS 20000

typedef itest_node node;

static char g_dsn[512];
static char g_bootstrap[256];
static char g_pfx[32];
static itest_proc g_broker;
static itest_fake g_fake;
static node g_node;
static bool g_node_up;

/* ---- the fake's control API, over HTTPS with its own CA ---- */

/* One request to the fake; returns the status, body in *resp (free()). */
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
static json_t *fake_accepted(void) {
  char *resp = NULL;
  json_t *doc;

  assert_int_equal(fake_call("GET", "/_fake/accepted", NULL, &resp), 200);
  doc = json_loads(resp, 0, NULL);
  free(resp);
  assert_non_null(doc);
  return doc;
}

static long fake_requests(void) {
  json_t *doc = fake_accepted();
  long n = (long)json_integer_value(json_object_get(doc, "requests"));

  json_decref(doc);
  return n;
}

/* The message id the fake gave `email` last, or NULL (free()). */
static char *fake_message_id(const char *email) {
  json_t *doc = fake_accepted(), *it;
  char *out = NULL;
  size_t i;

  json_array_foreach(json_object_get(doc, "items"), i, it) {
    if (strcmp(json_string_value(json_object_get(it, "to")), email) == 0) {
      free(out);
      out = strdup(json_string_value(json_object_get(it, "message_id")));
    }
  }
  json_decref(doc);
  return out;
}

/* ---- fanoutd ---- */

static void start_node(node *n, const char *name, const char *api_key) {
  char cfg[2048];

  /* Short timeouts and backoff keep the retry cases quick. */
  snprintf(cfg, sizeof(cfg),
           "[engine]\nretry_base_ms = 200\nretry_max_ms = 1000\n"
           "[kafka]\ngroup = sendgrid-%s\n"
           "[sendgrid]\nurl = %s\napi_key = %s\n"
           "from = notifications@example.com\nca_file = %s\n"
           "timeout_ms = 1000\nmax_inflight = 2000\n",
           g_pfx, g_fake.url, api_key, g_fake.ca);
  assert_int_equal(itest_node_start(n, name, 0, g_bootstrap, g_dsn, NULL,
                                    cfg),
                   0);
  assert_int_equal(
      itest_wait_log(&n->proc, "channel sends through SendGrid", 1000), 0);
}

static void put_user(node *n, const char *user, const char *email) {
  char path[256], body[256];

  snprintf(path, sizeof(path), "/v1/users/%s-%s", g_pfx, user);
  snprintf(body, sizeof(body), "{\"email\":\"%s\"}", email);
  assert_int_equal(itest_api(n, "PUT", path, body, NULL), 200);
}

/* Produces one e-mail event to `users` (names without the prefix), with
 * extra top-level JSON `fields` (may be NULL). */
static void send_event(const char *id, const char *const *users, size_t n,
                       const char *fields) {
  json_t *to = json_array();
  char full_id[128];
  char *tos, *ev = NULL;
  const char *one[1];

  for (size_t i = 0; i < n; i++) {
    char name[128];

    snprintf(name, sizeof(name), "%s-%s", g_pfx, users[i]);
    json_array_append_new(to, json_string(name));
  }
  tos = json_dumps(to, JSON_COMPACT);
  snprintf(full_id, sizeof(full_id), "%s-%s", g_pfx, id);
  assert_true(asprintf(&ev,
                       "{\"id\":\"%s\",\"category\":\"order_update\","
                       "\"channels\":[\"email\"],\"to\":%s%s%s}",
                       full_id, tos, fields != NULL ? "," : "",
                       fields != NULL ? fields : "") > 0);
  one[0] = ev;
  assert_int_equal(itest_produce(g_bootstrap, "notifications", one, 1), 0);
  free(ev);
  free(tos);
  json_decref(to);
}

/* The delivery log's entry for (event, user, email), or NULL. */
static json_t *delivery(node *n, const char *event, const char *user) {
  char ev[128], who[128];

  snprintf(ev, sizeof(ev), "%s-%s", g_pfx, event);
  snprintf(who, sizeof(who), "%s-%s", g_pfx, user);
  return itest_delivery(n, ev, who, "email");
}

/* Waits until the entry reads `want`; returns it (json_decref()). */
static json_t *expect(node *n, const char *event, const char *user,
                      const char *want) {
  char ev[128], who[128], got[256];
  json_t *d;

  snprintf(ev, sizeof(ev), "%s-%s", g_pfx, event);
  snprintf(who, sizeof(who), "%s-%s", g_pfx, user);
  d = itest_wait_outcome(n, ev, who, "email", want, false, WAIT_MS, got,
                         sizeof(got));
  if (d == NULL)
    fail_msg("%s/%s: want %s, got %s", event, user, want, got);
  return d;
}

static long attempts(const json_t *d) {
  return (long)json_integer_value(json_object_get(d, "attempts"));
}

static const char *provider_id(const json_t *d) {
  const char *s = json_string_value(json_object_get(d, "provider_id"));

  return s != NULL ? s : "";
}

/* Makes users NAME0..NAME{n-1} with addresses NAME0@example.com...,
 * filling names[] (each free()). */
static void make_users(node *n, const char *name, size_t count,
                       char **names) {
  for (size_t i = 0; i < count; i++) {
    char email[160];

    assert_true(asprintf(&names[i], "%s%zu", name, i) > 0);
    snprintf(email, sizeof(email), "%s-%s@example.com", g_pfx, names[i]);
    put_user(n, names[i], email);
  }
}

static void free_names(char **names, size_t n) {
  for (size_t i = 0; i < n; i++)
    free(names[i]);
}

/* ---- setup ---- */

static int start_fake(void) {
  const char *const args[] = {"--api-key", API_KEY, NULL};

  return itest_fake_start(&g_fake, "fake-sendgrid", "sendgrid-fake", args);
}

static int setup(void **state) {
  char dir[512];

  (void)state;
  snprintf(g_pfx, sizeof(g_pfx), "sg%d", (int)getpid());
  if (itest_db_create("sendgrid", g_dsn, sizeof(g_dsn)) != 0)
    return -1;
  if (itest_tmpdir("sendgrid-broker", dir, sizeof(dir)) != 0)
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

/* Every case but the last shares one fanoutd, started by the first. */
static node *shared_node(void) {
  if (!g_node_up) {
    start_node(&g_node, "sendgrid-node", API_KEY);
    g_node_up = true;
  }
  fake_reset();
  return &g_node;
}

/* ---- cases ---- */

/* 50 recipients of one event: one request, 50 personalizations, each
 * delivery sent with the message id the fake gave. */
static void test_batch_of_fifty_is_one_request(void **state) {
  enum { N = 50 };
  node *n = shared_node();
  char *names[N];
  json_t *acc, *it;
  size_t i;

  (void)state;
  make_users(n, "batch", N, names);
  send_event("batch", (const char *const *)names, N,
             "\"title\":\"Your order shipped\",\"body\":\"Tuesday\","
             "\"email\":{\"html\":\"<p>Tuesday</p>\"}");
  for (i = 0; i < N; i++) {
    json_t *d = expect(n, "batch", names[i], "sent");
    char email[160], *id;

    snprintf(email, sizeof(email), "%s-%s@example.com", g_pfx, names[i]);
    id = fake_message_id(email);
    assert_non_null(id);
    assert_string_equal(provider_id(d), id);
    assert_int_equal(attempts(d), 1);
    free(id);
    json_decref(d);
  }
  acc = fake_accepted();
  assert_int_equal(json_integer_value(json_object_get(acc, "count")), N);
  assert_int_equal(json_integer_value(json_object_get(acc, "requests")), 1);
  json_array_foreach(json_object_get(acc, "items"), i, it) {
    assert_string_equal(json_string_value(json_object_get(it, "subject")),
                        "Your order shipped");
  }
  json_decref(acc);
  free_names(names, N);
}

/* A template event carries its id and data to every personalization; two
 * users sharing an address go in two requests, as SendGrid wants. */
static void test_template_and_shared_address(void **state) {
  node *n = shared_node();
  const char *users[] = {"tpl-a", "tpl-b", "tpl-c"};
  char shared[160];
  json_t *acc, *it, *d;
  size_t i;

  (void)state;
  snprintf(shared, sizeof(shared), "%s-family@example.com", g_pfx);
  put_user(n, "tpl-a", shared);
  put_user(n, "tpl-b", shared);
  {
    char own[160];

    snprintf(own, sizeof(own), "%s-tpl-c@example.com", g_pfx);
    put_user(n, "tpl-c", own);
  }
  send_event("tpl", users, 3,
             "\"email\":{\"template_id\":\"d-0123456789abcdef\","
             "\"template_data\":{\"order\":\"1234\"}}");
  for (i = 0; i < 3; i++) {
    d = expect(n, "tpl", users[i], "sent");
    assert_true(provider_id(d)[0] != '\0');
    json_decref(d);
  }
  acc = fake_accepted();
  assert_int_equal(json_integer_value(json_object_get(acc, "count")), 3);
  assert_int_equal(json_integer_value(json_object_get(acc, "requests")), 2);
  json_array_foreach(json_object_get(acc, "items"), i, it) {
    assert_string_equal(
        json_string_value(json_object_get(it, "template_id")),
        "d-0123456789abcdef");
    assert_string_equal(json_string_value(json_object_get(
                            json_object_get(it, "template_data"), "order")),
                        "1234");
  }
  json_decref(acc);
}

/* A 400 fails every delivery of the request with SendGrid's message, and
 * is not retried. */
static void test_bad_request_fails_with_message(void **state) {
  node *n = shared_node();
  char *names[3];

  (void)state;
  make_users(n, "bad", 3, names);
  fake_script("[{\"status\":400,\"body\":{\"errors\":[{\"message\":"
              "\"The from email does not contain a valid address.\","
              "\"field\":\"from.email\",\"help\":null}]}}]");
  send_event("bad", (const char *const *)names, 3,
             "\"title\":\"t\",\"body\":\"b\"");
  for (size_t i = 0; i < 3; i++) {
    json_t *d = expect(n, "bad", names[i],
                       "failed:The from email does not contain a valid "
                       "address.");

    assert_int_equal(attempts(d), 1);
    json_decref(d);
  }
  itest_sleep_ms(500);
  assert_int_equal(fake_requests(), 1);
  free_names(names, 3);
}

/* When SendGrid names one personalization, only that recipient fails; the
 * others go again at once and are sent. */
static void test_refused_recipient_fails_alone(void **state) {
  node *n = shared_node();
  char *names[3];
  int failed = 0, sent = 0;

  (void)state;
  make_users(n, "part", 3, names);
  fake_script("[{\"status\":400,\"body\":{\"errors\":[{\"message\":"
              "\"Does not contain a valid address.\",\"field\":"
              "\"personalizations.1.to.0.email\",\"help\":null}]}}]");
  send_event("part", (const char *const *)names, 3,
             "\"title\":\"t\",\"body\":\"b\"");
  for (size_t i = 0; i < 3; i++) {
    int64_t end = itest_now_ms() + WAIT_MS;
    char got[256] = "";

    for (;;) {
      json_t *d = delivery(n, "part", names[i]);

      if (d != NULL)
        itest_outcome(d, got, sizeof(got));
      json_decref(d);
      if (strcmp(got, "sent") == 0 ||
          strcmp(got, "failed:Does not contain a valid address.") == 0)
        break;
      assert_true(itest_now_ms() < end);
      itest_sleep_ms(50);
    }
    if (strcmp(got, "sent") == 0)
      sent++;
    else
      failed++;
  }
  assert_int_equal(failed, 1);
  assert_int_equal(sent, 2);
  assert_int_equal(fake_requests(), 2);
  free_names(names, 3);
}

/* 429 with a reset two seconds ahead: the retry waits for the reset. */
static void test_rate_limit_waits_for_reset(void **state) {
  node *n = shared_node();
  const char *users[] = {"rl"};
  char email[160], script[256];
  int64_t t0;
  json_t *d;

  (void)state;
  snprintf(email, sizeof(email), "%s-rl@example.com", g_pfx);
  put_user(n, "rl", email);
  snprintf(script, sizeof(script),
           "[{\"status\":429,\"headers\":{\"X-RateLimit-Limit\":\"600\","
           "\"X-RateLimit-Remaining\":\"0\",\"X-RateLimit-Reset\":"
           "\"%lld\"}}]",
           (long long)time(NULL) + 2);
  fake_script(script);
  t0 = itest_now_ms();
  send_event("rl", users, 1, "\"title\":\"t\",\"body\":\"b\"");
  d = expect(n, "rl", "rl", "sent");
  /* The reset is in whole seconds, so at least one full second passed. */
  assert_true(itest_now_ms() - t0 >= 1000);
  assert_int_equal(attempts(d), 2);
  assert_int_equal(fake_requests(), 2);
  json_decref(d);
}

/* 500, a stall past timeout_ms and a dropped connection are each retried,
 * and the second attempt is sent. */
static void test_faults_are_retried(void **state) {
  static const char *const steps[] = {
      "[{\"status\":500}]", "[{\"delay_ms\":3000}]", "[{\"drop\":true}]"};
  static const char *const ids[] = {"e500", "stall", "drop"};
  node *n = shared_node();

  (void)state;
  for (size_t i = 0; i < 3; i++) {
    const char *users[1] = {ids[i]};
    char email[160], *id;
    json_t *d;

    fake_reset();
    snprintf(email, sizeof(email), "%s-%s@example.com", g_pfx, ids[i]);
    put_user(n, ids[i], email);
    fake_script(steps[i]);
    send_event(ids[i], users, 1, "\"title\":\"t\",\"body\":\"b\"");
    d = expect(n, ids[i], ids[i], "sent");
    /* libcurl itself sends a request again, once, when a kept-alive
     * connection closes before any answer; a drop on a fresh connection
     * comes back to the channel as a retryable failure instead. */
    if (strcmp(ids[i], "drop") == 0)
      assert_true(attempts(d) == 1 || attempts(d) == 2);
    else
      assert_int_equal(attempts(d), 2);
    id = fake_message_id(email);
    assert_non_null(id);
    assert_string_equal(provider_id(d), id);
    free(id);
    json_decref(d);
    assert_int_equal(fake_requests(), 2);
  }
}

/* An address SendGrid would refuse is suppressed before any request. */
static void test_malformed_address_is_suppressed(void **state) {
  node *n = shared_node();
  const char *users[] = {"nodot"};
  json_t *d;

  (void)state;
  /* The REST API takes it (one '@', text on both sides); SendGrid would
   * not, as the domain has no dot. */
  put_user(n, "nodot", "someone@localhost");
  send_event("nodot", users, 1, "\"title\":\"t\",\"body\":\"b\"");
  d = expect(n, "nodot", "nodot", "suppressed:no_address");
  json_decref(d);
  itest_sleep_ms(200);
  assert_int_equal(fake_requests(), 0);
}

/* A refused API key fails every delivery as unauthorized, with one error
 * line in the log and a metric, however many messages fail. Runs last: it
 * replaces the shared fanoutd with one holding a wrong key. */
static void test_bad_key_fails_loudly_once(void **state) {
  enum { EVENTS = 5, USERS = 4 };
  char *names[USERS], *metrics = NULL, url[96];
  node bad;

  (void)state;
  if (g_node_up) {
    assert_int_equal(WEXITSTATUS(itest_stop(&g_node.proc, SIGTERM, 20000)),
                     0);
    g_node_up = false;
  }
  fake_reset();
  start_node(&bad, "sendgrid-badkey", "SG.wrong-key");
  make_users(&bad, "auth", USERS, names);
  for (int e = 0; e < EVENTS; e++) {
    char id[16];

    snprintf(id, sizeof(id), "auth%d", e);
    send_event(id, (const char *const *)names, USERS,
               "\"title\":\"t\",\"body\":\"b\"");
  }
  for (int e = 0; e < EVENTS; e++) {
    char id[16];

    snprintf(id, sizeof(id), "auth%d", e);
    for (size_t i = 0; i < USERS; i++) {
      json_t *d = expect(&bad, id, names[i], "failed:unauthorized");

      assert_int_equal(attempts(d), 1);
      json_decref(d);
    }
  }
  assert_true(fake_requests() >= 1);
  assert_int_equal(itest_count_lines(bad.proc.log, "refused the API key"),
                   1);
  assert_int_equal(
      itest_count_lines(bad.proc.log, "level=error mod=sendgrid"), 1);

  snprintf(url, sizeof(url), "http://127.0.0.1:%d/metrics", bad.port);
  assert_int_equal(itest_http("GET", url, NULL, NULL, &metrics), 200);
  assert_non_null(
      strstr(metrics,
             "fanout_provider_auth_failures_total{channel=\"email\"}"));
  assert_null(strstr(metrics,
                     "fanout_provider_auth_failures_total{channel=\"email\"}"
                     " 0"));
  /* The key is a secret: it never reaches the log. */
  assert_int_equal(itest_count_lines(bad.proc.log, "SG.wrong-key"), 0);
  free(metrics);
  assert_int_equal(WEXITSTATUS(itest_stop(&bad.proc, SIGTERM, 20000)), 0);
  free_names(names, USERS);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_batch_of_fifty_is_one_request),
      cmocka_unit_test(test_template_and_shared_address),
      cmocka_unit_test(test_bad_request_fails_with_message),
      cmocka_unit_test(test_refused_recipient_fails_alone),
      cmocka_unit_test(test_rate_limit_waits_for_reset),
      cmocka_unit_test(test_faults_are_retried),
      cmocka_unit_test(test_malformed_address_is_suppressed),
      cmocka_unit_test(test_bad_key_fails_loudly_once),
  };

  return cmocka_run_group_tests_name("sendgrid", tests, setup, teardown);
}
