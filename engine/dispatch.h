/* SPDX-License-Identifier: MIT */
/*
 * The dispatcher: worker threads that take (user, channel) work items from
 * the queue, hand each to its channel, and gather the outcomes. A failed
 * attempt that the channel marks retryable is tried again after an
 * exponential backoff with jitter, within the event's ttl, for
 * at-least-once events only. When every item of an event has a final
 * outcome the dispatcher tells its owner through the done callback.
 */
#ifndef FO_DISPATCH_H
#define FO_DISPATCH_H

#include <stdbool.h>
#include <stdint.h>

#include "fanout/channel.h"
#include "queue.h"

typedef struct fo_dispatch fo_dispatch;

/*
 * Called once per event, from a dispatcher or channel thread. `finished`
 * is true when every item reached a final outcome, false when the
 * dispatcher gave the event up at shutdown (its work must be replayed).
 * The callee takes ownership of `ev` back.
 */
typedef void (*fo_dispatch_done_fn)(fo_event *ev, bool finished, void *arg);

/* An event may name its own done callback (ev->done_fn), which then
 * replaces the dispatcher's for that event; see fo_event. */

/* Called for every final outcome, before the event's done callback. */
typedef void (*fo_dispatch_outcome_fn)(const fo_delivery *d,
                                       const fo_outcome *o, void *arg);

/* What the policy stage decides about one delivery before it is sent. */
typedef enum fo_verdict_kind {
  FO_VERDICT_SEND = 0,          /* hand it to its channel */
  FO_VERDICT_FINAL,             /* end it with `outcome` */
  FO_VERDICT_RETRY              /* decide again after `retry_after_ms` */
} fo_verdict_kind;

typedef struct fo_verdict {
  fo_verdict_kind kind;
  fo_outcome outcome;           /* with FO_VERDICT_FINAL */
  int64_t retry_after_ms;       /* with FO_VERDICT_RETRY */
} fo_verdict;

/*
 * The policy stage, seen from the dispatcher. check() decides a batch of
 * deliveries at once (so that shared state costs one round trip per
 * batch), from a worker or the retry thread; it may set d->recipient and
 * d->gate_flags. final() sees every final outcome, also of deliveries
 * that check() never saw (a channel that is off, an expired event), from
 * any thread. release() is called once when a
 * delivery that check() has seen is freed, final or given up, so the gate
 * can drop what it attached.
 */
typedef struct fo_gate {
  void (*check)(void *self, fo_delivery *const *ds, size_t n,
                fo_verdict *out);
  void (*final)(void *self, const fo_delivery *d, const fo_outcome *o);
  void (*release)(void *self, fo_delivery *d);
  void *self;
} fo_gate;

typedef struct fo_dispatch_conf {
  int workers;                  /* threads popping the queue, >= 1 */
  int64_t retry_base_ms;        /* first backoff step */
  int64_t retry_max_ms;         /* backoff ceiling */
  fo_dispatch_done_fn on_done;  /* required */
  void *done_arg;
  fo_dispatch_outcome_fn on_outcome;  /* optional */
  void *outcome_arg;
  const fo_gate *gate;          /* optional; copied */
} fo_dispatch_conf;

typedef struct fo_dispatch_stats {
  uint64_t in_flight;           /* popped, no final outcome yet */
  uint64_t retry_waiting;       /* waiting for a retry */
  uint64_t final_by_status[FO_STATUS_COUNT];
  uint64_t retries;
} fo_dispatch_stats;

/*
 * Creates a dispatcher over `q`. Does not take ownership of `q`, which
 * must outlive it. Returns NULL when out of memory or `conf` is invalid.
 */
fo_dispatch *fo_dispatch_new(fo_queue *q, const fo_dispatch_conf *conf);

/*
 * Routes a channel kind to `ch` (NULL: the channel is off, and its items
 * end `suppressed` with reason channel_off). Call before start. Does not
 * take ownership of `ch`, which must outlive the dispatcher.
 */
void fo_dispatch_set_channel(fo_dispatch *d, fo_channel_kind kind,
                             fo_channel *ch);

int fo_dispatch_start(fo_dispatch *d);

/*
 * Closes the queue and waits until every queued, in-flight and
 * retry-waiting item has a final outcome, at most `timeout_ms`. Returns
 * FO_OK when all work finished, FO_ETIMEDOUT otherwise; either way the
 * workers have stopped when it returns, and what is left is given back as
 * unfinished by fo_dispatch_free().
 */
int fo_dispatch_drain(fo_dispatch *d, int timeout_ms);

/*
 * Stops the threads (draining with no wait if fo_dispatch_drain() was not
 * called), gives back every event still held as unfinished, and frees the
 * dispatcher. Channels must have been shut down first, so that none
 * completes a delivery during or after the call.
 */
void fo_dispatch_free(fo_dispatch *d);

void fo_dispatch_get_stats(fo_dispatch *d, fo_dispatch_stats *out);

/* The backoff before attempt `attempt + 1`: exponential from base, capped,
 * with equal jitter (half fixed, half random), and at least `floor_ms`. */
int64_t fo_dispatch_backoff_ms(int64_t base_ms, int64_t max_ms,
                               uint32_t attempt, int64_t floor_ms,
                               uint64_t *rng);

#endif /* FO_DISPATCH_H */
