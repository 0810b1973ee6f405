/* SPDX-License-Identifier: MIT */
/*
 * Unit tests for the bounded priority queue: order within a level and
 * across levels (the exact weighted round robin), bounds, close, blocking
 * and timed pops, and many threads pushing and popping at once with every
 * item coming out exactly once.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fanout/common.h"
#include "queue.h"

/* Events are built by hand: the queue reads only these fields. */
static fo_event *mk_event(fo_priority prio, uint32_t users, unsigned mask) {
  fo_event *ev = calloc(1, sizeof(*ev));

  assert_non_null(ev);
  ev->priority = prio;
  ev->to_count = users;
  ev->channels = mask;
  return ev;
}

static int64_t mono_ms(void) {
  struct timespec ts;

  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

  nanosleep(&ts, NULL);
}

static void test_new_rejects_zero_limits(void **state) {
  (void)state;
  assert_null(fo_queue_new(0, 10));
  assert_null(fo_queue_new(10, 0));
  fo_queue_free(NULL);
}

static void test_fifo_user_major_channel_order(void **state) {
  fo_queue *q = fo_queue_new(100, 10);
  fo_event *a = mk_event(FO_PRIO_NORMAL, 2,
                         (1u << FO_CH_INAPP) | (1u << FO_CH_PUSH) |
                         (1u << FO_CH_SMS));
  fo_event *b = mk_event(FO_PRIO_NORMAL, 2,
                         (1u << FO_CH_EMAIL) | (1u << FO_CH_INAPP));
  struct {
    fo_event *ev;
    uint32_t user;
    fo_channel_kind ch;
  } want[] = {
    {a, 0, FO_CH_PUSH}, {a, 0, FO_CH_SMS}, {a, 0, FO_CH_INAPP},
    {a, 1, FO_CH_PUSH}, {a, 1, FO_CH_SMS}, {a, 1, FO_CH_INAPP},
    {b, 0, FO_CH_EMAIL}, {b, 0, FO_CH_INAPP},
    {b, 1, FO_CH_EMAIL}, {b, 1, FO_CH_INAPP},
  };
  fo_work w;

  (void)state;
  assert_non_null(q);
  assert_int_equal(fo_queue_push(q, a), FO_OK);
  assert_int_equal(fo_queue_push(q, b), FO_OK);
  for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
    assert_int_equal(fo_queue_pop(q, &w, 0), FO_OK);
    assert_ptr_equal(w.event, want[i].ev);
    assert_int_equal(w.user, want[i].user);
    assert_int_equal(w.channel, want[i].ch);
  }
  assert_int_equal(fo_queue_pop(q, &w, 0), FO_ETIMEDOUT);
  fo_queue_free(q);
  free(a);
  free(b);
}

/* Bits beyond the four channels are not channels and are not handed out. */
static void test_unknown_channel_bits_ignored(void **state) {
  fo_queue *q = fo_queue_new(100, 10);
  fo_event *a = mk_event(FO_PRIO_LOW, 1, 0xF0u | (1u << FO_CH_SMS));
  fo_queue_stats st;
  fo_work w;

  (void)state;
  assert_int_equal(fo_queue_push(q, a), FO_OK);
  fo_queue_get_stats(q, &st);
  assert_int_equal(st.items, 1);
  assert_int_equal(fo_queue_pop(q, &w, 0), FO_OK);
  assert_int_equal(w.channel, FO_CH_SMS);
  assert_int_equal(fo_queue_pop(q, &w, 0), FO_ETIMEDOUT);
  fo_queue_free(q);
  free(a);
}

static char prio_letter(fo_priority p) {
  return "CHNL"[p];
}

/*
 * 20 critical, 10 high, 5 normal and 3 low items: rounds of 8/4/2/1 until
 * a level runs dry, then the others carry on with their own weights.
 */
static void test_weighted_round_robin_sequence(void **state) {
  fo_queue *q = fo_queue_new(1000, 10);
  fo_event *ev[4] = {
    mk_event(FO_PRIO_LOW, 3, 1u << FO_CH_PUSH),
    mk_event(FO_PRIO_NORMAL, 5, 1u << FO_CH_PUSH),
    mk_event(FO_PRIO_HIGH, 5, (1u << FO_CH_PUSH) | (1u << FO_CH_EMAIL)),
    mk_event(FO_PRIO_CRITICAL, 10, (1u << FO_CH_SMS) | (1u << FO_CH_INAPP)),
  };
  const char *want =
    "CCCCCCCCHHHHNNL"
    "CCCCCCCCHHHHNNL"
    "CCCCHHNL";
  char got[64] = {0};
  size_t n = 0;
  fo_work w;

  (void)state;
  for (int i = 0; i < 4; i++) {
    assert_int_equal(fo_queue_push(q, ev[i]), FO_OK);
  }
  while (fo_queue_pop(q, &w, 0) == FO_OK) {
    assert_true(n < sizeof(got) - 1);
    got[n++] = prio_letter(w.event->priority);
  }
  assert_string_equal(got, want);
  fo_queue_free(q);
  for (int i = 0; i < 4; i++) {
    free(ev[i]);
  }
}

/* pop_many hands out the same sequence as pop. */
static void test_pop_many_same_order(void **state) {
  fo_queue *q1 = fo_queue_new(1000, 10);
  fo_queue *q2 = fo_queue_new(1000, 10);
  fo_event *ev[3] = {
    mk_event(FO_PRIO_LOW, 7, FO_CH_MASK_ALL),
    mk_event(FO_PRIO_HIGH, 9, 1u << FO_CH_EMAIL),
    mk_event(FO_PRIO_CRITICAL, 3, (1u << FO_CH_PUSH) | (1u << FO_CH_SMS)),
  };
  fo_work a[64];
  fo_work b;
  size_t total = 0;
  size_t n;

  (void)state;
  for (int i = 0; i < 3; i++) {
    assert_int_equal(fo_queue_push(q1, ev[i]), FO_OK);
    assert_int_equal(fo_queue_push(q2, ev[i]), FO_OK);
  }
  for (;;) {
    n = fo_queue_pop_many(q1, a, 5, 0);
    if (n == 0) {
      break;
    }
    assert_true(n <= 5);
    for (size_t i = 0; i < n; i++) {
      assert_int_equal(fo_queue_pop(q2, &b, 0), FO_OK);
      assert_ptr_equal(a[i].event, b.event);
      assert_int_equal(a[i].user, b.user);
      assert_int_equal(a[i].channel, b.channel);
    }
    total += n;
  }
  assert_int_equal(total, 28 + 9 + 6);
  assert_int_equal(fo_queue_pop(q2, &b, 0), FO_ETIMEDOUT);
  fo_queue_free(q1);
  fo_queue_free(q2);
  for (int i = 0; i < 3; i++) {
    free(ev[i]);
  }
}

/*
 * Critical work never runs out (one-item events, topped up as they go),
 * yet low work still gets exactly one pop in every nine.
 */
static void test_no_starvation(void **state) {
  enum { CRIT = 64, POPS = 900 };
  fo_queue *q = fo_queue_new(100000, 1000);
  fo_event *crit[CRIT];
  fo_event *low = mk_event(FO_PRIO_LOW, 1000, 1u << FO_CH_PUSH);
  int lows = 0;
  int next = 0;
  fo_work w;

  (void)state;
  assert_int_equal(fo_queue_push(q, low), FO_OK);
  for (int i = 0; i < CRIT; i++) {
    crit[i] = mk_event(FO_PRIO_CRITICAL, 1, 1u << FO_CH_INAPP);
  }
  /* Keep 16 critical events queued; a popped one is pushed again. */
  for (next = 0; next < 16; next++) {
    assert_int_equal(fo_queue_push(q, crit[next]), FO_OK);
  }
  for (int i = 0; i < POPS; i++) {
    assert_int_equal(fo_queue_pop(q, &w, 0), FO_OK);
    if (w.event == low) {
      lows++;
      /* Exactly one low pop closes each round of nine. */
      assert_int_equal(i % 9, 8);
    } else {
      assert_int_equal(w.event->priority, FO_PRIO_CRITICAL);
      assert_int_equal(fo_queue_push(q, crit[next % CRIT]), FO_OK);
      next++;
    }
  }
  assert_int_equal(lows, POPS / 9);
  fo_queue_free(q);
  for (int i = 0; i < CRIT; i++) {
    free(crit[i]);
  }
  free(low);
}

/* All four levels busy: each round of 15 pops is 8, 4, 2 and 1. */
static void test_ratio_all_levels(void **state) {
  fo_queue *q = fo_queue_new(100000, 10);
  fo_event *ev[FO_PRIO_COUNT];
  int count[FO_PRIO_COUNT] = {0};
  fo_work w;

  (void)state;
  for (int p = 0; p < FO_PRIO_COUNT; p++) {
    ev[p] = mk_event((fo_priority)p, 1000, FO_CH_MASK_ALL);
    assert_int_equal(fo_queue_push(q, ev[p]), FO_OK);
  }
  for (int i = 0; i < 15 * 40; i++) {
    assert_int_equal(fo_queue_pop(q, &w, 0), FO_OK);
    count[w.event->priority]++;
  }
  assert_int_equal(count[FO_PRIO_CRITICAL], 8 * 40);
  assert_int_equal(count[FO_PRIO_HIGH], 4 * 40);
  assert_int_equal(count[FO_PRIO_NORMAL], 2 * 40);
  assert_int_equal(count[FO_PRIO_LOW], 1 * 40);
  fo_queue_free(q);
  for (int p = 0; p < FO_PRIO_COUNT; p++) {
    free(ev[p]);
  }
}

static void test_item_bound(void **state) {
  fo_queue *q = fo_queue_new(10, 100);
  fo_event *six = mk_event(FO_PRIO_NORMAL, 3, 3u);
  fo_event *five = mk_event(FO_PRIO_HIGH, 5, 1u);
  fo_event *four = mk_event(FO_PRIO_LOW, 4, 1u);
  fo_event *one = mk_event(FO_PRIO_LOW, 1, 1u);
  fo_work w;

  (void)state;
  assert_true(fo_queue_has_room(q, 10));
  assert_int_equal(fo_queue_push(q, six), FO_OK);
  assert_false(fo_queue_has_room(q, 5));
  assert_int_equal(fo_queue_push(q, five), FO_EFULL);
  assert_true(fo_queue_has_room(q, 4));
  assert_int_equal(fo_queue_push(q, four), FO_OK);
  assert_false(fo_queue_has_room(q, 1));
  assert_int_equal(fo_queue_push(q, one), FO_EFULL);

  /* A popped item frees its room even while its event is still queued. */
  assert_int_equal(fo_queue_pop(q, &w, 0), FO_OK);
  assert_ptr_equal(w.event, six);
  assert_true(fo_queue_has_room(q, 1));
  assert_false(fo_queue_has_room(q, 2));
  assert_int_equal(fo_queue_push(q, one), FO_OK);
  assert_int_equal(fo_queue_push(q, one), FO_EFULL);
  fo_queue_free(q);
  free(six);
  free(five);
  free(four);
  free(one);
}

static void test_event_bound(void **state) {
  fo_queue *q = fo_queue_new(1000, 2);
  fo_event *a = mk_event(FO_PRIO_NORMAL, 2, 1u);
  fo_event *b = mk_event(FO_PRIO_NORMAL, 1, 1u);
  fo_event *c = mk_event(FO_PRIO_NORMAL, 1, 1u);
  fo_work w;

  (void)state;
  assert_int_equal(fo_queue_push(q, a), FO_OK);
  assert_int_equal(fo_queue_push(q, b), FO_OK);
  assert_false(fo_queue_has_room(q, 1));
  assert_int_equal(fo_queue_push(q, c), FO_EFULL);

  /* An event counts until its last item is popped. */
  assert_int_equal(fo_queue_pop(q, &w, 0), FO_OK);
  assert_int_equal(fo_queue_push(q, c), FO_EFULL);
  assert_int_equal(fo_queue_pop(q, &w, 0), FO_OK);
  assert_ptr_equal(w.event, a);
  assert_true(fo_queue_has_room(q, 1));
  assert_int_equal(fo_queue_push(q, c), FO_OK);
  fo_queue_free(q);
  free(a);
  free(b);
  free(c);
}

static void test_empty_queue_takes_oversize(void **state) {
  fo_queue *q = fo_queue_new(4, 10);
  fo_event *big = mk_event(FO_PRIO_HIGH, 3, FO_CH_MASK_ALL);
  fo_event *one = mk_event(FO_PRIO_CRITICAL, 1, 1u);
  fo_queue_stats st;
  fo_work w;
  int popped = 0;

  (void)state;
  assert_true(fo_queue_has_room(q, 12));
  assert_int_equal(fo_queue_push(q, big), FO_OK);
  fo_queue_get_stats(q, &st);
  assert_int_equal(st.items, 12);
  assert_false(fo_queue_has_room(q, 1));
  assert_int_equal(fo_queue_push(q, one), FO_EFULL);
  assert_int_equal(fo_queue_push(q, big), FO_EFULL);

  /* Still over the limit with 4 left: nothing else gets in. */
  for (int i = 0; i < 8; i++) {
    assert_int_equal(fo_queue_pop(q, &w, 0), FO_OK);
  }
  assert_false(fo_queue_has_room(q, 1));
  while (fo_queue_pop(q, &w, 0) == FO_OK) {
    popped++;
  }
  assert_int_equal(popped, 4);
  assert_true(fo_queue_has_room(q, 12));
  assert_int_equal(fo_queue_push(q, big), FO_OK);
  fo_queue_free(q);
  free(big);
  free(one);
}

static void test_invalid_push(void **state) {
  fo_queue *q = fo_queue_new(10, 10);
  fo_event *nobody = mk_event(FO_PRIO_NORMAL, 0, FO_CH_MASK_ALL);
  fo_event *nochan = mk_event(FO_PRIO_NORMAL, 3, 0);
  fo_event *badprio = mk_event((fo_priority)7, 1, 1u);
  fo_work w;

  (void)state;
  assert_int_equal(fo_queue_push(q, nobody), FO_EINVAL);
  assert_int_equal(fo_queue_push(q, nochan), FO_EINVAL);
  assert_int_equal(fo_queue_push(q, badprio), FO_EINVAL);
  assert_int_equal(fo_queue_push(q, NULL), FO_EINVAL);
  assert_int_equal(fo_queue_push(NULL, nochan), FO_EINVAL);
  assert_false(fo_queue_has_room(q, 0));
  assert_int_equal(fo_queue_pop(q, NULL, 0), FO_EINVAL);
  assert_int_equal(fo_queue_pop(NULL, &w, 0), FO_EINVAL);
  assert_int_equal(fo_queue_pop_many(q, &w, 0, 0), 0);
  fo_queue_free(q);
  free(nobody);
  free(nochan);
  free(badprio);
}

static void test_close_drains_then_refuses(void **state) {
  fo_queue *q = fo_queue_new(10, 10);
  fo_event *a = mk_event(FO_PRIO_NORMAL, 1, 3u);
  fo_event *b = mk_event(FO_PRIO_NORMAL, 1, 1u);
  fo_work w[4];

  (void)state;
  assert_int_equal(fo_queue_push(q, a), FO_OK);
  fo_queue_close(q);
  assert_int_equal(fo_queue_push(q, b), FO_ECLOSED);
  assert_false(fo_queue_has_room(q, 1));
  assert_int_equal(fo_queue_pop(q, &w[0], -1), FO_OK);
  assert_int_equal(fo_queue_pop_many(q, w, 4, -1), 1);
  assert_ptr_equal(w[0].event, a);
  assert_int_equal(w[0].channel, FO_CH_EMAIL);
  assert_int_equal(fo_queue_pop(q, &w[0], -1), FO_ECLOSED);
  assert_int_equal(fo_queue_pop(q, &w[0], 0), FO_ECLOSED);
  assert_int_equal(fo_queue_pop_many(q, w, 4, -1), 0);
  fo_queue_close(q);
  fo_queue_close(NULL);
  fo_queue_free(q);
  free(a);
  free(b);
}

typedef struct popper {
  fo_queue *q;
  int timeout_ms;
  int rc;
  fo_work w;
} popper;

static void *popper_main(void *arg) {
  popper *p = arg;

  p->rc = fo_queue_pop(p->q, &p->w, p->timeout_ms);
  return NULL;
}

static void test_blocking_pop_woken_by_push(void **state) {
  fo_queue *q = fo_queue_new(10, 10);
  fo_event *a = mk_event(FO_PRIO_LOW, 1, 1u << FO_CH_INAPP);
  popper p = {q, -1, 1, {0}};
  pthread_t t;

  (void)state;
  assert_int_equal(pthread_create(&t, NULL, popper_main, &p), 0);
  sleep_ms(50);
  assert_int_equal(fo_queue_push(q, a), FO_OK);
  assert_int_equal(pthread_join(t, NULL), 0);
  assert_int_equal(p.rc, FO_OK);
  assert_ptr_equal(p.w.event, a);
  assert_int_equal(p.w.channel, FO_CH_INAPP);
  fo_queue_free(q);
  free(a);
}

static void test_blocking_pops_woken_by_close(void **state) {
  fo_queue *q = fo_queue_new(10, 10);
  popper p[3];
  pthread_t t[3];

  (void)state;
  for (int i = 0; i < 3; i++) {
    p[i] = (popper){q, i == 0 ? -1 : 60000, 1, {0}};
    assert_int_equal(pthread_create(&t[i], NULL, popper_main, &p[i]), 0);
  }
  sleep_ms(50);
  fo_queue_close(q);
  for (int i = 0; i < 3; i++) {
    assert_int_equal(pthread_join(t[i], NULL), 0);
    assert_int_equal(p[i].rc, FO_ECLOSED);
  }
  fo_queue_free(q);
}

static void test_pop_timeout(void **state) {
  fo_queue *q = fo_queue_new(10, 10);
  fo_work w[2];
  int64_t t0;
  int64_t dt;

  (void)state;
  t0 = mono_ms();
  assert_int_equal(fo_queue_pop(q, w, 0), FO_ETIMEDOUT);
  assert_true(mono_ms() - t0 < 50);

  t0 = mono_ms();
  assert_int_equal(fo_queue_pop(q, w, 120), FO_ETIMEDOUT);
  dt = mono_ms() - t0;
  assert_true(dt >= 119);
  assert_true(dt < 2000);

  t0 = mono_ms();
  assert_int_equal(fo_queue_pop_many(q, w, 2, 1100), 0);
  dt = mono_ms() - t0;
  assert_true(dt >= 1099);
  assert_true(dt < 3000);
  fo_queue_free(q);
}

static void test_stats(void **state) {
  fo_queue *q = fo_queue_new(500, 50);
  fo_event *c = mk_event(FO_PRIO_CRITICAL, 2, 3u);
  fo_event *n = mk_event(FO_PRIO_NORMAL, 5, FO_CH_MASK_ALL);
  fo_event *l = mk_event(FO_PRIO_LOW, 1, 1u);
  fo_queue_stats st;
  fo_work w[8];

  (void)state;
  memset(&st, 0xff, sizeof(st));
  fo_queue_get_stats(q, &st);
  assert_int_equal(st.items, 0);
  assert_int_equal(st.events, 0);
  assert_int_equal(st.max_items, 500);
  assert_int_equal(st.max_events, 50);

  assert_int_equal(fo_queue_push(q, c), FO_OK);
  assert_int_equal(fo_queue_push(q, n), FO_OK);
  assert_int_equal(fo_queue_push(q, l), FO_OK);
  fo_queue_get_stats(q, &st);
  assert_int_equal(st.items, 4 + 20 + 1);
  assert_int_equal(st.events, 3);
  assert_int_equal(st.items_by_prio[FO_PRIO_CRITICAL], 4);
  assert_int_equal(st.items_by_prio[FO_PRIO_HIGH], 0);
  assert_int_equal(st.items_by_prio[FO_PRIO_NORMAL], 20);
  assert_int_equal(st.items_by_prio[FO_PRIO_LOW], 1);

  /* 4 critical, then 2 normal. */
  assert_int_equal(fo_queue_pop_many(q, w, 6, 0), 6);
  fo_queue_get_stats(q, &st);
  assert_int_equal(st.items, 19);
  assert_int_equal(st.events, 2);
  assert_int_equal(st.items_by_prio[FO_PRIO_CRITICAL], 0);
  assert_int_equal(st.items_by_prio[FO_PRIO_NORMAL], 18);
  assert_int_equal(st.items_by_prio[FO_PRIO_LOW], 1);
  fo_queue_free(q);
  free(c);
  free(n);
  free(l);
}

/* Many threads at once: every (event, user, channel) comes out once. */
enum { MT_EVENTS = 600, MT_MAX_USERS = 13, MT_PRODUCERS = 2,
       MT_CONSUMERS = 2 };

typedef struct mt_ctx {
  fo_queue *q;
  fo_event *events[MT_EVENTS];
  atomic_int seen[MT_EVENTS][MT_MAX_USERS][FO_CH_COUNT];
  atomic_int next_event;
  atomic_long popped;
  atomic_int push_error;
} mt_ctx;

static void *mt_producer(void *arg) {
  mt_ctx *c = arg;

  for (;;) {
    int i = atomic_fetch_add(&c->next_event, 1);
    int rc;

    if (i >= MT_EVENTS) {
      break;
    }
    rc = fo_queue_push(c->q, c->events[i]);
    while (rc == FO_EFULL) {
      sched_yield();
      rc = fo_queue_push(c->q, c->events[i]);
    }
    if (rc != FO_OK) {
      /* cmocka cannot fail a test from another thread; main checks. */
      atomic_store(&c->push_error, rc);
      break;
    }
  }
  return NULL;
}

static void *mt_consumer(void *arg) {
  mt_ctx *c = arg;
  fo_work w[16];
  bool many = false;

  for (;;) {
    size_t n = 1;

    /* Alternate both ways of popping. */
    many = !many;
    if (many) {
      n = fo_queue_pop_many(c->q, w, 16, -1);
      if (n == 0) {
        break;
      }
    } else {
      int rc = fo_queue_pop(c->q, w, 200);

      if (rc == FO_ECLOSED) {
        break;
      }
      if (rc != FO_OK) {
        continue;
      }
    }
    for (size_t k = 0; k < n; k++) {
      int64_t e = w[k].event->origin_seq;

      atomic_fetch_add(&c->seen[e][w[k].user][w[k].channel], 1);
    }
    atomic_fetch_add(&c->popped, (long)n);
  }
  return NULL;
}

static void test_concurrent_exactly_once(void **state) {
  mt_ctx *c = calloc(1, sizeof(*c));
  pthread_t prod[MT_PRODUCERS];
  pthread_t cons[MT_CONSUMERS];
  long expected = 0;

  (void)state;
  assert_non_null(c);
  /* Small bounds so producers hit FO_EFULL often. */
  c->q = fo_queue_new(64, 8);
  assert_non_null(c->q);
  for (int i = 0; i < MT_EVENTS; i++) {
    uint32_t users = 1 + (uint32_t)(i * 7) % MT_MAX_USERS;
    unsigned mask = 1u + (unsigned)(i * 5) % FO_CH_MASK_ALL;

    c->events[i] = mk_event((fo_priority)(i % FO_PRIO_COUNT), users, mask);
    c->events[i]->origin_seq = i;
    expected += (long)users * __builtin_popcount(mask);
  }
  for (int i = 0; i < MT_CONSUMERS; i++) {
    assert_int_equal(pthread_create(&cons[i], NULL, mt_consumer, c), 0);
  }
  for (int i = 0; i < MT_PRODUCERS; i++) {
    assert_int_equal(pthread_create(&prod[i], NULL, mt_producer, c), 0);
  }
  for (int i = 0; i < MT_PRODUCERS; i++) {
    assert_int_equal(pthread_join(prod[i], NULL), 0);
  }
  fo_queue_close(c->q);
  for (int i = 0; i < MT_CONSUMERS; i++) {
    assert_int_equal(pthread_join(cons[i], NULL), 0);
  }

  assert_int_equal(atomic_load(&c->push_error), 0);
  assert_int_equal(atomic_load(&c->popped), expected);
  for (int i = 0; i < MT_EVENTS; i++) {
    const fo_event *ev = c->events[i];

    for (uint32_t u = 0; u < MT_MAX_USERS; u++) {
      for (int ch = 0; ch < FO_CH_COUNT; ch++) {
        int want = u < ev->to_count && (ev->channels & (1u << ch)) ? 1 : 0;

        assert_int_equal(atomic_load(&c->seen[i][u][ch]), want);
      }
    }
    free(c->events[i]);
  }
  fo_queue_free(c->q);
  free(c);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_new_rejects_zero_limits),
    cmocka_unit_test(test_fifo_user_major_channel_order),
    cmocka_unit_test(test_unknown_channel_bits_ignored),
    cmocka_unit_test(test_weighted_round_robin_sequence),
    cmocka_unit_test(test_pop_many_same_order),
    cmocka_unit_test(test_no_starvation),
    cmocka_unit_test(test_ratio_all_levels),
    cmocka_unit_test(test_item_bound),
    cmocka_unit_test(test_event_bound),
    cmocka_unit_test(test_empty_queue_takes_oversize),
    cmocka_unit_test(test_invalid_push),
    cmocka_unit_test(test_close_drains_then_refuses),
    cmocka_unit_test(test_blocking_pop_woken_by_push),
    cmocka_unit_test(test_blocking_pops_woken_by_close),
    cmocka_unit_test(test_pop_timeout),
    cmocka_unit_test(test_stats),
    cmocka_unit_test(test_concurrent_exactly_once),
  };

  return cmocka_run_group_tests(tests, NULL, NULL);
}
