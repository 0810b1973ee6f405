/* SPDX-License-Identifier: MIT */
/*
 * The acknowledged Kafka producer behind POST /v1/events. Each send gets
 * a small pending record that travels with its message as librdkafka's
 * per-message opaque, so the delivery report of that message, and only
 * that one, completes it. A deadline sweep on the same poll thread
 * completes sends whose report is late; the record itself lives until
 * its report arrives, because librdkafka still holds the pointer.
 */
#include "publish.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <librdkafka/rdkafka.h>

#include "fanout/common.h"
#include "log.h"
#include "metrics.h"

#define FO_PUBLISH_POLL_MS 50
#define FO_PUBLISH_HEALTH_MS 500
#define FO_PUBLISH_FLUSH_MS 2000

typedef struct fo_publish_pending {
  struct fo_publish_pending *prev;
  struct fo_publish_pending *next;
  struct fo_publish_pending *fire_next;  /* sweep's local list */
  int64_t start_us;
  int64_t deadline_ms;
  fo_publish_done_fn done;
  void *arg;
  bool fired;                   /* done was called (under mu) */
} fo_publish_pending;

struct fo_publish {
  rd_kafka_t *rk;
  rd_kafka_topic_t *rkt;
  pthread_t thread;
  bool thread_started;
  atomic_bool stop;
  atomic_bool closed;           /* refuses new sends */
  atomic_bool destroying;       /* reports are ignored from now on */

  pthread_mutex_t mu;           /* guards the pending list */
  fo_publish_pending *head;

  fo_counter *m_ok;
  fo_counter *m_timeout;
  fo_counter *m_error;
  fo_histogram *m_ack;
};

/* The outcome of one synchronous send, on the sender's stack. */
typedef struct fo_publish_waiter {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  bool done;
  int rc;
} fo_publish_waiter;

static void fo_publish_log_cb(const rd_kafka_t *rk, int level,
                              const char *fac, const char *buf) {
  static fo_ratelimit rl;
  fo_log_level lvl = level <= 3   ? FO_LOG_ERROR
                     : level <= 4 ? FO_LOG_WARN
                     : level <= 6 ? FO_LOG_INFO
                                  : FO_LOG_DEBUG;

  (void)rk;
  /* librdkafka repeats connection errors while a broker is down. */
  if (lvl <= FO_LOG_WARN)
    fo_log_rl(&rl, 5000, lvl, "publish", "librdkafka",
              "fac=%s detail=\"%s\"", fac, buf);
  else
    fo_log(lvl, "publish", "librdkafka", "fac=%s detail=\"%s\"", fac, buf);
}

static void fo_publish_error_cb(rd_kafka_t *rk, int err, const char *reason,
                                void *opaque) {
  static fo_ratelimit rl;

  (void)rk;
  (void)opaque;
  if (err == RD_KAFKA_RESP_ERR__FATAL) {
    /* An idempotent producer that lost its sequence state cannot go on.
     * Known limitation: it is not recreated; every later send fails and
     * /healthz reports Kafka down until fanoutd restarts. */
    fo_log_error("publish", "fatal producer error", "detail=\"%s\"",
                 reason);
    return;
  }
  fo_log_rl(&rl, 5000, FO_LOG_WARN, "publish", "kafka error",
            "error=\"%s\" detail=\"%s\"",
            rd_kafka_err2str((rd_kafka_resp_err_t)err), reason);
}

static void fo_publish_unlink(fo_publish *p, fo_publish_pending *pd) {
  if (pd->prev != NULL)
    pd->prev->next = pd->next;
  else
    p->head = pd->next;
  if (pd->next != NULL)
    pd->next->prev = pd->prev;
  pd->prev = NULL;
  pd->next = NULL;
}

static void fo_publish_count(fo_publish *p, int rc, int64_t start_us) {
  if (rc == FO_OK) {
    fo_counter_add(p->m_ok, 1);
    fo_histogram_observe_us(p->m_ack, fo_now_us() - start_us);
  } else if (rc == FO_ETIMEDOUT) {
    fo_counter_add(p->m_timeout, 1);
  } else {
    fo_counter_add(p->m_error, 1);
  }
}

/* The delivery report of one message: completes its send unless the
 * deadline sweep already did, and frees the record in any case. */
static void fo_publish_dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m,
                             void *opaque) {
  fo_publish *p = opaque;
  fo_publish_pending *pd = m->_private;
  bool fired;
  int rc;

  (void)rk;
  if (pd == NULL || atomic_load(&p->destroying))
    return;
  pthread_mutex_lock(&p->mu);
  fo_publish_unlink(p, pd);
  fired = pd->fired;
  pd->fired = true;
  pthread_mutex_unlock(&p->mu);

  if (!fired) {
    if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
      rc = FO_OK;
    } else if (m->err == RD_KAFKA_RESP_ERR__MSG_TIMED_OUT) {
      rc = FO_ETIMEDOUT;
    } else if (m->err == RD_KAFKA_RESP_ERR__PURGE_QUEUE ||
               m->err == RD_KAFKA_RESP_ERR__PURGE_INFLIGHT) {
      rc = FO_ECLOSED;
    } else {
      static fo_ratelimit rl;

      rc = FO_EKAFKA;
      fo_log_rl(&rl, 5000, FO_LOG_WARN, "publish", "delivery failed",
                "error=\"%s\"", rd_kafka_err2str(m->err));
    }
    fo_publish_count(p, rc, pd->start_us);
    pd->done(rc, pd->arg);
  }
  free(pd);
}

/* Completes every send whose deadline passed (or all of them, with
 * `all`) with `rc`. Records stay linked until their report arrives. */
static void fo_publish_sweep(fo_publish *p, int64_t now_ms, bool all,
                             int rc) {
  fo_publish_pending *fire = NULL;

  pthread_mutex_lock(&p->mu);
  for (fo_publish_pending *pd = p->head; pd != NULL; pd = pd->next) {
    if (pd->fired || (!all && now_ms < pd->deadline_ms))
      continue;
    pd->fired = true;
    pd->fire_next = fire;
    fire = pd;
  }
  pthread_mutex_unlock(&p->mu);

  /* Only this thread frees records (in the report callback), so the
   * collected ones stay valid without the lock. */
  while (fire != NULL) {
    fo_publish_pending *pd = fire;

    fire = pd->fire_next;
    fo_publish_count(p, rc, pd->start_us);
    pd->done(rc, pd->arg);
  }
}

static void *fo_publish_thread(void *arg) {
  fo_publish *p = arg;

  while (!atomic_load(&p->stop)) {
    rd_kafka_poll(p->rk, FO_PUBLISH_POLL_MS);
    fo_publish_sweep(p, fo_now_ms(), false, FO_ETIMEDOUT);
  }
  return NULL;
}

static int fo_publish_conf_set(rd_kafka_conf_t *conf, const char *k,
                               const char *v, char *err, size_t errlen) {
  char why[256];

  if (rd_kafka_conf_set(conf, k, v, why, sizeof(why)) != RD_KAFKA_CONF_OK) {
    snprintf(err, errlen, "kafka: %s: %s", k, why);
    return FO_EKAFKA;
  }
  return FO_OK;
}

int fo_publish_new(const char *brokers, const char *topic, fo_publish **out,
                   char *err, size_t errlen) {
  /* message.timeout.ms bounds how long an unacknowledged message lives
   * in the producer; a send's own timeout is usually much shorter. The
   * buffer bound keeps a Kafka outage from growing memory without end. */
  static const char *const settings[][2] = {
      {"enable.idempotence", "true"},
      {"linger.ms", "2"},
      {"message.timeout.ms", "30000"},
      {"queue.buffering.max.kbytes", "65536"},
      {"client.id", "fanout-publish"},
  };
  rd_kafka_conf_t *conf = NULL;
  fo_publish *p;
  char why[512];
  int rc = FO_EKAFKA;

  if (brokers == NULL || topic == NULL || *topic == '\0') {
    snprintf(err, errlen, "kafka: publish needs brokers and a topic");
    return FO_EINVAL;
  }
  p = calloc(1, sizeof(*p));
  if (p == NULL) {
    snprintf(err, errlen, "kafka: out of memory");
    return FO_ENOMEM;
  }
  pthread_mutex_init(&p->mu, NULL);

  conf = rd_kafka_conf_new();
  if (fo_publish_conf_set(conf, "bootstrap.servers", brokers, err,
                          errlen) != FO_OK)
    goto fail;
  for (size_t i = 0; i < sizeof(settings) / sizeof(settings[0]); i++) {
    if (fo_publish_conf_set(conf, settings[i][0], settings[i][1], err,
                            errlen) != FO_OK)
      goto fail;
  }
  rd_kafka_conf_set_opaque(conf, p);
  rd_kafka_conf_set_log_cb(conf, fo_publish_log_cb);
  rd_kafka_conf_set_error_cb(conf, fo_publish_error_cb);
  rd_kafka_conf_set_dr_msg_cb(conf, fo_publish_dr_cb);

  p->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, why, sizeof(why));
  if (p->rk == NULL) {
    snprintf(err, errlen, "kafka: producer: %s", why);
    goto fail;
  }
  conf = NULL;                  /* rd_kafka_new took it */
  p->rkt = rd_kafka_topic_new(p->rk, topic, NULL);
  if (p->rkt == NULL) {
    snprintf(err, errlen, "kafka: topic %s: %s", topic,
             rd_kafka_err2str(rd_kafka_last_error()));
    goto fail;
  }

  p->m_ok = fo_metrics_counter("fanout_publish_messages_total",
                               "Events published through the admin API",
                               "result=\"ok\"");
  p->m_timeout = fo_metrics_counter("fanout_publish_messages_total", NULL,
                                    "result=\"timeout\"");
  p->m_error = fo_metrics_counter("fanout_publish_messages_total", NULL,
                                  "result=\"error\"");
  p->m_ack = fo_metrics_histogram("fanout_publish_ack_seconds",
                                  "Time from send to broker acknowledgement",
                                  NULL);

  if (pthread_create(&p->thread, NULL, fo_publish_thread, p) != 0) {
    snprintf(err, errlen, "kafka: cannot start the publish thread");
    rc = FO_ENOMEM;
    goto fail;
  }
  p->thread_started = true;
  *out = p;
  return FO_OK;

fail:
  if (conf != NULL)
    rd_kafka_conf_destroy(conf);
  fo_publish_free(p);
  return rc;
}

int fo_publish_send_async(fo_publish *p, const char *key, const void *value,
                          size_t len, int timeout_ms,
                          fo_publish_done_fn done, void *arg) {
  size_t keylen = key != NULL ? strlen(key) : 0;
  fo_publish_pending *pd;
  rd_kafka_resp_err_t e;
  bool fired;

  if (p == NULL || done == NULL || timeout_ms <= 0 ||
      (value == NULL && len > 0))
    return FO_EINVAL;
  if (atomic_load(&p->closed))
    return FO_ECLOSED;
  pd = calloc(1, sizeof(*pd));
  if (pd == NULL)
    return FO_ENOMEM;
  pd->start_us = fo_now_us();
  pd->deadline_ms = fo_now_ms() + timeout_ms;
  pd->done = done;
  pd->arg = arg;

  /* Linked before producing: the report may arrive before producev
   * even returns. */
  pthread_mutex_lock(&p->mu);
  pd->next = p->head;
  if (p->head != NULL)
    p->head->prev = pd;
  p->head = pd;
  pthread_mutex_unlock(&p->mu);

  e = rd_kafka_producev(
      p->rk, RD_KAFKA_V_RKT(p->rkt),
      RD_KAFKA_V_KEY(key, keylen),
      RD_KAFKA_V_VALUE((void *)(uintptr_t)value, len),
      RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_OPAQUE(pd),
      RD_KAFKA_V_END);
  if (e == RD_KAFKA_RESP_ERR_NO_ERROR)
    return FO_OK;

  pthread_mutex_lock(&p->mu);
  fo_publish_unlink(p, pd);
  fired = pd->fired;
  pd->fired = true;
  pthread_mutex_unlock(&p->mu);
  free(pd);
  if (fired) {
    /* A very short deadline passed before producev failed: `done` was
     * called already, so this send counts as accepted. */
    return FO_OK;
  }
  {
    static fo_ratelimit rl;

    fo_counter_add(p->m_error, 1);
    fo_log_rl(&rl, 5000, FO_LOG_WARN, "publish", "produce refused",
              "error=\"%s\"", rd_kafka_err2str(e));
  }
  return FO_EKAFKA;
}

static void fo_publish_wake(int rc, void *arg) {
  fo_publish_waiter *w = arg;

  pthread_mutex_lock(&w->mu);
  w->rc = rc;
  w->done = true;
  pthread_cond_signal(&w->cv);
  pthread_mutex_unlock(&w->mu);
}

int fo_publish_send(fo_publish *p, const char *key, const void *value,
                    size_t len, int timeout_ms) {
  fo_publish_waiter w = {.done = false, .rc = FO_OK};
  int rc;

  pthread_mutex_init(&w.mu, NULL);
  pthread_cond_init(&w.cv, NULL);
  rc = fo_publish_send_async(p, key, value, len, timeout_ms,
                             fo_publish_wake, &w);
  if (rc == FO_OK) {
    /* The sweep completes every send by its deadline, so this wait is
     * bounded without a timeout of its own. */
    pthread_mutex_lock(&w.mu);
    while (!w.done)
      pthread_cond_wait(&w.cv, &w.mu);
    rc = w.rc;
    pthread_mutex_unlock(&w.mu);
  }
  pthread_cond_destroy(&w.cv);
  pthread_mutex_destroy(&w.mu);
  return rc;
}

bool fo_publish_healthy(fo_publish *p) {
  const rd_kafka_metadata_t *md = NULL;
  rd_kafka_resp_err_t e;
  bool ok;

  if (p == NULL || rd_kafka_fatal_error(p->rk, NULL, 0) !=
                       RD_KAFKA_RESP_ERR_NO_ERROR)
    return false;
  e = rd_kafka_metadata(p->rk, 0, p->rkt, &md, FO_PUBLISH_HEALTH_MS);
  if (e != RD_KAFKA_RESP_ERR_NO_ERROR)
    return false;
  ok = md->topic_cnt == 1 &&
       md->topics[0].err == RD_KAFKA_RESP_ERR_NO_ERROR &&
       md->topics[0].partition_cnt > 0;
  rd_kafka_metadata_destroy(md);
  return ok;
}

void fo_publish_free(fo_publish *p) {
  if (p == NULL)
    return;
  atomic_store(&p->closed, true);
  if (p->thread_started) {
    atomic_store(&p->stop, true);
    pthread_join(p->thread, NULL);
  }

  if (p->rk != NULL) {
    /* flush() serves delivery reports on this thread, so sends that
     * complete now get their real outcome. */
    rd_kafka_flush(p->rk, FO_PUBLISH_FLUSH_MS);
    rd_kafka_purge(p->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
    for (int i = 0; i < 20 && rd_kafka_outq_len(p->rk) > 0; i++)
      rd_kafka_poll(p->rk, 50);
  }
  /* Whatever is still pending will get no report now. */
  fo_publish_sweep(p, 0, true, FO_ECLOSED);
  atomic_store(&p->destroying, true);
  while (p->head != NULL) {
    fo_publish_pending *pd = p->head;

    p->head = pd->next;
    free(pd);
  }

  if (p->rkt != NULL)
    rd_kafka_topic_destroy(p->rkt);
  if (p->rk != NULL)
    rd_kafka_destroy(p->rk);
  pthread_mutex_destroy(&p->mu);
  free(p);
}
