/* SPDX-License-Identifier: MIT */
/*
 * The consumer against a real broker (the embedded mock cluster, in this
 * process): with nobody draining the queue it stops taking messages at
 * the queue's bound however large the backlog, resumes as the queue
 * drains, and commits exactly what finished.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "consumer.h"
#include "fanout/common.h"
#include "itest.h"
#include "kafka_mock.h"
#include "queue.h"

enum { EVENTS = 300, QUEUE_EVENTS = 5 };

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};

  nanosleep(&ts, NULL);
}

static char **make_events(int n) {
  char **v = calloc((size_t)n, sizeof(*v));

  for (int i = 0; i < n; i++) {
    v[i] = malloc(128);
    snprintf(v[i], 128,
             "{\"id\":\"c-%d\",\"category\":\"t\",\"to\":[\"a\",\"b\"],"
             "\"channels\":[\"push\"]}",
             i);
  }
  return v;
}

/* Pops items as the dispatcher would and finishes each event after its
 * last item. Returns the number of events finished. */
static int drain_queue(fo_queue *q, int timeout_ms) {
  fo_work w;
  int done = 0;

  while (fo_queue_pop(q, &w, timeout_ms) == FO_OK) {
    if (atomic_fetch_sub(&w.event->pending, 1) == 1) {
      fo_consumer_event_done(w.event, true, NULL);
      done++;
    }
  }
  return done;
}

static void test_backlog_is_bounded_then_resumed(void **state) {
  const char *topics[] = {"notifications", "notifications.dlq", NULL};
  fo_consumer_conf cc = {.group = "bounded",
                         .topic = "notifications",
                         .dlq_topic = "notifications.dlq",
                         .session_timeout_ms = 3000,
                         .max_event_bytes = 65536,
                         .commit_interval_ms = 100};
  fo_consumer_stats st;
  fo_queue_stats qs;
  fo_consumer *c = NULL;
  fo_kmock *m = NULL;
  fo_queue *q;
  char err[256];
  char **evs = make_events(EVENTS);
  int finished = 0;

  (void)state;
  assert_int_equal(fo_kmock_start(topics, 2, &m, err, sizeof(err)), FO_OK);
  cc.brokers = fo_kmock_bootstraps(m);
  assert_int_equal(itest_produce(cc.brokers, "notifications",
                                 (const char *const *)evs, EVENTS),
                   0);

  q = fo_queue_new(1000, QUEUE_EVENTS);
  assert_non_null(q);
  assert_int_equal(fo_consumer_new(&cc, q, &c, err, sizeof(err)), FO_OK);
  assert_int_equal(fo_consumer_start(c), FO_OK);

  /* Nobody drains: the consumer fills the queue, then pauses. */
  for (int i = 0; i < 200; i++) {
    fo_consumer_get_stats(c, &st);
    if (st.paused)
      break;
    sleep_ms(50);
  }
  assert_true(st.paused);
  sleep_ms(1500);
  fo_consumer_get_stats(c, &st);
  fo_queue_get_stats(q, &qs);
  print_message("paused with %llu consumed, %llu events queued, "
                "%d in Kafka\n",
                (unsigned long long)st.consumed,
                (unsigned long long)qs.events, EVENTS);
  assert_int_equal(qs.events, QUEUE_EVENTS);
  /* The queue's bound plus what one poll may hold back. */
  assert_true(st.consumed <= QUEUE_EVENTS + 2);

  /* Draining lets it resume until the whole backlog went through. */
  for (int i = 0; i < 400 && finished < EVENTS; i++)
    finished += drain_queue(q, 50);
  assert_int_equal(finished, EVENTS);
  fo_consumer_get_stats(c, &st);
  assert_true(st.pauses >= 1);
  assert_int_equal(st.consumed, EVENTS);

  assert_int_equal(fo_consumer_finish(c, 5000), FO_OK);
  assert_int_equal(itest_committed(cc.brokers, "bounded", "notifications"),
                   EVENTS);
  fo_consumer_free(c);
  fo_queue_free(q);
  fo_kmock_stop(m);
  for (int i = 0; i < EVENTS; i++)
    free(evs[i]);
  free(evs);
}

/* Work that is not finished is never committed, even when later offsets
 * of the same partition finished. */
static void test_commit_stops_at_unfinished(void **state) {
  const char *topics[] = {"notifications", "notifications.dlq", NULL};
  fo_consumer_conf cc = {.group = "holes",
                         .topic = "notifications",
                         .dlq_topic = "notifications.dlq",
                         .session_timeout_ms = 3000,
                         .max_event_bytes = 65536,
                         .commit_interval_ms = 50};
  fo_consumer *c = NULL;
  fo_kmock *m = NULL;
  fo_queue *q;
  fo_work w;
  fo_event *held = NULL;
  char err[256];
  char **evs = make_events(10);
  int finished = 0;

  (void)state;
  assert_int_equal(fo_kmock_start(topics, 1, &m, err, sizeof(err)), FO_OK);
  cc.brokers = fo_kmock_bootstraps(m);
  assert_int_equal(itest_produce(cc.brokers, "notifications",
                                 (const char *const *)evs, 10),
                   0);
  q = fo_queue_new(1000, 100);
  assert_int_equal(fo_consumer_new(&cc, q, &c, err, sizeof(err)), FO_OK);
  assert_int_equal(fo_consumer_start(c), FO_OK);

  /* Finish every event but the fourth (offset 3). */
  for (int i = 0; i < 300 && finished < 9; i++) {
    while (fo_queue_pop(q, &w, 50) == FO_OK) {
      if (strcmp(w.event->id, "c-3") == 0) {
        held = w.event;
        atomic_fetch_sub(&w.event->pending, 1);
        continue;
      }
      if (atomic_fetch_sub(&w.event->pending, 1) == 1) {
        fo_consumer_event_done(w.event, true, NULL);
        finished++;
      }
    }
  }
  assert_int_equal(finished, 9);
  assert_non_null(held);
  sleep_ms(500);
  assert_int_equal(itest_committed(cc.brokers, "holes", "notifications"), 3);

  /* Finishing it moves the commit past everything. */
  fo_consumer_event_done(held, true, NULL);
  sleep_ms(500);
  assert_int_equal(itest_committed(cc.brokers, "holes", "notifications"),
                   10);

  assert_int_equal(fo_consumer_finish(c, 5000), FO_OK);
  fo_consumer_free(c);
  fo_queue_free(q);
  fo_kmock_stop(m);
  for (int i = 0; i < 10; i++)
    free(evs[i]);
  free(evs);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_backlog_is_bounded_then_resumed),
      cmocka_unit_test(test_commit_stops_at_unfinished),
  };

  return cmocka_run_group_tests_name("consumer", tests, NULL, NULL);
}
