/* SPDX-License-Identifier: MIT */
/*
 * The policy stage end to end: fanoutd with the private PostgreSQL and
 * Redis, users and preferences set through the REST API, events through
 * Kafka, outcomes read back from the delivery log and the record file.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "itest.h"

typedef itest_node node;

static char g_dsn[512];
static char g_bootstrap[256];
static itest_proc g_broker;
static char g_pfx[32];

static int setup(void **state) {
  char dir[512];

  (void)state;
  snprintf(g_pfx, sizeof(g_pfx), "p%d", (int)getpid());
  if (itest_db_create("policy", g_dsn, sizeof(g_dsn)) != 0)
    return -1;
  if (itest_tmpdir("policy-broker", dir, sizeof(dir)) != 0)
    return -1;
  return itest_start_broker(&g_broker, dir, 4, g_bootstrap,
                            sizeof(g_bootstrap));
}

static int teardown(void **state) {
  (void)state;
  itest_stop(&g_broker, SIGTERM, 5000);
  itest_db_drop(g_dsn);
  return 0;
}

/* Starts one fanoutd on the shared broker and database, with Redis at
 * `redis` (NULL: the test services' Redis). */
static void start_node_redis(node *n, const char *name, const char *extra,
                             const char *redis) {
  char cfg[1024];

  snprintf(cfg, sizeof(cfg), "[engine]\ndeferred_poll_ms = 100\n%s",
           extra != NULL ? extra : "");
  assert_int_equal(itest_node_start(n, name, 0, g_bootstrap, g_dsn, redis,
                                    cfg),
                   0);
}

static void start_node(node *n, const char *name, const char *extra) {
  start_node_redis(n, name, extra, NULL);
}

static void put_user(node *n, const char *user, const char *body) {
  char path[256];

  snprintf(path, sizeof(path), "/v1/users/%s-%s", g_pfx, user);
  assert_int_equal(itest_api(n, "PUT", path, body, NULL), 200);
}

static void put_prefs(node *n, const char *user, const char *body) {
  char path[256];
  char *resp = NULL;
  int st;

  snprintf(path, sizeof(path), "/v1/users/%s-%s/preferences", g_pfx, user);
  st = itest_api(n, "PUT", path, body, &resp);
  if (st != 200)
    fail_msg("PUT %s: %d %s", path, st, resp);
  free(resp);
}

static void add_device(node *n, const char *user, const char *token) {
  char path[256], body[256];

  snprintf(path, sizeof(path), "/v1/users/%s-%s/devices", g_pfx, user);
  snprintf(body, sizeof(body), "{\"platform\":\"apns\",\"token\":\"%s-%s\"}",
           g_pfx, token);
  assert_int_equal(itest_api(n, "POST", path, body, NULL), 201);
}

/* Produces one event; `users` is a JSON array of names without prefix. */
static void send_event(const char *id, const char *users,
                       const char *fields) {
  json_t *to = json_loads(users, 0, NULL);
  json_t *pto = json_array();
  char buf[4096], full_id[128];
  size_t i;
  json_t *u;
  char *tos;
  const char *one[1];

  json_array_foreach(to, i, u) {
    char name[128];

    snprintf(name, sizeof(name), "%s-%s", g_pfx, json_string_value(u));
    json_array_append_new(pto, json_string(name));
  }
  tos = json_dumps(pto, JSON_COMPACT);
  snprintf(full_id, sizeof(full_id), "%s-%s", g_pfx, id);
  snprintf(buf, sizeof(buf),
           "{\"id\":\"%s\",\"category\":\"order_update\",\"to\":%s%s%s}",
           full_id, tos, fields != NULL ? "," : "",
           fields != NULL ? fields : "");
  one[0] = buf;
  assert_int_equal(itest_produce(g_bootstrap, "notifications", one, 1), 0);
  free(tos);
  json_decref(to);
  json_decref(pto);
}

/* Waits until the delivery's log entry is `want`. */
static void expect(node *n, const char *event, const char *user,
                   const char *channel, const char *want) {
  char ev[128], who[128], got[256];
  json_t *d;

  snprintf(ev, sizeof(ev), "%s-%s", g_pfx, event);
  snprintf(who, sizeof(who), "%s-%s", g_pfx, user);
  d = itest_wait_outcome(n, ev, who, channel, want, false, 10000, got,
                         sizeof(got));
  if (d == NULL)
    fail_msg("%s/%s/%s: want %s, got %s", event, user, channel, want, got);
  json_decref(d);
}

/* "HH:MM" in UTC, `delta_min` minutes from now. */
static void utc_hhmm(int delta_min, char *out) {
  time_t t = time(NULL) + delta_min * 60;
  struct tm tm;

  gmtime_r(&t, &tm);
  snprintf(out, 6, "%02d:%02d", tm.tm_hour, tm.tm_min);
}

static void test_every_policy_reason(void **state) {
  node n;
  char prefs[512], start[6], end[6], sql[512], rec[600];

  (void)state;
  start_node(&n, "policy-one", NULL);

  put_user(&n, "full", "{\"email\":\"full@example.com\","
                       "\"phone\":\"+15551234567\",\"timezone\":\"UTC\"}");
  add_device(&n, "full", "tok-full");
  put_user(&n, "noaddr", "{}");
  put_user(&n, "dead", "{}");
  add_device(&n, "dead", "tok-dead");
  snprintf(sql, sizeof(sql),
           "UPDATE devices SET invalid_since = now() WHERE token = "
           "'%s-tok-dead'",
           g_pfx);
  assert_int_equal(itest_sql(g_dsn, sql), 1);
  put_user(&n, "optout", "{\"email\":\"o@example.com\"}");
  put_prefs(&n, "optout", "{\"channels\":{\"email\":false},"
                          "\"categories\":{\"order_update\":"
                          "{\"inapp\":false}}}");
  put_user(&n, "quiet", "{\"timezone\":\"UTC\"}");
  add_device(&n, "quiet", "tok-quiet");
  utc_hhmm(-60, start);
  utc_hhmm(60, end);
  snprintf(prefs, sizeof(prefs),
           "{\"quiet_hours\":{\"start\":\"%s\",\"end\":\"%s\"}}", start, end);
  put_prefs(&n, "quiet", prefs);
  put_user(&n, "capped", "{}");
  add_device(&n, "capped", "tok-capped");
  put_prefs(&n, "capped", "{\"caps\":{\"push\":{\"limit\":2,"
                          "\"per\":\"hour\"}}}");

  send_event("e1", "[\"full\",\"noaddr\",\"dead\",\"optout\",\"quiet\","
                   "\"ghost\"]",
             NULL);
  expect(&n, "e1", "full", "push", "sent");
  expect(&n, "e1", "full", "email", "sent");
  expect(&n, "e1", "full", "sms", "sent");
  expect(&n, "e1", "full", "inapp", "sent");
  expect(&n, "e1", "ghost", "push", "suppressed:unknown_user");
  expect(&n, "e1", "noaddr", "push", "suppressed:no_address");
  expect(&n, "e1", "noaddr", "email", "suppressed:no_address");
  expect(&n, "e1", "noaddr", "sms", "suppressed:no_address");
  expect(&n, "e1", "noaddr", "inapp", "sent");
  expect(&n, "e1", "dead", "push", "suppressed:invalid_token");
  expect(&n, "e1", "optout", "email", "suppressed:opted_out");
  expect(&n, "e1", "optout", "inapp", "suppressed:opted_out");
  expect(&n, "e1", "quiet", "push", "deferred");
  expect(&n, "e1", "quiet", "inapp", "sent");

  /* Caps: two pass in the hour, the rest are capped; critical skips
   * both caps and quiet hours. A short ttl ends before the window. */
  for (int i = 0; i < 4; i++) {
    char id[16];

    snprintf(id, sizeof(id), "cap%d", i);
    send_event(id, "[\"capped\"]", "\"channels\":[\"push\"]");
    itest_sleep_ms(200);
  }
  send_event("crit", "[\"capped\",\"quiet\"]",
             "\"channels\":[\"push\"],\"priority\":\"critical\"");
  send_event("short", "[\"quiet\"]", "\"channels\":[\"push\"],\"ttl\":60");
  expect(&n, "cap0", "capped", "push", "sent");
  expect(&n, "cap1", "capped", "push", "sent");
  expect(&n, "cap2", "capped", "push", "suppressed:capped");
  expect(&n, "cap3", "capped", "push", "suppressed:capped");
  expect(&n, "crit", "capped", "push", "sent");
  expect(&n, "crit", "quiet", "push", "sent");
  expect(&n, "short", "quiet", "push", "suppressed:expired");

  /* The same event again sends nothing twice, and keeps its log. */
  snprintf(rec, sizeof(rec), "%s/deliveries.jsonl", n.dir);
  {
    size_t before = itest_count_lines(rec, NULL);

    send_event("e1", "[\"full\"]", NULL);
    itest_sleep_ms(1500);
    assert_int_equal(itest_count_lines(rec, NULL), before);
    expect(&n, "e1", "full", "push", "sent");
  }

  /* The window's end, brought forward: the poller releases it. */
  assert_int_equal(itest_sql(g_dsn, "UPDATE deferred SET due_at = now() - "
                                    "interval '1 second'"),
                   1);
  expect(&n, "e1", "quiet", "push", "sent");
  for (int i = 0; i < 50 && itest_sql(g_dsn, "SELECT count(*) FROM "
                                             "deferred") != 0;
       i++)
    itest_sleep_ms(100);
  assert_int_equal(itest_sql(g_dsn, "SELECT count(*) FROM deferred"), 0);

  /* A replay of the event after the release defers nothing again. */
  send_event("e1", "[\"quiet\"]", "\"channels\":[\"push\"]");
  itest_sleep_ms(1500);
  expect(&n, "e1", "quiet", "push", "sent");
  assert_int_equal(itest_sql(g_dsn, "SELECT count(*) FROM deferred"), 0);

  assert_int_equal(WEXITSTATUS(itest_stop(&n.proc, SIGTERM, 20000)), 0);
}

/* A change made through one instance reaches the other's cache. */
static void test_cache_follows_changes_across_instances(void **state) {
  node a, b;
  char *resp = NULL;

  (void)state;
  /* a serves the API and reads another topic; b delivers. */
  start_node(&a, "policy-a", "[kafka]\ntopic = chat\ngroup = admin-only\n");
  start_node(&b, "policy-b", NULL);
  put_user(&a, "cached", "{}");
  add_device(&a, "cached", "tok-cached");

  send_event("c1", "[\"cached\"]", "\"channels\":[\"push\"]");
  expect(&b, "c1", "cached", "push", "sent");

  {
    char path[256];

    snprintf(path, sizeof(path), "/v1/users/%s-cached/preferences", g_pfx);
    assert_int_equal(itest_api(&a, "PATCH", path,
                         "{\"channels\":{\"push\":false}}", &resp),
                     200);
    free(resp);
  }
  itest_sleep_ms(1000);
  send_event("c2", "[\"cached\"]", "\"channels\":[\"push\"]");
  expect(&b, "c2", "cached", "push", "suppressed:opted_out");

  itest_stop(&a.proc, SIGTERM, 20000);
  itest_stop(&b.proc, SIGTERM, 20000);
}

/* Two instances racing on one user's cap let no more than the limit
 * through. */
static void test_cap_holds_across_instances(void **state) {
  enum { EVENTS = 40, LIMIT = 5 };
  node a, b;
  char sql[512];
  long sent, capped;

  (void)state;
  start_node(&a, "race-a", "[kafka]\ngroup = race\n");
  start_node(&b, "race-b", "[kafka]\ngroup = race\n");
  /* Let the group settle with both members. */
  itest_sleep_ms(6000);
  put_user(&a, "racer", "{}");
  add_device(&a, "racer", "tok-racer");
  put_prefs(&a, "racer", "{\"caps\":{\"push\":{\"limit\":5,"
                         "\"per\":\"hour\"}}}");

  for (int i = 0; i < EVENTS; i++) {
    char id[16];

    snprintf(id, sizeof(id), "race%d", i);
    send_event(id, "[\"racer\"]", "\"channels\":[\"push\"]");
  }
  snprintf(sql, sizeof(sql),
           "SELECT count(*) FROM delivery_log WHERE user_id = '%s-racer'",
           g_pfx);
  for (int i = 0; i < 200 && itest_sql(g_dsn, sql) < EVENTS; i++)
    itest_sleep_ms(100);
  snprintf(sql, sizeof(sql),
           "SELECT count(*) FROM delivery_log WHERE user_id = '%s-racer' "
           "AND status = 'sent'",
           g_pfx);
  sent = itest_sql(g_dsn, sql);
  snprintf(sql, sizeof(sql),
           "SELECT count(*) FROM delivery_log WHERE user_id = '%s-racer' "
           "AND reason = 'capped'",
           g_pfx);
  capped = itest_sql(g_dsn, sql);
  print_message("sent %ld, capped %ld\n", sent, capped);
  assert_int_equal(sent, LIMIT);
  assert_int_equal(capped, EVENTS - LIMIT);
  /* Both instances did part of the work. */
  assert_true(itest_count_lines(a.proc.log, "partitions assigned") > 0);
  assert_true(itest_count_lines(b.proc.log, "partitions assigned") > 0);

  itest_stop(&a.proc, SIGTERM, 20000);
  itest_stop(&b.proc, SIGTERM, 20000);
}

/* With Redis unreachable, caps let deliveries through (fail open, the
 * default), dedup falls back to the delivery log, and /healthz says so. */
static void test_redis_down_degrades(void **state) {
  node n;
  char url[64], rec[600];
  char *resp = NULL;

  (void)state;
  snprintf(url, sizeof(url), "redis://127.0.0.1:%d", itest_free_port());
  /* E-mail has neither a provider nor the record sink here: it is off. */
  start_node_redis(&n, "policy-noredis", "[record]\nchannels = push\n", url);
  put_user(&n, "nored", "{}");
  add_device(&n, "nored", "tok-nored");
  put_prefs(&n, "nored", "{\"caps\":{\"push\":{\"limit\":1,"
                         "\"per\":\"hour\"}}}");

  send_event("nr1", "[\"nored\"]", "\"channels\":[\"push\"]");
  send_event("nr2", "[\"nored\"]", "\"channels\":[\"push\"]");
  expect(&n, "nr1", "nored", "push", "sent");
  expect(&n, "nr2", "nored", "push", "sent");

  /* An outcome decided before the policy stage is logged too. */
  send_event("off1", "[\"nored\"]", "\"channels\":[\"email\"]");
  expect(&n, "off1", "nored", "email", "suppressed:channel_off");

  /* The same event again: the delivery log knows it was sent. */
  snprintf(rec, sizeof(rec), "%s/deliveries.jsonl", n.dir);
  assert_int_equal(itest_count_lines(rec, "nr1"), 1);
  send_event("nr1", "[\"nored\"]", "\"channels\":[\"push\"]");
  itest_sleep_ms(2000);
  assert_int_equal(itest_count_lines(rec, "nr1"), 1);

  {
    char hurl[64];

    snprintf(hurl, sizeof(hurl), "http://127.0.0.1:%d/healthz", n.port);
    assert_int_equal(itest_http("GET", hurl, NULL, NULL, &resp), 503);
    assert_non_null(strstr(resp, "\"redis\":false"));
    free(resp);
  }
  assert_int_equal(WEXITSTATUS(itest_stop(&n.proc, SIGTERM, 20000)), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_every_policy_reason),
      cmocka_unit_test(test_cache_follows_changes_across_instances),
      cmocka_unit_test(test_cap_holds_across_instances),
      cmocka_unit_test(test_redis_down_degrades),
  };

  return cmocka_run_group_tests_name("policy", tests, setup, teardown);
}
