/* SPDX-License-Identifier: MIT */
/*
 * The Kafka consumer: the one place where events enter fanout. Valid
 * events go into the bounded queue; invalid ones go to the dead-letter
 * topic with the original bytes and the reason in headers. Either way the
 * message's offset is tracked until its work is done (delivered, or
 * acknowledged by the dead-letter topic), and only finished prefixes of
 * each partition are committed.
 */
#include "consumer.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <librdkafka/rdkafka.h>

#include "fanout/common.h"
#include "log.h"
#include "metrics.h"
#include "offsets.h"

#define POLL_MS 100
#define PAUSED_POLL_MS 20

/* A valid event that did not fit in the queue yet, or a dead letter that
 * could not be handed to the producer yet. */
typedef struct held {
  struct held *next;
  fo_event *ev;
} held;

typedef struct dead_letter {
  struct dead_letter *next;
  fo_offsets *track;
  int64_t offset;
  int32_t partition;
  void *value;
  size_t value_len;
  void *key;
  size_t key_len;
  const char *reason;           /* static */
  char detail[160];
} dead_letter;

typedef struct part_state {
  fo_offsets *track;            /* NULL when not assigned */
  int64_t committed;            /* last commit point sent, -1 none */
} part_state;

struct fo_consumer {
  rd_kafka_t *rk;               /* consumer */
  rd_kafka_t *dlq;              /* dead-letter producer */
  fo_queue *q;
  char *topic;
  char *dlq_topic;
  size_t max_event_bytes;
  int commit_interval_ms;

  pthread_t thread;
  bool running;
  atomic_bool stop;

  /* Owned by the consumer thread (callbacks run on it too). */
  part_state *parts;
  int32_t nparts;
  held *held_head;
  held **held_tail;
  dead_letter *dl_retry;
  bool paused;
  int64_t next_commit_ms;

  atomic_uint_fast64_t consumed;
  atomic_uint_fast64_t dead_lettered;
  atomic_uint_fast64_t commits;
  atomic_uint_fast64_t pauses;
  atomic_bool paused_flag;

  fo_counter *m_consumed;
  fo_counter *m_dlq[8];
  fo_counter *m_pauses;
  fo_counter *m_commits;
  fo_counter *m_commit_errors;
  fo_gauge *m_paused;
};

static void kafka_log_cb(const rd_kafka_t *rk, int level, const char *fac,
                         const char *buf) {
  static fo_ratelimit rl;
  fo_log_level lvl = level <= 3   ? FO_LOG_ERROR
                     : level <= 4 ? FO_LOG_WARN
                     : level <= 6 ? FO_LOG_INFO
                                  : FO_LOG_DEBUG;

  (void)rk;
  /* librdkafka repeats connection errors while a broker is down. */
  if (lvl <= FO_LOG_WARN)
    fo_log_rl(&rl, 5000, lvl, "kafka", "librdkafka", "fac=%s detail=\"%s\"",
              fac, buf);
  else
    fo_log(lvl, "kafka", "librdkafka", "fac=%s detail=\"%s\"", fac, buf);
}

static int conf_set(rd_kafka_conf_t *conf, const char *k, const char *v,
                    char *err, size_t errlen) {
  char why[256];

  if (rd_kafka_conf_set(conf, k, v, why, sizeof(why)) != RD_KAFKA_CONF_OK) {
    snprintf(err, errlen, "kafka: %s: %s", k, why);
    return FO_EKAFKA;
  }
  return FO_OK;
}

static part_state *part_get(fo_consumer *c, int32_t p, bool grow) {
  if (p < 0)
    return NULL;
  if (p >= c->nparts) {
    part_state *n;

    if (!grow)
      return NULL;
    n = realloc(c->parts, (size_t)(p + 1) * sizeof(*n));
    if (n == NULL)
      return NULL;
    for (int32_t i = c->nparts; i <= p; i++)
      n[i] = (part_state){.track = NULL, .committed = -1};
    c->parts = n;
    c->nparts = p + 1;
  }
  return &c->parts[p];
}

/* Commits the finished prefix of every assigned partition. */
static void commit_points(fo_consumer *c, bool sync) {
  rd_kafka_topic_partition_list_t *list;
  rd_kafka_resp_err_t err;

  list = rd_kafka_topic_partition_list_new(c->nparts > 0 ? c->nparts : 1);
  for (int32_t p = 0; p < c->nparts; p++) {
    part_state *ps = &c->parts[p];
    int64_t point;

    if (ps->track == NULL)
      continue;
    point = fo_offsets_commit_point(ps->track);
    if (point < 0 || point == ps->committed)
      continue;
    rd_kafka_topic_partition_list_add(list, c->topic, p)->offset = point;
    ps->committed = point;
  }

  if (list->cnt > 0) {
    err = rd_kafka_commit(c->rk, list, sync ? 0 : 1);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
      static fo_ratelimit rl;

      fo_counter_add(c->m_commit_errors, 1);
      fo_log_rl(&rl, 10000, FO_LOG_WARN, "consumer", "commit failed",
                "error=\"%s\"", rd_kafka_err2str(err));
      /* Offsets not known to be committed are sent again next time. */
      for (int i = 0; i < list->cnt; i++) {
        part_state *ps = part_get(c, list->elems[i].partition, false);

        if (ps != NULL)
          ps->committed = -1;
      }
    } else if (sync) {
      atomic_fetch_add(&c->commits, 1);
      fo_counter_add(c->m_commits, 1);
    }
  }
  rd_kafka_topic_partition_list_destroy(list);
}

static void offset_commit_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                             rd_kafka_topic_partition_list_t *offsets,
                             void *opaque) {
  fo_consumer *c = opaque;

  (void)rk;
  if (err == RD_KAFKA_RESP_ERR__NO_OFFSET)
    return;
  if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
    static fo_ratelimit rl;

    fo_counter_add(c->m_commit_errors, 1);
    fo_log_rl(&rl, 10000, FO_LOG_WARN, "consumer", "commit failed",
              "error=\"%s\"", rd_kafka_err2str(err));
    for (int i = 0; offsets != NULL && i < offsets->cnt; i++) {
      part_state *ps = part_get(c, offsets->elems[i].partition, false);

      if (ps != NULL)
        ps->committed = -1;
    }
    return;
  }
  atomic_fetch_add(&c->commits, 1);
  fo_counter_add(c->m_commits, 1);
}

static void set_paused(fo_consumer *c, bool pause) {
  rd_kafka_topic_partition_list_t *list = NULL;

  if (c->paused == pause)
    return;
  if (rd_kafka_assignment(c->rk, &list) != RD_KAFKA_RESP_ERR_NO_ERROR)
    return;
  if (pause)
    rd_kafka_pause_partitions(c->rk, list);
  else
    rd_kafka_resume_partitions(c->rk, list);
  rd_kafka_topic_partition_list_destroy(list);

  c->paused = pause;
  atomic_store(&c->paused_flag, pause);
  fo_gauge_set(c->m_paused, pause ? 1 : 0);
  if (pause) {
    atomic_fetch_add(&c->pauses, 1);
    fo_counter_add(c->m_pauses, 1);
    fo_log_debug("consumer", "queue full, partitions paused", "%s", "");
  } else {
    fo_log_debug("consumer", "queue has room, partitions resumed", "%s", "");
  }
}

static void rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *parts,
                         void *opaque) {
  fo_consumer *c = opaque;

  if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
    for (int i = 0; i < parts->cnt; i++) {
      part_state *ps = part_get(c, parts->elems[i].partition, true);

      if (ps == NULL) {
        fo_log_error("consumer", "out of memory on assignment", "%s", "");
        continue;
      }
      if (ps->track == NULL)
        ps->track = fo_offsets_new(parts->elems[i].partition);
      ps->committed = -1;
    }
    rd_kafka_assign(rk, parts);
    if (c->paused)
      rd_kafka_pause_partitions(rk, parts);
    fo_log_info("consumer", "partitions assigned", "topic=%s count=%d",
                c->topic, parts->cnt);
    return;
  }

  /* Revoked (or an error): commit what finished while we still may.
   * Events of these partitions that are still running complete normally;
   * the new owner may replay them, which is what at least once allows. */
  if (err == RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS)
    commit_points(c, true);
  for (int32_t p = 0; p < c->nparts; p++) {
    fo_offsets_unref(c->parts[p].track);
    c->parts[p].track = NULL;
    c->parts[p].committed = -1;
  }
  rd_kafka_assign(rk, NULL);
  fo_log_info("consumer", "partitions revoked", "topic=%s reason=\"%s\"",
              c->topic, rd_kafka_err2str(err));
}

static void dead_letter_free(dead_letter *dl) {
  free(dl->value);
  free(dl->key);
  free(dl);
}

/* Known limitation: the source message's own headers are not copied to
 * the dead letter; its key and value are. */
static int dead_letter_send(fo_consumer *c, dead_letter *dl) {
  char part[16], off[24];
  rd_kafka_resp_err_t err;

  snprintf(part, sizeof(part), "%" PRId32, dl->partition);
  snprintf(off, sizeof(off), "%" PRId64, dl->offset);
  err = rd_kafka_producev(
      c->dlq, RD_KAFKA_V_TOPIC(c->dlq_topic),
      RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
      RD_KAFKA_V_VALUE(dl->value, dl->value_len),
      RD_KAFKA_V_KEY(dl->key, dl->key_len),
      RD_KAFKA_V_HEADER("fanout-reason", dl->reason, -1),
      RD_KAFKA_V_HEADER("fanout-detail", dl->detail, -1),
      RD_KAFKA_V_HEADER("fanout-topic", c->topic, -1),
      RD_KAFKA_V_HEADER("fanout-partition", part, -1),
      RD_KAFKA_V_HEADER("fanout-offset", off, -1), RD_KAFKA_V_OPAQUE(dl),
      RD_KAFKA_V_END);
  if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
    static fo_ratelimit rl;

    fo_log_rl(&rl, 10000, FO_LOG_WARN, "consumer",
              "dead-letter produce refused, will retry", "error=\"%s\"",
              rd_kafka_err2str(err));
    return FO_EKAFKA;
  }
  return FO_OK;
}

/* Dead letters are retried until the topic takes them: an event is never
 * dropped, and its offset stays uncommitted meanwhile. */
static void dead_letter_retry_later(fo_consumer *c, dead_letter *dl) {
  dl->next = c->dl_retry;
  c->dl_retry = dl;
}

static void dlq_dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m,
                      void *opaque) {
  fo_consumer *c = opaque;
  dead_letter *dl = m->_private;

  (void)rk;
  if (m->err != RD_KAFKA_RESP_ERR_NO_ERROR) {
    static fo_ratelimit rl;

    fo_log_rl(&rl, 10000, FO_LOG_ERROR, "consumer",
              "dead-letter delivery failed, will retry", "topic=%s "
              "error=\"%s\"", c->dlq_topic, rd_kafka_err2str(m->err));
    dead_letter_retry_later(c, dl);
    return;
  }
  fo_offsets_done(dl->track, dl->offset);
  dead_letter_free(dl);
}

static void send_to_dlq(fo_consumer *c, const rd_kafka_message_t *m,
                        fo_offsets *track, const fo_event_error *e) {
  dead_letter *dl = calloc(1, sizeof(*dl));
  const char *reason = fo_event_reason_name(e->reason);

  atomic_fetch_add(&c->dead_lettered, 1);
  if ((unsigned)e->reason < 8)
    fo_counter_add(c->m_dlq[e->reason], 1);
  {
    static fo_ratelimit rl;

    fo_log_rl(&rl, 1000, FO_LOG_WARN, "consumer", "invalid event",
              "partition=%" PRId32 " offset=%" PRId64
              " reason=%s detail=\"%s\"",
              m->partition, m->offset, reason, e->message);
  }
  if (dl == NULL)
    goto oom;
  dl->track = track;
  dl->offset = m->offset;
  dl->partition = m->partition;
  dl->reason = reason;
  snprintf(dl->detail, sizeof(dl->detail), "%s", e->message);
  if (m->len > 0 && (dl->value = malloc(m->len)) == NULL)
    goto oom;
  if (m->len > 0)
    memcpy(dl->value, m->payload, m->len);
  dl->value_len = m->len;
  if (m->key_len > 0 && (dl->key = malloc(m->key_len)) == NULL)
    goto oom;
  if (m->key_len > 0)
    memcpy(dl->key, m->key, m->key_len);
  dl->key_len = m->key_len;

  if (dead_letter_send(c, dl) != FO_OK)
    dead_letter_retry_later(c, dl);
  return;

oom:
  /* The offset stays unfinished and is replayed after a restart. */
  fo_log_error("consumer", "out of memory for a dead letter",
               "offset=%" PRId64, m->offset);
  if (dl != NULL)
    dead_letter_free(dl);
  fo_offsets_unref(track);
}

static void hold(fo_consumer *c, held *h) {
  h->next = NULL;
  *c->held_tail = h;
  c->held_tail = &h->next;
}

/* True when the queue is at most half full. Resuming only then, not as
 * soon as one event fits, leaves the other half to cover the time a
 * resumed partition takes to deliver again. */
static bool queue_low(fo_consumer *c) {
  fo_queue_stats qs;

  fo_queue_get_stats(c->q, &qs);
  return qs.items <= qs.max_items / 2 && qs.events <= qs.max_events / 2;
}

/* Moves held events into the queue while it has room. */
static void release_held(fo_consumer *c) {
  while (c->held_head != NULL) {
    held *h = c->held_head;

    if (fo_queue_push(c->q, h->ev) != FO_OK)
      return;
    c->held_head = h->next;
    if (c->held_head == NULL)
      c->held_tail = &c->held_head;
    free(h);
  }
  if (c->paused && queue_low(c))
    set_paused(c, false);
}

static void enqueue(fo_consumer *c, fo_event *ev) {
  held *h;

  if (c->held_head == NULL) {
    int rc = fo_queue_push(c->q, ev);

    if (rc == FO_OK)
      return;
    if (rc == FO_ECLOSED) {
      fo_consumer_event_done(ev, false, NULL);
      return;
    }
  }

  /* Full: keep the event here and stop fetching until there is room, so
   * memory stays bounded whatever the backlog in Kafka. */
  h = malloc(sizeof(*h));
  if (h == NULL) {
    fo_log_error("consumer", "out of memory holding an event",
                 "event=\"%s\"", ev->id);
    fo_consumer_event_done(ev, false, NULL);
    return;
  }
  h->ev = ev;
  hold(c, h);
  set_paused(c, true);
}

static void handle_message(fo_consumer *c, rd_kafka_message_t *m) {
  part_state *ps;
  fo_event *ev = NULL;
  fo_event_error e;
  int64_t ts;
  int rc;

  if (m->err != RD_KAFKA_RESP_ERR_NO_ERROR) {
    static fo_ratelimit rl;

    if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
      fo_log_rl(&rl, 10000, FO_LOG_WARN, "consumer", "consume error",
                "error=\"%s\"", rd_kafka_message_errstr(m));
    return;
  }
  ps = part_get(c, m->partition, false);
  if (ps == NULL || ps->track == NULL)
    return;
  /* A message at or below one already taken is a re-fetch after a pause
   * or rebalance; its work is already tracked. */
  if (fo_offsets_add(ps->track, m->offset) != FO_OK)
    return;
  atomic_fetch_add_explicit(&c->consumed, 1, memory_order_relaxed);
  fo_counter_add(c->m_consumed, 1);

  memset(&e, 0, sizeof(e));
  rc = fo_event_decode(m->payload, m->len, c->max_event_bytes, &ev, &e);
  if (rc == FO_EINVAL) {
    send_to_dlq(c, m, ps->track, &e);
    return;
  }
  if (rc != FO_OK) {
    fo_log_error("consumer", "cannot decode event", "offset=%" PRId64
                 " error=%s", m->offset, fo_strerror(rc));
    fo_offsets_unref(ps->track);
    return;
  }

  /* The ttl runs from when the producer wrote the event, so a replay
   * after a restart does not extend it. */
  ts = rd_kafka_message_timestamp(m, NULL);
  if (ts <= 0)
    ts = fo_wall_ms();
  ev->consumed_us = fo_now_us();
  ev->expires_ms = ts + ev->ttl_s * 1000;
  atomic_store(&ev->pending, (uint_fast32_t)fo_event_items(ev));
  ev->origin = ps->track;
  ev->origin_seq = m->offset;
  enqueue(c, ev);
}

void fo_consumer_event_done(fo_event *ev, bool finished, void *arg) {
  fo_offsets *t = ev->origin;

  (void)arg;
  if (t != NULL) {
    if (finished)
      fo_offsets_done(t, ev->origin_seq);
    else
      fo_offsets_unref(t);
  }
  fo_event_free(ev);
}

static void retry_dead_letters(fo_consumer *c) {
  dead_letter *list = c->dl_retry;

  c->dl_retry = NULL;
  while (list != NULL) {
    dead_letter *dl = list;

    list = dl->next;
    if (dead_letter_send(c, dl) != FO_OK)
      dead_letter_retry_later(c, dl);
  }
}

static void *consumer_main(void *arg) {
  fo_consumer *c = arg;

  while (!atomic_load(&c->stop)) {
    rd_kafka_message_t *m;

    rd_kafka_poll(c->dlq, 0);
    if (c->dl_retry != NULL)
      retry_dead_letters(c);
    if (c->held_head != NULL || c->paused)
      release_held(c);

    m = rd_kafka_consumer_poll(c->rk, c->paused ? PAUSED_POLL_MS : POLL_MS);
    if (m != NULL) {
      handle_message(c, m);
      rd_kafka_message_destroy(m);
    }

    if (fo_now_ms() >= c->next_commit_ms) {
      commit_points(c, false);
      c->next_commit_ms = fo_now_ms() + c->commit_interval_ms;
    }
  }
  return NULL;
}

static int make_consumer(fo_consumer *c, const fo_consumer_conf *cf,
                         char *err, size_t errlen) {
  rd_kafka_conf_t *conf = rd_kafka_conf_new();
  char num[32], why[512];
  int rc;

  snprintf(num, sizeof(num), "%d", cf->session_timeout_ms);
  if ((rc = conf_set(conf, "bootstrap.servers", cf->brokers, err, errlen)) ||
      (rc = conf_set(conf, "group.id", cf->group, err, errlen)) ||
      (rc = conf_set(conf, "client.id", "fanoutd", err, errlen)) ||
      (rc = conf_set(conf, "enable.auto.commit", "false", err, errlen)) ||
      (rc = conf_set(conf, "enable.auto.offset.store", "false", err,
                     errlen)) ||
      (rc = conf_set(conf, "auto.offset.reset", "earliest", err, errlen)) ||
      (rc = conf_set(conf, "session.timeout.ms", num, err, errlen)) ||
      (rc = conf_set(conf, "queued.max.messages.kbytes", "16384", err,
                     errlen)) ||
      /* A resumed partition joins the next fetch request only once the
       * one in flight returns; a short long-poll keeps resumes quick. */
      (rc = conf_set(conf, "fetch.wait.max.ms", "100", err, errlen)))
    goto fail;
  snprintf(num, sizeof(num), "%d",
           cf->session_timeout_ms / 6 > 100 ? cf->session_timeout_ms / 6
                                            : 100);
  if ((rc = conf_set(conf, "heartbeat.interval.ms", num, err, errlen)))
    goto fail;
  rd_kafka_conf_set_log_cb(conf, kafka_log_cb);
  rd_kafka_conf_set_rebalance_cb(conf, rebalance_cb);
  rd_kafka_conf_set_offset_commit_cb(conf, offset_commit_cb);
  rd_kafka_conf_set_opaque(conf, c);

  c->rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, why, sizeof(why));
  if (c->rk == NULL) {
    snprintf(err, errlen, "kafka: consumer: %s", why);
    rc = FO_EKAFKA;
    goto fail;
  }
  rd_kafka_poll_set_consumer(c->rk);
  return FO_OK;

fail:
  rd_kafka_conf_destroy(conf);
  return rc;
}

static int make_producer(fo_consumer *c, const char *brokers, char *err,
                         size_t errlen) {
  rd_kafka_conf_t *conf = rd_kafka_conf_new();
  char why[512];
  int rc;

  if ((rc = conf_set(conf, "bootstrap.servers", brokers, err, errlen)) ||
      (rc = conf_set(conf, "client.id", "fanoutd-dlq", err, errlen)) ||
      (rc = conf_set(conf, "enable.idempotence", "true", err, errlen)) ||
      (rc = conf_set(conf, "linger.ms", "5", err, errlen)))
    goto fail;
  rd_kafka_conf_set_log_cb(conf, kafka_log_cb);
  rd_kafka_conf_set_dr_msg_cb(conf, dlq_dr_cb);
  rd_kafka_conf_set_opaque(conf, c);

  c->dlq = rd_kafka_new(RD_KAFKA_PRODUCER, conf, why, sizeof(why));
  if (c->dlq == NULL) {
    snprintf(err, errlen, "kafka: dead-letter producer: %s", why);
    rc = FO_EKAFKA;
    goto fail;
  }
  return FO_OK;

fail:
  rd_kafka_conf_destroy(conf);
  return rc;
}

static void register_metrics(fo_consumer *c) {
  char labels[64];

  c->m_consumed = fo_metrics_counter("fanout_events_consumed_total",
                                     "Kafka messages read.", NULL);
  for (int r = 1; r <= FO_EVR_TOO_MANY_RECIPIENTS; r++) {
    snprintf(labels, sizeof(labels), "reason=\"%s\"",
             fo_event_reason_name((fo_event_reason)r));
    c->m_dlq[r] = fo_metrics_counter(
        "fanout_events_dead_lettered_total",
        "Invalid events sent to the dead-letter topic, by reason.", labels);
  }
  c->m_pauses = fo_metrics_counter(
      "fanout_consumer_pauses_total",
      "Times consumption paused because the queue was full.", NULL);
  c->m_paused = fo_metrics_gauge("fanout_consumer_paused",
                                 "1 while consumption is paused.", NULL);
  c->m_commits = fo_metrics_counter("fanout_offset_commits_total",
                                    "Offset commits acknowledged.", NULL);
  c->m_commit_errors = fo_metrics_counter("fanout_offset_commit_errors_total",
                                          "Offset commits that failed.",
                                          NULL);
}

int fo_consumer_new(const fo_consumer_conf *conf, fo_queue *q,
                    fo_consumer **out, char *err, size_t errlen) {
  fo_consumer *c = calloc(1, sizeof(*c));
  int rc = FO_ENOMEM;

  if (c == NULL)
    goto fail;
  c->q = q;
  c->topic = strdup(conf->topic);
  c->dlq_topic = strdup(conf->dlq_topic);
  if (c->topic == NULL || c->dlq_topic == NULL)
    goto fail;
  c->max_event_bytes = conf->max_event_bytes;
  c->commit_interval_ms = conf->commit_interval_ms;
  c->held_tail = &c->held_head;
  register_metrics(c);

  if ((rc = make_consumer(c, conf, err, errlen)) != FO_OK)
    goto fail;
  if ((rc = make_producer(c, conf->brokers, err, errlen)) != FO_OK)
    goto fail;
  *out = c;
  return FO_OK;

fail:
  if (rc == FO_ENOMEM)
    snprintf(err, errlen, "consumer: out of memory");
  fo_consumer_free(c);
  return rc;
}

int fo_consumer_start(fo_consumer *c) {
  rd_kafka_topic_partition_list_t *topics;
  rd_kafka_resp_err_t err;

  topics = rd_kafka_topic_partition_list_new(1);
  rd_kafka_topic_partition_list_add(topics, c->topic,
                                    RD_KAFKA_PARTITION_UA);
  err = rd_kafka_subscribe(c->rk, topics);
  rd_kafka_topic_partition_list_destroy(topics);
  if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
    fo_log_error("consumer", "subscribe failed", "topic=%s error=\"%s\"",
                 c->topic, rd_kafka_err2str(err));
    return FO_EKAFKA;
  }

  c->next_commit_ms = fo_now_ms() + c->commit_interval_ms;
  if (pthread_create(&c->thread, NULL, consumer_main, c) != 0)
    return FO_EIO;
  c->running = true;
  fo_log_info("consumer", "subscribed", "topic=%s dlq=%s", c->topic,
              c->dlq_topic);
  return FO_OK;
}

void fo_consumer_stop(fo_consumer *c) {
  if (!c->running)
    return;
  atomic_store(&c->stop, true);
  pthread_join(c->thread, NULL);
  c->running = false;
}

int fo_consumer_finish(fo_consumer *c, int timeout_ms) {
  int64_t deadline = fo_now_ms() + timeout_ms;
  rd_kafka_resp_err_t err;

  fo_consumer_stop(c);

  /* Events held for lack of room never ran: give them back. */
  while (c->held_head != NULL) {
    held *h = c->held_head;

    c->held_head = h->next;
    fo_consumer_event_done(h->ev, false, NULL);
    free(h);
  }
  c->held_tail = &c->held_head;

  /* Dead letters finish when the topic acknowledges them. */
  while (fo_now_ms() < deadline) {
    if (c->dl_retry != NULL)
      retry_dead_letters(c);
    if (rd_kafka_outq_len(c->dlq) == 0 && c->dl_retry == NULL)
      break;
    rd_kafka_poll(c->dlq, 50);
  }

  commit_points(c, true);
  err = rd_kafka_consumer_close(c->rk);
  if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
    fo_log_warn("consumer", "leaving the group failed", "error=\"%s\"",
                rd_kafka_err2str(err));
  fo_log_info("consumer", "closed", "commits=%" PRIu64,
              (uint64_t)atomic_load(&c->commits));
  return rd_kafka_outq_len(c->dlq) == 0 ? FO_OK : FO_ETIMEDOUT;
}

void fo_consumer_free(fo_consumer *c) {
  if (c == NULL)
    return;
  if (c->running)
    fo_consumer_stop(c);
  if (c->dlq != NULL) {
    /* Dead letters still queued were not acknowledged; their offsets
     * were not committed, so they are replayed after a restart. */
    rd_kafka_purge(c->dlq, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
    rd_kafka_poll(c->dlq, 0);
    rd_kafka_destroy(c->dlq);
  }
  if (c->rk != NULL)
    rd_kafka_destroy(c->rk);
  while (c->held_head != NULL) {
    held *h = c->held_head;

    c->held_head = h->next;
    fo_consumer_event_done(h->ev, false, NULL);
    free(h);
  }
  while (c->dl_retry != NULL) {
    dead_letter *dl = c->dl_retry;

    c->dl_retry = dl->next;
    fo_offsets_unref(dl->track);
    dead_letter_free(dl);
  }
  for (int32_t p = 0; p < c->nparts; p++)
    fo_offsets_unref(c->parts[p].track);
  free(c->parts);
  free(c->topic);
  free(c->dlq_topic);
  free(c);
}

void fo_consumer_get_stats(fo_consumer *c, fo_consumer_stats *out) {
  memset(out, 0, sizeof(*out));
  out->consumed = atomic_load(&c->consumed);
  out->dead_lettered = atomic_load(&c->dead_lettered);
  out->commits = atomic_load(&c->commits);
  out->pauses = atomic_load(&c->pauses);
  out->paused = atomic_load(&c->paused_flag);
}
