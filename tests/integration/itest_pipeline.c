/* SPDX-License-Identifier: MIT */
/*
 * End-to-end tests of the pipeline: fanoutd as a real process, events
 * through the real Kafka protocol (the embedded broker, or the standalone
 * development broker where the broker must outlive fanoutd), deliveries
 * counted in the record channel's file.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include <jansson.h>

#include "itest.h"

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};

  nanosleep(&ts, NULL);
}

/* Tally of record lines: how many in all, how many distinct deliveries. */
typedef struct tally {
  size_t lines;
  size_t distinct;
  json_t *seen;                 /* "event|user|channel" -> count */
} tally;

static void tally_file(const char *path, tally *t) {
  char *s = itest_slurp(path, NULL);
  char *save = NULL;

  t->lines = 0;
  t->distinct = 0;
  t->seen = json_object();
  if (s == NULL)
    return;
  for (char *l = strtok_r(s, "\n", &save); l != NULL;
       l = strtok_r(NULL, "\n", &save)) {
    json_t *o = json_loads(l, 0, NULL);
    char key[512];
    json_t *n;

    assert_non_null(o);
    snprintf(key, sizeof(key), "%s|%s|%s",
             json_string_value(json_object_get(o, "event")),
             json_string_value(json_object_get(o, "user")),
             json_string_value(json_object_get(o, "channel")));
    n = json_object_get(t->seen, key);
    if (n == NULL) {
      json_object_set_new(t->seen, key, json_integer(1));
      t->distinct++;
    } else {
      json_integer_set(n, json_integer_value(n) + 1);
    }
    t->lines++;
    json_decref(o);
  }
  free(s);
}

static size_t wait_lines(const char *path, size_t want, int timeout_ms) {
  size_t n = 0;

  for (int waited = 0; waited < timeout_ms; waited += 100) {
    n = itest_count_lines(path, NULL);
    if (n >= want)
      break;
    sleep_ms(100);
  }
  return n;
}

static char *event_json(const char *id, int users, const char *channels,
                        const char *priority) {
  json_t *to = json_array();
  json_t *ev;
  char *s, u[32];

  for (int i = 0; i < users; i++) {
    snprintf(u, sizeof(u), "user-%d", i);
    json_array_append_new(to, json_string(u));
  }
  ev = json_pack("{s:s, s:s, s:s, s:o, s:s}", "id", id, "category",
                 "order_update", "priority", priority, "to", to, "title",
                 "Your order shipped");
  if (channels != NULL)
    json_object_set_new(ev, "channels", json_loads(channels, 0, NULL));
  s = json_dumps(ev, JSON_COMPACT);
  json_decref(ev);
  return s;
}

static char *read_bootstrap(const char *dir) {
  char path[600];
  char *s;

  snprintf(path, sizeof(path), "%s/var/kafka.bootstrap", dir);
  s = itest_slurp(path, NULL);
  if (s != NULL)
    s[strcspn(s, "\n")] = '\0';
  return s;
}

/*
 * The embedded broker: valid events are delivered to every listed user
 * and recorded channel, a channel with no provider is reported off, and
 * every kind of bad event goes to the dead-letter topic with its reason
 * while the consumer keeps going.
 */
static void test_embedded_flow_and_dead_letters(void **state) {
  char *debug_env[] = {"FANOUT_LOG_LEVEL=debug", NULL};
  char dir[512], rec[600];
  itest_proc fd;
  char *bootstrap, *good1, *good2;
  char big[64 + 10001 * 8];
  itest_msg *dlq = NULL;
  size_t got;
  tally t;
  int st;

  (void)state;
  assert_int_equal(itest_tmpdir("embedded", dir, sizeof(dir)), 0);
  assert_int_equal(itest_write_config(dir, "embedded",
                                      "channels = push,email,inapp\n"),
                   0);
  assert_int_equal(itest_start_fanoutd(&fd, dir, debug_env, 30000), 0);
  bootstrap = read_bootstrap(dir);
  assert_non_null(bootstrap);

  /* 10,001 recipients: one more than the contract allows. */
  {
    size_t n = (size_t)snprintf(big, sizeof(big),
                                "{\"id\":\"big\",\"category\":\"x\","
                                "\"to\":[");
    for (int i = 0; i < 10001; i++)
      n += (size_t)snprintf(big + n, sizeof(big) - n, "%s\"u%d\"",
                            i ? "," : "", i);
    snprintf(big + n, sizeof(big) - n, "]}");
  }
  good1 = event_json("first", 2, "[\"push\",\"email\",\"sms\",\"inapp\"]",
                     "high");
  good2 = event_json("after-bad", 3, "[\"push\"]", "low");
  {
    const char *msgs[] = {good1,
                          "this is not json",
                          "[1,2,3]",
                          "{\"category\":\"x\",\"to\":[\"u1\"]}",
                          "{\"id\":\"e\",\"category\":\"Bad Cat\","
                          "\"to\":[\"u1\"]}",
                          big,
                          good2};

    assert_int_equal(itest_produce(bootstrap, "notifications", msgs, 7), 0);
  }

  /* 2 users x 3 recorded channels, then 3 users x push. */
  snprintf(rec, sizeof(rec), "%s/deliveries.jsonl", dir);
  assert_int_equal(wait_lines(rec, 9, 20000), 9);
  tally_file(rec, &t);
  assert_int_equal(t.distinct, 9);
  assert_non_null(json_object_get(t.seen, "first|user-1|inapp"));
  assert_null(json_object_get(t.seen, "first|user-0|sms"));
  assert_non_null(json_object_get(t.seen, "after-bad|user-2|push"));
  json_decref(t.seen);

  /* sms has no provider: its items end suppressed, channel_off. */
  assert_int_equal(itest_wait_log(&fd, "status=suppressed "
                                       "reason=\"channel_off\"", 5000),
                   0);

  got = itest_consume(bootstrap, "notifications.dlq", 5, 20000, &dlq);
  assert_int_equal(got, 5);
  {
    const char *want[] = {"fanout-reason=invalid_json",
                          "fanout-reason=not_object",
                          "fanout-reason=missing_field",
                          "fanout-reason=invalid_field",
                          "fanout-reason=too_many_recipients"};

    for (size_t w = 0; w < 5; w++) {
      bool found = false;

      for (size_t i = 0; i < got; i++)
        found = found || strstr(dlq[i].headers, want[w]) != NULL;
      assert_true(found);
    }
    /* The original bytes travel unchanged. */
    for (size_t i = 0; i < got; i++) {
      if (strstr(dlq[i].headers, "invalid_json") != NULL)
        assert_string_equal(dlq[i].value, "this is not json");
      assert_non_null(strstr(dlq[i].headers, "fanout-topic=notifications"));
      assert_non_null(strstr(dlq[i].headers, "fanout-offset="));
    }
  }
  itest_msgs_free(dlq, got);

  /* A graceful stop exits 0 with everything finished. */
  st = itest_stop(&fd, SIGTERM, 20000);
  assert_true(WIFEXITED(st));
  assert_int_equal(WEXITSTATUS(st), 0);
  assert_int_equal(itest_wait_log(&fd, "all work finished and committed",
                                   100),
                   0);
  free(good1);
  free(good2);
  free(bootstrap);
}

/* SIGTERM drains and commits: a restarted fanoutd replays nothing. */
static void test_sigterm_commits_finished_work(void **state) {
  char dir[512], rec[600], bootstrap[256];
  itest_proc broker, fd;
  char *msgs[200];
  tally t;
  int st;

  (void)state;
  assert_int_equal(itest_tmpdir("sigterm", dir, sizeof(dir)), 0);
  assert_int_equal(itest_start_broker(&broker, dir, 4, bootstrap,
                                      sizeof(bootstrap)),
                   0);
  assert_int_equal(itest_write_config(dir, bootstrap, NULL), 0);
  assert_int_equal(itest_start_fanoutd(&fd, dir, NULL, 30000), 0);

  for (int i = 0; i < 200; i++) {
    char id[32];

    snprintf(id, sizeof(id), "ev-%d", i);
    msgs[i] = event_json(id, 2, NULL, "normal");
  }
  assert_int_equal(itest_produce(bootstrap, "notifications",
                                 (const char *const *)msgs, 200),
                   0);
  snprintf(rec, sizeof(rec), "%s/deliveries.jsonl", dir);
  assert_int_equal(wait_lines(rec, 1600, 30000), 1600);

  st = itest_stop(&fd, SIGTERM, 20000);
  assert_true(WIFEXITED(st));
  assert_int_equal(WEXITSTATUS(st), 0);
  assert_int_equal(itest_committed(bootstrap, "fanout", "notifications"),
                   200);

  /* Restart: nothing is delivered again. */
  assert_int_equal(itest_start_fanoutd(&fd, dir, NULL, 30000), 0);
  sleep_ms(1500);
  tally_file(rec, &t);
  assert_int_equal(t.lines, 1600);
  assert_int_equal(t.distinct, 1600);
  json_decref(t.seen);

  itest_stop(&fd, SIGTERM, 20000);
  itest_stop(&broker, SIGTERM, 5000);
  for (int i = 0; i < 200; i++)
    free(msgs[i]);
}

/*
 * kill -9 in the middle of a stream, then a restart: every delivery of
 * every event is made, and repeats come only from events at or after the
 * committed offsets, that is, from work that was in flight.
 */
static void test_kill9_loses_nothing(void **state) {
  enum { EVENTS = 4000, USERS = 5, ITEMS = EVENTS * USERS * 4 };
  char dir[512], rec[600], bootstrap[256];
  itest_proc broker, fd;
  char **msgs = calloc(EVENTS, sizeof(*msgs));
  int64_t committed;
  struct stat sb;
  size_t before;
  tally t;

  (void)state;
  assert_int_equal(itest_tmpdir("kill9", dir, sizeof(dir)), 0);
  assert_int_equal(itest_start_broker(&broker, dir, 4, bootstrap,
                                      sizeof(bootstrap)),
                   0);
  assert_int_equal(itest_write_config(dir, bootstrap, NULL), 0);
  assert_int_equal(itest_start_fanoutd(&fd, dir, NULL, 30000), 0);

  for (int i = 0; i < EVENTS; i++) {
    char id[32];

    snprintf(id, sizeof(id), "k-%d", i);
    msgs[i] = event_json(id, USERS, NULL, i % 2 ? "normal" : "high");
  }
  assert_int_equal(itest_produce(bootstrap, "notifications",
                                 (const char *const *)msgs, EVENTS),
                   0);

  /* Kill once a part of the work is done, and before all of it is. */
  snprintf(rec, sizeof(rec), "%s/deliveries.jsonl", dir);
  for (int waited = 0; waited < 60000; waited += 5) {
    if (stat(rec, &sb) == 0 && sb.st_size > 5 * 1000 * 1000)
      break;
    sleep_ms(5);
  }
  kill(fd.pid, SIGKILL);
  waitpid(fd.pid, NULL, 0);
  fd.pid = -1;
  before = itest_count_lines(rec, NULL);
  committed = itest_committed(bootstrap, "fanout", "notifications");
  print_message("killed after %zu of %d deliveries; %lld events committed\n",
                before, ITEMS, (long long)committed);
  assert_true(before > 0);
  assert_true(before < ITEMS);
  assert_true(committed >= 0 && committed < EVENTS);

  assert_int_equal(itest_start_fanoutd(&fd, dir, NULL, 30000), 0);
  wait_lines(rec, ITEMS, 120000);
  sleep_ms(500);
  tally_file(rec, &t);
  print_message("after restart: %zu lines, %zu distinct, %zu repeats; "
                "bound %lld\n",
                t.lines, t.distinct, t.lines - t.distinct,
                (long long)((EVENTS - committed) * USERS * 4));
  assert_int_equal(t.distinct, ITEMS);
  assert_true(t.lines - t.distinct <=
              (size_t)((EVENTS - committed) * USERS * 4));
  json_decref(t.seen);

  itest_stop(&fd, SIGTERM, 20000);
  itest_stop(&broker, SIGTERM, 5000);
  for (int i = 0; i < EVENTS; i++)
    free(msgs[i]);
  free(msgs);
}

/*
 * A backlog far larger than the queue: consumption pauses when the queue
 * is full and resumes as it drains, the queue never holds more than its
 * limit, and every delivery is made.
 */
static void test_full_queue_pauses_consumption(void **state) {
  enum { EVENTS = 600, USERS = 40 };
  char dir[512], rec[600];
  itest_proc fd;
  char *bootstrap, *msgs[EVENTS];
  char *log, *save = NULL;
  long max_queued = 0;

  (void)state;
  assert_int_equal(itest_tmpdir("backpressure", dir, sizeof(dir)), 0);
  assert_int_equal(itest_write_config(dir, "embedded",
                                      "[engine]\nqueue_items = 1000\n"
                                      "queue_events = 8\nworkers = 1\n"),
                   0);
  assert_int_equal(itest_start_fanoutd(&fd, dir, NULL, 30000), 0);
  bootstrap = read_bootstrap(dir);
  assert_non_null(bootstrap);

  for (int i = 0; i < EVENTS; i++) {
    char id[32];

    snprintf(id, sizeof(id), "bp-%d", i);
    msgs[i] = event_json(id, USERS, NULL, "normal");
  }
  assert_int_equal(itest_produce(bootstrap, "notifications",
                                 (const char *const *)msgs, EVENTS),
                   0);
  snprintf(rec, sizeof(rec), "%s/deliveries.jsonl", dir);
  assert_int_equal(wait_lines(rec, EVENTS * USERS * 4, 60000),
                   EVENTS * USERS * 4);
  assert_int_equal(itest_stop(&fd, SIGTERM, 20000), 0);

  /* The last summary, written at exit, counts the pauses. */
  log = itest_slurp(fd.log, NULL);
  assert_non_null(log);
  {
    char *last = NULL, *p = log;

    while ((p = strstr(p, " pauses=")) != NULL)
      last = ++p;
    assert_non_null(last);
    print_message("consumption paused %ld times\n", atol(last + 7));
    assert_true(atol(last + 7) > 0);
  }
  for (char *l = strtok_r(log, "\n", &save); l != NULL;
       l = strtok_r(NULL, "\n", &save)) {
    char *q = strstr(l, "queued_items=");

    if (q != NULL && atol(q + 13) > max_queued)
      max_queued = atol(q + 13);
  }
  print_message("largest queue seen in summaries: %ld items\n", max_queued);
  assert_true(max_queued <= 1000);
  free(log);
  for (int i = 0; i < EVENTS; i++)
    free(msgs[i]);
  free(bootstrap);
}

/* A bad configuration stops the start with one line naming the key. */
static void test_bad_config_names_the_key(void **state) {
  char dir[512];
  itest_proc fd;
  char *log;
  char *argv[] = {(char *)itest_bin("fanoutd"), "-c", "fanout.ini", NULL};
  int st;

  (void)state;
  assert_int_equal(itest_tmpdir("badconfig", dir, sizeof(dir)), 0);
  assert_int_equal(itest_write_config(dir, "embedded",
                                      "[engine]\nworkers = many\n"),
                   0);
  assert_int_equal(itest_spawn(&fd, dir, "fanoutd", argv, NULL), 0);
  st = itest_stop(&fd, 0, 10000);
  if (st == -1) {
    /* Signal 0 only probes; wait for the exit itself. */
    fail_msg("fanoutd did not exit on a bad config");
  }
  log = itest_slurp(fd.log, NULL);
  assert_non_null(log);
  assert_non_null(strstr(log, "workers"));
  assert_int_equal(itest_count_lines(fd.log, NULL), 1);
  free(log);
}

/* PostgreSQL down at start: fanoutd waits for it, and a stop signal
 * during the wait ends it cleanly; a DSN that cannot work stops the start
 * at once, naming the key and not its value. */
static void test_waits_for_postgres(void **state) {
  char dir[512], dsn_env[128];
  char *env[] = {dsn_env, NULL};
  char *argv[] = {(char *)itest_bin("fanoutd"), "-c", "fanout.ini", NULL};
  itest_proc fd;
  char *log;
  int st;

  (void)state;
  assert_int_equal(itest_tmpdir("waitpg", dir, sizeof(dir)), 0);
  assert_int_equal(itest_write_config(dir, "embedded", NULL), 0);
  snprintf(dsn_env, sizeof(dsn_env),
           "FANOUT_POSTGRES_DSN=postgresql://fanout@127.0.0.1:%d/fanout",
           itest_free_port());
  assert_int_equal(itest_spawn(&fd, dir, "fanoutd", argv, env), 0);
  assert_int_equal(itest_wait_log(&fd, "PostgreSQL unreachable, waiting",
                                  15000),
                   0);
  sleep_ms(2500);
  assert_true(itest_alive(&fd));
  st = itest_stop(&fd, SIGTERM, 10000);
  assert_true(WIFEXITED(st));
  assert_int_equal(WEXITSTATUS(st), 0);

  snprintf(dsn_env, sizeof(dsn_env),
           "FANOUT_POSTGRES_DSN=host=127.0.0.1 password=s3cret nonsense");
  assert_int_equal(itest_spawn(&fd, dir, "fanoutd-bad", argv, env), 0);
  st = itest_stop(&fd, 0, 10000);
  log = itest_slurp(fd.log, NULL);
  assert_non_null(log);
  assert_non_null(strstr(log, "[postgres] dsn"));
  assert_null(strstr(log, "s3cret"));
  free(log);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_bad_config_names_the_key),
      cmocka_unit_test(test_embedded_flow_and_dead_letters),
      cmocka_unit_test(test_sigterm_commits_finished_work),
      cmocka_unit_test(test_full_queue_pauses_consumption),
      cmocka_unit_test(test_kill9_loses_nothing),
      cmocka_unit_test(test_waits_for_postgres),
  };

  return cmocka_run_group_tests_name("pipeline", tests, NULL, NULL);
}
