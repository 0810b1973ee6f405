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
#include "log.h"
#include "metrics.h"
#include "queue.h"

struct fo_engine {
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

int fo_engine_new(const fo_config *cfg, const char *brokers,
                  fo_engine **out, char *err, size_t errlen) {
  fo_engine *e = calloc(1, sizeof(*e));
  fo_consumer_conf cc;
  fo_dispatch_conf dc;
  int rc = FO_ENOMEM;

  if (e == NULL)
    goto fail;
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
              " paused=%d pauses=%" PRIu64 " events_per_s=%.0f deliveries_per_s=%.0f",
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
  return rc;
}

void fo_engine_free(fo_engine *e) {
  if (e == NULL)
    return;
  if (e->started && !e->stopped)
    fo_engine_stop(e, 0);
  /* The dispatcher gives unfinished events back to the consumer, so it
   * goes first. */
  fo_dispatch_free(e->dispatch);
  fo_consumer_free(e->consumer);
  if (e->queue != NULL)
    fo_queue_free(e->queue);
  free(e);
}
