/* SPDX-License-Identifier: MIT */
/*
 * Dispatcher: worker threads between the queue and the channels, a retry
 * timer for failed attempts, and the bookkeeping that turns the last
 * outcome of an event into its done callback.
 */
#include "dispatch.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fanout/common.h"
#include "log.h"
#include "metrics.h"

#define BATCH 64
#define POP_WAIT_MS 100

/* One delivery in flight; `d` is what channels see. */
typedef struct inflight {
  fo_delivery d;
  int64_t due_ms;               /* monotonic, while waiting for a retry */
  bool gate_seen;               /* the policy stage has decided on it */
  bool gate_passed;             /* ... and said send */
} inflight;

typedef struct chan_metrics {
  fo_counter *status[FO_STATUS_COUNT];
  fo_counter *suppressed[FO_SUP_COUNT];
  fo_counter *retries;
  fo_histogram *dispatch_lat;   /* consumed to first submit */
  fo_histogram *delivery_lat;   /* consumed to final outcome */
} chan_metrics;

struct fo_dispatch {
  fo_queue *q;
  fo_dispatch_conf conf;
  fo_channel *channels[FO_CH_COUNT];
  chan_metrics m[FO_CH_COUNT];
  fo_gate gate;
  bool has_gate;

  pthread_t *threads;
  int started;
  pthread_t retry_thread;
  bool retry_started;

  atomic_bool stopping;         /* workers exit once the queue is empty */
  atomic_bool closed;           /* outcomes no longer retried */
  atomic_int workers_running;
  atomic_uint_fast64_t in_flight;
  atomic_uint_fast64_t final_by_status[FO_STATUS_COUNT];
  atomic_uint_fast64_t retries;

  /* Retry heap, ordered by due time. */
  pthread_mutex_t lock;
  pthread_cond_t retry_cond;
  pthread_cond_t idle_cond;
  inflight **heap;
  size_t heap_len;
  size_t heap_cap;
  uint64_t rng;
};

static void cond_init_monotonic(pthread_cond_t *c) {
  pthread_condattr_t a;

  pthread_condattr_init(&a);
  pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
  pthread_cond_init(c, &a);
  pthread_condattr_destroy(&a);
}

static void deadline_in(struct timespec *ts, int64_t ms) {
  clock_gettime(CLOCK_MONOTONIC, ts);
  ts->tv_sec += ms / 1000;
  ts->tv_nsec += (ms % 1000) * 1000000;
  if (ts->tv_nsec >= 1000000000) {
    ts->tv_sec++;
    ts->tv_nsec -= 1000000000;
  }
}

static void register_metrics(fo_dispatch *d) {
  char labels[96];

  for (int c = 0; c < FO_CH_COUNT; c++) {
    const char *ch = fo_channel_name((fo_channel_kind)c);
    chan_metrics *m = &d->m[c];

    for (int s = 0; s < FO_STATUS_COUNT; s++) {
      snprintf(labels, sizeof(labels), "channel=\"%s\",status=\"%s\"", ch,
               fo_status_name((fo_status)s));
      m->status[s] = fo_metrics_counter(
          "fanout_deliveries_total",
          "Deliveries by channel and final status.", labels);
    }
    for (int r = 1; r < FO_SUP_COUNT; r++) {
      snprintf(labels, sizeof(labels), "channel=\"%s\",reason=\"%s\"", ch,
               fo_suppress_name((fo_suppress_reason)r));
      m->suppressed[r] = fo_metrics_counter(
          "fanout_deliveries_suppressed_total",
          "Suppressed deliveries by channel and reason.", labels);
    }
    snprintf(labels, sizeof(labels), "channel=\"%s\"", ch);
    m->retries = fo_metrics_counter("fanout_delivery_retries_total",
                                    "Attempts scheduled again after a "
                                    "retryable failure.", labels);
    m->dispatch_lat = fo_metrics_histogram(
        "fanout_dispatch_latency_seconds",
        "Time from consuming an event to handing an item to its channel.",
        labels);
    m->delivery_lat = fo_metrics_histogram(
        "fanout_delivery_latency_seconds",
        "Time from consuming an event to an item's final outcome.", labels);
  }
}

fo_dispatch *fo_dispatch_new(fo_queue *q, const fo_dispatch_conf *conf) {
  fo_dispatch *d;

  if (q == NULL || conf == NULL || conf->workers < 1 ||
      conf->on_done == NULL || conf->retry_base_ms < 1 ||
      conf->retry_max_ms < conf->retry_base_ms)
    return NULL;
  d = calloc(1, sizeof(*d));
  if (d == NULL)
    return NULL;
  d->threads = calloc((size_t)conf->workers, sizeof(*d->threads));
  if (d->threads == NULL) {
    free(d);
    return NULL;
  }

  d->q = q;
  d->conf = *conf;
  if (conf->gate != NULL) {
    d->gate = *conf->gate;
    d->has_gate = true;
  }
  d->rng = (uint64_t)fo_now_us() * 0x9E3779B97F4A7C15ull | 1;
  pthread_mutex_init(&d->lock, NULL);
  cond_init_monotonic(&d->retry_cond);
  cond_init_monotonic(&d->idle_cond);
  register_metrics(d);
  return d;
}

void fo_dispatch_set_channel(fo_dispatch *d, fo_channel_kind kind,
                             fo_channel *ch) {
  d->channels[kind] = ch;
}

static uint64_t next_rand(uint64_t *s) {
  /* xorshift64*: jitter needs spread, not cryptographic strength. */
  *s ^= *s >> 12;
  *s ^= *s << 25;
  *s ^= *s >> 27;
  return *s * 0x2545F4914F6CDD1Dull;
}

int64_t fo_dispatch_backoff_ms(int64_t base_ms, int64_t max_ms,
                               uint32_t attempt, int64_t floor_ms,
                               uint64_t *rng) {
  int64_t step = base_ms;

  /* Doubling stops at the ceiling, so it cannot overflow. */
  for (uint32_t i = 1; i < attempt && step < max_ms; i++)
    step = step > max_ms / 2 ? max_ms : step * 2;
  if (step > max_ms)
    step = max_ms;

  /* Equal jitter: never less than half the step, so retries still back
   * off, yet spread so that many failures do not retry in lockstep. */
  step = step / 2 + (int64_t)(next_rand(rng) % (uint64_t)(step / 2 + 1));
  return step < floor_ms ? floor_ms : step;
}

/* Gives an event's item back: final, or abandoned at shutdown. */
static void item_finished(fo_dispatch *d, fo_event *ev, bool abandoned) {
  if (abandoned)
    atomic_store(&ev->abandoned, true);
  if (atomic_fetch_sub(&ev->pending, 1) != 1)
    return;
  if (ev->done_fn != NULL)
    ev->done_fn(ev, !atomic_load(&ev->abandoned), ev->done_arg);
  else
    d->conf.on_done(ev, !atomic_load(&ev->abandoned), d->conf.done_arg);
}

static void wake_drain(fo_dispatch *d) {
  pthread_mutex_lock(&d->lock);
  pthread_cond_broadcast(&d->idle_cond);
  pthread_mutex_unlock(&d->lock);
}

static void count_released(fo_dispatch *d) {
  if (atomic_fetch_sub(&d->in_flight, 1) == 1)
    wake_drain(d);
}

static void inflight_release(fo_dispatch *d, inflight *f, bool abandoned) {
  fo_event *ev = (fo_event *)f->d.event;

  if (f->gate_seen && d->gate.release != NULL)
    d->gate.release(d->gate.self, &f->d);
  free(f);
  item_finished(d, ev, abandoned);
  count_released(d);
}

static void record_final(fo_dispatch *d, inflight *f, const fo_outcome *o) {
  chan_metrics *m = &d->m[f->d.channel];
  const fo_event *ev = f->d.event;

  atomic_fetch_add_explicit(&d->final_by_status[o->status], 1,
                            memory_order_relaxed);
  fo_counter_add(m->status[o->status], 1);
  if (o->status == FO_STATUS_SUPPRESSED && o->suppress > FO_SUP_NONE &&
      o->suppress < FO_SUP_COUNT)
    fo_counter_add(m->suppressed[o->suppress], 1);
  fo_histogram_observe_us(m->delivery_lat, fo_now_us() - ev->consumed_us);

  fo_log(FO_LOG_DEBUG, "dispatch", "delivery",
         "event=\"%s\" user=\"%s\" channel=%s status=%s reason=\"%s\" "
         "attempts=%u provider_id=\"%s\"",
         ev->id, f->d.user, fo_channel_name(f->d.channel),
         fo_status_name(o->status),
         o->status == FO_STATUS_SUPPRESSED ? fo_suppress_name(o->suppress)
                                           : o->reason,
         f->d.attempt, o->provider_id);

  /* Every final outcome reaches the gate, also those decided here
   * (channel_off, expired), so the delivery log has them all. */
  if (d->has_gate && d->gate.final != NULL)
    d->gate.final(d->gate.self, &f->d, o);
  if (d->conf.on_outcome != NULL)
    d->conf.on_outcome(&f->d, o, d->conf.outcome_arg);
}

static void heap_push_locked(fo_dispatch *d, inflight *f) {
  size_t i = d->heap_len++;

  while (i > 0) {
    size_t parent = (i - 1) / 2;

    if (d->heap[parent]->due_ms <= f->due_ms)
      break;
    d->heap[i] = d->heap[parent];
    i = parent;
  }
  d->heap[i] = f;
}

static inflight *heap_pop_locked(fo_dispatch *d) {
  inflight *top = d->heap[0];
  inflight *last = d->heap[--d->heap_len];
  size_t i = 0;

  for (;;) {
    size_t c = 2 * i + 1;

    if (c >= d->heap_len)
      break;
    if (c + 1 < d->heap_len && d->heap[c + 1]->due_ms < d->heap[c]->due_ms)
      c++;
    if (last->due_ms <= d->heap[c]->due_ms)
      break;
    d->heap[i] = d->heap[c];
    i = c;
  }
  if (d->heap_len > 0)
    d->heap[i] = last;
  return top;
}

/* Queues `f` for another attempt; false when it cannot be retried.
 * Known limitation: a waiting retry is held in memory and keeps its
 * partition's commit point back until it finishes. */
static bool schedule_retry(fo_dispatch *d, inflight *f, const fo_outcome *o) {
  const fo_event *ev = f->d.event;
  int64_t delay;
  bool ok = false;

  if (!o->retryable || ev->delivery != FO_DELIVERY_AT_LEAST_ONCE ||
      atomic_load(&d->closed))
    return false;

  pthread_mutex_lock(&d->lock);
  delay = fo_dispatch_backoff_ms(d->conf.retry_base_ms, d->conf.retry_max_ms,
                                 f->d.attempt, o->retry_after_ms, &d->rng);
  if (fo_wall_ms() + delay >= ev->expires_ms)
    goto out;
  if (d->heap_len == d->heap_cap) {
    size_t ncap = d->heap_cap ? d->heap_cap * 2 : 256;
    inflight **n = realloc(d->heap, ncap * sizeof(*n));

    if (n == NULL)
      goto out;
    d->heap = n;
    d->heap_cap = ncap;
  }
  f->due_ms = fo_now_ms() + delay;
  heap_push_locked(d, f);
  pthread_cond_signal(&d->retry_cond);
  ok = true;

out:
  pthread_mutex_unlock(&d->lock);
  if (ok) {
    atomic_fetch_add_explicit(&d->retries, 1, memory_order_relaxed);
    fo_counter_add(d->m[f->d.channel].retries, 1);
  }
  return ok;
}

void fo_delivery_complete(fo_delivery *dl, const fo_outcome *o) {
  inflight *f = (inflight *)dl;
  fo_dispatch *d = dl->engine;

  if (o->status == FO_STATUS_FAILED && schedule_retry(d, f, o))
    return;

  /* After shutdown a retryable failure is not final: the event is given
   * back unfinished and replayed from Kafka after a restart. */
  if (o->status == FO_STATUS_FAILED && o->retryable &&
      atomic_load(&d->closed) &&
      f->d.event->delivery == FO_DELIVERY_AT_LEAST_ONCE) {
    inflight_release(d, f, true);
    return;
  }
  record_final(d, f, o);
  inflight_release(d, f, false);
}

static void complete_here(inflight *f, fo_status status,
                          fo_suppress_reason why, const char *reason) {
  fo_outcome o;

  fo_outcome_init(&o, status);
  o.suppress = why;
  if (reason != NULL)
    snprintf(o.reason, sizeof(o.reason), "%s", reason);
  fo_delivery_complete(&f->d, &o);
}

/* Hands `f` to its channel, waiting while the channel is full. */
static void send(fo_dispatch *d, inflight *f) {
  fo_channel *ch = d->channels[f->d.channel];
  int rc;

  f->d.attempt++;
  f->d.submitted_us = fo_now_us();
  while ((rc = ch->ops->submit(ch->self, &f->d)) == FO_EFULL) {
    if (atomic_load(&d->closed)) {
      inflight_release(d, f, true);
      return;
    }
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
  }
  if (rc == FO_ECLOSED) {
    /* The channel is shutting down: not an outcome, a replay later. */
    inflight_release(d, f, true);
    return;
  }
  if (rc != FO_OK) {
    char why[64];

    snprintf(why, sizeof(why), "submit: %s", fo_strerror(rc));
    complete_here(f, FO_STATUS_FAILED, FO_SUP_NONE, why);
  }
}

/* Takes a batch to its channels: what needs no decision ends here, the
 * rest goes through the policy stage (when there is one) in one call. */
static void route(fo_dispatch *d, inflight **fs, size_t n) {
  fo_delivery *ask[BATCH];
  inflight *asked[BATCH];
  fo_verdict verdicts[BATCH];
  size_t m = 0;
  int64_t now = fo_wall_ms();

  for (size_t i = 0; i < n; i++) {
    inflight *f = fs[i];

    if (d->channels[f->d.channel] == NULL)
      complete_here(f, FO_STATUS_SUPPRESSED, FO_SUP_CHANNEL_OFF, NULL);
    else if (now >= f->d.event->expires_ms)
      complete_here(f, FO_STATUS_SUPPRESSED, FO_SUP_EXPIRED, NULL);
    else if (!d->has_gate || f->gate_passed)
      send(d, f);
    else {
      f->gate_seen = true;
      ask[m] = &f->d;
      asked[m++] = f;
    }
  }
  if (m == 0)
    return;

  d->gate.check(d->gate.self, ask, m, verdicts);
  for (size_t i = 0; i < m; i++) {
    inflight *f = asked[i];
    fo_verdict *v = &verdicts[i];

    switch (v->kind) {
    case FO_VERDICT_SEND:
      f->gate_passed = true;
      send(d, f);
      break;
    case FO_VERDICT_FINAL:
      fo_delivery_complete(&f->d, &v->outcome);
      break;
    case FO_VERDICT_RETRY:
      v->outcome.status = FO_STATUS_FAILED;
      v->outcome.retryable = true;
      v->outcome.retry_after_ms = v->retry_after_ms;
      fo_delivery_complete(&f->d, &v->outcome);
      break;
    }
  }
}

static inflight *new_inflight(fo_dispatch *d, const fo_work *w) {
  inflight *f = malloc(sizeof(*f));
  fo_event *ev = w->event;

  if (f == NULL) {
    /* Without memory there is no outcome to record; give the event back
     * so that its offset is not committed and it is replayed. */
    static fo_ratelimit rl;

    fo_log_rl(&rl, 10000, FO_LOG_ERROR, "dispatch", "out of memory",
              "event=\"%s\"", ev->id);
    item_finished(d, ev, true);
    count_released(d);
    return NULL;
  }
  memset(f, 0, sizeof(*f));
  f->d.event = ev;
  f->d.user = ev->to[w->user];
  f->d.channel = w->channel;
  f->d.engine = d;
  fo_histogram_observe_us(d->m[w->channel].dispatch_lat,
                          fo_now_us() - ev->consumed_us);
  return f;
}

static void *worker_main(void *arg) {
  fo_dispatch *d = arg;
  fo_work batch[BATCH];
  inflight *fs[BATCH];
  size_t m;

  while (!atomic_load(&d->closed)) {
    size_t n = fo_queue_pop_many(d->q, batch, BATCH, POP_WAIT_MS);

    if (n == 0) {
      if (atomic_load(&d->stopping))
        break;
      continue;
    }

    /* Counted before the first submit, so a drain never sees an empty
     * queue and nothing in flight while this batch is in hand. */
    atomic_fetch_add(&d->in_flight, n);
    m = 0;
    for (size_t i = 0; i < n; i++) {
      inflight *f = new_inflight(d, &batch[i]);

      if (f != NULL)
        fs[m++] = f;
    }
    route(d, fs, m);
  }

  if (atomic_fetch_sub(&d->workers_running, 1) == 1)
    wake_drain(d);
  return NULL;
}

static void *retry_main(void *arg) {
  fo_dispatch *d = arg;

  pthread_mutex_lock(&d->lock);
  while (!atomic_load(&d->closed)) {
    struct timespec ts;
    int64_t now = fo_now_ms();

    if (d->heap_len > 0 && d->heap[0]->due_ms <= now) {
      inflight *f = heap_pop_locked(d);

      pthread_mutex_unlock(&d->lock);
      route(d, &f, 1);
      pthread_mutex_lock(&d->lock);
      continue;
    }
    deadline_in(&ts, d->heap_len > 0 ? d->heap[0]->due_ms - now : 1000);
    pthread_cond_timedwait(&d->retry_cond, &d->lock, &ts);
  }
  pthread_mutex_unlock(&d->lock);
  return NULL;
}

int fo_dispatch_start(fo_dispatch *d) {
  if (pthread_create(&d->retry_thread, NULL, retry_main, d) != 0)
    return FO_EIO;
  d->retry_started = true;

  for (int i = 0; i < d->conf.workers; i++) {
    if (pthread_create(&d->threads[i], NULL, worker_main, d) != 0) {
      fo_log_error("dispatch", "cannot start worker", "errno=%d", errno);
      return FO_EIO;
    }
    d->started++;
    atomic_fetch_add(&d->workers_running, 1);
  }
  fo_log_info("dispatch", "started", "workers=%d", d->conf.workers);
  return FO_OK;
}

static void stop_threads(fo_dispatch *d) {
  atomic_store(&d->stopping, true);
  pthread_mutex_lock(&d->lock);
  atomic_store(&d->closed, true);
  pthread_cond_broadcast(&d->retry_cond);
  pthread_mutex_unlock(&d->lock);
  fo_queue_close(d->q);

  for (int i = 0; i < d->started; i++)
    pthread_join(d->threads[i], NULL);
  d->started = 0;
  if (d->retry_started)
    pthread_join(d->retry_thread, NULL);
  d->retry_started = false;
}

int fo_dispatch_drain(fo_dispatch *d, int timeout_ms) {
  struct timespec ts;
  int rc = FO_OK;

  atomic_store(&d->stopping, true);
  fo_queue_close(d->q);

  /* Workers leave once the closed queue is empty; then wait for the items
   * that channels or the retry timer still hold. */
  deadline_in(&ts, timeout_ms);
  pthread_mutex_lock(&d->lock);
  while (atomic_load(&d->workers_running) > 0 ||
         atomic_load(&d->in_flight) > 0) {
    if (pthread_cond_timedwait(&d->idle_cond, &d->lock, &ts) == ETIMEDOUT) {
      if (atomic_load(&d->workers_running) > 0 ||
          atomic_load(&d->in_flight) > 0)
        rc = FO_ETIMEDOUT;
      break;
    }
  }
  pthread_mutex_unlock(&d->lock);

  stop_threads(d);
  return rc;
}

void fo_dispatch_free(fo_dispatch *d) {
  fo_work w;

  if (d == NULL)
    return;
  stop_threads(d);

  /* What never reached a final outcome goes back as unfinished. */
  while (d->heap_len > 0)
    inflight_release(d, heap_pop_locked(d), true);
  while (fo_queue_pop(d->q, &w, 0) == FO_OK)
    item_finished(d, w.event, true);

  pthread_cond_destroy(&d->retry_cond);
  pthread_cond_destroy(&d->idle_cond);
  pthread_mutex_destroy(&d->lock);
  free(d->heap);
  free(d->threads);
  free(d);
}

void fo_dispatch_get_stats(fo_dispatch *d, fo_dispatch_stats *out) {
  memset(out, 0, sizeof(*out));
  out->in_flight = atomic_load(&d->in_flight);
  pthread_mutex_lock(&d->lock);
  out->retry_waiting = d->heap_len;
  pthread_mutex_unlock(&d->lock);
  for (int s = 0; s < FO_STATUS_COUNT; s++)
    out->final_by_status[s] = atomic_load(&d->final_by_status[s]);
  out->retries = atomic_load(&d->retries);
}

/* Names and helpers of the outcome contract. */

void fo_outcome_init(fo_outcome *o, fo_status status) {
  memset(o, 0, sizeof(*o));
  o->status = status;
}

const char *fo_status_name(fo_status s) {
  static const char *const names[FO_STATUS_COUNT] = {
      "sent", "failed", "deferred", "suppressed"};

  return (unsigned)s < FO_STATUS_COUNT ? names[s] : "unknown";
}

const char *fo_suppress_name(fo_suppress_reason r) {
  static const char *const names[FO_SUP_COUNT] = {
      "",          "opted_out", "capped",       "no_address", "invalid_token",
      "expired",   "duplicate", "unknown_user", "channel_off"};

  return (unsigned)r < FO_SUP_COUNT ? names[r] : "unknown";
}
