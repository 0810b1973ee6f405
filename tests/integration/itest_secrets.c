/* SPDX-License-Identifier: MIT */
/*
 * No secret reaches the log: a full run of fanoutd at debug level, with
 * every secret of the configuration set (admin token, JWT secret, the
 * SendGrid key, the Twilio auth token, a Redis password), bad admin
 * requests, deliveries through both providers and a Redis that refuses
 * the password; then the whole log is searched for each secret.
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

#include <jansson.h>

#include "itest.h"

#define SG_KEY "SG.secret-sendgrid-key-7f3a9c"
#define TW_TOKEN "secret-twilio-token-4b8e21"
#define TW_SID "AC0123456789abcdef0123456789abcdef"
#define REDIS_PASSWORD "secret-redis-password-91dd"
#define JWT_SECRET "test-jwt-secret-0123456789"

static void test_no_secret_in_any_log_line(void **state) {
  const char *const sg_args[] = {"--api-key", SG_KEY, NULL};
  const char *const tw_args[] = {"--account-sid", TW_SID, "--auth-token",
                                 TW_TOKEN, NULL};
  const char *secrets[] = {ITEST_ADMIN_TOKEN, JWT_SECRET, SG_KEY, TW_TOKEN,
                           REDIS_PASSWORD};
  char dsn[512], bootstrap[256], dir[512], cfg[2048], redis[256];
  char body[512], pfx[32];
  itest_proc broker;
  itest_fake sg, tw;
  itest_node n;
  char got[128];
  json_t *d;
  char *log;
  int st;

  (void)state;
  snprintf(pfx, sizeof(pfx), "sec%d", (int)getpid());
  assert_int_equal(itest_db_create("secrets", dsn, sizeof(dsn)), 0);
  assert_int_equal(itest_tmpdir("secrets-broker", dir, sizeof(dir)), 0);
  assert_int_equal(itest_start_broker(&broker, dir, 2, bootstrap,
                                      sizeof(bootstrap)),
                   0);
  assert_int_equal(itest_fake_start(&sg, "fake-sendgrid", "secrets-sg",
                                    sg_args),
                   0);
  assert_int_equal(itest_fake_start(&tw, "fake-twilio", "secrets-tw",
                                    tw_args),
                   0);

  /* The base configuration says info; the environment overrides it. */
  setenv("FANOUT_LOG_LEVEL", "debug", 1);
  snprintf(cfg, sizeof(cfg),
           "[sendgrid]\nurl = %s\napi_key = %s\nfrom = n@example.com\n"
           "ca_file = %s\n"
           "[twilio]\nurl = %s\naccount_sid = %s\nauth_token = %s\n"
           "from = +15005550006\nca_file = %s\n",
           sg.url, SG_KEY, sg.ca, tw.url, TW_SID, TW_TOKEN, tw.ca);
  /* The test Redis has no password, so this one is refused: the outage
   * path logs too. */
  snprintf(redis, sizeof(redis), "redis://:%s@%s", REDIS_PASSWORD,
           strstr(getenv("FANOUT_REDIS_URL"), "//") + 2);
  assert_int_equal(itest_node_start(&n, "secrets-node", 0, bootstrap, dsn,
                                    redis, cfg),
                   0);

  /* Wrong and missing tokens, and a good request. */
  {
    char url[128];

    snprintf(url, sizeof(url), "http://127.0.0.1:%d/v1/users/x", n.port);
    assert_int_equal(itest_http("GET", url, "wrong-token", NULL, NULL), 401);
    assert_int_equal(itest_http("GET", url, NULL, NULL, NULL), 401);
  }
  snprintf(body, sizeof(body), "/v1/users/%s-u", pfx);
  assert_int_equal(itest_api(&n, "PUT", body,
                             "{\"email\":\"u@example.com\","
                             "\"phone\":\"+15551230000\"}",
                             NULL),
                   200);

  {
    char ev[512], ev_id[64], user[64];
    const char *one[1] = {ev};

    snprintf(ev_id, sizeof(ev_id), "%s-e", pfx);
    snprintf(user, sizeof(user), "%s-u", pfx);
    snprintf(ev, sizeof(ev),
             "{\"id\":\"%s\",\"category\":\"t\",\"to\":[\"%s\"],"
             "\"channels\":[\"email\",\"sms\"],\"title\":\"Hi\","
             "\"body\":\"There\"}",
             ev_id, user);
    assert_int_equal(itest_produce(bootstrap, "notifications", one, 1), 0);
    d = itest_wait_outcome(&n, ev_id, user, "email", "sent", false, 20000,
                           got, sizeof(got));
    assert_non_null(d);
    json_decref(d);
    d = itest_wait_outcome(&n, ev_id, user, "sms", "sent", false, 20000,
                           got, sizeof(got));
    assert_non_null(d);
    json_decref(d);
  }

  st = itest_stop(&n.proc, SIGTERM, 20000);
  assert_true(WIFEXITED(st));
  assert_int_equal(WEXITSTATUS(st), 0);

  log = itest_slurp(n.proc.log, NULL);
  assert_non_null(log);
  assert_non_null(strstr(log, "level=debug"));
  print_message("searched %zu bytes of log\n", strlen(log));
  for (size_t i = 0; i < sizeof(secrets) / sizeof(secrets[0]); i++)
    if (strstr(log, secrets[i]) != NULL)
      fail_msg("a secret is in the log: %.6s...", secrets[i]);
  free(log);

  itest_stop(&sg.proc, SIGTERM, 5000);
  itest_stop(&tw.proc, SIGTERM, 5000);
  itest_stop(&broker, SIGTERM, 5000);
  itest_db_drop(dsn);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_no_secret_in_any_log_line),
  };

  return cmocka_run_group_tests_name("secrets", tests, NULL, NULL);
}
