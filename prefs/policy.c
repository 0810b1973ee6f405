/* SPDX-License-Identifier: MIT */
/*
 * The policy stage: the user cache, the decision order, dedup marks, the
 * delivery log hand-off and the deferred poller.
 */
#include "policy.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fanout/common.h"
#include "log.h"
#include "metrics.h"

#define SHARDS 64
#define MARKS_MAX 4096
#define FLUSH_MS 50
#define STORE_RETRY_MS 1000
#define DEDUP_MARGIN_MS (3600 * 1000)
#define BATCH_OPS 512

/* gate_flags bits */
#define GF_CLAIMED 1u           /* this attempt holds a dedup claim */

typedef struct entry {
  struct entry *next;           /* hash chain */
  struct entry *older;          /* insertion order, for eviction */
  struct entry *newer;
  uint64_t hash;
  char *user;
  fo_recipient *r;              /* NULL: no such user */
} entry;

typedef struct shard {
  pthread_mutex_t lock;
  entry **buckets;
  size_t nbuckets;              /* power of two */
  size_t count;
  entry *oldest;
  entry *newest;
  uint64_t gen;                 /* bumped by every invalidation */
} shard;

/* A dedup mark waiting to be written: done (sent) or release. */
typedef struct mark {
  fo_limit_kind kind;
  char *key_event;
  char *user;
  fo_channel_kind channel;
  int64_t ttl_ms;
} mark;

struct fo_policy {
  fo_policy_conf conf;
  fo_gate gate;
  shard shards[SHARDS];
  size_t shard_cap;

  pthread_mutex_t marks_lock;
  mark marks[MARKS_MAX];
  size_t nmarks;

  pthread_t flusher;
  atomic_bool stop;
  bool flusher_started;

  pthread_t poller;
  atomic_bool poller_stop;
  bool poller_started;
  fo_queue *queue;

  fo_counter *m_hits;
  fo_counter *m_misses;
  fo_counter *m_invalidations;
  fo_counter *m_deferred;
  fo_counter *m_released;
  fo_counter *m_store_errors;
  fo_histogram *m_check;
};

static uint64_t hash_str(const char *s) {
  uint64_t h = 1469598103934665603ull;

  while (*s != '\0') {
    h ^= (unsigned char)*s++;
    h *= 1099511628211ull;
  }
  return h;
}

/* The shard comes from the hash's top bits; buckets inside a shard use its
 * low bits, so the two choices stay independent. */
static shard *shard_of(fo_policy *p, uint64_t h) {
  return &p->shards[h >> 58];
}

/* ---- the user cache ---- */

static void entry_free(entry *e) {
  if (e->r != NULL)
    fo_recipient_unref(e->r);
  free(e->user);
  free(e);
}

static void unlink_order(shard *s, entry *e) {
  if (e->older != NULL)
    e->older->newer = e->newer;
  else
    s->oldest = e->newer;
  if (e->newer != NULL)
    e->newer->older = e->older;
  else
    s->newest = e->older;
}

static void remove_entry(shard *s, entry *e) {
  entry **pp = &s->buckets[e->hash & (s->nbuckets - 1)];

  while (*pp != e)
    pp = &(*pp)->next;
  *pp = e->next;
  unlink_order(s, e);
  s->count--;
  entry_free(e);
}

static entry *find(shard *s, const char *user, uint64_t h) {
  for (entry *e = s->buckets[h & (s->nbuckets - 1)]; e != NULL; e = e->next)
    if (e->hash == h && strcmp(e->user, user) == 0)
      return e;
  return NULL;
}

static void grow(shard *s) {
  size_t n = s->nbuckets * 2;
  entry **b = calloc(n, sizeof(*b));

  if (b == NULL)
    return;
  for (size_t i = 0; i < s->nbuckets; i++) {
    entry *e = s->buckets[i];

    while (e != NULL) {
      entry *next = e->next;

      e->next = b[e->hash & (n - 1)];
      b[e->hash & (n - 1)] = e;
      e = next;
    }
  }
  free(s->buckets);
  s->buckets = b;
  s->nbuckets = n;
}

/* Inserts what was loaded, unless a change arrived while loading. Takes
 * one reference of `r` for the cache when it keeps it. */
static void cache_put(fo_policy *p, shard *s, const char *user, uint64_t h,
                      fo_recipient *r, uint64_t gen) {
  entry *e;

  pthread_mutex_lock(&s->lock);
  if (s->gen != gen || find(s, user, h) != NULL)
    goto out;
  e = calloc(1, sizeof(*e));
  if (e == NULL || (e->user = strdup(user)) == NULL) {
    free(e);
    goto out;
  }
  e->hash = h;
  e->r = r;
  if (r != NULL)
    fo_recipient_ref(r);
  e->next = s->buckets[h & (s->nbuckets - 1)];
  s->buckets[h & (s->nbuckets - 1)] = e;
  e->older = s->newest;
  if (s->newest != NULL)
    s->newest->newer = e;
  else
    s->oldest = e;
  s->newest = e;
  s->count++;
  if (s->count > s->nbuckets)
    grow(s);
  while (s->count > p->shard_cap)
    remove_entry(s, s->oldest);

out:
  pthread_mutex_unlock(&s->lock);
}

/*
 * The recipient of `user` with a reference for the caller: FO_OK,
 * FO_ENOENT (no such user), or FO_EIO (the store cannot say now).
 */
static int recipient_get(fo_policy *p, const char *user, fo_recipient **out) {
  uint64_t h = hash_str(user);
  shard *s = shard_of(p, h);
  fo_recipient *r = NULL;
  uint64_t gen;
  entry *e;
  int rc;

  pthread_mutex_lock(&s->lock);
  e = find(s, user, h);
  if (e != NULL) {
    r = e->r;
    if (r != NULL)
      fo_recipient_ref(r);
    pthread_mutex_unlock(&s->lock);
    fo_counter_add(p->m_hits, 1);
    *out = r;
    return r != NULL ? FO_OK : FO_ENOENT;
  }
  gen = s->gen;
  pthread_mutex_unlock(&s->lock);

  fo_counter_add(p->m_misses, 1);
  rc = fo_store_load_recipient(p->conf.store, user, &r);
  if (rc == FO_OK || rc == FO_ENOENT)
    cache_put(p, s, user, h, rc == FO_OK ? r : NULL, gen);
  if (rc != FO_OK && rc != FO_ENOENT)
    fo_counter_add(p->m_store_errors, 1);
  *out = rc == FO_OK ? r : NULL;
  return rc;
}

void fo_policy_invalidate(fo_policy *p, const char *user) {
  fo_counter_add(p->m_invalidations, 1);
  if (user == NULL) {
    for (size_t i = 0; i < SHARDS; i++) {
      shard *s = &p->shards[i];

      pthread_mutex_lock(&s->lock);
      while (s->oldest != NULL)
        remove_entry(s, s->oldest);
      s->gen++;
      pthread_mutex_unlock(&s->lock);
    }
    return;
  }

  uint64_t h = hash_str(user);
  shard *s = shard_of(p, h);
  entry *e;

  pthread_mutex_lock(&s->lock);
  e = find(s, user, h);
  if (e != NULL)
    remove_entry(s, e);
  s->gen++;
  pthread_mutex_unlock(&s->lock);
}

static void on_user_change(const char *user, void *arg) {
  fo_policy *p = arg;

  fo_log_debug("policy", "user changed, cache entry dropped", "user=\"%s\"",
               user != NULL ? user : "(all)");
  fo_policy_invalidate(p, user);
}

/* ---- dedup marks, written in batches ---- */

static void add_mark(fo_policy *p, fo_limit_kind kind, const fo_delivery *d,
                     int64_t ttl_ms) {
  mark m = {.kind = kind, .channel = d->channel, .ttl_ms = ttl_ms};

  m.key_event = strdup(d->event->id);
  m.user = strdup(d->user);
  if (m.key_event == NULL || m.user == NULL) {
    free(m.key_event);
    free(m.user);
    return;
  }
  pthread_mutex_lock(&p->marks_lock);
  if (p->nmarks == MARKS_MAX) {
    /* Losing a mark only risks a repeat, never a loss. */
    static fo_ratelimit rl;

    pthread_mutex_unlock(&p->marks_lock);
    fo_log_rl(&rl, 10000, FO_LOG_WARN, "policy",
              "dedup marks backlog full, dropping one", "");
    free(m.key_event);
    free(m.user);
    return;
  }
  p->marks[p->nmarks++] = m;
  pthread_mutex_unlock(&p->marks_lock);
}

/* Moves pending marks into `ops` (up to `cap`); returns how many. The
 * strings move too: free them with free_mark_ops(). */
static size_t take_marks(fo_policy *p, fo_limit_op *ops, size_t cap) {
  size_t n = 0;

  pthread_mutex_lock(&p->marks_lock);
  while (p->nmarks > 0 && n < cap) {
    mark *m = &p->marks[--p->nmarks];

    memset(&ops[n], 0, sizeof(ops[n]));
    ops[n].kind = m->kind;
    ops[n].event_id = m->key_event;
    ops[n].user = m->user;
    ops[n].channel = m->channel;
    ops[n].ttl_ms = m->ttl_ms;
    n++;
  }
  pthread_mutex_unlock(&p->marks_lock);
  return n;
}

static void free_mark_ops(fo_limit_op *ops, size_t n) {
  for (size_t i = 0; i < n; i++) {
    free((char *)ops[i].event_id);
    free((char *)ops[i].user);
  }
}

void fo_policy_flush(fo_policy *p) {
  fo_limit_op ops[256];
  size_t n;

  if (p->conf.limits == NULL)
    return;
  while ((n = take_marks(p, ops, 256)) > 0) {
    fo_limiter_decide(p->conf.limits, ops, n);
    free_mark_ops(ops, n);
  }
}

static void *flusher_main(void *arg) {
  fo_policy *p = arg;
  struct timespec ts = {0, FLUSH_MS * 1000000L};

  while (!atomic_load(&p->stop)) {
    nanosleep(&ts, NULL);
    fo_policy_flush(p);
  }
  return NULL;
}

/* The Redis connection for the calling thread: each thread keeps the one
 * it was given first, and threads are spread over the connections. */
static fo_limiter *limiter_for_thread(fo_policy *p) {
  static atomic_uint next;
  static _Thread_local int slot = -1;
  size_t n = 1 + p->conf.nmore_limits;

  if (slot < 0)
    slot = (int)(atomic_fetch_add(&next, 1) % 64);
  if ((size_t)slot % n == 0)
    return p->conf.limits;
  return p->conf.more_limits[(size_t)slot % n - 1];
}

/* ---- decisions ---- */

static void final_suppressed(fo_verdict *v, fo_suppress_reason why) {
  v->kind = FO_VERDICT_FINAL;
  fo_outcome_init(&v->outcome, FO_STATUS_SUPPRESSED);
  v->outcome.suppress = why;
}

static void retry_later(fo_verdict *v, const char *why, int64_t after_ms) {
  v->kind = FO_VERDICT_RETRY;
  fo_outcome_init(&v->outcome, FO_STATUS_FAILED);
  snprintf(v->outcome.reason, sizeof(v->outcome.reason), "%s", why);
  v->retry_after_ms = after_ms;
}

/* Address check: true when the channel has somewhere to go. */
static bool has_address(const fo_recipient *r, fo_channel_kind ch,
                        fo_suppress_reason *why) {
  size_t valid = 0;

  switch (ch) {
  case FO_CH_PUSH:
    for (size_t i = 0; i < r->ndevices; i++)
      valid += r->devices[i].invalid_since_ms == 0;
    *why = r->ndevices > 0 ? FO_SUP_INVALID_TOKEN : FO_SUP_NO_ADDRESS;
    return valid > 0;
  case FO_CH_EMAIL:
    *why = FO_SUP_NO_ADDRESS;
    return r->email != NULL && r->email[0] != '\0';
  case FO_CH_SMS:
    *why = FO_SUP_NO_ADDRESS;
    return r->phone != NULL && r->phone[0] != '\0';
  case FO_CH_INAPP:
    return true;
  }
  return false;
}

/* Stores a delivery for the end of the quiet window. */
static void defer(fo_policy *p, const fo_delivery *d, int64_t end_ms,
                  fo_verdict *v) {
  const fo_event *ev = d->event;
  char *doc;
  int rc;

  if (end_ms >= ev->expires_ms) {
    final_suppressed(v, FO_SUP_EXPIRED);
    return;
  }
  /* A replay of an event whose deferred delivery was already released
   * and sent must not be deferred again. */
  if (fo_store_delivery_sent(p->conf.store, ev->id, d->user, d->channel) ==
      FO_OK) {
    final_suppressed(v, FO_SUP_DUPLICATE);
    return;
  }
  doc = json_dumps(ev->root, JSON_COMPACT);
  if (doc == NULL) {
    retry_later(v, "out of memory", STORE_RETRY_MS);
    return;
  }
  rc = fo_store_defer(p->conf.store, doc, d->user, d->channel, end_ms,
                      ev->expires_ms);
  free(doc);
  if (rc != FO_OK) {
    retry_later(v, "user store unavailable", STORE_RETRY_MS);
    return;
  }
  fo_counter_add(p->m_deferred, 1);
  v->kind = FO_VERDICT_FINAL;
  fo_outcome_init(&v->outcome, FO_STATUS_DEFERRED);
}

/* The steps that need only the user: returns true when the delivery is
 * still open after them. */
static bool check_user(fo_policy *p, fo_delivery *d, int64_t now,
                       fo_verdict *v) {
  fo_recipient *r = NULL;
  fo_suppress_reason why = FO_SUP_NO_ADDRESS;
  const fo_event *ev = d->event;
  int64_t end;
  int rc;

  /* A delivery decided again (after a retry) drops what the last
   * decision attached. */
  if (d->recipient != NULL) {
    fo_recipient_unref((fo_recipient *)d->recipient);
    d->recipient = NULL;
  }

  rc = recipient_get(p, d->user, &r);
  if (rc == FO_ENOENT) {
    final_suppressed(v, FO_SUP_UNKNOWN_USER);
    return false;
  }
  if (rc != FO_OK) {
    static fo_ratelimit rl;

    fo_log_rl(&rl, 10000, FO_LOG_WARN, "policy",
              "user store unavailable, deliveries wait", "error=%s",
              fo_strerror(rc));
    retry_later(v, "user store unavailable", STORE_RETRY_MS);
    return false;
  }
  d->recipient = r;

  if (!fo_prefs_allows(&r->prefs, ev->category, d->channel)) {
    final_suppressed(v, FO_SUP_OPTED_OUT);
    return false;
  }
  if (!has_address(r, d->channel, &why)) {
    final_suppressed(v, why);
    return false;
  }
  if (ev->priority != FO_PRIO_CRITICAL && !ev->released &&
      fo_quiet_active(&r->prefs.quiet, r->timezone, d->channel, now, &end)) {
    defer(p, d, end, v);
    return false;
  }
  return true;
}

static int64_t dedup_ttl(const fo_event *ev, int64_t now) {
  int64_t left = ev->expires_ms - now;

  return (left > 0 ? left : 0) + DEDUP_MARGIN_MS;
}

static void policy_check(void *self, fo_delivery *const *ds, size_t n,
                         fo_verdict *out) {
  fo_policy *p = self;
  fo_limit_op ops[BATCH_OPS];
  size_t open[BATCH_OPS];
  size_t nopen = 0, nops, nmarks;
  fo_limiter *lim;
  int64_t now = fo_wall_ms();
  int64_t t0 = fo_now_us();

  /* 1-4: user, opt-out, address, quiet hours. */
  for (size_t i = 0; i < n; i++) {
    memset(&out[i], 0, sizeof(out[i]));
    out[i].kind = FO_VERDICT_SEND;
    if (check_user(p, ds[i], now, &out[i]))
      open[nopen++] = i;
  }
  if (p->conf.limits == NULL || nopen == 0)
    goto dedup_by_log;

  /* 5: dedup claims, with the pending marks in the same round trip. */
  nmarks = take_marks(p, ops, BATCH_OPS - nopen);
  nops = nmarks;
  for (size_t k = 0; k < nopen; k++) {
    const fo_delivery *d = ds[open[k]];
    fo_limit_op *op = &ops[nops++];

    memset(op, 0, sizeof(*op));
    op->kind = FO_LIMIT_CLAIM;
    op->user = d->user;
    op->channel = d->channel;
    op->event_id = d->event->id;
    op->claim_ms = p->conf.claim_ms;
    op->ttl_ms = dedup_ttl(d->event, now);
  }
  lim = limiter_for_thread(p);
  fo_limiter_decide(lim, ops, nops);
  free_mark_ops(ops, nmarks);

  {
    size_t still = 0;

    for (size_t k = 0; k < nopen; k++) {
      fo_limit_op *op = &ops[nmarks + k];
      fo_delivery *d = ds[open[k]];
      fo_verdict *v = &out[open[k]];

      switch (op->result) {
      case FO_LIMIT_PASS:
        d->gate_flags |= GF_CLAIMED;
        open[still++] = open[k];
        break;
      case FO_LIMIT_DUPLICATE:
        final_suppressed(v, FO_SUP_DUPLICATE);
        break;
      case FO_LIMIT_BUSY:
        retry_later(v, "another attempt is in flight",
                    op->retry_after_ms > 0 ? op->retry_after_ms : 1000);
        break;
      default:
        /* Redis is down: the delivery log says whether it was sent. */
        if (fo_store_delivery_sent(p->conf.store, d->event->id, d->user,
                                   d->channel) == FO_OK)
          final_suppressed(v, FO_SUP_DUPLICATE);
        else
          open[still++] = open[k];
        break;
      }
    }
    nopen = still;
  }

  /* 6: rate caps, for what is still open and not critical. */
  nops = 0;
  size_t capped_idx[BATCH_OPS];
  for (size_t k = 0; k < nopen; k++) {
    fo_delivery *d = ds[open[k]];
    const fo_recipient *r = d->recipient;
    const fo_cap *cap = &r->prefs.caps[d->channel];

    if (d->event->priority == FO_PRIO_CRITICAL || cap->per == FO_CAP_NONE)
      continue;
    memset(&ops[nops], 0, sizeof(ops[nops]));
    ops[nops].kind = FO_LIMIT_CAP;
    ops[nops].user = d->user;
    ops[nops].channel = d->channel;
    ops[nops].cap = *cap;
    ops[nops].now_ms = now;
    capped_idx[nops++] = open[k];
  }
  if (nops > 0) {
    fo_limiter_decide(lim, ops, nops);
    for (size_t k = 0; k < nops; k++) {
      if (ops[k].result != FO_LIMIT_CAPPED)
        continue;
      final_suppressed(&out[capped_idx[k]], FO_SUP_CAPPED);
    }
  }
  goto out;

dedup_by_log:
  for (size_t k = 0; k < nopen; k++) {
    fo_delivery *d = ds[open[k]];

    if (fo_store_delivery_sent(p->conf.store, d->event->id, d->user,
                               d->channel) == FO_OK)
      final_suppressed(&out[open[k]], FO_SUP_DUPLICATE);
  }

out:
  fo_histogram_observe_us(p->m_check, fo_now_us() - t0);
}

static void policy_final(void *self, const fo_delivery *d,
                         const fo_outcome *o) {
  fo_policy *p = self;
  const char *reason = o->status == FO_STATUS_SUPPRESSED
                           ? fo_suppress_name(o->suppress)
                           : o->reason;

  /* A duplicate's delivery was made before: its row in the log already
   * says so and must keep saying it. */
  bool repeat = o->status == FO_STATUS_SUPPRESSED &&
                o->suppress == FO_SUP_DUPLICATE;

  if (p->conf.dlog != NULL && !repeat)
    fo_dlog_record(p->conf.dlog, d->event->id, d->user, d->channel,
                   o->status, reason[0] != '\0' ? reason : NULL, d->attempt,
                   o->provider_id[0] != '\0' ? o->provider_id : NULL);

  /* A sent delivery is remembered; any other end frees the claim so a
   * later replay may try again. */
  if ((d->gate_flags & GF_CLAIMED) && p->conf.limits != NULL)
    add_mark(p, o->status == FO_STATUS_SENT ? FO_LIMIT_DONE
                                            : FO_LIMIT_RELEASE,
             d, dedup_ttl(d->event, fo_wall_ms()));
}

static void policy_release(void *self, fo_delivery *d) {
  (void)self;
  if (d->recipient != NULL)
    fo_recipient_unref((fo_recipient *)d->recipient);
  d->recipient = NULL;
}

/* ---- deferred deliveries ---- */

static void released_done(fo_event *ev, bool finished, void *arg) {
  fo_policy *p = arg;

  if (finished &&
      fo_store_deferred_done(p->conf.store, ev->origin_seq) != FO_OK) {
    static fo_ratelimit rl;

    /* The row comes back when its lease ends; dedup stops a repeat. */
    fo_log_rl(&rl, 10000, FO_LOG_WARN, "policy",
              "cannot delete a released deferred delivery", "id=%lld",
              (long long)ev->origin_seq);
  }
  fo_event_free(ev);
}

/* Makes the one-user, one-channel event of a deferred row. */
static fo_event *released_event(fo_policy *p, const fo_deferred *row) {
  fo_event_error err;
  fo_event *ev = NULL;
  uint32_t i;

  if (fo_event_decode(row->event_json, strlen(row->event_json), 0, &ev,
                      &err) != FO_OK)
    return NULL;
  for (i = 0; i < ev->to_count; i++)
    if (strcmp(ev->to[i], row->user) == 0)
      break;
  if (i == ev->to_count) {
    fo_event_free(ev);
    return NULL;
  }
  ev->to[0] = ev->to[i];
  ev->to_count = 1;
  ev->channels = 1u << row->channel;
  ev->released = true;
  ev->consumed_us = fo_now_us();
  ev->expires_ms = row->expires_ms;
  ev->origin_seq = row->id;
  ev->done_fn = released_done;
  ev->done_arg = p;
  atomic_store(&ev->pending, 1);
  return ev;
}

static void *poller_main(void *arg) {
  fo_policy *p = arg;

  while (!atomic_load(&p->poller_stop)) {
    fo_deferred *rows = NULL;
    int n = fo_store_claim_due(p->conf.store, 256, 60000, &rows);

    for (int i = 0; i < n; i++) {
      fo_event *ev = released_event(p, &rows[i]);

      if (ev == NULL) {
        /* A row that no longer decodes cannot be sent; drop it. */
        fo_log_warn("policy", "dropping an undecodable deferred delivery",
                    "id=%lld", (long long)rows[i].id);
        fo_store_deferred_done(p->conf.store, rows[i].id);
        continue;
      }
      if (fo_queue_push(p->queue, ev) != FO_OK) {
        /* Full or closing: the lease runs out and it comes back. */
        fo_event_free(ev);
        continue;
      }
      fo_counter_add(p->m_released, 1);
    }
    if (rows != NULL)
      fo_deferred_free(rows, n > 0 ? n : 0);

    for (int64_t waited = 0; waited < p->conf.poll_ms &&
                             !atomic_load(&p->poller_stop);
         waited += 10) {
      struct timespec ts = {0, 10 * 1000000L};

      nanosleep(&ts, NULL);
    }
  }
  return NULL;
}

int fo_policy_start_poller(fo_policy *p, fo_queue *q) {
  p->queue = q;
  if (pthread_create(&p->poller, NULL, poller_main, p) != 0)
    return FO_EIO;
  p->poller_started = true;
  return FO_OK;
}

void fo_policy_stop_poller(fo_policy *p) {
  if (!p->poller_started)
    return;
  atomic_store(&p->poller_stop, true);
  pthread_join(p->poller, NULL);
  p->poller_started = false;
}

/* ---- life cycle ---- */

static void register_metrics(fo_policy *p) {
  p->m_hits = fo_metrics_counter("fanout_user_cache_hits_total",
                                 "User lookups served by the cache.", NULL);
  p->m_misses = fo_metrics_counter("fanout_user_cache_misses_total",
                                   "User lookups that went to PostgreSQL.",
                                   NULL);
  p->m_invalidations = fo_metrics_counter(
      "fanout_user_cache_invalidations_total",
      "Cache entries dropped because a user changed.", NULL);
  p->m_deferred = fo_metrics_counter(
      "fanout_deferred_total", "Deliveries deferred by quiet hours.", NULL);
  p->m_released = fo_metrics_counter(
      "fanout_deferred_released_total",
      "Deferred deliveries released at the end of quiet hours.", NULL);
  p->m_store_errors = fo_metrics_counter(
      "fanout_policy_store_errors_total",
      "User lookups that failed because PostgreSQL was unavailable.", NULL);
  p->m_check = fo_metrics_histogram(
      "fanout_policy_batch_seconds",
      "Time the policy stage took to decide one batch.", NULL);
}

int fo_policy_new(const fo_policy_conf *conf, fo_policy **out) {
  fo_policy *p;

  if (conf->store == NULL)
    return FO_EINVAL;
  p = calloc(1, sizeof(*p));
  if (p == NULL)
    return FO_ENOMEM;
  p->conf = *conf;
  p->shard_cap = conf->cache_users / SHARDS + 1;
  for (size_t i = 0; i < SHARDS; i++) {
    pthread_mutex_init(&p->shards[i].lock, NULL);
    p->shards[i].nbuckets = 64;
    p->shards[i].buckets = calloc(64, sizeof(entry *));
    if (p->shards[i].buckets == NULL) {
      fo_policy_free(p);
      return FO_ENOMEM;
    }
  }
  pthread_mutex_init(&p->marks_lock, NULL);
  p->gate = (fo_gate){.check = policy_check,
                      .final = policy_final,
                      .release = policy_release,
                      .self = p};
  register_metrics(p);

  if (pthread_create(&p->flusher, NULL, flusher_main, p) != 0) {
    fo_policy_free(p);
    return FO_EIO;
  }
  p->flusher_started = true;
  if (fo_store_listen(conf->store, on_user_change, p) != FO_OK)
    fo_log_warn("policy", "cannot listen for user changes; the cache may "
                          "serve stale preferences", "");
  *out = p;
  return FO_OK;
}

const fo_gate *fo_policy_gate(fo_policy *p) {
  return &p->gate;
}

void fo_policy_free(fo_policy *p) {
  if (p == NULL)
    return;
  fo_policy_stop_poller(p);
  if (p->flusher_started) {
    atomic_store(&p->stop, true);
    pthread_join(p->flusher, NULL);
  }
  fo_policy_flush(p);
  for (size_t i = 0; i < SHARDS; i++) {
    shard *s = &p->shards[i];

    while (s->buckets != NULL && s->oldest != NULL)
      remove_entry(s, s->oldest);
    free(s->buckets);
    pthread_mutex_destroy(&s->lock);
  }
  pthread_mutex_destroy(&p->marks_lock);
  free(p);
}
