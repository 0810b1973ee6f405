/* SPDX-License-Identifier: MIT */
/*
 * Unit tests for the dispatcher, run over the real queue and the real
 * event decoder with a scripted test channel: fan-out of every (user,
 * channel) item exactly once, channel_off and expired suppression, retries
 * with backoff, the provider's retry-after floor, best-effort and ttl
 * limits, channel back-pressure (FO_EFULL), refused submits, drain with
 * and without completion, events given back unfinished at shutdown, the
 * backoff function itself, and priority order.
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
#include <time.h>

#include "dispatch.h"
#include "fanout/channel.h"
#include "fanout/common.h"
#include "fanout/event.h"
#include "log.h"
#include "queue.h"

/* Generous bound for anything the test waits for; only a broken
 * dispatcher gets near it, even under ASan on a loaded machine. */
#define WAIT_MS 20000
#define TC_MAX_CALLS 4096
#define TC_MAX_HELD 256
#define W_MAX_DONE 256
#define W_MAX_OUTS 4096

static void sleep_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

  nanosleep(&ts, NULL);
}

/* The test channel. */

typedef struct tc_call {
  char event[FO_EVENT_ID_MAX + 1];
  char user[FO_EVENT_USER_MAX + 1];
  fo_channel_kind channel;
  uint32_t attempt;
  int64_t at_ms;
} tc_call;

typedef struct tc_held {
  fo_delivery *d;
  int64_t due_ms;
} tc_held;

/*
 * A channel whose behaviour each test scripts before the dispatcher
 * starts. It records every accepted submit (a "call"), and completes a
 * delivery inside submit(), from a thread of its own after `delay_ms`
 * (`async`), or only at shutdown (`hold`).
 */
typedef struct tchan {
  fo_channel ch;

  /* The script; written before the dispatcher starts. */
  uint32_t fails;          /* retryable failures before success, per item */
  bool fatal;              /* every attempt fails for good with `reason` */
  int64_t retry_after_ms;  /* sent with each retryable failure */
  char reason[128];
  int efull;               /* FO_EFULL returns to give first; -1: always */
  int submit_err;          /* submit() returns this when not FO_OK */
  bool async;
  int delay_ms;
  bool hold;

  pthread_mutex_t lock;
  bool closed;
  int efull_seen;
  int refused;
  tc_call *calls;
  size_t ncalls;
  tc_held held[TC_MAX_HELD];
  size_t nheld;
  pthread_t thread;
  bool thread_on;
} tchan;

/* The outcome of attempt `attempt` under the script. */
static void tc_outcome(const tchan *t, uint32_t attempt, fo_outcome *o) {
  if (t->fatal) {
    fo_outcome_init(o, FO_STATUS_FAILED);
    snprintf(o->reason, sizeof(o->reason), "%s", t->reason);
    return;
  }
  if (attempt <= t->fails) {
    fo_outcome_init(o, FO_STATUS_FAILED);
    o->retryable = true;
    o->retry_after_ms = t->retry_after_ms;
    snprintf(o->reason, sizeof(o->reason), "%s", t->reason);
    return;
  }
  fo_outcome_init(o, FO_STATUS_SENT);
  snprintf(o->provider_id, sizeof(o->provider_id), "tc-%u", attempt);
}

static int tc_submit(void *self, fo_delivery *d) {
  tchan *t = self;
  fo_outcome o;
  tc_call *c;

  pthread_mutex_lock(&t->lock);
  if (t->closed) {
    pthread_mutex_unlock(&t->lock);
    return FO_ECLOSED;
  }
  if (t->efull != 0 || ((t->async || t->hold) && t->nheld == TC_MAX_HELD)) {
    if (t->efull > 0) {
      t->efull--;
    }
    t->efull_seen++;
    pthread_mutex_unlock(&t->lock);
    return FO_EFULL;
  }
  if (t->submit_err != FO_OK) {
    t->refused++;
    pthread_mutex_unlock(&t->lock);
    return t->submit_err;
  }

  if (t->ncalls < TC_MAX_CALLS) {
    c = &t->calls[t->ncalls];
    snprintf(c->event, sizeof(c->event), "%s", d->event->id);
    snprintf(c->user, sizeof(c->user), "%s", d->user);
    c->channel = d->channel;
    c->attempt = d->attempt;
    c->at_ms = fo_now_ms();
  }
  t->ncalls++;

  if (t->async || t->hold) {
    t->held[t->nheld].d = d;
    t->held[t->nheld].due_ms = fo_now_ms() + t->delay_ms;
    t->nheld++;
    pthread_mutex_unlock(&t->lock);
    return FO_OK;
  }
  pthread_mutex_unlock(&t->lock);

  tc_outcome(t, d->attempt, &o);
  fo_delivery_complete(d, &o);
  return FO_OK;
}

/* Completes the async deliveries that are due, in submit order. */
static void *tc_main(void *arg) {
  tchan *t = arg;
  fo_delivery *due[TC_MAX_HELD];

  pthread_mutex_lock(&t->lock);
  while (!t->closed) {
    int64_t now = fo_now_ms();
    size_t n = 0;
    size_t keep = 0;

    for (size_t i = 0; i < t->nheld; i++) {
      if (t->held[i].due_ms <= now) {
        due[n++] = t->held[i].d;
      } else {
        t->held[keep++] = t->held[i];
      }
    }
    t->nheld = keep;
    pthread_mutex_unlock(&t->lock);

    for (size_t i = 0; i < n; i++) {
      fo_outcome o;

      tc_outcome(t, due[i]->attempt, &o);
      fo_delivery_complete(due[i], &o);
    }
    if (n == 0) {
      sleep_ms(1);
    }
    pthread_mutex_lock(&t->lock);
  }
  pthread_mutex_unlock(&t->lock);
  return NULL;
}

static int tc_flush(void *self, int timeout_ms) {
  tchan *t = self;
  int64_t end = fo_now_ms() + timeout_ms;

  for (;;) {
    size_t n;

    pthread_mutex_lock(&t->lock);
    n = t->nheld;
    pthread_mutex_unlock(&t->lock);
    if (n == 0) {
      return FO_OK;
    }
    if (fo_now_ms() >= end) {
      return FO_ETIMEDOUT;
    }
    sleep_ms(1);
  }
}

/* Refuses new work, then completes what it still holds with a retryable
 * failure, as a channel whose provider connection is going away would. */
static void tc_shutdown(void *self) {
  tchan *t = self;
  fo_delivery *left[TC_MAX_HELD];
  size_t n;

  pthread_mutex_lock(&t->lock);
  t->closed = true;
  pthread_mutex_unlock(&t->lock);
  if (t->thread_on) {
    pthread_join(t->thread, NULL);
    t->thread_on = false;
  }

  pthread_mutex_lock(&t->lock);
  n = t->nheld;
  for (size_t i = 0; i < n; i++) {
    left[i] = t->held[i].d;
  }
  t->nheld = 0;
  pthread_mutex_unlock(&t->lock);

  for (size_t i = 0; i < n; i++) {
    fo_outcome o;

    fo_outcome_init(&o, FO_STATUS_FAILED);
    o.retryable = true;
    snprintf(o.reason, sizeof(o.reason), "shutdown");
    fo_delivery_complete(left[i], &o);
  }
}

static void tc_destroy(void *self) {
  tchan *t = self;

  pthread_mutex_destroy(&t->lock);
  free(t->calls);
  free(t);
}

static const fo_channel_ops tc_ops = {
    .name = "test",
    .submit = tc_submit,
    .flush = tc_flush,
    .shutdown = tc_shutdown,
    .destroy = tc_destroy,
};

static tchan *tc_new(void) {
  tchan *t = calloc(1, sizeof(*t));

  assert_non_null(t);
  t->calls = calloc(TC_MAX_CALLS, sizeof(*t->calls));
  assert_non_null(t->calls);
  pthread_mutex_init(&t->lock, NULL);
  t->ch.ops = &tc_ops;
  t->ch.self = t;
  snprintf(t->reason, sizeof(t->reason), "test failure");
  return t;
}

/* Starts the completion thread of an async channel; call after the
 * script is set. */
static void tc_go_async(tchan *t, int delay_ms) {
  t->async = true;
  t->delay_ms = delay_ms;
  assert_int_equal(pthread_create(&t->thread, NULL, tc_main, t), 0);
  t->thread_on = true;
}

static size_t tc_ncalls(tchan *t) {
  size_t n;

  pthread_mutex_lock(&t->lock);
  n = t->ncalls;
  pthread_mutex_unlock(&t->lock);
  return n;
}

static size_t tc_nheld(tchan *t) {
  size_t n;

  pthread_mutex_lock(&t->lock);
  n = t->nheld;
  pthread_mutex_unlock(&t->lock);
  return n;
}

static int tc_efull_seen(tchan *t) {
  int n;

  pthread_mutex_lock(&t->lock);
  n = t->efull_seen;
  pthread_mutex_unlock(&t->lock);
  return n;
}

/* Calls for (event, user, channel); read once the dispatcher is idle. */
static size_t tc_count(const tchan *t, const char *event, const char *user,
                       fo_channel_kind ch) {
  size_t n = 0;

  for (size_t i = 0; i < t->ncalls && i < TC_MAX_CALLS; i++) {
    const tc_call *c = &t->calls[i];

    if (strcmp(c->event, event) == 0 && strcmp(c->user, user) == 0 &&
        c->channel == ch) {
      n++;
    }
  }
  return n;
}

/* The world: queue, dispatcher, and what the callbacks saw. */

typedef struct w_done {
  char id[FO_EVENT_ID_MAX + 1];
  bool finished;
  size_t outcomes_before;   /* final outcomes of the event seen by then */
} w_done;

typedef struct w_out {
  char event[FO_EVENT_ID_MAX + 1];
  char user[FO_EVENT_USER_MAX + 1];
  fo_channel_kind channel;
  uint32_t attempt;
  fo_outcome o;
} w_out;

typedef struct world {
  fo_queue *q;
  fo_dispatch *d;
  tchan *tc[FO_CH_COUNT];
  int ntc;

  pthread_mutex_t lock;
  w_done done[W_MAX_DONE];
  size_t ndone;
  w_out *outs;
  size_t nouts;
} world;

static size_t outs_of_locked(const world *w, const char *event) {
  size_t n = 0;

  for (size_t i = 0; i < w->nouts && i < W_MAX_OUTS; i++) {
    if (strcmp(w->outs[i].event, event) == 0) {
      n++;
    }
  }
  return n;
}

static void on_done(fo_event *ev, bool finished, void *arg) {
  world *w = arg;

  pthread_mutex_lock(&w->lock);
  if (w->ndone < W_MAX_DONE) {
    w_done *r = &w->done[w->ndone];

    snprintf(r->id, sizeof(r->id), "%s", ev->id);
    r->finished = finished;
    r->outcomes_before = outs_of_locked(w, ev->id);
  }
  w->ndone++;
  pthread_mutex_unlock(&w->lock);
  fo_event_free(ev);
}

static void on_outcome(const fo_delivery *d, const fo_outcome *o,
                       void *arg) {
  world *w = arg;

  pthread_mutex_lock(&w->lock);
  if (w->nouts < W_MAX_OUTS) {
    w_out *r = &w->outs[w->nouts];

    snprintf(r->event, sizeof(r->event), "%s", d->event->id);
    snprintf(r->user, sizeof(r->user), "%s", d->user);
    r->channel = d->channel;
    r->attempt = d->attempt;
    r->o = *o;
  }
  w->nouts++;
  pthread_mutex_unlock(&w->lock);
}

static world *w_new(int workers, int64_t base_ms, int64_t max_ms) {
  world *w = calloc(1, sizeof(*w));
  fo_dispatch_conf conf = {
      .workers = workers,
      .retry_base_ms = base_ms,
      .retry_max_ms = max_ms,
      .on_done = on_done,
      .on_outcome = on_outcome,
  };

  assert_non_null(w);
  w->outs = calloc(W_MAX_OUTS, sizeof(*w->outs));
  assert_non_null(w->outs);
  pthread_mutex_init(&w->lock, NULL);
  w->q = fo_queue_new(100000, 1000);
  assert_non_null(w->q);
  conf.done_arg = w;
  conf.outcome_arg = w;
  w->d = fo_dispatch_new(w->q, &conf);
  assert_non_null(w->d);
  return w;
}

/* A new test channel, routed for every kind in `mask`; the world shuts it
 * down and destroys it. */
static tchan *w_channel(world *w, unsigned mask) {
  tchan *t = tc_new();

  assert_true(w->ntc < FO_CH_COUNT);
  w->tc[w->ntc++] = t;
  for (int k = 0; k < FO_CH_COUNT; k++) {
    if (mask & (1u << k)) {
      fo_dispatch_set_channel(w->d, (fo_channel_kind)k, &t->ch);
    }
  }
  return t;
}

static void w_start(world *w) {
  assert_int_equal(fo_dispatch_start(w->d), FO_OK);
}

/* Decodes `json` as the consumer does and stamps the engine fields. */
static fo_event *mk_event(const char *json) {
  fo_event *ev = NULL;
  fo_event_error err;

  memset(&err, 0, sizeof(err));
  assert_int_equal(fo_event_decode(json, strlen(json), 0, &ev, &err),
                   FO_OK);
  assert_non_null(ev);
  ev->consumed_us = fo_now_us();
  ev->expires_ms = fo_wall_ms() + ev->ttl_s * 1000;
  atomic_store(&ev->pending, (uint_fast32_t)fo_event_items(ev));
  return ev;
}

/* Pushes `ev`, whose ownership passes to the dispatcher until on_done. */
static uint64_t w_push_ev(world *w, fo_event *ev) {
  uint64_t items = fo_event_items(ev);

  assert_int_equal(fo_queue_push(w->q, ev), FO_OK);
  return items;
}

static uint64_t w_push(world *w, const char *json) {
  return w_push_ev(w, mk_event(json));
}

static size_t w_ndone(world *w) {
  size_t n;

  pthread_mutex_lock(&w->lock);
  n = w->ndone;
  pthread_mutex_unlock(&w->lock);
  return n;
}

static void w_wait_done(world *w, size_t n) {
  int64_t end = fo_now_ms() + WAIT_MS;

  while (w_ndone(w) < n && fo_now_ms() < end) {
    sleep_ms(2);
  }
  assert_int_equal(w_ndone(w), n);
}

/* Drains with a generous timeout; everything must have finished. */
static void w_drain(world *w) {
  fo_dispatch_stats st;

  assert_int_equal(fo_dispatch_drain(w->d, WAIT_MS), FO_OK);
  fo_dispatch_get_stats(w->d, &st);
  assert_int_equal(st.in_flight, 0);
  assert_int_equal(st.retry_waiting, 0);
}

/* Shuts the channels down, then frees the dispatcher, the queue, the
 * channels and the world, in the order the dispatcher's contract asks. */
static void w_free(world *w) {
  for (int i = 0; i < w->ntc; i++) {
    tc_shutdown(w->tc[i]);
  }
  fo_dispatch_free(w->d);
  fo_queue_free(w->q);
  for (int i = 0; i < w->ntc; i++) {
    tc_destroy(w->tc[i]);
  }
  pthread_mutex_destroy(&w->lock);
  free(w->outs);
  free(w);
}

/* The done record of `id`; fails unless there is exactly one. */
static const w_done *w_done_of(const world *w, const char *id) {
  const w_done *found = NULL;
  size_t n = 0;

  for (size_t i = 0; i < w->ndone && i < W_MAX_DONE; i++) {
    if (strcmp(w->done[i].id, id) == 0) {
      found = &w->done[i];
      n++;
    }
  }
  assert_int_equal(n, 1);
  return found;
}

/* The final outcome of one item; fails unless there is exactly one. */
static const w_out *w_out_of(const world *w, const char *event,
                             const char *user, fo_channel_kind ch) {
  const w_out *found = NULL;
  size_t n = 0;

  for (size_t i = 0; i < w->nouts && i < W_MAX_OUTS; i++) {
    const w_out *r = &w->outs[i];

    if (strcmp(r->event, event) == 0 && strcmp(r->user, user) == 0 &&
        r->channel == ch) {
      found = r;
      n++;
    }
  }
  assert_int_equal(n, 1);
  return found;
}

/* Tests. */

static void test_new_rejects_bad_conf(void **state) {
  fo_queue *q = fo_queue_new(10, 10);
  fo_dispatch_conf ok = {
      .workers = 1, .retry_base_ms = 10, .retry_max_ms = 40,
      .on_done = on_done,
  };
  fo_dispatch_conf c;
  fo_dispatch *d;

  (void)state;
  assert_non_null(q);
  assert_null(fo_dispatch_new(NULL, &ok));
  assert_null(fo_dispatch_new(q, NULL));
  c = ok;
  c.workers = 0;
  assert_null(fo_dispatch_new(q, &c));
  c = ok;
  c.on_done = NULL;
  assert_null(fo_dispatch_new(q, &c));
  c = ok;
  c.retry_base_ms = 0;
  assert_null(fo_dispatch_new(q, &c));
  c = ok;
  c.retry_max_ms = 5;
  assert_null(fo_dispatch_new(q, &c));

  /* A valid one can be freed without ever starting. */
  d = fo_dispatch_new(q, &ok);
  assert_non_null(d);
  fo_dispatch_free(d);
  fo_dispatch_free(NULL);
  fo_queue_free(q);
}

static void test_every_item_once(void **state) {
  static const char *users_a[] = {"u1", "u2", "u3"};
  static const char *users_b[] = {"b1", "b2"};
  world *w = w_new(2, 10, 40);
  tchan *t = w_channel(w, FO_CH_MASK_ALL);
  fo_dispatch_stats st;
  uint64_t na;
  uint64_t nb;

  (void)state;
  w_start(w);
  na = w_push(w, "{\"id\":\"ev-a\",\"category\":\"c\","
                 "\"to\":[\"u1\",\"u2\",\"u3\",\"u2\"]}");
  nb = w_push(w, "{\"id\":\"ev-b\",\"category\":\"c\",\"to\":[\"b1\","
                 "\"b2\"],\"channels\":[\"sms\",\"push\"]}");
  assert_int_equal(na, 12);
  assert_int_equal(nb, 4);
  w_wait_done(w, 2);
  w_drain(w);

  /* Each (user, channel) of ev-a reached its channel once, on its first
   * attempt, and ended sent; ev-b did only on its two channels. */
  assert_int_equal(tc_ncalls(t), 16);
  for (size_t u = 0; u < 3; u++) {
    for (int k = 0; k < FO_CH_COUNT; k++) {
      const w_out *r;

      assert_int_equal(tc_count(t, "ev-a", users_a[u], (fo_channel_kind)k),
                       1);
      r = w_out_of(w, "ev-a", users_a[u], (fo_channel_kind)k);
      assert_int_equal(r->o.status, FO_STATUS_SENT);
      assert_int_equal(r->attempt, 1);
      assert_string_equal(r->o.provider_id, "tc-1");
    }
  }
  for (size_t u = 0; u < 2; u++) {
    assert_int_equal(tc_count(t, "ev-b", users_b[u], FO_CH_SMS), 1);
    assert_int_equal(tc_count(t, "ev-b", users_b[u], FO_CH_PUSH), 1);
    assert_int_equal(tc_count(t, "ev-b", users_b[u], FO_CH_EMAIL), 0);
    assert_int_equal(tc_count(t, "ev-b", users_b[u], FO_CH_INAPP), 0);
  }
  for (size_t i = 0; i < t->ncalls; i++) {
    assert_int_equal(t->calls[i].attempt, 1);
  }

  /* One done per event, finished, after its last outcome. */
  assert_true(w_done_of(w, "ev-a")->finished);
  assert_int_equal(w_done_of(w, "ev-a")->outcomes_before, 12);
  assert_true(w_done_of(w, "ev-b")->finished);
  assert_int_equal(w_done_of(w, "ev-b")->outcomes_before, 4);
  assert_int_equal(w->nouts, 16);

  fo_dispatch_get_stats(w->d, &st);
  assert_int_equal(st.final_by_status[FO_STATUS_SENT], 16);
  assert_int_equal(st.final_by_status[FO_STATUS_FAILED], 0);
  assert_int_equal(st.retries, 0);
  w_free(w);
}

static void test_channel_off(void **state) {
  world *w = w_new(1, 10, 40);
  tchan *t = w_channel(w, 1u << FO_CH_PUSH);
  const w_out *r;

  (void)state;
  fo_dispatch_set_channel(w->d, FO_CH_EMAIL, NULL);
  w_start(w);
  w_push(w, "{\"id\":\"off\",\"category\":\"c\",\"to\":[\"u1\",\"u2\"],"
            "\"channels\":[\"push\",\"email\"]}");
  w_wait_done(w, 1);
  w_drain(w);

  assert_int_equal(tc_ncalls(t), 2);
  assert_int_equal(tc_count(t, "off", "u1", FO_CH_EMAIL), 0);
  r = w_out_of(w, "off", "u1", FO_CH_EMAIL);
  assert_int_equal(r->o.status, FO_STATUS_SUPPRESSED);
  assert_int_equal(r->o.suppress, FO_SUP_CHANNEL_OFF);
  r = w_out_of(w, "off", "u2", FO_CH_EMAIL);
  assert_int_equal(r->o.status, FO_STATUS_SUPPRESSED);
  assert_int_equal(r->o.suppress, FO_SUP_CHANNEL_OFF);
  assert_int_equal(w_out_of(w, "off", "u1", FO_CH_PUSH)->o.status,
                   FO_STATUS_SENT);
  assert_true(w_done_of(w, "off")->finished);
  assert_int_equal(w_done_of(w, "off")->outcomes_before, 4);
  w_free(w);
}

static void test_expired_not_delivered(void **state) {
  world *w = w_new(1, 10, 40);
  tchan *t = w_channel(w, FO_CH_MASK_ALL);
  fo_event *ev;
  fo_dispatch_stats st;

  (void)state;
  ev = mk_event("{\"id\":\"old\",\"category\":\"c\",\"to\":[\"u1\"],"
                "\"channels\":[\"push\",\"sms\"],\"ttl\":60}");
  ev->expires_ms = fo_wall_ms() - 1000;
  w_push_ev(w, ev);
  w_start(w);
  w_wait_done(w, 1);
  w_drain(w);

  assert_int_equal(tc_ncalls(t), 0);
  assert_int_equal(w_out_of(w, "old", "u1", FO_CH_PUSH)->o.status,
                   FO_STATUS_SUPPRESSED);
  assert_int_equal(w_out_of(w, "old", "u1", FO_CH_PUSH)->o.suppress,
                   FO_SUP_EXPIRED);
  assert_int_equal(w_out_of(w, "old", "u1", FO_CH_SMS)->o.suppress,
                   FO_SUP_EXPIRED);
  assert_true(w_done_of(w, "old")->finished);
  fo_dispatch_get_stats(w->d, &st);
  assert_int_equal(st.final_by_status[FO_STATUS_SUPPRESSED], 2);
  w_free(w);
}

static void test_retry_with_backoff(void **state) {
  world *w = w_new(1, 10, 40);
  tchan *t = w_channel(w, 1u << FO_CH_PUSH);
  fo_dispatch_stats st;
  const w_out *r;

  (void)state;
  t->fails = 2;
  w_start(w);
  w_push(w, "{\"id\":\"flaky\",\"category\":\"c\",\"to\":[\"u1\"],"
            "\"channels\":[\"push\"]}");
  w_wait_done(w, 1);
  w_drain(w);

  assert_int_equal(t->ncalls, 3);
  for (uint32_t i = 0; i < 3; i++) {
    assert_int_equal(t->calls[i].attempt, i + 1);
  }
  /* Backoff before attempt 2 is in [5, 10] ms, before attempt 3 in
   * [10, 20] ms: the retries did not come early. */
  assert_true(t->calls[1].at_ms - t->calls[0].at_ms >= 5);
  assert_true(t->calls[2].at_ms - t->calls[1].at_ms >= 10);

  assert_int_equal(w->nouts, 1);
  r = w_out_of(w, "flaky", "u1", FO_CH_PUSH);
  assert_int_equal(r->o.status, FO_STATUS_SENT);
  assert_int_equal(r->attempt, 3);
  assert_string_equal(r->o.provider_id, "tc-3");
  assert_true(w_done_of(w, "flaky")->finished);

  fo_dispatch_get_stats(w->d, &st);
  assert_int_equal(st.retries, 2);
  assert_int_equal(st.final_by_status[FO_STATUS_SENT], 1);
  assert_int_equal(st.final_by_status[FO_STATUS_FAILED], 0);
  w_free(w);
}

/* Retries also work when the channel completes from its own thread, and
 * with many items at once, some meeting a full channel. */
static void test_retry_async_many(void **state) {
  world *w = w_new(2, 1, 4);
  tchan *t = w_channel(w, FO_CH_MASK_ALL);
  fo_dispatch_stats st;
  char json[256];
  char id[32];

  (void)state;
  t->fails = 1;
  tc_go_async(t, 1);
  w_start(w);
  for (int e = 0; e < 50; e++) {
    snprintf(json, sizeof(json),
             "{\"id\":\"m%d\",\"category\":\"c\",\"to\":[\"a\",\"b\","
             "\"c\",\"d\"]}", e);
    assert_int_equal(w_push(w, json), 16);
  }
  w_wait_done(w, 50);
  w_drain(w);

  assert_int_equal(t->ncalls, 50 * 16 * 2);
  assert_int_equal(w->nouts, 50 * 16);
  for (int e = 0; e < 50; e++) {
    const w_done *r;

    snprintf(id, sizeof(id), "m%d", e);
    r = w_done_of(w, id);
    assert_true(r->finished);
    assert_int_equal(r->outcomes_before, 16);
    assert_int_equal(tc_count(t, id, "c", FO_CH_SMS), 2);
    assert_int_equal(w_out_of(w, id, "c", FO_CH_SMS)->attempt, 2);
  }
  for (size_t i = 0; i < w->nouts; i++) {
    assert_int_equal(w->outs[i].o.status, FO_STATUS_SENT);
  }
  fo_dispatch_get_stats(w->d, &st);
  assert_int_equal(st.retries, 50 * 16);
  assert_int_equal(st.final_by_status[FO_STATUS_SENT], 50 * 16);
  w_free(w);
}

static void test_retry_after_floor(void **state) {
  world *w = w_new(1, 10, 40);
  tchan *t = w_channel(w, 1u << FO_CH_EMAIL);
  fo_dispatch_stats st;

  (void)state;
  t->fails = 1;
  t->retry_after_ms = 300;
  w_start(w);
  w_push(w, "{\"id\":\"ra\",\"category\":\"c\",\"to\":[\"u1\"],"
            "\"channels\":[\"email\"]}");
  w_wait_done(w, 1);
  w_drain(w);

  assert_int_equal(t->ncalls, 2);
  assert_int_equal(t->calls[1].attempt, 2);
  assert_true(t->calls[1].at_ms - t->calls[0].at_ms >= 300);
  assert_int_equal(w_out_of(w, "ra", "u1", FO_CH_EMAIL)->o.status,
                   FO_STATUS_SENT);
  fo_dispatch_get_stats(w->d, &st);
  assert_int_equal(st.retries, 1);
  w_free(w);
}

static void test_best_effort_no_retry(void **state) {
  world *w = w_new(1, 10, 40);
  tchan *t = w_channel(w, 1u << FO_CH_PUSH);
  fo_dispatch_stats st;
  const w_out *r;

  (void)state;
  t->fails = 5;
  snprintf(t->reason, sizeof(t->reason), "503 unavailable");
  w_start(w);
  w_push(w, "{\"id\":\"be\",\"category\":\"c\",\"to\":[\"u1\"],"
            "\"channels\":[\"push\"],\"delivery\":\"best_effort\"}");
  w_wait_done(w, 1);
  /* Longer than any backoff step of this dispatcher. */
  sleep_ms(100);
  w_drain(w);

  assert_int_equal(tc_ncalls(t), 1);
  r = w_out_of(w, "be", "u1", FO_CH_PUSH);
  assert_int_equal(r->o.status, FO_STATUS_FAILED);
  assert_string_equal(r->o.reason, "503 unavailable");
  assert_true(w_done_of(w, "be")->finished);
  fo_dispatch_get_stats(w->d, &st);
  assert_int_equal(st.retries, 0);
  assert_int_equal(st.final_by_status[FO_STATUS_FAILED], 1);
  w_free(w);
}

/* A critical event is at least once even when it asks for best effort. */
static void test_critical_best_effort_retried(void **state) {
  world *w = w_new(1, 10, 40);
  tchan *t = w_channel(w, 1u << FO_CH_PUSH);
  fo_dispatch_stats st;

  (void)state;
  t->fails = 1;
  w_start(w);
  w_push(w, "{\"id\":\"crit\",\"category\":\"c\",\"to\":[\"u1\"],"
            "\"channels\":[\"push\"],\"priority\":\"critical\","
            "\"delivery\":\"best_effort\"}");
  w_wait_done(w, 1);
  w_drain(w);

  assert_int_equal(t->ncalls, 2);
  assert_int_equal(w_out_of(w, "crit", "u1", FO_CH_PUSH)->o.status,
                   FO_STATUS_SENT);
  fo_dispatch_get_stats(w->d, &st);
  assert_int_equal(st.retries, 1);
  w_free(w);
}

static void test_retry_beyond_ttl_is_final(void **state) {
  world *w = w_new(1, 10, 40);
  tchan *t = w_channel(w, 1u << FO_CH_SMS);
  fo_dispatch_stats st;
  const w_out *r;

  (void)state;
  t->fails = 1;
  t->retry_after_ms = 5000;
  snprintf(t->reason, sizeof(t->reason), "429 slow down");
  w_start(w);
  w_push(w, "{\"id\":\"short\",\"category\":\"c\",\"to\":[\"u1\"],"
            "\"channels\":[\"sms\"],\"ttl\":1}");
  w_wait_done(w, 1);
  w_drain(w);

  assert_int_equal(tc_ncalls(t), 1);
  r = w_out_of(w, "short", "u1", FO_CH_SMS);
  assert_int_equal(r->o.status, FO_STATUS_FAILED);
  assert_string_equal(r->o.reason, "429 slow down");
  assert_true(w_done_of(w, "short")->finished);
  fo_dispatch_get_stats(w->d, &st);
  assert_int_equal(st.retries, 0);
  w_free(w);
}

static void test_non_retryable_keeps_reason(void **state) {
  world *w = w_new(1, 10, 40);
  tchan *t = w_channel(w, 1u << FO_CH_INAPP);
  fo_dispatch_stats st;
  const w_out *r;

  (void)state;
  t->fatal = true;
  snprintf(t->reason, sizeof(t->reason), "400 BadDeviceToken: \"x\"");
  w_start(w);
  w_push(w, "{\"id\":\"bad\",\"category\":\"c\",\"to\":[\"u1\",\"u2\"],"
            "\"channels\":[\"inapp\"]}");
  w_wait_done(w, 1);
  w_drain(w);

  assert_int_equal(tc_ncalls(t), 2);
  r = w_out_of(w, "bad", "u2", FO_CH_INAPP);
  assert_int_equal(r->o.status, FO_STATUS_FAILED);
  assert_false(r->o.retryable);
  assert_string_equal(r->o.reason, "400 BadDeviceToken: \"x\"");
  assert_true(w_done_of(w, "bad")->finished);
  assert_int_equal(w_done_of(w, "bad")->outcomes_before, 2);
  fo_dispatch_get_stats(w->d, &st);
  assert_int_equal(st.retries, 0);
  assert_int_equal(st.final_by_status[FO_STATUS_FAILED], 2);
  w_free(w);
}

static void test_efull_resubmits(void **state) {
  world *w = w_new(1, 10, 40);
  tchan *t = w_channel(w, 1u << FO_CH_PUSH);

  (void)state;
  t->efull = 3;
  w_start(w);
  w_push(w, "{\"id\":\"full\",\"category\":\"c\",\"to\":[\"u1\",\"u2\"],"
            "\"channels\":[\"push\"]}");
  w_wait_done(w, 1);
  w_drain(w);

  assert_int_equal(tc_efull_seen(t), 3);
  assert_int_equal(tc_ncalls(t), 2);
  assert_int_equal(tc_count(t, "full", "u1", FO_CH_PUSH), 1);
  assert_int_equal(tc_count(t, "full", "u2", FO_CH_PUSH), 1);
  /* A resubmit is the same attempt, not a retry. */
  assert_int_equal(w_out_of(w, "full", "u1", FO_CH_PUSH)->attempt, 1);
  assert_int_equal(w_out_of(w, "full", "u1", FO_CH_PUSH)->o.status,
                   FO_STATUS_SENT);
  assert_true(w_done_of(w, "full")->finished);
  w_free(w);
}

static void test_submit_error_is_failure(void **state) {
  world *w = w_new(1, 10, 40);
  tchan *t = w_channel(w, 1u << FO_CH_EMAIL);
  fo_dispatch_stats st;
  const w_out *r;

  (void)state;
  t->submit_err = FO_EIO;
  w_start(w);
  w_push(w, "{\"id\":\"eio\",\"category\":\"c\",\"to\":[\"u1\"],"
            "\"channels\":[\"email\"]}");
  w_wait_done(w, 1);
  w_drain(w);

  assert_int_equal(t->refused, 1);
  assert_int_equal(tc_ncalls(t), 0);
  r = w_out_of(w, "eio", "u1", FO_CH_EMAIL);
  assert_int_equal(r->o.status, FO_STATUS_FAILED);
  assert_true(r->o.reason[0] != '\0');
  assert_true(w_done_of(w, "eio")->finished);
  fo_dispatch_get_stats(w->d, &st);
  assert_int_equal(st.retries, 0);
  assert_int_equal(st.final_by_status[FO_STATUS_FAILED], 1);
  w_free(w);
}

static void test_drain_waits_for_async(void **state) {
  world *w = w_new(2, 10, 40);
  tchan *t = w_channel(w, (1u << FO_CH_PUSH) | (1u << FO_CH_INAPP));

  (void)state;
  tc_go_async(t, 50);
  w_start(w);
  w_push(w, "{\"id\":\"d1\",\"category\":\"c\",\"to\":[\"u1\",\"u2\","
            "\"u3\"],\"channels\":[\"push\",\"inapp\"]}");
  w_push(w, "{\"id\":\"d2\",\"category\":\"c\",\"to\":[\"u4\"],"
            "\"channels\":[\"inapp\"],\"priority\":\"low\"}");

  /* No polling first: drain itself must wait for the channel. */
  assert_int_equal(fo_dispatch_drain(w->d, WAIT_MS), FO_OK);
  assert_int_equal(w_ndone(w), 2);
  assert_true(w_done_of(w, "d1")->finished);
  assert_int_equal(w_done_of(w, "d1")->outcomes_before, 6);
  assert_true(w_done_of(w, "d2")->finished);
  assert_int_equal(w->nouts, 7);
  assert_int_equal(tc_nheld(t), 0);
  w_free(w);
}

/*
 * A channel that never completes, and an item waiting for a long retry:
 * drain gives up after its timeout, the channel's shutdown hands its
 * deliveries back with a retryable failure, and fo_dispatch_free gives
 * back what is still waiting. Every event comes back once, unfinished,
 * with no final outcome recorded.
 */
static void test_drain_timeout_gives_back(void **state) {
  world *w = w_new(2, 10, 40);
  tchan *hold = w_channel(w, 1u << FO_CH_PUSH);
  tchan *slow = w_channel(w, 1u << FO_CH_EMAIL);
  fo_dispatch_stats st;
  int64_t end;
  int64_t t0;
  int64_t took;

  (void)state;
  hold->hold = true;
  slow->fails = 100;
  slow->retry_after_ms = 60000;
  w_start(w);
  w_push(w, "{\"id\":\"h-push\",\"category\":\"c\",\"to\":[\"u1\",\"u2\"],"
            "\"channels\":[\"push\"]}");
  w_push(w, "{\"id\":\"h-email\",\"category\":\"c\",\"to\":[\"u1\"],"
            "\"channels\":[\"email\"]}");
  w_push(w, "{\"id\":\"h-both\",\"category\":\"c\",\"to\":[\"u3\"],"
            "\"channels\":[\"push\",\"email\"]}");

  end = fo_now_ms() + WAIT_MS;
  for (;;) {
    fo_dispatch_get_stats(w->d, &st);
    if ((tc_nheld(hold) == 3 && st.retry_waiting == 2) ||
        fo_now_ms() >= end) {
      break;
    }
    sleep_ms(2);
  }
  /* Read again: the fields of one snapshot are not taken at one instant,
   * but nothing moves any more once every item is held or waiting. */
  fo_dispatch_get_stats(w->d, &st);
  assert_int_equal(tc_nheld(hold), 3);
  assert_int_equal(st.retry_waiting, 2);
  assert_int_equal(st.in_flight, 5);

  t0 = fo_now_ms();
  assert_int_equal(fo_dispatch_drain(w->d, 200), FO_ETIMEDOUT);
  took = fo_now_ms() - t0;
  assert_true(took >= 199);
  assert_true(took < 10000);
  assert_int_equal(w_ndone(w), 0);

  /* The held push items come back now; h-both still waits for email. */
  tc_shutdown(hold);
  assert_int_equal(w_ndone(w), 1);
  assert_false(w_done_of(w, "h-push")->finished);
  tc_shutdown(slow);
  assert_int_equal(w_ndone(w), 1);

  fo_dispatch_free(w->d);
  w->d = NULL;
  assert_int_equal(w_ndone(w), 3);
  assert_false(w_done_of(w, "h-email")->finished);
  assert_false(w_done_of(w, "h-both")->finished);
  assert_int_equal(w->nouts, 0);
  w_free(w);
}

/* A channel that stays full: the items in hand and those still queued
 * all come back unfinished. */
static void test_always_full_gives_back(void **state) {
  world *w = w_new(1, 10, 40);
  tchan *t = w_channel(w, 1u << FO_CH_PUSH);
  char json[2048];
  size_t len;
  int64_t end;

  (void)state;
  t->efull = -1;
  len = (size_t)snprintf(json, sizeof(json),
                         "{\"id\":\"stuck\",\"category\":\"c\","
                         "\"channels\":[\"push\"],\"to\":[\"x0\"");
  for (int i = 1; i < 100; i++) {
    len += (size_t)snprintf(json + len, sizeof(json) - len, ",\"x%d\"", i);
  }
  snprintf(json + len, sizeof(json) - len, "]}");
  assert_int_equal(w_push(w, json), 100);
  w_start(w);

  end = fo_now_ms() + WAIT_MS;
  while (tc_efull_seen(t) < 3 && fo_now_ms() < end) {
    sleep_ms(2);
  }
  assert_true(tc_efull_seen(t) >= 3);
  assert_int_equal(w_ndone(w), 0);
  assert_int_equal(fo_dispatch_drain(w->d, 200), FO_ETIMEDOUT);
  tc_shutdown(t);
  fo_dispatch_free(w->d);
  w->d = NULL;

  assert_int_equal(w_ndone(w), 1);
  assert_false(w_done_of(w, "stuck")->finished);
  assert_int_equal(tc_ncalls(t), 0);
  assert_int_equal(w->nouts, 0);
  w_free(w);
}

static void test_backoff(void **state) {
  uint64_t rng = 0x1234567887654321ull;
  uint64_t before;

  (void)state;
  for (uint32_t a = 1; a <= 8; a++) {
    int64_t step = 100LL << (a - 1);
    int64_t lo = INT64_MAX;
    int64_t hi = 0;

    if (step > 1000) {
      step = 1000;
    }
    for (int i = 0; i < 500; i++) {
      int64_t v = fo_dispatch_backoff_ms(100, 1000, a, 0, &rng);

      assert_in_range(v, step / 2, step);
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    /* Jitter spreads over most of [step/2, step]. */
    assert_true(lo < step / 2 + step / 8);
    assert_true(hi > step - step / 8);
  }

  /* Capped even for absurd attempt numbers; an odd step stays within. */
  for (int i = 0; i < 100; i++) {
    assert_in_range(fo_dispatch_backoff_ms(100, 1000, UINT32_MAX, 0, &rng),
                    500, 1000);
    assert_in_range(fo_dispatch_backoff_ms(3, 10, 3, 0, &rng), 5, 10);
    assert_in_range(fo_dispatch_backoff_ms(5, 5, 1, 0, &rng), 2, 5);
  }

  /* The floor wins when it is above the jittered step, and only then. */
  for (int i = 0; i < 100; i++) {
    assert_int_equal(fo_dispatch_backoff_ms(100, 1000, 1, 5000, &rng), 5000);
    assert_in_range(fo_dispatch_backoff_ms(100, 1000, 1, 75, &rng), 75, 100);
    assert_in_range(fo_dispatch_backoff_ms(100, 1000, 4, 10, &rng), 400,
                    800);
  }

  before = rng;
  (void)fo_dispatch_backoff_ms(100, 1000, 1, 0, &rng);
  assert_true(rng != before);
}

static void test_priority_order(void **state) {
  static const char *want[] = {"p-crit", "p-high", "p-norm", "p-low"};
  world *w = w_new(1, 10, 40);
  tchan *t = w_channel(w, 1u << FO_CH_SMS);

  (void)state;
  w_push(w, "{\"id\":\"p-low\",\"category\":\"c\",\"to\":[\"u\"],"
            "\"channels\":[\"sms\"],\"priority\":\"low\"}");
  w_push(w, "{\"id\":\"p-norm\",\"category\":\"c\",\"to\":[\"u\"],"
            "\"channels\":[\"sms\"]}");
  w_push(w, "{\"id\":\"p-high\",\"category\":\"c\",\"to\":[\"u\"],"
            "\"channels\":[\"sms\"],\"priority\":\"high\"}");
  w_push(w, "{\"id\":\"p-crit\",\"category\":\"c\",\"to\":[\"u\"],"
            "\"channels\":[\"sms\"],\"priority\":\"critical\"}");
  w_start(w);
  w_wait_done(w, 4);
  w_drain(w);

  assert_int_equal(t->ncalls, 4);
  for (size_t i = 0; i < 4; i++) {
    assert_string_equal(t->calls[i].event, want[i]);
  }
  w_free(w);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_new_rejects_bad_conf),
      cmocka_unit_test(test_every_item_once),
      cmocka_unit_test(test_channel_off),
      cmocka_unit_test(test_expired_not_delivered),
      cmocka_unit_test(test_retry_with_backoff),
      cmocka_unit_test(test_retry_async_many),
      cmocka_unit_test(test_retry_after_floor),
      cmocka_unit_test(test_best_effort_no_retry),
      cmocka_unit_test(test_critical_best_effort_retried),
      cmocka_unit_test(test_retry_beyond_ttl_is_final),
      cmocka_unit_test(test_non_retryable_keeps_reason),
      cmocka_unit_test(test_efull_resubmits),
      cmocka_unit_test(test_submit_error_is_failure),
      cmocka_unit_test(test_drain_waits_for_async),
      cmocka_unit_test(test_drain_timeout_gives_back),
      cmocka_unit_test(test_always_full_gives_back),
      cmocka_unit_test(test_backoff),
      cmocka_unit_test(test_priority_order),
  };

  fo_log_set_level(FO_LOG_WARN);
  return cmocka_run_group_tests(tests, NULL, NULL);
}
