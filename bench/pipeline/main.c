/* SPDX-License-Identifier: MIT */
/*
 * Pipeline benchmark: events produced into the embedded Kafka broker are
 * consumed, decoded, queued and dispatched by the real engine to a channel
 * that only counts, so the figures are the engine's own cost per
 * (user, channel) delivery.
 *
 * Each run is a forked child (fresh metrics registry and peak RSS) that
 * forks once more: the broker and the producer live in that second
 * process, as Kafka and the event producers do in production, so the
 * engine process's memory is the engine's alone and not the broker's
 * retained log. The two share the delivery counter through a shared
 * mapping; the producer uses it to stay within a window of unfinished
 * events. The parent prints every run, the median of each figure and the
 * command that reproduces them, and exits non-zero unless every delivery
 * of every run was counted exactly once.
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>

#include "../common.h"
#include "config.h"
#include "engine.h"
#include "fanout/channel.h"
#include "fanout/common.h"
#include "kafka_mock.h"
#include "log.h"
#include "metrics.h"

#define BENCH_STALL_MS 30000      /* no progress for this long: failed */
#define BENCH_JOIN_MS 60000       /* no first delivery by then: failed */
#define BENCH_BROKER_MS 15000     /* broker process must be up by then */
#define BENCH_DRAIN_MS 10000
#define BENCH_TICK_MS 2
#define BENCH_NSAMPLES 4
#define BENCH_TARGET_PER_S 300000.0

/*
 * The broker drops a partition's oldest messages past about 5 MB, and
 * the consumer may lag on one partition while it reads the others, so
 * the whole window must fit in one partition.
 */
#define BENCH_WINDOW_BYTES (3L * 1024 * 1024)

static const int bench_sample_pct[BENCH_NSAMPLES] = {10, 50, 90, 100};

typedef struct bench_opts {
  long events;
  long users;
  long runs;
  long workers;
  long window;                    /* events produced ahead of completion */
  long partitions;
} bench_opts;

/* What one run reports to the parent, through a pipe. */
typedef struct bench_result {
  int ok;
  uint64_t events;
  uint64_t deliveries;            /* counted by the sink */
  double secs;                    /* first to last delivery */
  double events_per_s;
  double deliveries_per_s;
  int64_t p50_us;                 /* worst channel's estimate */
  int64_t p99_us;
  double engine_cores;            /* CPU time / wall over the timed part */
  double broker_cores;            /* broker and producer process */
  uint64_t pauses;                /* consumer paused for a full queue */
  long peak_rss_kb;               /* engine process */
  long rss_kb[BENCH_NSAMPLES];
  long broker_peak_rss_kb;
  char error[640];
} bench_result;

/*
 * The counting channel, in memory shared with the broker process, which
 * reads `count` to pace the producer. The counter sits on its own cache
 * line because every dispatcher worker writes it for every delivery.
 */
typedef struct bench_sink {
  alignas(64) atomic_uint_fast64_t count;
  alignas(64) atomic_int_fast64_t first_us;
  atomic_int_fast64_t last_us;
  atomic_bool closed;
  uint64_t target;
  fo_outcome sent;
  fo_channel ch;
} bench_sink;

/* Everything the engine and broker processes share; one mapping. */
typedef struct bench_shared {
  bench_sink sink;
  atomic_int broker_state;        /* 0 starting, 1 ready, -1 failed */
  atomic_bool finish;             /* the engine is done with the broker */
  atomic_bool abort;              /* stop producing */
  atomic_uint_fast64_t produced;
  int producer_rc;
  long broker_peak_rss_kb;
  char bootstrap[256];
  char error[320];
} bench_shared;

/* Channel */

static int sink_submit(void *self, fo_delivery *d) {
  bench_sink *s = self;
  uint64_t n;

  if (atomic_load_explicit(&s->closed, memory_order_relaxed))
    return FO_ECLOSED;
  n = atomic_fetch_add_explicit(&s->count, 1, memory_order_relaxed) + 1;
  if (n == 1)
    atomic_store(&s->first_us, fo_now_us());
  if (n == s->target)
    atomic_store(&s->last_us, fo_now_us());
  fo_delivery_complete(d, &s->sent);
  return FO_OK;
}

static int sink_flush(void *self, int timeout_ms) {
  (void)self;
  (void)timeout_ms;
  /* Every delivery completes inside submit(): nothing is ever pending. */
  return FO_OK;
}

static void sink_shutdown(void *self) {
  bench_sink *s = self;

  atomic_store(&s->closed, true);
}

static void sink_destroy(void *self) {
  /* The sink lives in the shared mapping, unmapped by its creator. */
  (void)self;
}

static const fo_channel_ops sink_ops = {
    .name = "bench-count",
    .submit = sink_submit,
    .flush = sink_flush,
    .shutdown = sink_shutdown,
    .destroy = sink_destroy,
};

/* Maps the shared block; the caller unmaps it with shared_free(). */
static bench_shared *shared_new(uint64_t target) {
  bench_shared *sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE,
                          MAP_SHARED | MAP_ANONYMOUS, -1, 0);

  if (sh == MAP_FAILED)
    return NULL;
  memset(sh, 0, sizeof(*sh));
  atomic_init(&sh->sink.count, 0);
  atomic_init(&sh->sink.first_us, 0);
  atomic_init(&sh->sink.last_us, 0);
  atomic_init(&sh->sink.closed, false);
  sh->sink.target = target;
  fo_outcome_init(&sh->sink.sent, FO_STATUS_SENT);
  sh->sink.ch.ops = &sink_ops;
  sh->sink.ch.self = &sh->sink;
  atomic_init(&sh->broker_state, 0);
  atomic_init(&sh->finish, false);
  atomic_init(&sh->abort, false);
  atomic_init(&sh->produced, 0);
  return sh;
}

static void shared_free(bench_shared *sh) {
  if (sh != NULL)
    munmap(sh, sizeof(*sh));
}

/* Small helpers */

/* A "Vm...:" line of /proc/PID/status in kB (pid 0: this process). */
static long proc_status_kb(pid_t pid, const char *key) {
  char path[64], line[256];
  size_t klen = strlen(key);
  long kb = -1;
  FILE *f;

  if (pid == 0)
    snprintf(path, sizeof(path), "/proc/self/status");
  else
    snprintf(path, sizeof(path), "/proc/%ld/status", (long)pid);
  if ((f = fopen(path, "r")) == NULL)
    return -1;
  while (fgets(line, sizeof(line), f) != NULL) {
    if (strncmp(line, key, klen) == 0) {
      kb = strtol(line + klen, NULL, 10);
      break;
    }
  }
  fclose(f);
  return kb;
}

/* User plus system CPU seconds of a process (pid 0: this one). */
static double proc_cpu_secs(pid_t pid) {
  char path[64], buf[1024], *p;
  unsigned long ut = 0, st = 0;
  size_t n;
  FILE *f;

  if (pid == 0) {
    struct rusage ru;

    if (getrusage(RUSAGE_SELF, &ru) != 0)
      return 0;
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
  }
  snprintf(path, sizeof(path), "/proc/%ld/stat", (long)pid);
  if ((f = fopen(path, "r")) == NULL)
    return 0;
  n = fread(buf, 1, sizeof(buf) - 1, f);
  fclose(f);
  buf[n] = '\0';
  /* Fields after the command name, which may hold spaces: state is the
   * 3rd field, utime the 14th and stime the 15th. */
  if ((p = strrchr(buf, ')')) == NULL ||
      sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu",
             &ut, &st) != 2)
    return 0;
  return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/*
 * The JSON after the id: recipients user-0 .. user-(N-1), every channel
 * by default. Caller frees the result.
 */
static char *event_tail(long users) {
  size_t cap = 256 + (size_t)users * 24;
  char *s = malloc(cap);
  size_t n;

  if (s == NULL)
    return NULL;
  n = (size_t)snprintf(s, cap, "\",\"category\":\"bench\",\"to\":[");
  for (long u = 0; u < users; u++)
    n += (size_t)snprintf(s + n, cap - n, "%s\"user-%ld\"", u ? "," : "",
                          u);
  snprintf(s + n, cap - n,
           "],\"title\":\"Benchmark\",\"body\":\"One event of the "
           "pipeline benchmark\"}");
  return s;
}

/* Broker process: the embedded broker and the producer */

static void producer_dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m,
                           void *opaque) {
  atomic_uint_fast64_t *errors = opaque;

  (void)rk;
  if (m->err != RD_KAFKA_RESP_ERR_NO_ERROR)
    atomic_fetch_add(errors, 1);
}

static rd_kafka_t *producer_new(const char *brokers,
                                atomic_uint_fast64_t *dr_errors, char *err,
                                size_t errlen) {
  const char *kv[][2] = {
      {"bootstrap.servers", brokers},
      {"client.id", "fanout-bench"},
      {"linger.ms", "5"},
      {"batch.num.messages", "10000"},
      {"batch.size", "1000000"},
      {"queue.buffering.max.messages", "200000"},
      {"queue.buffering.max.kbytes", "131072"},
  };
  rd_kafka_conf_t *conf = rd_kafka_conf_new();
  rd_kafka_t *rk;
  char why[256];

  for (size_t i = 0; i < sizeof(kv) / sizeof(kv[0]); i++) {
    if (rd_kafka_conf_set(conf, kv[i][0], kv[i][1], why, sizeof(why)) !=
        RD_KAFKA_CONF_OK) {
      snprintf(err, errlen, "producer: %s: %s", kv[i][0], why);
      rd_kafka_conf_destroy(conf);
      return NULL;
    }
  }
  rd_kafka_conf_set_dr_msg_cb(conf, producer_dr_cb);
  rd_kafka_conf_set_opaque(conf, dr_errors);
  rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, why, sizeof(why));
  if (rk == NULL) {
    snprintf(err, errlen, "producer: %s", why);
    rd_kafka_conf_destroy(conf);
  }
  return rk;
}

/* Waits while more than the window of produced events is unfinished;
 * false when told to stop. */
static bool producer_wait_window(bench_shared *sh, rd_kafka_t *rk,
                                 uint64_t produced, uint64_t per_event,
                                 uint64_t window) {
  for (;;) {
    uint64_t done = atomic_load_explicit(&sh->sink.count,
                                         memory_order_relaxed) /
                    per_event;

    if (produced < done + window)
      return true;
    if (atomic_load(&sh->abort))
      return false;
    rd_kafka_poll(rk, 0);
    bench_sleep_ms(1);
  }
}

static int producer_send(bench_shared *sh, rd_kafka_t *rk,
                         const char *topic, const char *buf, size_t len) {
  for (;;) {
    rd_kafka_resp_err_t e = rd_kafka_producev(
        rk, RD_KAFKA_V_TOPIC(topic),
        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
        RD_KAFKA_V_VALUE((void *)buf, len), RD_KAFKA_V_END);

    if (e == RD_KAFKA_RESP_ERR_NO_ERROR)
      return FO_OK;
    if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL) {
      snprintf(sh->error, sizeof(sh->error), "produce: %s",
               rd_kafka_err2str(e));
      return FO_EKAFKA;
    }
    if (atomic_load(&sh->abort))
      return FO_ECLOSED;
    rd_kafka_poll(rk, 10);
  }
}

/* Produces every event of the run; FO_OK or an error in sh->error. */
static int produce_all(const bench_opts *o, bench_shared *sh,
                       const char *topic) {
  atomic_uint_fast64_t dr_errors;
  uint64_t per_event = (uint64_t)o->users * FO_CH_COUNT;
  char *tail = event_tail(o->users);
  rd_kafka_t *rk = NULL;
  char *buf = NULL;
  size_t cap;
  int rc = FO_ENOMEM;

  atomic_init(&dr_errors, 0);
  if (tail == NULL)
    goto out;
  cap = strlen(tail) + 64;
  if ((buf = malloc(cap)) == NULL)
    goto out;
  rk = producer_new(sh->bootstrap, &dr_errors, sh->error,
                    sizeof(sh->error));
  if (rk == NULL) {
    rc = FO_EKAFKA;
    goto out;
  }

  for (long i = 0; i < o->events; i++) {
    int n = snprintf(buf, cap, "{\"id\":\"bench-%ld%s", i, tail);

    if (!producer_wait_window(sh, rk, (uint64_t)i, per_event,
                              (uint64_t)o->window)) {
      rc = FO_ECLOSED;
      goto out;
    }
    if ((rc = producer_send(sh, rk, topic, buf, (size_t)n)) != FO_OK)
      goto out;
    atomic_store_explicit(&sh->produced, (uint64_t)i + 1,
                          memory_order_relaxed);
    rd_kafka_poll(rk, 0);
  }
  if (rd_kafka_flush(rk, 60000) != RD_KAFKA_RESP_ERR_NO_ERROR) {
    snprintf(sh->error, sizeof(sh->error), "producer: flush timed out");
    rc = FO_ETIMEDOUT;
    goto out;
  }
  rc = FO_OK;
  if (atomic_load(&dr_errors) > 0) {
    snprintf(sh->error, sizeof(sh->error), "producer: %" PRIu64
             " messages not acknowledged", (uint64_t)atomic_load(&dr_errors));
    rc = FO_EKAFKA;
  }

out:
  if (rc == FO_ENOMEM)
    snprintf(sh->error, sizeof(sh->error), "producer: out of memory");
  if (rk != NULL)
    rd_kafka_destroy(rk);
  free(buf);
  free(tail);
  return rc;
}

/*
 * Main of the broker process: starts the broker, produces, then keeps the
 * broker up until the engine process has stopped (it commits and leaves
 * the group on the way out). Never returns.
 */
static _Noreturn void broker_main(const bench_opts *o,
                                   const fo_config *cfg,
                                   bench_shared *sh) {
  const char *topics[3];
  fo_kmock *mock = NULL;
  struct rusage ru;
  char err[512];
  int rc;

  /* Dies with the engine process rather than outliving a failed run. */
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  topics[0] = fo_config_get(cfg, "kafka", "topic");
  topics[1] = fo_config_get(cfg, "kafka", "dlq_topic");
  topics[2] = NULL;
  rc = fo_kmock_start(topics,
                      (int)fo_config_get_int(cfg, "kafka",
                                             "embedded_partitions"),
                      &mock, err, sizeof(err));
  if (rc != FO_OK) {
    snprintf(sh->error, sizeof(sh->error), "%.300s", err);
    atomic_store(&sh->broker_state, -1);
    _exit(1);
  }
  snprintf(sh->bootstrap, sizeof(sh->bootstrap), "%s",
           fo_kmock_bootstraps(mock));
  atomic_store(&sh->broker_state, 1);

  sh->producer_rc = produce_all(o, sh, topics[0]);
  while (!atomic_load(&sh->finish) && !atomic_load(&sh->abort))
    bench_sleep_ms(10);
  if (getrusage(RUSAGE_SELF, &ru) == 0)
    sh->broker_peak_rss_kb = ru.ru_maxrss;
  fo_kmock_stop(mock);
  _exit(0);
}

/* Engine process: one run */

/*
 * Waits until the sink has counted every delivery, sampling RSS as the
 * count passes each mark and CPU over the timed part. Returns FO_OK, or
 * FO_ETIMEDOUT with the reason in r->error when the pipeline stalls.
 */
static int watch_run(bench_shared *sh, pid_t broker, bench_result *r) {
  bench_sink *s = &sh->sink;
  int64_t start = fo_now_ms(), last_change = start, busy_from = 0;
  double cpu_from = 0, broker_from = 0;
  uint64_t last = 0;
  int next = 0;

  for (;;) {
    uint64_t n = atomic_load(&s->count);
    int64_t now = fo_now_ms();

    while (next < BENCH_NSAMPLES &&
           n * 100 >= s->target * (uint64_t)bench_sample_pct[next])
      r->rss_kb[next++] = proc_status_kb(0, "VmRSS:");
    if (n >= s->target && atomic_load(&s->last_us) != 0) {
      double wall = (double)(now - busy_from) / 1000.0;

      if (wall > 0) {
        r->engine_cores = (proc_cpu_secs(0) - cpu_from) / wall;
        r->broker_cores = (proc_cpu_secs(broker) - broker_from) / wall;
      }
      return FO_OK;
    }
    if (n > 0 && last == 0) {
      busy_from = now;
      cpu_from = proc_cpu_secs(0);
      broker_from = proc_cpu_secs(broker);
    }
    if (n != last) {
      last = n;
      last_change = now;
    }
    if ((n == 0 && now - start > BENCH_JOIN_MS) ||
        (n > 0 && now - last_change > BENCH_STALL_MS)) {
      snprintf(r->error, sizeof(r->error),
               "stalled at %" PRIu64 " of %" PRIu64 " deliveries "
               "(produced %" PRIu64 " events)%s%s", n, s->target,
               (uint64_t)atomic_load(&sh->produced),
               sh->error[0] ? ": " : "", sh->error);
      return FO_ETIMEDOUT;
    }
    bench_sleep_ms(BENCH_TICK_MS);
  }
}

/* The dispatcher's consume-to-dispatch histograms, worst channel. */
static void read_latency(bench_result *r) {
  for (int k = 0; k < FO_CH_COUNT; k++) {
    char labels[48];
    fo_histogram *h;
    int64_t v;

    snprintf(labels, sizeof(labels), "channel=\"%s\"",
             fo_channel_name((fo_channel_kind)k));
    h = fo_metrics_histogram("fanout_dispatch_latency_seconds", "", labels);
    if ((v = fo_histogram_quantile_us(h, 0.50)) > r->p50_us)
      r->p50_us = v;
    if ((v = fo_histogram_quantile_us(h, 0.99)) > r->p99_us)
      r->p99_us = v;
  }
}

/* Starts the broker process and waits for its address. */
static int broker_start(const bench_opts *o, const fo_config *cfg,
                        bench_shared *sh, pid_t *out, char *err,
                        size_t errlen) {
  int64_t deadline = fo_now_ms() + BENCH_BROKER_MS;
  pid_t pid;

  /* No thread runs in this process yet, so the fork is clean. */
  fflush(stdout);
  fflush(stderr);
  pid = fork();
  if (pid < 0) {
    snprintf(err, errlen, "fork: %s", strerror(errno));
    return FO_EIO;
  }
  if (pid == 0)
    broker_main(o, cfg, sh);

  *out = pid;
  while (atomic_load(&sh->broker_state) == 0) {
    if (fo_now_ms() > deadline) {
      snprintf(err, errlen, "broker process did not start");
      return FO_ETIMEDOUT;
    }
    bench_sleep_ms(5);
  }
  if (atomic_load(&sh->broker_state) < 0) {
    snprintf(err, errlen, "%s", sh->error);
    return FO_EKAFKA;
  }
  return FO_OK;
}

/* Lets the broker process finish and collects its outcome into `rc`. */
static int broker_finish(bench_shared *sh, pid_t pid, int rc,
                         bench_result *r) {
  int status = 0;

  if (rc != FO_OK)
    atomic_store(&sh->abort, true);
  atomic_store(&sh->finish, true);
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
    continue;
  r->broker_peak_rss_kb = sh->broker_peak_rss_kb;
  if (rc != FO_OK)
    return rc;
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    snprintf(r->error, sizeof(r->error), "broker process failed");
    return FO_EIO;
  }
  if (sh->producer_rc != FO_OK) {
    snprintf(r->error, sizeof(r->error), "%s", sh->error);
    return sh->producer_rc;
  }
  return FO_OK;
}

static int run_once(const bench_opts *o, bench_result *r) {
  char workers[64], parts[64];
  char *envp[] = {
      "FANOUT_ADMIN_TOKEN=bench-admin-token-0123456789",
      "FANOUT_RELAY_JWT_SECRET=bench-jwt-secret-0123456789",
      "FANOUT_KAFKA_SESSION_TIMEOUT_MS=3000",
      "FANOUT_ENGINE_SUMMARY_INTERVAL_S=0",
      workers,
      parts,
      NULL};
  uint64_t target = (uint64_t)o->events * (uint64_t)o->users * FO_CH_COUNT;
  bench_shared *sh = NULL;
  fo_config *cfg = NULL;
  fo_engine *e = NULL;
  pid_t broker = -1;
  struct rusage ru;
  char err[512];
  int rc;

  snprintf(workers, sizeof(workers), "FANOUT_ENGINE_WORKERS=%ld",
           o->workers);
  snprintf(parts, sizeof(parts), "FANOUT_KAFKA_EMBEDDED_PARTITIONS=%ld",
           o->partitions);
  r->events = (uint64_t)o->events;

  if ((rc = fo_config_load(NULL, envp, &cfg, err, sizeof(err))) != FO_OK)
    goto fail;
  if ((sh = shared_new(target)) == NULL) {
    rc = FO_ENOMEM;
    snprintf(err, sizeof(err), "mmap: %s", strerror(errno));
    goto fail;
  }
  if ((rc = broker_start(o, cfg, sh, &broker, err, sizeof(err))) != FO_OK)
    goto fail;

  rc = fo_engine_new(cfg, sh->bootstrap, &e, err, sizeof(err));
  if (rc != FO_OK)
    goto fail;
  for (int k = 0; k < FO_CH_COUNT; k++)
    fo_engine_set_channel(e, (fo_channel_kind)k, &sh->sink.ch);
  if ((rc = fo_engine_start(e)) != FO_OK) {
    snprintf(err, sizeof(err), "engine start: %s", fo_strerror(rc));
    goto fail;
  }

  rc = watch_run(sh, broker, r);
  if (rc == FO_OK) {
    r->secs = (double)(atomic_load(&sh->sink.last_us) -
                       atomic_load(&sh->sink.first_us)) / 1e6;
    if (r->secs <= 0)
      r->secs = 1e-6;
    r->events_per_s = (double)r->events / r->secs;
    r->deliveries_per_s = (double)target / r->secs;
    read_latency(r);
    r->pauses = fo_counter_value(
        fo_metrics_counter("fanout_consumer_pauses_total", "", NULL));
  }
  goto out;

fail:
  snprintf(r->error, sizeof(r->error), "%s", err);
out:
  if (e != NULL && fo_engine_stop(e, BENCH_DRAIN_MS) != FO_OK &&
      rc == FO_OK) {
    rc = FO_ETIMEDOUT;
    snprintf(r->error, sizeof(r->error), "engine stop: work left over");
  }
  fo_engine_free(e);
  if (broker > 0)
    rc = broker_finish(sh, broker, rc, r);
  if (sh != NULL) {
    /* Read after the stop: a replayed delivery would show up here. */
    r->deliveries = atomic_load(&sh->sink.count);
    if (rc == FO_OK && r->deliveries != target) {
      rc = FO_EINVAL;
      snprintf(r->error, sizeof(r->error),
               "counted %" PRIu64 " deliveries, expected %" PRIu64,
               r->deliveries, target);
    }
  }
  shared_free(sh);
  fo_config_free(cfg);
  if (getrusage(RUSAGE_SELF, &ru) == 0)
    r->peak_rss_kb = ru.ru_maxrss;
  /* The kernel updates the high-water mark lazily, so a sample taken
   * during the run may be a little above it. */
  for (int i = 0; i < BENCH_NSAMPLES; i++)
    if (r->rss_kb[i] > r->peak_rss_kb)
      r->peak_rss_kb = r->rss_kb[i];
  r->ok = rc == FO_OK;
  return rc;
}

/* The parent: options, one child per run, report */

static void usage(FILE *to) {
  fprintf(to,
          "usage: pipeline [--events N] [--users N] [--runs N]\n"
          "                [--workers N] [--window N] [--partitions N]\n"
          "\n"
          "Produces N events of --users recipients on all four channels\n"
          "into the embedded Kafka broker and times the engine delivering\n"
          "them to a channel that only counts.\n"
          "\n"
          "  --events N      events per run [100000]\n"
          "  --users N       recipients per event, 1-10000 [25]\n"
          "  --runs N        runs, each in fresh processes [3]\n"
          "  --workers N     dispatcher threads [2]\n"
          "  --window N      most events produced ahead of completion\n"
          "                  [20000; lowered to what fits in 3 MB, as\n"
          "                  the broker keeps only about 5 MB per\n"
          "                  partition]\n"
          "  --partitions N  partitions of the topic [4]\n");
}

static int parse_args(int argc, char **argv, bench_opts *o) {
  static const bench_flag flags[] = {
      {"--events", offsetof(bench_opts, events), 1, 100000000},
      {"--users", offsetof(bench_opts, users), 1, 10000},
      {"--runs", offsetof(bench_opts, runs), 1, 99},
      {"--workers", offsetof(bench_opts, workers), 1, 64},
      {"--window", offsetof(bench_opts, window), 1, 10000000},
      {"--partitions", offsetof(bench_opts, partitions), 1, 64},
  };

  if (bench_parse_flags(argc, argv, flags, sizeof(flags) / sizeof(flags[0]),
                        o, "pipeline", usage) != FO_OK)
    return FO_EINVAL;
  return FO_OK;
}

/* Lowers the window so that the broker never holds more than it keeps. */
static void fit_window(bench_opts *o) {
  char *tail = event_tail(o->users);
  long bytes, fit;

  if (tail == NULL)
    return;
  bytes = (long)strlen(tail) + 32;
  free(tail);
  fit = BENCH_WINDOW_BYTES / bytes;
  if (fit < 1)
    fit = 1;
  if (o->window > fit)
    o->window = fit;
}

/* Runs one benchmark in a child, so that each starts from a fresh
 * process: its own metrics registry, broker and peak RSS. */
static void run_child(const bench_opts *o, bench_result *r) {
  int fds[2], status = 0;
  ssize_t got = 0;
  pid_t pid;

  memset(r, 0, sizeof(*r));
  if (pipe(fds) != 0) {
    snprintf(r->error, sizeof(r->error), "pipe: %s", strerror(errno));
    return;
  }
  fflush(stdout);
  fflush(stderr);
  pid = fork();
  if (pid < 0) {
    snprintf(r->error, sizeof(r->error), "fork: %s", strerror(errno));
    close(fds[0]);
    close(fds[1]);
    return;
  }
  if (pid == 0) {
    bench_result mine;
    int rc;

    close(fds[0]);
    memset(&mine, 0, sizeof(mine));
    rc = run_once(o, &mine);
    if (write(fds[1], &mine, sizeof(mine)) != (ssize_t)sizeof(mine))
      rc = FO_EIO;
    _exit(rc == FO_OK ? 0 : 1);
  }

  close(fds[1]);
  while ((size_t)got < sizeof(*r)) {
    ssize_t n = read(fds[0], (char *)r + got, sizeof(*r) - (size_t)got);

    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    got += n;
  }
  close(fds[0]);
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
    continue;
  if ((size_t)got != sizeof(*r)) {
    memset(r, 0, sizeof(*r));
    if (WIFSIGNALED(status))
      snprintf(r->error, sizeof(r->error), "run died of signal %d",
               WTERMSIG(status));
    else
      snprintf(r->error, sizeof(r->error), "run gave no result");
  }
}

/* Sets each figure of *med to its median over the runs. */
static void medians(const bench_result *rs, long n, bench_result *med) {
  double v[99];

#define BENCH_MEDIAN(field, type)                                          \
  do {                                                                     \
    for (long i = 0; i < n; i++)                                           \
      v[i] = (double)rs[i].field;                                          \
    med->field = (type)bench_median(v, n);                                 \
  } while (0)

  BENCH_MEDIAN(secs, double);
  BENCH_MEDIAN(events_per_s, double);
  BENCH_MEDIAN(deliveries_per_s, double);
  BENCH_MEDIAN(p50_us, int64_t);
  BENCH_MEDIAN(p99_us, int64_t);
  BENCH_MEDIAN(engine_cores, double);
  BENCH_MEDIAN(broker_cores, double);
  BENCH_MEDIAN(pauses, uint64_t);
  BENCH_MEDIAN(peak_rss_kb, long);
  BENCH_MEDIAN(broker_peak_rss_kb, long);
  for (int k = 0; k < BENCH_NSAMPLES; k++)
    BENCH_MEDIAN(rss_kb[k], long);
#undef BENCH_MEDIAN
}

static double mb(long kb) {
  return (double)kb / 1024.0;
}

static void print_figures(const char *label, const bench_result *r) {
  printf("%-7s %9" PRIu64 " deliveries in %.2f s: %.0f events/s, "
         "%.0f deliveries/s;\n"
         "        consume to dispatch p50 %" PRId64 " us, p99 %" PRId64
         " us; %" PRIu64 " consumer pauses;\n"
         "        CPU: engine %.2f cores, broker+producer %.2f cores;\n"
         "        engine RSS at 10/50/90/100%%: %.1f %.1f %.1f %.1f MB, "
         "peak %.1f MB (broker process peak %.1f MB)\n",
         label, r->deliveries, r->secs, r->events_per_s,
         r->deliveries_per_s, r->p50_us, r->p99_us, r->pauses,
         r->engine_cores, r->broker_cores, mb(r->rss_kb[0]),
         mb(r->rss_kb[1]), mb(r->rss_kb[2]), mb(r->rss_kb[3]),
         mb(r->peak_rss_kb), mb(r->broker_peak_rss_kb));
}

int main(int argc, char **argv) {
  bench_opts o = {.events = 100000, .users = 25, .runs = 3, .workers = 2,
                  .window = 20000, .partitions = 4};
  bench_result rs[99], med;
  uint64_t per_run;
  int failed = 0;

  if (parse_args(argc, argv, &o) != FO_OK)
    return 2;
  fit_window(&o);
  /* The engine logs only what goes wrong; info lines would interleave
   * with the report. */
  fo_log_set_level(FO_LOG_WARN);
  per_run = (uint64_t)o.events * (uint64_t)o.users * FO_CH_COUNT;
  printf("pipeline: %ld events x %ld users x %d channels = %" PRIu64
         " deliveries per run; %ld workers, %ld partitions, window %ld "
         "events, %ld runs\n",
         o.events, o.users, FO_CH_COUNT, per_run, o.workers, o.partitions,
         o.window, o.runs);

  for (long i = 0; i < o.runs; i++) {
    char label[16];

    run_child(&o, &rs[i]);
    snprintf(label, sizeof(label), "run %ld", i + 1);
    if (!rs[i].ok) {
      printf("%-7s FAILED: %s\n", label, rs[i].error);
      failed++;
      continue;
    }
    print_figures(label, &rs[i]);
  }
  if (failed > 0) {
    printf("pipeline: %d of %ld runs failed\n", failed, o.runs);
    return 1;
  }

  memset(&med, 0, sizeof(med));
  med.deliveries = per_run;
  medians(rs, o.runs, &med);
  print_figures("median", &med);
  printf("every delivery counted exactly once in every run; target %.0f "
         "deliveries/s %s\n", BENCH_TARGET_PER_S,
         med.deliveries_per_s >= BENCH_TARGET_PER_S ? "met" : "NOT met");
  printf("reproduce: make build/bench/pipeline && build/bench/pipeline "
         "--events %ld --users %ld --runs %ld --workers %ld --window %ld "
         "--partitions %ld\n",
         o.events, o.users, o.runs, o.workers, o.window, o.partitions);
  return 0;
}
