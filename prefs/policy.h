/* SPDX-License-Identifier: MIT */
/*
 * The policy stage: for each (event, user, channel), in this order, an
 * unknown user, a channel or category opt-out, a missing address, quiet
 * hours (the delivery is deferred to the window's end), the dedup claim
 * and the rate cap; whatever passes goes to its channel. Users are cached
 * in process and dropped from the cache when PostgreSQL announces a
 * change (LISTEN/NOTIFY), so the hot path makes no database round trip.
 *
 * The policy plugs into the dispatcher as its gate (engine/dispatch.h),
 * and releases deferred deliveries into the queue when they are due.
 */
#ifndef FO_POLICY_H
#define FO_POLICY_H

#include <stddef.h>
#include <stdint.h>

#include "dispatch.h"
#include "limiter.h"
#include "queue.h"
#include "store.h"

typedef struct fo_policy fo_policy;

typedef struct fo_policy_conf {
  fo_store *store;              /* required */
  fo_limiter *limits;            /* NULL: no caps, dedup by the log only */
  /* Extra connections to the same Redis, so that the dispatcher's workers
   * do not wait for each other's round trips; may be empty. */
  fo_limiter *const *more_limits;
  size_t nmore_limits;
  fo_dlog *dlog;                /* NULL: outcomes are not logged */
  size_t cache_users;           /* most users kept in the cache */
  int64_t claim_ms;             /* how long a dedup claim holds */
  int64_t poll_ms;              /* deferred poller period */
} fo_policy_conf;

/* Creates the policy and subscribes to user changes. Does not take
 * ownership of the store, limits or log, which must outlive it. */
int fo_policy_new(const fo_policy_conf *conf, fo_policy **out);

/* The gate to give the dispatcher; valid as long as the policy. */
const fo_gate *fo_policy_gate(fo_policy *p);

/* Starts releasing due deferred deliveries into `q`. */
int fo_policy_start_poller(fo_policy *p, fo_queue *q);

/* Stops the poller (before the queue closes). */
void fo_policy_stop_poller(fo_policy *p);

/* Drops one user (NULL: everyone) from the cache. Thread-safe. */
void fo_policy_invalidate(fo_policy *p, const char *user);

/* Writes the pending dedup marks; call before stopping. */
void fo_policy_flush(fo_policy *p);

void fo_policy_free(fo_policy *p);

#endif /* FO_POLICY_H */
