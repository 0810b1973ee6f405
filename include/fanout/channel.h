/* SPDX-License-Identifier: MIT */
/*
 * The channel interface: how the dispatcher hands one (event, user,
 * channel) delivery to a channel worker, and how the worker reports the
 * outcome.
 *
 * Contract between the dispatcher and a channel:
 * - submit() is called from a dispatcher thread. It must not block on the
 *   network; a channel that needs time queues the delivery and returns.
 * - When submit() returns FO_OK, the channel calls fo_delivery_complete()
 *   exactly once for that delivery, from any thread, possibly before
 *   submit() returns. When submit() returns an error, it never does, and
 *   the dispatcher records a failure itself.
 * - submit() may return FO_EFULL when the channel's own in-flight limit is
 *   reached; the dispatcher then waits and submits again, so a slow
 *   provider fills only its own channel.
 * - flush() waits until every submitted delivery has completed or the
 *   timeout passes; shutdown() makes submit() refuse new work
 *   (FO_ECLOSED), completes what is queued, and returns only once its
 *   threads are out of fo_delivery_complete(); destroy() frees the
 *   channel after both.
 */
#ifndef FANOUT_CHANNEL_H
#define FANOUT_CHANNEL_H

#include <stdbool.h>
#include <stdint.h>

#include "fanout/event.h"

/* The four final statuses of the outcome contract. */
typedef enum fo_status {
  FO_STATUS_SENT = 0,
  FO_STATUS_FAILED,
  FO_STATUS_DEFERRED,
  FO_STATUS_SUPPRESSED
} fo_status;
#define FO_STATUS_COUNT 4

/* Reasons of a `suppressed` outcome. */
typedef enum fo_suppress_reason {
  FO_SUP_NONE = 0,
  FO_SUP_OPTED_OUT,
  FO_SUP_CAPPED,
  FO_SUP_NO_ADDRESS,
  FO_SUP_INVALID_TOKEN,
  FO_SUP_EXPIRED,
  FO_SUP_DUPLICATE,
  FO_SUP_UNKNOWN_USER,
  FO_SUP_CHANNEL_OFF
} fo_suppress_reason;
#define FO_SUP_COUNT 9

/*
 * What a channel reports for one attempt. A `failed` outcome with
 * `retryable` set is retried by the engine with backoff and jitter, after
 * at least `retry_after_ms` when the provider said so, within the event's
 * ttl and only for at-least-once events; otherwise it is final.
 */
typedef struct fo_outcome {
  fo_status status;
  fo_suppress_reason suppress;   /* with FO_STATUS_SUPPRESSED */
  bool retryable;                /* with FO_STATUS_FAILED */
  int64_t retry_after_ms;        /* 0: engine's own backoff */
  char reason[128];              /* provider's reason, "" when none */
  char provider_id[96];          /* provider message id, "" when none */
} fo_outcome;

typedef struct fo_delivery fo_delivery;
struct fo_recipient;

/*
 * One delivery in flight. The dispatcher owns it; a channel may read
 * every field and keep the pointer until it calls fo_delivery_complete(),
 * after which the pointer is invalid.
 */
struct fo_delivery {
  const fo_event *event;
  const char *user;              /* points into event */
  fo_channel_kind channel;
  uint32_t attempt;              /* 1 for the first try */
  int64_t submitted_us;          /* monotonic, when submit() was called */
  void *engine;                  /* dispatcher's own; channels ignore it */
  void *channel_ctx;             /* free for the channel's use */

  /* The user's addresses and preferences as the policy stage saw them
   * (prefs/store.h); NULL when fanoutd runs without a user store. Valid
   * until the delivery completes. */
  const struct fo_recipient *recipient;
  unsigned gate_flags;           /* the policy stage's own */
};

typedef struct fo_channel_ops {
  const char *name;
  int (*submit)(void *self, fo_delivery *d);
  int (*flush)(void *self, int timeout_ms);
  void (*shutdown)(void *self);
  void (*destroy)(void *self);
} fo_channel_ops;

typedef struct fo_channel {
  const fo_channel_ops *ops;
  void *self;
} fo_channel;

/*
 * Reports the outcome of `d`. Thread-safe; call exactly once per delivery
 * that submit() accepted. `d` is invalid after the call. Does not take
 * ownership of `o`.
 */
void fo_delivery_complete(fo_delivery *d, const fo_outcome *o);

/* Fills *o as a final outcome of the given status, with no reason. */
void fo_outcome_init(fo_outcome *o, fo_status status);

/* Static names: "sent", "failed", ...; "opted_out", "channel_off", ... */
const char *fo_status_name(fo_status s);
const char *fo_suppress_name(fo_suppress_reason r);

#endif /* FANOUT_CHANNEL_H */
