/* SPDX-License-Identifier: MIT */
/*
 * Unit tests for the configuration loader: defaults, file values,
 * environment overrides (which win over the file and can create a
 * section), named instances, and one test per class of error, each
 * checking the exact line the user would see and that secrets stay out
 * of it. Every test writes its INI file to a fresh temporary directory
 * and passes an explicit environment.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "config.h"
#include "fanout/common.h"

/* Internal to config.c; reached here because no schema key is boolean. */
bool fo_config__bool_parse(const char *s, bool *out);

#define TOKEN "admin-token-0123456789"
#define JWT "relay-secret-0123456789"
/* A minimal valid file: four lines, so extra text starts on line 5. */
#define BASE "[admin]\ntoken = " TOKEN "\n[relay]\njwt_secret = " JWT "\n"

struct fx {
  char dir[256];
  char path[300];
  char err[512];
  fo_config *cfg;
};

static char *const no_env[] = {NULL};

static int fx_setup(void **state) {
  struct fx *fx = calloc(1, sizeof(*fx));
  const char *tmp = getenv("TMPDIR");

  if (fx == NULL) {
    return -1;
  }
  if (tmp == NULL || *tmp == '\0') {
    tmp = P_tmpdir;
  }
  snprintf(fx->dir, sizeof(fx->dir), "%s/fo_config_XXXXXX", tmp);
  if (mkdtemp(fx->dir) == NULL) {
    free(fx);
    return -1;
  }
  snprintf(fx->path, sizeof(fx->path), "%s/fanout.ini", fx->dir);
  *state = fx;
  return 0;
}

static int fx_teardown(void **state) {
  struct fx *fx = *state;

  fo_config_free(fx->cfg);
  unlink(fx->path);
  rmdir(fx->dir);
  free(fx);
  return 0;
}

static void write_file(const char *path, const char *text) {
  FILE *f = fopen(path, "w");

  assert_non_null(f);
  assert_int_equal(fputs(text, f) >= 0, 1);
  assert_int_equal(fclose(f), 0);
}

/* Writes `text` as the whole file and loads it. */
static int load_text(struct fx *fx, const char *text, char *const *envp) {
  fo_config_free(fx->cfg);
  fx->cfg = NULL;
  write_file(fx->path, text);
  return fo_config_load(fx->path, envp, &fx->cfg, fx->err,
                        sizeof(fx->err));
}

/* Loads the minimal valid base followed by `extra`. */
static int load_base(struct fx *fx, const char *extra, char *const *envp) {
  char text[4096];

  snprintf(text, sizeof(text), "%s%s", BASE, extra);
  return load_text(fx, text, envp);
}

static void assert_loaded(struct fx *fx, int rc) {
  if (rc != FO_OK) {
    fail_msg("load failed (%d): %s", rc, fx->err);
  }
  assert_non_null(fx->cfg);
}

/* The error is one line starting "config: " and holding `want`. */
static void assert_error(struct fx *fx, int rc, const char *want) {
  if (rc != FO_ECONFIG) {
    fail_msg("expected FO_ECONFIG, got %d (want \"%s\")", rc, want);
  }
  assert_null(fx->cfg);
  assert_null(strchr(fx->err, '\n'));
  assert_memory_equal(fx->err, "config: ", 8);
  if (strstr(fx->err, want) == NULL) {
    fail_msg("error \"%s\" does not contain \"%s\"", fx->err, want);
  }
}

/* The error is exactly "config: PATH:LINE: rest". */
static void assert_file_error(struct fx *fx, int rc, int line,
                              const char *rest) {
  char want[1024];

  snprintf(want, sizeof(want), "config: %s:%d: %s", fx->path, line, rest);
  assert_error(fx, rc, want);
  assert_string_equal(fx->err, want);
}

static void test_defaults(void **state) {
  struct fx *fx = *state;
  fo_config *c;

  assert_loaded(fx, load_base(fx, "", no_env));
  c = fx->cfg;

  assert_string_equal(fo_config_get(c, "log", "level"), "info");
  assert_string_equal(fo_config_get(c, "kafka", "brokers"), "embedded");
  assert_string_equal(fo_config_get(c, "kafka", "group"), "fanout");
  assert_string_equal(fo_config_get(c, "kafka", "topic"), "notifications");
  assert_string_equal(fo_config_get(c, "kafka", "chat_topic"), "chat");
  assert_string_equal(fo_config_get(c, "kafka", "dlq_topic"),
                      "notifications.dlq");
  assert_string_equal(fo_config_get(c, "kafka", "bootstrap_file"),
                      "var/kafka.bootstrap");
  assert_int_equal(fo_config_get_int(c, "kafka", "session_timeout_ms"),
                   10000);
  assert_int_equal(fo_config_get_int(c, "kafka", "embedded_partitions"), 4);
  assert_int_equal(fo_config_get_int(c, "kafka", "max_event_bytes"),
                   1048576);
  assert_int_equal(fo_config_get_int(c, "engine", "queue_items"), 1000000);
  assert_int_equal(fo_config_get_int(c, "engine", "queue_events"), 4096);
  assert_int_equal(fo_config_get_int(c, "engine", "workers"), 2);
  assert_int_equal(fo_config_get_int(c, "engine", "commit_interval_ms"),
                   1000);
  assert_int_equal(fo_config_get_int(c, "engine", "drain_timeout_ms"),
                   10000);
  assert_int_equal(fo_config_get_int(c, "engine", "summary_interval_s"), 10);
  assert_int_equal(fo_config_get_int(c, "engine", "retry_base_ms"), 1000);
  assert_int_equal(fo_config_get_int(c, "engine", "retry_max_ms"), 300000);
  assert_string_equal(fo_config_get(c, "redis", "url"),
                      "redis://127.0.0.1:6379");
  assert_string_equal(fo_config_get(c, "admin", "listen"), "127.0.0.1:8080");
  assert_string_equal(fo_config_get(c, "relay", "listen"), "127.0.0.1:8081");
  assert_string_equal(fo_config_get(c, "record", "channels"),
                      "push,email,sms,inapp");
  assert_string_equal(fo_config_get(c, "admin", "token"), TOKEN);
  assert_string_equal(fo_config_get(c, "relay", "jwt_secret"), JWT);

  /* No value and no default. */
  assert_null(fo_config_get(c, "postgres", "dsn"));
  assert_null(fo_config_get(c, "apns", "url"));
  assert_null(fo_config_get(c, "apns.ios", "url"));
  assert_null(fo_config_get(c, "record", "file"));
  /* Not in the schema. */
  assert_null(fo_config_get(c, "kafka", "nope"));
  assert_null(fo_config_get(c, "nope", "url"));
  assert_null(fo_config_get(c, "kafka.x", "brokers"));

  /* Typed views of keys of another type, or of no key, are zero. */
  assert_int_equal(fo_config_get_int(c, "kafka", "brokers"), 0);
  assert_int_equal(fo_config_get_int(c, "engine", "nope"), 0);
  assert_false(fo_config_get_bool(c, "kafka", "brokers"));
  assert_false(fo_config_get_bool(c, "nope", "nope"));

  assert_true(fo_config_has_section(c, "admin"));
  assert_true(fo_config_has_section(c, "relay"));
  assert_false(fo_config_has_section(c, "kafka"));
  assert_false(fo_config_has_section(c, "apns"));
  assert_false(fo_config_has_section(c, "record"));
  assert_false(fo_config_has_section(c, "nope"));
  assert_int_equal(fo_config_instances(c, "apns", NULL, 0), 0);
}

static void test_file_values(void **state) {
  struct fx *fx = *state;
  fo_config *c;

  assert_loaded(fx, load_base(fx,
                              "; a comment\n"
                              "# another one\n"
                              "[log]\n"
                              "level = debug\n"
                              "[kafka]\n"
                              "brokers = k1:9092, k2.example:9093 ; ours\n"
                              "session_timeout_ms=3000\n"
                              "[engine]\n"
                              "workers = 64\n"
                              "summary_interval_s = 0\n"
                              "drain_timeout_ms = 0\n"
                              "[admin]\n"
                              "listen = [::1]:0\n"
                              "[postgres]\n"
                              "dsn = host=127.0.0.1 port=5433 dbname=f\n"
                              "[record]\n"
                              "file = var/record.jsonl\n"
                              "channels = push , sms\n"
                              "[sendgrid]\n"
                              "[twilio]\n"
                              "url = http://127.0.0.1:9001\n"
                              "status_callback_url = https://cb.example/x\n",
                              no_env));
  c = fx->cfg;
  assert_string_equal(fo_config_get(c, "log", "level"), "debug");
  assert_string_equal(fo_config_get(c, "kafka", "brokers"),
                      "k1:9092, k2.example:9093");
  assert_int_equal(fo_config_get_int(c, "kafka", "session_timeout_ms"),
                   3000);
  assert_int_equal(fo_config_get_int(c, "engine", "workers"), 64);
  assert_int_equal(fo_config_get_int(c, "engine", "summary_interval_s"), 0);
  assert_int_equal(fo_config_get_int(c, "engine", "drain_timeout_ms"), 0);
  assert_string_equal(fo_config_get(c, "admin", "listen"), "[::1]:0");
  assert_string_equal(fo_config_get(c, "postgres", "dsn"),
                      "host=127.0.0.1 port=5433 dbname=f");
  assert_string_equal(fo_config_get(c, "record", "channels"),
                      "push , sms");
  assert_string_equal(fo_config_get(c, "record", "file"),
                      "var/record.jsonl");
  /* An empty section is still given. */
  assert_true(fo_config_has_section(c, "sendgrid"));
  assert_true(fo_config_has_section(c, "twilio"));
  assert_true(fo_config_has_section(c, "kafka"));
  assert_false(fo_config_has_section(c, "fcm"));
}

static void test_indent_and_bom(void **state) {
  struct fx *fx = *state;

  /* An indented line is a key of its own, never a continuation of the
   * value above it. */
  assert_loaded(fx, load_base(fx,
                              "  [kafka]\n"
                              "brokers = a:1\n"
                              "    group = g\r\n"
                              "\t topic = t\n",
                              no_env));
  assert_string_equal(fo_config_get(fx->cfg, "kafka", "brokers"), "a:1");
  assert_string_equal(fo_config_get(fx->cfg, "kafka", "group"), "g");
  assert_string_equal(fo_config_get(fx->cfg, "kafka", "topic"), "t");

  assert_loaded(fx, load_text(fx, "\xEF\xBB\xBF" BASE, no_env));
  assert_string_equal(fo_config_get(fx->cfg, "admin", "token"), TOKEN);
}

static void test_no_file(void **state) {
  struct fx *fx = *state;
  char *const env[] = {"FANOUT_ADMIN_TOKEN=" TOKEN,
                       "FANOUT_RELAY_JWT_SECRET=" JWT, NULL};

  assert_int_equal(fo_config_load(NULL, env, &fx->cfg, fx->err,
                                  sizeof(fx->err)),
                   FO_OK);
  assert_string_equal(fo_config_get(fx->cfg, "admin", "token"), TOKEN);
  assert_string_equal(fo_config_get(fx->cfg, "kafka", "brokers"),
                      "embedded");
  assert_true(fo_config_has_section(fx->cfg, "admin"));
  assert_false(fo_config_has_section(fx->cfg, "kafka"));
}

static void test_env_overrides(void **state) {
  struct fx *fx = *state;
  char *const env[] = {"LANG=C",
                       "FANOUT_NOT_A_KEY=1",
                       "FANOUT_ENGINE_WORKERSX=3",
                       "FANOUT_ENGINE_WORKERS=8",
                       "FANOUT_ENGINE_WORKERS=9",
                       "FANOUT_KAFKA_BROKERS=b1:1,b2:2",
                       "FANOUT_ADMIN_TOKEN=another-token-0123456789",
                       NULL};

  assert_loaded(fx, load_base(fx, "[engine]\nworkers = 4\n", env));
  /* The first of two settings wins, as with getenv(3). */
  assert_int_equal(fo_config_get_int(fx->cfg, "engine", "workers"), 8);
  assert_string_equal(fo_config_get(fx->cfg, "kafka", "brokers"),
                      "b1:1,b2:2");
  assert_true(fo_config_has_section(fx->cfg, "kafka"));
  assert_string_equal(fo_config_get(fx->cfg, "admin", "token"),
                      "another-token-0123456789");

  /* A bad value in the file does not matter once the environment
   * replaces it. */
  {
    char *const fix[] = {"FANOUT_ENGINE_WORKERS=3", NULL};

    assert_loaded(fx, load_base(fx, "[engine]\nworkers = lots\n", fix));
    assert_int_equal(fo_config_get_int(fx->cfg, "engine", "workers"), 3);
  }
}

static void test_env_creates_section(void **state) {
  struct fx *fx = *state;
  char *const env[] = {"FANOUT_SENDGRID_API_KEY=SG.key",
                       "FANOUT_SENDGRID_URL=http://127.0.0.1:9002", NULL};

  assert_loaded(fx, load_base(fx, "", env));
  assert_true(fo_config_has_section(fx->cfg, "sendgrid"));
  assert_string_equal(fo_config_get(fx->cfg, "sendgrid", "api_key"),
                      "SG.key");
  assert_string_equal(fo_config_get(fx->cfg, "sendgrid", "url"),
                      "http://127.0.0.1:9002");
  assert_false(fo_config_has_section(fx->cfg, "twilio"));
}

static void test_env_from_environ(void **state) {
  struct fx *fx = *state;
  int rc;

  assert_int_equal(setenv("FANOUT_ADMIN_TOKEN", TOKEN, 1), 0);
  assert_int_equal(setenv("FANOUT_RELAY_JWT_SECRET", JWT, 1), 0);
  assert_int_equal(setenv("FANOUT_ENGINE_WORKERS", "7", 1), 0);
  rc = fo_config_load(NULL, NULL, &fx->cfg, fx->err, sizeof(fx->err));
  unsetenv("FANOUT_ADMIN_TOKEN");
  unsetenv("FANOUT_RELAY_JWT_SECRET");
  unsetenv("FANOUT_ENGINE_WORKERS");
  assert_loaded(fx, rc);
  assert_int_equal(fo_config_get_int(fx->cfg, "engine", "workers"), 7);
}

static void test_named_instances(void **state) {
  struct fx *fx = *state;
  char *const env[] = {"FANOUT_APNS_IOS_KEY_ID=K1env",
                       "FANOUT_APNS_MAC_APP_TEAM_ID=T2",
                       "FANOUT_APNS_WATCH_URL=https://watch.example", NULL};
  const char *names[4] = {NULL, NULL, NULL, NULL};
  fo_config *c;

  assert_loaded(fx, load_base(fx,
                              "[apns]\n"
                              "url = https://api.push.apple.com\n"
                              "key_id = K0\n"
                              "[apns.ios]\n"
                              "key_id = K1\n"
                              "topic = com.example.ios\n"
                              "[fcm.android]\n"
                              "url = https://fcm.googleapis.com\n"
                              "[apns.mac-app]\n",
                              env));
  c = fx->cfg;

  assert_int_equal(fo_config_instances(c, "apns", names, 4), 3);
  assert_string_equal(names[0], "default");
  assert_string_equal(names[1], "ios");
  assert_string_equal(names[2], "mac-app");
  assert_null(names[3]);

  /* A short array gets what fits; the count is still the total. */
  names[0] = names[1] = NULL;
  assert_int_equal(fo_config_instances(c, "apns", names, 1), 3);
  assert_string_equal(names[0], "default");
  assert_null(names[1]);

  assert_int_equal(fo_config_instances(c, "fcm", names, 4), 1);
  assert_string_equal(names[0], "android");
  assert_int_equal(fo_config_instances(c, "kafka", names, 4), 0);
  assert_int_equal(fo_config_instances(c, "apns.ios", names, 4), 0);

  assert_string_equal(fo_config_get(c, "apns", "key_id"), "K0");
  assert_string_equal(fo_config_get(c, "apns.ios", "key_id"), "K1env");
  assert_string_equal(fo_config_get(c, "apns.ios", "topic"),
                      "com.example.ios");
  assert_null(fo_config_get(c, "apns.ios", "url"));
  assert_string_equal(fo_config_get(c, "apns.mac-app", "team_id"), "T2");
  assert_true(fo_config_has_section(c, "apns.ios"));
  assert_true(fo_config_has_section(c, "apns.mac-app"));
  assert_true(fo_config_has_section(c, "fcm.android"));
  assert_false(fo_config_has_section(c, "fcm"));

  /* The environment sets keys of instances in the file; it does not
   * create instances. */
  assert_false(fo_config_has_section(c, "apns.watch"));
  assert_null(fo_config_get(c, "apns.watch", "url"));
}

static void test_is_secret(void **state) {
  (void)state;
  assert_true(fo_config_is_secret("admin", "token"));
  assert_true(fo_config_is_secret("relay", "jwt_secret"));
  assert_true(fo_config_is_secret("postgres", "dsn"));
  assert_true(fo_config_is_secret("redis", "url"));
  assert_true(fo_config_is_secret("sendgrid", "api_key"));
  assert_true(fo_config_is_secret("twilio", "auth_token"));
  assert_false(fo_config_is_secret("twilio", "account_sid"));
  assert_false(fo_config_is_secret("admin", "listen"));
  assert_false(fo_config_is_secret("apns", "key_id"));
  assert_false(fo_config_is_secret("apns.ios", "key_file"));
  assert_false(fo_config_is_secret("kafka.x", "brokers"));
  assert_false(fo_config_is_secret("nope", "token"));
  assert_false(fo_config_is_secret("admin", "nope"));
  assert_false(fo_config_is_secret(NULL, NULL));
}

static void test_bool_parse(void **state) {
  static const char *const yes[] = {"true", "yes", "on", "1", "TRUE", "On"};
  static const char *const no[] = {"false", "no", "off", "0", "No", "OFF"};
  bool b;

  (void)state;
  for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
    b = false;
    assert_true(fo_config__bool_parse(yes[i], &b));
    assert_true(b);
  }
  for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++) {
    b = true;
    assert_true(fo_config__bool_parse(no[i], &b));
    assert_false(b);
  }
  assert_false(fo_config__bool_parse("2", &b));
  assert_false(fo_config__bool_parse("", &b));
  assert_false(fo_config__bool_parse("yess", &b));
}

static void test_error_unknown(void **state) {
  struct fx *fx = *state;

  assert_file_error(fx, load_base(fx, "[kafka]\nbrokerz = x\n", no_env), 6,
                    "[kafka] brokerz: unknown key");
  assert_file_error(fx, load_base(fx, "[kafak]\n", no_env), 5,
                    "[kafak]: unknown section");
  assert_file_error(fx, load_base(fx, "[kafka.x]\ngroup = g\n", no_env), 5,
                    "[kafka.x]: unknown section ([kafka] takes no "
                    "instance name)");
  assert_file_error(fx, load_base(fx, "[apns.IOS]\n", no_env), 5,
                    "[apns.IOS]: bad instance name (1-32 characters of "
                    "a-z, 0-9, _ and -)");
  assert_file_error(fx, load_base(fx, "[apns.]\n", no_env), 5,
                    "[apns.]: bad instance name (1-32 characters of "
                    "a-z, 0-9, _ and -)");
  assert_file_error(fx, load_base(fx, "[apns.default]\n", no_env), 5,
                    "[apns.default]: the app named default is configured "
                    "in [apns]");
  assert_file_error(fx, load_text(fx, "token = x\n" BASE, no_env), 1,
                    "token: key outside any [section]");
  assert_file_error(fx,
                    load_base(fx, "[engine]\nworkers = 2\nworkers = 3\n",
                              no_env),
                    7, "[engine] workers: given twice (first on line 6)");
  assert_file_error(fx, load_base(fx, "[fcm.token]\n", no_env), 5,
                    "[fcm.token]: instance name clashes with [fcm]: "
                    "FANOUT_FCM_TOKEN_URL would set both");
  assert_error(fx, load_base(fx, "[apns.a-b]\n[apns.a_b]\n", no_env),
               "instance name clashes with");
}

static void test_error_int(void **state) {
  struct fx *fx = *state;
  char *const env_bad[] = {"FANOUT_ENGINE_WORKERS=x", NULL};

  assert_file_error(fx, load_base(fx, "[engine]\nworkers = x\n", no_env), 6,
                    "[engine] workers: expected an integer 1-64, got \"x\"");
  assert_file_error(fx, load_base(fx, "[engine]\nworkers = 65\n", no_env),
                    6,
                    "[engine] workers: expected an integer 1-64, got "
                    "\"65\"");
  assert_file_error(fx, load_base(fx, "[engine]\nworkers = 0\n", no_env), 6,
                    "[engine] workers: expected an integer 1-64, got \"0\"");
  assert_file_error(fx, load_base(fx, "[engine]\nworkers = 2x\n", no_env),
                    6,
                    "[engine] workers: expected an integer 1-64, got "
                    "\"2x\"");
  assert_error(fx,
               load_base(fx, "[engine]\nqueue_items = 99999999999999999999\n",
                         no_env),
               "[engine] queue_items: expected an integer 1-100000000");
  assert_error(fx,
               load_base(fx, "[kafka]\nmax_event_bytes = -5\n", no_env),
               "[kafka] max_event_bytes: expected an integer "
               "1024-16777216, got \"-5\"");

  assert_int_equal(load_base(fx, "", env_bad), FO_ECONFIG);
  assert_string_equal(fx->err,
                      "config: FANOUT_ENGINE_WORKERS: [engine] workers: "
                      "expected an integer 1-64, got \"x\"");

  assert_error(fx,
               load_base(fx,
                         "[engine]\nretry_base_ms = 5000\n"
                         "retry_max_ms = 4000\n",
                         no_env),
               "[engine] retry_base_ms: must not be above retry_max_ms");
}

static void test_error_listen(void **state) {
  struct fx *fx = *state;
  static const char *const bad[] = {
      "nope",        "127.0.0.1",   "127.0.0.1:",  ":8080",
      "host:70000",  "host:-1",     "host:80a",    "::1:8080",
      "[::1]",       "[zz]:80",     "[]:80",       "a b:80",
      "host:123456",
  };
  static const char *const good[] = {"0.0.0.0:0", "localhost:65535",
                                     "[::]:8080", "[fe80::1]:1"};
  char text[256];
  char *const env[] = {"FANOUT_ADMIN_LISTEN=nope", NULL};

  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    char want[256];

    snprintf(text, sizeof(text), "[admin]\nlisten = %s\n", bad[i]);
    snprintf(want, sizeof(want),
             "[admin] listen: expected HOST:PORT, got \"%s\"", bad[i]);
    assert_file_error(fx, load_base(fx, text, no_env), 6, want);
  }
  for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
    snprintf(text, sizeof(text), "[relay]\nlisten = %s\n", good[i]);
    assert_loaded(fx, load_base(fx, text, no_env));
    assert_string_equal(fo_config_get(fx->cfg, "relay", "listen"), good[i]);
  }
  assert_int_equal(load_base(fx, "", env), FO_ECONFIG);
  assert_string_equal(fx->err, "config: FANOUT_ADMIN_LISTEN: [admin] "
                               "listen: expected HOST:PORT, got \"nope\"");
}

static void test_error_url(void **state) {
  struct fx *fx = *state;

  assert_file_error(fx, load_base(fx, "[apns]\nurl = ftp://x\n", no_env), 6,
                    "[apns] url: expected an http:// or https:// URL, got "
                    "\"ftp://x\"");
  assert_file_error(
      fx, load_base(fx, "[fcm.a]\ntoken_url = oauth.example\n", no_env), 6,
      "[fcm.a] token_url: expected an http:// or https:// URL, got "
      "\"oauth.example\"");
  assert_error(
      fx, load_base(fx, "[twilio]\nstatus_callback_url = https://\n", no_env),
      "[twilio] status_callback_url: expected an http:// or https:// URL");
  assert_error(fx,
               load_base(fx, "[sendgrid]\nurl = http://a b\n", no_env),
               "[sendgrid] url: expected an http:// or https:// URL");
}

static void test_error_lists(void **state) {
  struct fx *fx = *state;

  assert_file_error(
      fx,
      load_base(fx, "[record]\nfile = r.jsonl\nchannels = push,fax\n",
                no_env),
      7,
      "[record] channels: expected a comma-separated list of push, email, "
      "sms, inapp, got \"push,fax\"");
  assert_error(
      fx,
      load_base(fx, "[record]\nfile = r.jsonl\nchannels = push,,sms\n",
                no_env),
      "[record] channels: expected a comma-separated list");
  assert_error(fx,
               load_base(fx, "[record]\nfile = r.jsonl\nchannels = ,\n",
                         no_env),
               "[record] channels: expected a comma-separated list");
  assert_file_error(fx,
                    load_base(fx, "[record]\nfile = r\nchannels =\n",
                              no_env),
                    7, "[record] channels: empty value");
  assert_file_error(fx, load_base(fx, "[record]\nchannels = push\n", no_env),
                    5, "[record] file: required in [record]");

  assert_file_error(fx, load_base(fx, "[kafka]\nbrokers = host\n", no_env),
                    6,
                    "[kafka] brokers: expected \"embedded\" or a list of "
                    "HOST:PORT, got \"host\"");
  assert_error(fx, load_base(fx, "[kafka]\nbrokers = a:1,b\n", no_env),
               "[kafka] brokers: expected");
  assert_error(fx,
               load_base(fx, "[kafka]\nbrokers = embedded,a:1\n", no_env),
               "[kafka] brokers: expected");
  assert_error(fx, load_base(fx, "[kafka]\nbrokers = a:0\n", no_env),
               "[kafka] brokers: expected");

  assert_file_error(fx, load_base(fx, "[log]\nlevel = loud\n", no_env), 6,
                    "[log] level: expected one of error|warn|info|debug, "
                    "got \"loud\"");
  assert_file_error(fx, load_base(fx, "[kafka]\ngroup =\n", no_env), 6,
                    "[kafka] group: empty value");
}

static void test_error_required(void **state) {
  struct fx *fx = *state;

  assert_int_equal(load_text(fx, "[relay]\njwt_secret = " JWT "\n", no_env),
                   FO_ECONFIG);
  assert_string_equal(fx->err, "config: [admin] token: required");
  assert_null(fx->cfg);

  assert_int_equal(load_text(fx, "[admin]\ntoken = " TOKEN "\n", no_env),
                   FO_ECONFIG);
  assert_string_equal(fx->err, "config: [relay] jwt_secret: required");
}

static void test_error_secrets_not_echoed(void **state) {
  struct fx *fx = *state;
  char *const env_short[] = {"FANOUT_ADMIN_TOKEN=short-secret-xy", NULL};
  char *const env_ctl[] = {"FANOUT_ADMIN_TOKEN=secret-with\nnewline-x",
                           NULL};

  assert_int_equal(load_base(fx, "", env_short), FO_ECONFIG);
  assert_string_equal(fx->err, "config: FANOUT_ADMIN_TOKEN: [admin] token: "
                               "too short (at least 16 characters)");
  assert_null(strstr(fx->err, "short-secret-xy"));

  assert_file_error(fx,
                    load_text(fx,
                              "[admin]\ntoken = " TOKEN "\n"
                              "[relay]\njwt_secret = tiny-jwt-key\n",
                              no_env),
                    4,
                    "[relay] jwt_secret: too short (at least 16 "
                    "characters)");
  assert_null(strstr(fx->err, "tiny-jwt-key"));

  /* A secret of the wrong shape is not shown either. */
  assert_file_error(
      fx, load_base(fx, "[redis]\nurl = http://u:hunter2@h:6379\n", no_env),
      6, "[redis] url: expected a redis:// URL");
  assert_null(strstr(fx->err, "hunter2"));

  assert_int_equal(load_base(fx, "", env_ctl), FO_ECONFIG);
  assert_string_equal(fx->err, "config: FANOUT_ADMIN_TOKEN: [admin] token: "
                               "contains a control character");
  assert_null(strstr(fx->err, "newline"));
}

static void test_error_syntax(void **state) {
  struct fx *fx = *state;
  char text[512];

  assert_file_error(fx, load_base(fx, "[kafka]\nthis is not ini\n", no_env),
                    6, "syntax error (expected [section] or key = value)");
  assert_file_error(fx, load_base(fx, "[kafka\ngroup = g\n", no_env), 5,
                    "syntax error (expected [section] or key = value)");
  /* The earlier of a syntax error and a bad key is the one shown. */
  assert_file_error(fx,
                    load_base(fx, "[kafka]\nbad line\nbrokerz = 1\n",
                              no_env),
                    6, "syntax error (expected [section] or key = value)");
  assert_file_error(fx,
                    load_base(fx, "[kafka]\nbrokerz = 1\nbad line\n",
                              no_env),
                    6, "[kafka] brokerz: unknown key");

  snprintf(text, sizeof(text), "[postgres]\ndsn = %0250d\n", 0);
  assert_file_error(fx, load_base(fx, text, no_env), 6,
                    "line too long (at most 197 characters)");
}

static void test_error_files(void **state) {
  struct fx *fx = *state;
  char path[400];
  char want[600];
  fo_config *cfg = (fo_config *)&path;

  snprintf(path, sizeof(path), "%s/nope.ini", fx->dir);
  assert_int_equal(fo_config_load(path, no_env, &cfg, fx->err,
                                  sizeof(fx->err)),
                   FO_ECONFIG);
  /* Out-parameters are left alone on failure. */
  assert_ptr_equal(cfg, (fo_config *)&path);
  snprintf(want, sizeof(want),
           "config: cannot read %s: No such file or directory", path);
  assert_string_equal(fx->err, want);

  assert_int_equal(fo_config_load(fx->dir, no_env, &cfg, fx->err,
                                  sizeof(fx->err)),
                   FO_ECONFIG);
  snprintf(want, sizeof(want), "config: cannot read %s: Is a directory",
           fx->dir);
  assert_string_equal(fx->err, want);

  /* No error buffer, or a tiny one, is fine. */
  write_file(fx->path, "[kafka]\nbrokerz = 1\n");
  assert_int_equal(fo_config_load(fx->path, no_env, &cfg, NULL, 0),
                   FO_ECONFIG);
  assert_int_equal(fo_config_load(fx->path, no_env, &cfg, fx->err, 4),
                   FO_ECONFIG);
  assert_string_equal(fx->err, "con");
  assert_ptr_equal(cfg, (fo_config *)&path);
}

#define T(f) cmocka_unit_test_setup_teardown(f, fx_setup, fx_teardown)

int main(void) {
  const struct CMUnitTest tests[] = {
      T(test_defaults),
      T(test_file_values),
      T(test_indent_and_bom),
      T(test_no_file),
      T(test_env_overrides),
      T(test_env_creates_section),
      T(test_env_from_environ),
      T(test_named_instances),
      T(test_is_secret),
      T(test_bool_parse),
      T(test_error_unknown),
      T(test_error_int),
      T(test_error_listen),
      T(test_error_url),
      T(test_error_lists),
      T(test_error_required),
      T(test_error_secrets_not_echoed),
      T(test_error_syntax),
      T(test_error_files),
  };

  return cmocka_run_group_tests(tests, NULL, NULL);
}
