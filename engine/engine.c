/* SPDX-License-Identifier: MIT */
/*
 * Wiring of the pipeline and its orderly shutdown. The order matters:
 * input stops first, then in-flight work drains, then channels close,
 * and only then are offsets committed, so that a commit never covers work
 * that did not finish.
 */
#include "engine.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "consumer.h"
#include "dispatch.h"
#include "fanout/common.h"
#include "limiter.h"
#include "log.h"
#include "metrics.h"
#include "policy.h"
#include "queue.h"
#include "store.h"

struct fo_engine {
  /* State, when [postgres] dsn is set: the policy stage runs. */
  fo_store *store;
  fo_dlog *dlog;
  fo_limiter *limits;
  fo_limiter *more_limits[3];   /* one more per worker, up to 3 */
  size_t nmore_limits;
  fo_policy *policy;

  fo_queue *queue;
  fo_dispatch *dispatch;
  fo_consumer *consumer;
  fo_channel *channels[FO_CH_COUNT];
  fo_gauge *m_queue_items;
  fo_gauge *m_queue_events;
  bool started;
  bool stopped;

  /* Previous summary, for rates. */
  int64_t last_ms;
  uint64_t last_consumed;
  uint64_t last_final;
};

/* Opens PostgreSQL, the delivery log, Redis and the policy stage. Without
 * a DSN the engine runs without them: every recipient is delivered as
 * given, which suits development and the pipeline benchmark. */
static int open_state(fo_engine *e, const fo_config *cfg, char *err,
                      size_t errlen) {
  const char *dsn = fo_config_get(cfg, "postgres", "dsn");
  fo_policy_conf pc;
  int rc;

  if (dsn == NULL) {
    fo_log_warn("engine", "no [postgres] dsn: users, preferences and the "
                          "policy stage are off", "");
    return FO_OK;
  }
  rc = fo_store_open(dsn, (int)fo_config_get_int(cfg, "postgres", "pool"),
                     &e->store, err, errlen);
  if (rc != FO_OK)
    return rc;
  rc = fo_dlog_start(e->store, 100000, &e->dlog);
  if (rc != FO_OK) {
    snprintf(err, errlen, "engine: cannot start the delivery log: %s",
             fo_strerror(rc));
    return rc;
  }
  rc = fo_limiter_open(fo_config_get(cfg, "redis", "url"),
                      fo_config_get_bool(cfg, "redis", "caps_fail_closed"),
                      &e->limits);
  if (rc != FO_OK) {
    snprintf(err, errlen, "config: [redis] url: cannot be used (%s)",
             fo_strerror(rc));
    return rc;
  }

  /* A connection per worker, so that workers do not queue behind each
   * other's Redis round trips. */
  for (int64_t w = 1; w < fo_config_get_int(cfg, "engine", "workers") &&
                      e->nmore_limits < 3;
       w++) {
    rc = fo_limiter_open(fo_config_get(cfg, "redis", "url"),
                         fo_config_get_bool(cfg, "redis",
                                            "caps_fail_closed"),
                         &e->more_limits[e->nmore_limits]);
    if (rc != FO_OK)
      break;
    e->nmore_limits++;
  }

  memset(&pc, 0, sizeof(pc));
  pc.store = e->store;
  pc.limits = e->limits;
  pc.more_limits = e->more_limits;
  pc.nmore_limits = e->nmore_limits;
  pc.dlog = e->dlog;
  pc.cache_users = (size_t)fo_config_get_int(cfg, "engine", "cache_users");
  pc.claim_ms = fo_config_get_int(cfg, "engine", "dedup_claim_ms");
  pc.poll_ms = fo_config_get_int(cfg, "engine", "deferred_poll_ms");
  rc = fo_policy_new(&pc, &e->policy);
  if (rc != FO_OK)
    snprintf(err, errlen, "engine: cannot start the policy stage: %s",
             fo_strerror(rc));
  return rc;
}

fo_store *fo_engine_store(fo_engine *e) {
  return e->store;
}

fo_limiter *fo_engine_limits(fo_engine *e) {
  return e->limits;
}

int fo_engine_new(const fo_config *cfg, const char *brokers,
                  fo_engine **out, char *err, size_t errlen) {
  fo_engine *e = calloc(1, sizeof(*e));
  fo_consumer_conf cc;
  fo_dispatch_conf dc;
  int rc = FO_ENOMEM;

  if (e == NULL)
    goto fail;
  if ((rc = open_state(e, cfg, err, errlen)) != FO_OK)
    goto fail_quiet;
  rc = FO_ENOMEM;
  e->queue = fo_queue_new(
      (uint64_t)fo_config_get_int(cfg, "engine", "queue_items"),
      (uint64_t)fo_config_get_int(cfg, "engine", "queue_events"));
  if (e->queue == NULL)
    goto fail;

  memset(&dc, 0, sizeof(dc));
  dc.workers = (int)fo_config_get_int(cfg, "engine", "workers");
  dc.retry_base_ms = fo_config_get_int(cfg, "engine", "retry_base_ms");
  dc.retry_max_ms = fo_config_get_int(cfg, "engine", "retry_max_ms");
  dc.on_done = fo_consumer_event_done;
  if (e->policy != NULL)
    dc.gate = fo_policy_gate(e->policy);
  e->dispatch = fo_dispatch_new(e->queue, &dc);
  if (e->dispatch == NULL) {
    snprintf(err, errlen, "config: [engine] retry_max_ms: must not be "
                          "below retry_base_ms");
    rc = FO_ECONFIG;
    goto fail_quiet;
  }

  memset(&cc, 0, sizeof(cc));
  cc.brokers = brokers;
  cc.group = fo_config_get(cfg, "kafka", "group");
  cc.topic = fo_config_get(cfg, "kafka", "topic");
  cc.dlq_topic = fo_config_get(cfg, "kafka", "dlq_topic");
  cc.session_timeout_ms =
      (int)fo_config_get_int(cfg, "kafka", "session_timeout_ms");
  cc.max_event_bytes =
      (size_t)fo_config_get_int(cfg, "kafka", "max_event_bytes");
  cc.commit_interval_ms =
      (int)fo_config_get_int(cfg, "engine", "commit_interval_ms");
  rc = fo_consumer_new(&cc, e->queue, &e->consumer, err, errlen);
  if (rc != FO_OK)
    goto fail_quiet;

  e->m_queue_items = fo_metrics_gauge(
      "fanout_queue_items", "Work items waiting in the queue.", NULL);
  e->m_queue_events = fo_metrics_gauge(
      "fanout_queue_events", "Events with items waiting in the queue.",
      NULL);
  *out = e;
  return FO_OK;

fail:
  snprintf(err, errlen, "engine: out of memory");
fail_quiet:
  fo_engine_free(e);
  return rc;
}

void fo_engine_set_channel(fo_engine *e, fo_channel_kind kind,
                           fo_channel *ch) {
  e->channels[kind] = ch;
  fo_dispatch_set_channel(e->dispatch, kind, ch);
}

int fo_engine_start(fo_engine *e) {
  int rc;

  if ((rc = fo_dispatch_start(e->dispatch)) != FO_OK)
    return rc;
  if ((rc = fo_consumer_start(e->consumer)) != FO_OK)
    return rc;
  if (e->policy != NULL &&
      (rc = fo_policy_start_poller(e->policy, e->queue)) != FO_OK)
    return rc;
  e->started = true;
  e->last_ms = fo_now_ms();
  return FO_OK;
}

void fo_engine_log_summary(fo_engine *e) {
  fo_consumer_stats cs;
  fo_dispatch_stats ds;
  fo_queue_stats qs;
  int64_t now = fo_now_ms();
  uint64_t final = 0;
  double secs;

  fo_consumer_get_stats(e->consumer, &cs);
  fo_dispatch_get_stats(e->dispatch, &ds);
  fo_queue_get_stats(e->queue, &qs);
  fo_gauge_set(e->m_queue_items, (int64_t)qs.items);
  fo_gauge_set(e->m_queue_events, (int64_t)qs.events);
  for (int s = 0; s < FO_STATUS_COUNT; s++)
    final += ds.final_by_status[s];

  secs = (double)(now - e->last_ms) / 1000.0;
  if (secs <= 0)
    secs = 1;
  fo_log_info("engine", "summary",
              "consumed=%" PRIu64 " dead_lettered=%" PRIu64
              " queued_items=%" PRIu64 " in_flight=%" PRIu64
              " retry_waiting=%" PRIu64 " sent=%" PRIu64 " failed=%" PRIu64
              " deferred=%" PRIu64 " suppressed=%" PRIu64
              " paused=%d pauses=%" PRIu64
              " events_per_s=%.0f deliveries_per_s=%.0f",
              cs.consumed, cs.dead_lettered, qs.items, ds.in_flight,
              ds.retry_waiting, ds.final_by_status[FO_STATUS_SENT],
              ds.final_by_status[FO_STATUS_FAILED],
              ds.final_by_status[FO_STATUS_DEFERRED],
              ds.final_by_status[FO_STATUS_SUPPRESSED], cs.paused ? 1 : 0,
              cs.pauses,
              (double)(cs.consumed - e->last_consumed) / secs,
              (double)(final - e->last_final) / secs);
  e->last_ms = now;
  e->last_consumed = cs.consumed;
  e->last_final = final;
}

int fo_engine_stop(fo_engine *e, int drain_ms) {
  int64_t deadline = fo_now_ms() + drain_ms;
  int rc, left;

  if (e->stopped)
    return FO_OK;
  e->stopped = true;
  fo_consumer_stop(e->consumer);
  if (e->policy != NULL)
    fo_policy_stop_poller(e->policy);

  rc = fo_dispatch_drain(e->dispatch, drain_ms);
  for (int k = 0; k < FO_CH_COUNT; k++) {
    fo_channel *ch = e->channels[k];
    bool seen = false;

    /* One channel object may serve several kinds; shut it down once. */
    for (int j = 0; j < k; j++)
      seen = seen || e->channels[j] == ch;
    if (ch != NULL && !seen)
      ch->ops->shutdown(ch->self);
  }

  left = (int)(deadline - fo_now_ms());
  if (fo_consumer_finish(e->consumer, left > 1000 ? left : 1000) != FO_OK &&
      rc == FO_OK)
    rc = FO_ETIMEDOUT;
  if (e->policy != NULL)
    fo_policy_flush(e->policy);
  if (e->dlog != NULL)
    fo_dlog_flush(e->dlog, 5000);
  return rc;
}

void fo_engine_free(fo_engine *e) {
  if (e == NULL)
    return;
  if (e->started && !e->stopped)
    fo_engine_stop(e, 0);
  /* The dispatcher gives unfinished events back to the consumer, so it
   * goes first. */
  if (e->policy != NULL)
    fo_policy_stop_poller(e->policy);
  fo_dispatch_free(e->dispatch);
  fo_consumer_free(e->consumer);

  /* The log writes through the store, and the store's change listener
   * calls into the policy: stop them in that order. */
  if (e->dlog != NULL)
    fo_dlog_stop(e->dlog);
  if (e->store != NULL)
    fo_store_close(e->store);
  fo_policy_free(e->policy);
  if (e->limits != NULL)
    fo_limiter_close(e->limits);
  for (size_t i = 0; i < e->nmore_limits; i++)
    fo_limiter_close(e->more_limits[i]);
  if (e->queue != NULL)
    fo_queue_free(e->queue);
  free(e);
}
