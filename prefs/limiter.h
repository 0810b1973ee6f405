/* SPDX-License-Identifier: MIT */
/*
 * Shared per-user limits in Redis: rate caps and deduplication claims,
 * decided for a whole batch of deliveries in one pipelined round trip
 * (one script call per up to 128 decisions, each decision atomic), so
 * that every fanoutd instance sees the same counts.
 *
 * Threads: a fo_limiter is one Redis connection with a mutex; callers on
 * several threads share it, or open one each.
 */
#ifndef FO_LIMITER_H
#define FO_LIMITER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fanout/event.h"
#include "prefs.h"

typedef struct fo_limiter fo_limiter;

/*
 * Connects to `url` ("redis://host:port[/db]", optional password as
 * redis://:secret@host:port). A connection that fails now is retried
 * later, so fanoutd starts with Redis down. `fail_closed` makes caps refuse
 * (instead of pass) while Redis is unreachable. Returns FO_OK and *out,
 * or FO_EINVAL for a bad URL, or FO_ENOMEM.
 */
int fo_limiter_open(const char *url, bool fail_closed, fo_limiter **out);
void fo_limiter_close(fo_limiter *l);

/* True when Redis answers PING now (for /healthz). */
bool fo_limiter_ping(fo_limiter *l);

/* One decision of a batch. Inputs first, then the result. */
typedef enum fo_limit_kind {
  FO_LIMIT_CAP = 0,             /* count one against a cap */
  FO_LIMIT_CLAIM,               /* claim a delivery before sending */
  FO_LIMIT_DONE,                /* the delivery was sent: remember it */
  FO_LIMIT_RELEASE,             /* it was not sent: drop the claim */
  FO_LIMIT_RATE                 /* count one send against a sender's rate */
} fo_limit_kind;

typedef enum fo_limit_result {
  FO_LIMIT_PASS = 0,            /* under the cap / claim taken */
  FO_LIMIT_CAPPED,              /* the cap is reached in this window */
  FO_LIMIT_DUPLICATE,           /* already sent */
  FO_LIMIT_BUSY,                /* claimed by another attempt right now */
  FO_LIMIT_UNAVAILABLE,         /* Redis unreachable: caller decides */
  FO_LIMIT_THROTTLED            /* the sender's rate is used up this second */
} fo_limit_result;

typedef struct fo_limit_op {
  fo_limit_kind kind;
  const char *user;             /* not with FO_LIMIT_RATE */
  fo_channel_kind channel;
  /* FO_LIMIT_CAP */
  fo_cap cap;
  int64_t now_ms;               /* also FO_LIMIT_RATE */
  /* FO_LIMIT_RATE */
  const char *sender;           /* e.g. the SMS sender number */
  int64_t rate;                 /* sends per second, > 0 */
  /* FO_LIMIT_CLAIM / DONE / RELEASE */
  const char *event_id;
  int64_t ttl_ms;               /* how long to remember a sent delivery */
  int64_t claim_ms;             /* how long a claim holds */
  /* result */
  fo_limit_result result;
  int64_t retry_after_ms;       /* with BUSY: when the claim lapses;
                                 * with THROTTLED: the next second */
} fo_limit_op;

/*
 * Decides `n` operations in one pipelined round trip. A cap counts only
 * when it passes (a capped delivery does not use the window up); windows
 * are fixed, aligned on UTC minutes, hours and days. A claim is atomic:
 * of two instances claiming the same delivery, one gets PASS and the other
 * BUSY, and a delivery marked DONE gets DUPLICATE for `ttl_ms`. A rate
 * counts sends per sender in fixed 1-second windows (UTC seconds): PASS
 * counts one, THROTTLED counts nothing and says when the next window
 * starts.
 * Returns FO_OK (each op has its result) or FO_EIO when Redis is
 * unreachable (each op then has FO_LIMIT_UNAVAILABLE, except caps when
 * fail-open, which get PASS, and when fail-closed, CAPPED).
 */
int fo_limiter_decide(fo_limiter *l, fo_limit_op *ops, size_t n);

#endif /* FO_LIMITER_H */
