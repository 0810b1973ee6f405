/* SPDX-License-Identifier: MIT */
/*
 * Policy benchmark: deliveries per second through the policy stage as
 * fanoutd runs it (user cache over PostgreSQL, dedup claims and rate caps
 * in Redis, the delivery log), with every user cached and a cap on every
 * channel. Events are decoded and pushed straight into the queue, with no
 * Kafka in front, and the channel only counts, so the figures are the
 * queue, the dispatcher and the policy stage alone.
 *
 * The parent creates a database of its own, loads the users into it once
 * (COPY, not the REST API), then forks one child per run so that each run
 * starts with a cold cache and a fresh metrics registry. A run times the
 * same events without the policy stage first, then with it: a warm-up
 * pass that loads every user into the cache, then the timed pass. A
 * separate child checks that caps are really evaluated (a cap of 3 an
 * hour lets exactly 3 of 10 deliveries through, as the delivery log
 * confirms). The parent prints every run, the medians and the command
 * that reproduces them, drops the database and deletes its Redis keys.
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdalign.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <libpq-fe.h>

#include "../common.h"
#include "dispatch.h"
#include "fanout/channel.h"
#include "fanout/common.h"
#include "fanout/event.h"
#include "limiter.h"
#include "log.h"
#include "metrics.h"
#include "policy.h"
#include "queue.h"
#include "store.h"
#include "urlenc.h"

#define BENCH_TARGET_PER_S 300000.0
#define BENCH_TARGET_P99_US 1000
#define BENCH_STALL_MS 30000      /* no event finished for this long */
#define BENCH_DRAIN_MS 10000
#define BENCH_DLOG_FLUSH_MS 60000
#define BENCH_EVENT_TTL_S 600     /* short, so dedup keys expire soon */
#define BENCH_ENV_FILE "var/services.env"

/* The policy stage configured as fanoutd's defaults configure it. */
#define BENCH_POOL 4
#define BENCH_DLOG_CAPACITY 100000
#define BENCH_CACHE_USERS 1000000
#define BENCH_CLAIM_MS 300000
#define BENCH_POLL_MS 1000
#define BENCH_QUEUE_ITEMS 1000000
#define BENCH_QUEUE_EVENTS 4096
#define BENCH_RETRY_BASE_MS 1000
#define BENCH_RETRY_MAX_MS 300000

/* Every user's caps: high enough that none is reached. */
#define BENCH_CAP_LIMIT 1000000

/* The caps check: one user capped at 3 an hour gets 10 deliveries. */
#define CHECK_LIMIT 3
#define CHECK_EVENTS 10

#define HIST_MAX 32

typedef struct bench_opts {
  long users;
  long events;
  long recipients;
  long runs;
  long workers;
  long window;                  /* events pushed ahead of completion */
} bench_opts;

/* Where the services are and what this invocation calls its data. */
typedef struct bench_env {
  char admin_dsn[1024];         /* FANOUT_POSTGRES_DSN; never printed */
  char dsn[1280];               /* the same naming the bench database */
  char redis_url[512];          /* never printed: may hold a password */
  char db[64];                  /* fanout_bench_<pid> */
  char tag[32];                 /* in every user and event id */
} bench_env;

/* What one run reports to the parent, through a pipe. */
typedef struct bench_result {
  int ok;
  uint64_t deliveries;          /* timed pass, sent */
  double secs;                  /* timed pass, first push to last done */
  double per_s;
  double nogate_secs;
  double nogate_per_s;
  double warm_secs;
  double warm_users_per_s;      /* one push each */
  uint64_t warm_misses;
  int64_t batch_p50_us;         /* fanout_policy_batch_seconds */
  int64_t batch_p99_us;
  double batch_mean_us;
  uint64_t batches;
  int64_t dispatch_p50_us;      /* fanout_dispatch_latency_seconds */
  int64_t dispatch_p99_us;
  int64_t nogate_dispatch_p99_us;
  double hit_ratio;
  double redis_cmds_per_s;      /* server-wide, commands in scripts too */
  double redis_scripts_per_s;   /* EVAL and EVALSHA calls */
  double redis_cores;
  double engine_cores;
  double machine_cores;         /* every process on the machine */
  double nogate_engine_cores;
  double cpu_us_per_delivery;   /* engine process, timed pass */
  double nogate_cpu_us_per_delivery;
  double redis_cpu_us_per_delivery;
  double pg_cores;              /* every local postgres process */
  double pg_cpu_us_per_delivery;
  uint64_t dlog_written;        /* over the whole gated part */
  uint64_t dlog_dropped;
  double dlog_flush_secs;       /* writing what was queued at the end */
  long peak_rss_kb;
  char error[640];
} bench_result;

/* What the caps check reports. */
typedef struct check_result {
  int ok;
  uint64_t sent;
  uint64_t capped;
  uint64_t other;
  uint64_t log_sent;
  uint64_t log_capped;
  uint64_t log_other;
  char error[640];
} check_result;

/* ---- small helpers ---- */

/*
 * CPU seconds of every process named `comm` on this machine (0 when
 * there is none, e.g. a remote server).
 */
static double cpu_comm_secs(const char *comm) {
  unsigned long long total = 0;
  struct dirent *de;
  DIR *d = opendir("/proc");

  if (d == NULL)
    return 0;
  while ((de = readdir(d)) != NULL) {
    char path[300], buf[1024], *open_, *close_;
    unsigned long ut = 0, st = 0;
    size_t n;
    FILE *f;

    if (!isdigit((unsigned char)de->d_name[0]))
      continue;
    snprintf(path, sizeof(path), "/proc/%s/stat", de->d_name);
    if ((f = fopen(path, "r")) == NULL)
      continue;
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* "pid (comm) state ... utime stime": utime is the 14th field. */
    if ((open_ = strchr(buf, '(')) == NULL ||
        (close_ = strrchr(buf, ')')) == NULL ||
        (size_t)(close_ - open_ - 1) != strlen(comm) ||
        strncmp(open_ + 1, comm, strlen(comm)) != 0)
      continue;
    if (sscanf(close_ + 1,
               " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut,
               &st) == 2)
      total += ut + st;
  }
  closedir(d);
  return (double)total / (double)sysconf(_SC_CLK_TCK);
}

/* ---- the environment ---- */

/* Reads KEY=VALUE from the services file when the variable is unset. */
static void env_from_file(const char *key, char *out, size_t cap) {
  size_t klen = strlen(key);
  char line[1024];
  FILE *f;

  if (getenv(key) != NULL) {
    snprintf(out, cap, "%s", getenv(key));
    return;
  }
  if ((f = fopen(BENCH_ENV_FILE, "r")) == NULL)
    return;
  while (fgets(line, sizeof(line), f) != NULL) {
    if (strncmp(line, key, klen) != 0 || line[klen] != '=')
      continue;
    line[strcspn(line, "\r\n")] = '\0';
    snprintf(out, cap, "%s", line + klen + 1);
    break;
  }
  fclose(f);
}

/* `dsn` with its database replaced by `db`, as keyword=value pairs. */
static int dsn_with_db(const char *dsn, const char *db, char *out,
                       size_t cap) {
  PQconninfoOption *opts = PQconninfoParse(dsn, NULL);
  size_t len = 0;

  if (opts == NULL)
    return FO_EINVAL;
  out[0] = '\0';
  for (PQconninfoOption *o = opts; o->keyword != NULL; o++) {
    const char *v = strcmp(o->keyword, "dbname") == 0 ? db : o->val;

    if (v == NULL)
      continue;
    len += (size_t)snprintf(out + len, cap - len, "%s='", o->keyword);
    for (; *v != '\0' && len + 4 < cap; v++) {
      if (*v == '\'' || *v == '\\')
        out[len++] = '\\';
      out[len++] = *v;
    }
    if (len + 3 >= cap) {
      PQconninfoFree(opts);
      return FO_EINVAL;
    }
    len += (size_t)snprintf(out + len, cap - len, "' ");
  }
  PQconninfoFree(opts);
  return FO_OK;
}

static int env_load(bench_env *e) {
  memset(e, 0, sizeof(*e));
  env_from_file("FANOUT_POSTGRES_DSN", e->admin_dsn, sizeof(e->admin_dsn));
  env_from_file("FANOUT_REDIS_URL", e->redis_url, sizeof(e->redis_url));
  if (e->admin_dsn[0] == '\0' || e->redis_url[0] == '\0') {
    fprintf(stderr,
            "policy: FANOUT_POSTGRES_DSN and FANOUT_REDIS_URL must be set "
            "(or present in %s):\n"
            "  scripts/services.sh start\n"
            "  set -a; . var/services.env; set +a\n", BENCH_ENV_FILE);
    return FO_ECONFIG;
  }
  snprintf(e->db, sizeof(e->db), "fanout_bench_%ld", (long)getpid());
  /* Unique per invocation, so Redis keys of earlier runs never count. */
  snprintf(e->tag, sizeof(e->tag), "pb%lx%lx", (long)getpid(),
           (long)(fo_wall_ms() & 0xffffff));
  if (dsn_with_db(e->admin_dsn, e->db, e->dsn, sizeof(e->dsn)) != FO_OK) {
    fprintf(stderr, "policy: FANOUT_POSTGRES_DSN cannot be parsed\n");
    return FO_ECONFIG;
  }
  return FO_OK;
}

/* ---- Redis, for server figures and clean-up ---- */

/* Decodes %XX escapes of a URL part in place (decoding never makes it
 * longer); a part with a malformed escape is left as it is. */
static void url_unescape(char *s) {
  int rc;
  char *d = fo_url_unescape(s, strlen(s), false, &rc);

  if (d != NULL) {
    memcpy(s, d, strlen(d) + 1);
    free(d);
  }
}

/* A connection of the bench's own to the URL's server and database;
 * NULL with the reason in `err` (never the password). */
static redisContext *redis_open(const char *url, char *err, size_t errlen) {
  char buf[512], *auth = NULL, *host, *p, *pass = NULL, *user = NULL;
  struct timeval tv = {2, 0};
  redisContext *c = NULL;
  redisReply *r;
  int port = 6379;
  long db = 0;

  if (strncmp(url, "redis://", 8) != 0) {
    snprintf(err, errlen, "FANOUT_REDIS_URL is not a redis:// URL");
    return NULL;
  }
  snprintf(buf, sizeof(buf), "%s", url + 8);
  if ((p = strchr(buf, '/')) != NULL) {
    *p = '\0';
    db = strtol(p + 1, NULL, 10);
  }
  host = buf;
  if ((p = strrchr(buf, '@')) != NULL) {
    *p = '\0';
    auth = buf;
    host = p + 1;
  }
  if (host[0] == '[' && (p = strchr(host, ']')) != NULL) {
    *p = '\0';
    host++;
    if (p[1] == ':')
      port = atoi(p + 2);
  } else if ((p = strrchr(host, ':')) != NULL) {
    *p = '\0';
    port = atoi(p + 1);
  }
  if (auth != NULL) {
    if ((p = strchr(auth, ':')) != NULL) {
      *p = '\0';
      user = auth[0] != '\0' ? auth : NULL;
      pass = p + 1;
    } else {
      pass = auth;
    }
    if (user != NULL)
      url_unescape(user);
    url_unescape(pass);
  }

  c = redisConnectWithTimeout(host, port, tv);
  if (c == NULL || c->err) {
    snprintf(err, errlen, "redis: cannot connect to %.200s:%d: %.200s",
             host, port, c != NULL ? c->errstr : "out of memory");
    goto fail;
  }
  redisSetTimeout(c, (struct timeval){30, 0});
  if (pass != NULL && pass[0] != '\0') {
    r = user != NULL ? redisCommand(c, "AUTH %s %s", user, pass)
                     : redisCommand(c, "AUTH %s", pass);
    if (r == NULL || r->type == REDIS_REPLY_ERROR) {
      snprintf(err, errlen, "redis: authentication refused");
      if (r != NULL)
        freeReplyObject(r);
      goto fail;
    }
    freeReplyObject(r);
  }
  r = redisCommand(c, "SELECT %ld", db);
  if (r == NULL || r->type == REDIS_REPLY_ERROR) {
    snprintf(err, errlen, "redis: cannot select database %ld", db);
    if (r != NULL)
      freeReplyObject(r);
    goto fail;
  }
  freeReplyObject(r);
  return c;

fail:
  if (c != NULL)
    redisFree(c);
  return NULL;
}

/* A number after "\n<key>" in an INFO reply; 0 when absent. */
static double info_field(const char *text, const char *key) {
  size_t klen = strlen(key);

  for (const char *p = text; (p = strstr(p, key)) != NULL; p += klen)
    if ((p == text || p[-1] == '\n') && (p[klen] == ':' || p[klen] == '='))
      return strtod(p + klen + 1, NULL);
  return 0;
}

/* Server-wide Redis counters: shared with whatever else uses it. */
typedef struct redis_snap {
  double cmds;
  double scripts;
  double cpu_secs;
} redis_snap;

static void redis_snapshot(redisContext *c, redis_snap *s) {
  redisReply *r;

  memset(s, 0, sizeof(*s));
  if (c == NULL)
    return;
  if ((r = redisCommand(c, "INFO")) != NULL) {
    if (r->type == REDIS_REPLY_STRING) {
      s->cmds = info_field(r->str, "total_commands_processed");
      s->cpu_secs = info_field(r->str, "used_cpu_sys") +
                    info_field(r->str, "used_cpu_user");
    }
    freeReplyObject(r);
  }
  if ((r = redisCommand(c, "INFO commandstats")) != NULL) {
    if (r->type == REDIS_REPLY_STRING) {
      const char *p;

      /* "cmdstat_evalsha:calls=N,..." */
      if ((p = strstr(r->str, "cmdstat_evalsha:")) != NULL)
        s->scripts += info_field(p + 16, "calls");
      if ((p = strstr(r->str, "cmdstat_eval:")) != NULL)
        s->scripts += info_field(p + 13, "calls");
    }
    freeReplyObject(r);
  }
}

/*
 * Deletes every key that matches `pattern` (SCAN, then UNLINK of each
 * page). Returns how many were deleted, or -1 when Redis failed.
 */
static long long redis_delete(redisContext *c, const char *pattern) {
  char cursor[32] = "0";
  long long deleted = 0;

  do {
    redisReply *r = redisCommand(c, "SCAN %s MATCH %s COUNT 10000", cursor,
                                 pattern);
    redisReply *keys;

    if (r == NULL || r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
      if (r != NULL)
        freeReplyObject(r);
      return -1;
    }
    snprintf(cursor, sizeof(cursor), "%s", r->element[0]->str);
    keys = r->element[1];
    if (keys->elements > 0) {
      size_t n = keys->elements + 1;
      const char **argv = malloc(n * sizeof(*argv));
      size_t *lens = malloc(n * sizeof(*lens));
      redisReply *u = NULL;

      if (argv != NULL && lens != NULL) {
        argv[0] = "UNLINK";
        lens[0] = 6;
        for (size_t i = 0; i < keys->elements; i++) {
          argv[i + 1] = keys->element[i]->str;
          lens[i + 1] = keys->element[i]->len;
        }
        u = redisCommandArgv(c, (int)n, argv, lens);
      }
      if (u != NULL && u->type == REDIS_REPLY_INTEGER)
        deleted += u->integer;
      else
        deleted = -1;
      if (u != NULL)
        freeReplyObject(u);
      free(argv);
      free(lens);
    }
    freeReplyObject(r);
  } while (deleted >= 0 && strcmp(cursor, "0") != 0);
  return deleted;
}

/* ---- histograms, from the metrics text ---- */

/*
 * One histogram series as rendered: cumulative bucket counts and their
 * upper bounds. The engine's histograms cannot be reset while threads
 * use them, so a pass is measured as the difference of two renders.
 */
typedef struct hsnap {
  size_t n;                     /* buckets, +Inf last */
  int64_t bound_us[HIST_MAX];
  uint64_t cum[HIST_MAX];
  double sum_s;
} hsnap;

typedef struct msnap {
  hsnap batch;
  hsnap dispatch[FO_CH_COUNT];
  uint64_t hits;
  uint64_t misses;
  uint64_t dlog_written;
  uint64_t dlog_dropped;
  double cpu_self;
  double cpu_machine;
  double cpu_pg;
  redis_snap redis;
  int64_t at_us;
} msnap;

/* Fills `h` from the series `name{labels}` of a render; empty if none. */
static void hist_parse(const char *text, const char *name,
                       const char *labels, hsnap *h) {
  char bucket[160], sum[160];
  size_t blen, slen;

  memset(h, 0, sizeof(*h));
  snprintf(bucket, sizeof(bucket), "%s_bucket{%s%sle=\"", name, labels,
           labels[0] != '\0' ? "," : "");
  if (labels[0] != '\0')
    snprintf(sum, sizeof(sum), "%s_sum{%s} ", name, labels);
  else
    snprintf(sum, sizeof(sum), "%s_sum ", name);
  blen = strlen(bucket);
  slen = strlen(sum);
  for (const char *line = text; *line != '\0';) {
    const char *end = strchr(line, '\n');

    if (strncmp(line, bucket, blen) == 0 && h->n < HIST_MAX) {
      const char *le = line + blen, *close = strstr(le, "} ");

      h->bound_us[h->n] = strncmp(le, "+Inf", 4) == 0
                              ? INT64_MAX
                              : (int64_t)(strtod(le, NULL) * 1e6 + 0.5);
      h->cum[h->n] = close != NULL ? strtoull(close + 2, NULL, 10) : 0;
      h->n++;
    } else if (strncmp(line, sum, slen) == 0) {
      h->sum_s = strtod(line + slen, NULL);
    }
    if (end == NULL)
      break;
    line = end + 1;
  }
}

static uint64_t hist_count(const hsnap *a, const hsnap *b) {
  uint64_t before = a->n > 0 ? a->cum[a->n - 1] : 0;

  return b->n > 0 ? b->cum[b->n - 1] - before : 0;
}

/*
 * The q-quantile of the observations between snapshots `a` and `b`, in
 * microseconds: the upper bound of the bucket that holds it, as
 * fo_histogram_quantile_us() estimates it.
 */
static int64_t hist_quantile(const hsnap *a, const hsnap *b, double q) {
  uint64_t total = hist_count(a, b), rank;
  double want;

  if (total == 0 || b->n < 2)
    return 0;
  want = q * (double)total;
  rank = want >= (double)total ? total : (uint64_t)want;
  if ((double)rank < want)
    rank++;
  if (rank == 0)
    rank = 1;
  for (size_t i = 0; i + 1 < b->n; i++) {
    uint64_t before = i < a->n ? a->cum[i] : 0;

    if (b->cum[i] - before >= rank)
      return b->bound_us[i];
  }
  return b->bound_us[b->n - 2];
}

static uint64_t counter(const char *name) {
  return fo_counter_value(fo_metrics_counter(name, "", NULL));
}

static void snapshot(redisContext *rc, msnap *s) {
  char *text = NULL;
  size_t len;

  memset(s, 0, sizeof(*s));
  if (fo_metrics_render(&text, &len) == FO_OK) {
    hist_parse(text, "fanout_policy_batch_seconds", "", &s->batch);
    for (int k = 0; k < FO_CH_COUNT; k++) {
      char labels[48];

      snprintf(labels, sizeof(labels), "channel=\"%s\"",
               fo_channel_name((fo_channel_kind)k));
      hist_parse(text, "fanout_dispatch_latency_seconds", labels,
                 &s->dispatch[k]);
    }
  }
  free(text);
  s->hits = counter("fanout_user_cache_hits_total");
  s->misses = counter("fanout_user_cache_misses_total");
  s->dlog_written = counter("fanout_delivery_log_written_total");
  s->dlog_dropped = counter("fanout_delivery_log_dropped_total");
  redis_snapshot(rc, &s->redis);
  s->cpu_self = bench_cpu_self_secs();
  s->cpu_machine = bench_cpu_machine_secs();
  s->cpu_pg = cpu_comm_secs("postgres");
  s->at_us = fo_now_us();
}

/* Worst channel's q-quantile of the consume-to-dispatch latency. */
static int64_t dispatch_quantile(const msnap *a, const msnap *b, double q) {
  int64_t worst = 0;

  for (int k = 0; k < FO_CH_COUNT; k++) {
    int64_t v = hist_quantile(&a->dispatch[k], &b->dispatch[k], q);

    if (v > worst)
      worst = v;
  }
  return worst;
}

/* ---- the counting channel ---- */

/*
 * Completes every delivery as sent inside submit(). The counter sits on
 * its own cache line because both workers write it for every delivery.
 */
typedef struct bench_sink {
  alignas(64) atomic_uint_fast64_t count;
  alignas(64) atomic_uint_fast64_t suppressed[FO_SUP_COUNT];
  atomic_bool closed;
  fo_outcome sent;
  fo_channel ch;
} bench_sink;

static int sink_submit(void *self, fo_delivery *d) {
  bench_sink *s = self;

  if (atomic_load_explicit(&s->closed, memory_order_relaxed))
    return FO_ECLOSED;
  atomic_fetch_add_explicit(&s->count, 1, memory_order_relaxed);
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
  /* The sink lives in its run's frame. */
  (void)self;
}

static const fo_channel_ops sink_ops = {
    .name = "bench-count",
    .submit = sink_submit,
    .flush = sink_flush,
    .shutdown = sink_shutdown,
    .destroy = sink_destroy,
};

static void sink_init(bench_sink *s) {
  memset(s, 0, sizeof(*s));
  atomic_init(&s->count, 0);
  for (int i = 0; i < FO_SUP_COUNT; i++)
    atomic_init(&s->suppressed[i], 0);
  atomic_init(&s->closed, false);
  fo_outcome_init(&s->sent, FO_STATUS_SENT);
  s->ch.ops = &sink_ops;
  s->ch.self = s;
}

/* Counts what the policy stage ended, by reason (a rare path here). */
static void on_outcome(const fo_delivery *d, const fo_outcome *o,
                       void *arg) {
  bench_sink *s = arg;

  (void)d;
  if (o->status == FO_STATUS_SUPPRESSED && o->suppress < FO_SUP_COUNT)
    atomic_fetch_add_explicit(&s->suppressed[o->suppress], 1,
                              memory_order_relaxed);
}

/* ---- events ---- */

/* Which events a pass feeds. */
typedef enum pass_kind {
  PASS_NOGATE = 'n',            /* the timed events, without the stage */
  PASS_WARM = 'w',              /* every user once, push only */
  PASS_TIMED = 'e',
  PASS_CHECK = 'c'              /* the capped user, push only */
} pass_kind;

typedef struct feed {
  const bench_opts *o;
  const char *tag;
  pass_kind kind;
  long run;
  long events;
  uint64_t deliveries;          /* every one expected to end sent */
} feed;

/* A multiplier prime to `users`, so that consecutive slots map to
 * distinct users spread over the whole range. */
static long spread_of(long users) {
  long m = 7919;

  for (;; m++) {
    long a = m, b = users;

    while (b != 0) {
      long t = a % b;

      a = b;
      b = t;
    }
    if (a == 1)
      return m;
  }
}

static void feed_init(feed *f, const bench_opts *o, const char *tag,
                      pass_kind kind, long run) {
  memset(f, 0, sizeof(*f));
  f->o = o;
  f->tag = tag;
  f->kind = kind;
  f->run = run;
  switch (kind) {
  case PASS_WARM:
    f->events = (o->users + o->recipients - 1) / o->recipients;
    f->deliveries = (uint64_t)o->users;
    break;
  case PASS_CHECK:
    f->events = CHECK_EVENTS;
    f->deliveries = CHECK_EVENTS;
    break;
  default:
    f->events = o->events;
    f->deliveries =
        (uint64_t)o->events * (uint64_t)o->recipients * FO_CH_COUNT;
    break;
  }
}

/* The JSON of event `i`; returns its length, or 0 when it does not fit. */
static size_t event_json(const feed *f, long i, char *buf, size_t cap) {
  const bench_opts *o = f->o;
  long spread = spread_of(o->users);
  size_t n;

  n = (size_t)snprintf(buf, cap,
                       "{\"id\":\"%s-r%ld-%c%ld\",\"category\":\"bench\","
                       "\"ttl\":%d,\"to\":[",
                       f->tag, f->run, (char)f->kind, i, BENCH_EVENT_TTL_S);
  if (f->kind == PASS_CHECK) {
    n += (size_t)snprintf(buf + n, cap - n, "\"%s-capped\"],\"channels\":"
                          "[\"push\"]", f->tag);
  } else {
    for (long j = 0; j < o->recipients && n < cap; j++) {
      long slot = i * o->recipients + j, u;

      if (f->kind == PASS_WARM) {
        if (slot >= o->users)
          break;
        u = slot;
      } else {
        u = (long)(((uint64_t)slot * (uint64_t)spread) %
                   (uint64_t)o->users);
      }
      n += (size_t)snprintf(buf + n, cap - n, "%s\"%s-u%ld\"",
                            j > 0 ? "," : "", f->tag, u);
    }
    /* The warm-up loads users: one channel keeps its other costs
     * small beside the loads. */
    if (n < cap)
      n += (size_t)snprintf(buf + n, cap - n, "]%s",
                            f->kind == PASS_WARM ? ",\"channels\":[\"push\"]"
                                                 : "");
  }
  if (n < cap)
    n += (size_t)snprintf(buf + n, cap - n,
                          ",\"title\":\"Benchmark\",\"body\":\"One event "
                          "of the policy benchmark\"}");
  return n < cap ? n : 0;
}

/* ---- the pipeline: queue, dispatcher, optional policy stage ---- */

typedef struct pipe_ctx {
  fo_queue *q;
  fo_dispatch *d;
  fo_policy *policy;            /* NULL: no gate */
  bench_sink *sink;

  /* Events finished, for the window and the end of a pass. */
  pthread_mutex_t lock;
  pthread_cond_t cond;
  long done;
  int64_t last_done_us;
  atomic_long unfinished;
} pipe_ctx;

static void event_done(fo_event *ev, bool finished, void *arg) {
  pipe_ctx *p = arg;

  if (!finished)
    atomic_fetch_add(&p->unfinished, 1);
  fo_event_free(ev);
  pthread_mutex_lock(&p->lock);
  p->done++;
  p->last_done_us = fo_now_us();
  pthread_cond_signal(&p->cond);
  pthread_mutex_unlock(&p->lock);
}

/* Starts a queue and a dispatcher over `sink`, with the policy's gate
 * and deferred poller when `policy` is set. */
static int pipe_start(pipe_ctx *p, const bench_opts *o, fo_policy *policy,
                      bench_sink *sink, char *err, size_t errlen) {
  fo_dispatch_conf dc;

  memset(p, 0, sizeof(*p));
  pthread_mutex_init(&p->lock, NULL);
  pthread_cond_init(&p->cond, NULL);
  atomic_init(&p->unfinished, 0);
  p->policy = policy;
  p->sink = sink;
  p->q = fo_queue_new(BENCH_QUEUE_ITEMS, BENCH_QUEUE_EVENTS);
  if (p->q == NULL) {
    snprintf(err, errlen, "queue: out of memory");
    return FO_ENOMEM;
  }
  memset(&dc, 0, sizeof(dc));
  dc.workers = (int)o->workers;
  dc.retry_base_ms = BENCH_RETRY_BASE_MS;
  dc.retry_max_ms = BENCH_RETRY_MAX_MS;
  dc.on_done = event_done;
  dc.done_arg = p;
  dc.on_outcome = on_outcome;
  dc.outcome_arg = sink;
  if (policy != NULL)
    dc.gate = fo_policy_gate(policy);
  if ((p->d = fo_dispatch_new(p->q, &dc)) == NULL) {
    snprintf(err, errlen, "dispatch: cannot create");
    return FO_ENOMEM;
  }
  atomic_store(&sink->closed, false);
  for (int k = 0; k < FO_CH_COUNT; k++)
    fo_dispatch_set_channel(p->d, (fo_channel_kind)k, &sink->ch);
  if (fo_dispatch_start(p->d) != FO_OK) {
    snprintf(err, errlen, "dispatch: cannot start");
    return FO_EIO;
  }
  if (policy != NULL && fo_policy_start_poller(policy, p->q) != FO_OK) {
    snprintf(err, errlen, "policy: cannot start the deferred poller");
    return FO_EIO;
  }
  return FO_OK;
}

/* Stops in fanoutd's order: poller, dispatcher drain, channels. */
static int pipe_stop(pipe_ctx *p) {
  int rc = FO_OK;

  if (p->policy != NULL)
    fo_policy_stop_poller(p->policy);
  if (p->d != NULL)
    rc = fo_dispatch_drain(p->d, BENCH_DRAIN_MS);
  atomic_store(&p->sink->closed, true);
  fo_dispatch_free(p->d);
  if (p->q != NULL)
    fo_queue_free(p->q);
  pthread_cond_destroy(&p->cond);
  pthread_mutex_destroy(&p->lock);
  p->d = NULL;
  p->q = NULL;
  return rc;
}

/* Waits until fewer than `ahead` events are unfinished; FO_ETIMEDOUT
 * when none finished for BENCH_STALL_MS. */
static int wait_done(pipe_ctx *p, long pushed, long ahead) {
  int rc = FO_OK;

  pthread_mutex_lock(&p->lock);
  while (pushed - p->done >= ahead) {
    long before = p->done;
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += BENCH_STALL_MS / 1000;
    while (p->done == before &&
           pthread_cond_timedwait(&p->cond, &p->lock, &ts) != ETIMEDOUT)
      continue;
    if (p->done == before) {
      rc = FO_ETIMEDOUT;
      break;
    }
  }
  pthread_mutex_unlock(&p->lock);
  return rc;
}

/*
 * Decodes and queues every event of `f`, keeping at most the window
 * unfinished, as the consumer would, and waits for the last one. Sets
 * *secs from the first push to the last event done.
 */
static int pipe_feed(pipe_ctx *p, const feed *f, double *secs, char *err,
                     size_t errlen) {
  size_t cap = 256 + (size_t)f->o->recipients * 48;
  char *buf = malloc(cap);
  int64_t t0 = fo_now_us();
  int rc = FO_OK;
  long i;

  if (buf == NULL) {
    snprintf(err, errlen, "out of memory");
    return FO_ENOMEM;
  }
  pthread_mutex_lock(&p->lock);
  p->done = 0;
  pthread_mutex_unlock(&p->lock);

  for (i = 0; i < f->events; i++) {
    size_t n = event_json(f, i, buf, cap);
    fo_event_error e;
    fo_event *ev = NULL;

    if ((rc = wait_done(p, i, f->o->window)) != FO_OK)
      break;
    if (n == 0 || fo_event_decode(buf, n, 0, &ev, &e) != FO_OK) {
      snprintf(err, errlen, "event %ld does not decode: %s", i,
               n == 0 ? "too long" : e.message);
      rc = FO_EINVAL;
      goto out;
    }
    /* What the consumer sets before queueing. */
    ev->consumed_us = fo_now_us();
    ev->expires_ms = fo_wall_ms() + ev->ttl_s * 1000;
    atomic_store(&ev->pending, (uint_fast32_t)fo_event_items(ev));
    while ((rc = fo_queue_push(p->q, ev)) == FO_EFULL)
      bench_sleep_ms(1);
    if (rc != FO_OK) {
      fo_event_free(ev);
      snprintf(err, errlen, "queue push: %s", fo_strerror(rc));
      goto out;
    }
  }
  if (rc == FO_OK)
    rc = wait_done(p, f->events, 1);
  if (rc != FO_OK) {
    long done;

    pthread_mutex_lock(&p->lock);
    done = p->done;
    pthread_mutex_unlock(&p->lock);
    snprintf(err, errlen, "stalled: %ld of %ld events finished, "
             "%" PRIu64 " deliveries counted", done, f->events,
             (uint64_t)atomic_load(&p->sink->count));
    goto out;
  }
  *secs = (double)(p->last_done_us - t0) / 1e6;
  if (*secs <= 0)
    *secs = 1e-6;
  if (atomic_load(&p->unfinished) > 0) {
    snprintf(err, errlen, "%ld events given back unfinished",
             (long)atomic_load(&p->unfinished));
    rc = FO_EINVAL;
  }

out:
  free(buf);
  return rc;
}

/*
 * Checks that every delivery of the pass between two dispatcher stats
 * ended sent, and that the sink counted each once.
 */
static int check_all_sent(const fo_dispatch_stats *a,
                          const fo_dispatch_stats *b, uint64_t sink_before,
                          uint64_t sink_after, uint64_t want,
                          const char *what, char *err, size_t errlen) {
  uint64_t sent = b->final_by_status[FO_STATUS_SENT] -
                  a->final_by_status[FO_STATUS_SENT];
  uint64_t all = 0;

  for (int s = 0; s < FO_STATUS_COUNT; s++)
    all += b->final_by_status[s] - a->final_by_status[s];
  if (sent == want && all == want && sink_after - sink_before == want)
    return FO_OK;
  snprintf(err, errlen,
           "%s: %" PRIu64 " deliveries ended, %" PRIu64 " sent, %" PRIu64
           " counted by the channel; expected %" PRIu64 " sent",
           what, all, sent, sink_after - sink_before, want);
  return FO_EINVAL;
}

/* ---- the policy stage as fanoutd opens it ---- */

typedef struct stage {
  fo_store *store;
  fo_dlog *dlog;
  fo_limiter *limits;
  fo_limiter *more_limits[1];   /* the second worker's, as in fanoutd */
  fo_policy *policy;
} stage;

static int stage_open(const bench_env *env, stage *st, char *err,
                      size_t errlen) {
  fo_policy_conf pc;
  int rc;

  memset(st, 0, sizeof(*st));
  rc = fo_store_open(env->dsn, BENCH_POOL, &st->store, err, errlen);
  if (rc != FO_OK)
    return rc;
  if ((rc = fo_dlog_start(st->store, BENCH_DLOG_CAPACITY, &st->dlog)) !=
      FO_OK) {
    snprintf(err, errlen, "delivery log: %s", fo_strerror(rc));
    return rc;
  }
  if ((rc = fo_limiter_open(env->redis_url, false, &st->limits)) != FO_OK) {
    snprintf(err, errlen, "limits: %s", fo_strerror(rc));
    return rc;
  }
  if (!fo_limiter_ping(st->limits)) {
    snprintf(err, errlen, "limits: Redis does not answer");
    return FO_EIO;
  }
  if ((rc = fo_limiter_open(env->redis_url, false, &st->more_limits[0])) !=
      FO_OK) {
    snprintf(err, errlen, "limits: %s", fo_strerror(rc));
    return rc;
  }
  memset(&pc, 0, sizeof(pc));
  pc.store = st->store;
  pc.limits = st->limits;
  pc.more_limits = st->more_limits;
  pc.nmore_limits = 1;
  pc.dlog = st->dlog;
  pc.cache_users = BENCH_CACHE_USERS;
  pc.claim_ms = BENCH_CLAIM_MS;
  pc.poll_ms = BENCH_POLL_MS;
  if ((rc = fo_policy_new(&pc, &st->policy)) != FO_OK) {
    snprintf(err, errlen, "policy: %s", fo_strerror(rc));
    return rc;
  }
  return FO_OK;
}

/* Closes in fanoutd's order: the log and the store (whose change
 * listener calls into the policy) before the policy, Redis last. */
static void stage_close(stage *st) {
  if (st->dlog != NULL)
    fo_dlog_stop(st->dlog);
  if (st->store != NULL)
    fo_store_close(st->store);
  fo_policy_free(st->policy);
  if (st->limits != NULL)
    fo_limiter_close(st->limits);
  if (st->more_limits[0] != NULL)
    fo_limiter_close(st->more_limits[0]);
}

/* ---- one run (a child process) ---- */

static int run_nogate(const bench_opts *o, const bench_env *env, long run,
                      redisContext *redis, bench_sink *sink, bench_result *r,
                      char *err, size_t errlen) {
  fo_dispatch_stats a, b;
  pipe_ctx p;
  msnap s0, s1;
  feed f;
  uint64_t c0;
  int rc, rc2;

  feed_init(&f, o, env->tag, PASS_NOGATE, run);
  if ((rc = pipe_start(&p, o, NULL, sink, err, errlen)) != FO_OK)
    goto out;
  fo_dispatch_get_stats(p.d, &a);
  c0 = atomic_load(&sink->count);
  snapshot(redis, &s0);
  if ((rc = pipe_feed(&p, &f, &r->nogate_secs, err, errlen)) != FO_OK)
    goto out;
  snapshot(redis, &s1);
  fo_dispatch_get_stats(p.d, &b);
  rc = check_all_sent(&a, &b, c0, atomic_load(&sink->count), f.deliveries,
                      "without the policy stage", err, errlen);
  r->nogate_per_s = (double)f.deliveries / r->nogate_secs;
  r->nogate_dispatch_p99_us = dispatch_quantile(&s0, &s1, 0.99);
  r->nogate_engine_cores =
      (s1.cpu_self - s0.cpu_self) / ((double)(s1.at_us - s0.at_us) / 1e6);
  r->nogate_cpu_us_per_delivery =
      (s1.cpu_self - s0.cpu_self) * 1e6 / (double)f.deliveries;

out:
  rc2 = pipe_stop(&p);
  if (rc == FO_OK && rc2 != FO_OK) {
    snprintf(err, errlen, "without the policy stage: drain: %s",
             fo_strerror(rc2));
    rc = rc2;
  }
  return rc;
}

static int run_gated(const bench_opts *o, const bench_env *env, long run,
                     redisContext *redis, stage *st, bench_sink *sink,
                     bench_result *r, char *err, size_t errlen) {
  fo_dispatch_stats a, b, c;
  msnap s0, s1, s2;
  uint64_t c0, c1;
  pipe_ctx p;
  feed w, t;
  double wall;
  int rc, rc2;

  feed_init(&w, o, env->tag, PASS_WARM, run);
  feed_init(&t, o, env->tag, PASS_TIMED, run);
  if ((rc = pipe_start(&p, o, st->policy, sink, err, errlen)) != FO_OK)
    goto out;

  /* Warm-up: every user once, loaded from PostgreSQL into the cache. */
  fo_dispatch_get_stats(p.d, &a);
  c0 = atomic_load(&sink->count);
  snapshot(redis, &s0);
  if ((rc = pipe_feed(&p, &w, &r->warm_secs, err, errlen)) != FO_OK)
    goto out;
  snapshot(redis, &s1);
  fo_dispatch_get_stats(p.d, &b);
  c1 = atomic_load(&sink->count);
  if ((rc = check_all_sent(&a, &b, c0, c1, w.deliveries, "warm-up", err,
                           errlen)) != FO_OK)
    goto out;
  r->warm_users_per_s = (double)o->users / r->warm_secs;
  r->warm_misses = s1.misses - s0.misses;

  /* The timed pass. */
  if ((rc = pipe_feed(&p, &t, &r->secs, err, errlen)) != FO_OK)
    goto out;
  snapshot(redis, &s2);
  fo_dispatch_get_stats(p.d, &c);
  if ((rc = check_all_sent(&b, &c, c1, atomic_load(&sink->count),
                           t.deliveries, "timed pass", err, errlen)) !=
      FO_OK)
    goto out;

  wall = (double)(s2.at_us - s1.at_us) / 1e6;
  r->deliveries = t.deliveries;
  r->per_s = (double)t.deliveries / r->secs;
  r->batch_p50_us = hist_quantile(&s1.batch, &s2.batch, 0.50);
  r->batch_p99_us = hist_quantile(&s1.batch, &s2.batch, 0.99);
  r->batches = hist_count(&s1.batch, &s2.batch);
  if (r->batches > 0)
    r->batch_mean_us =
        (s2.batch.sum_s - s1.batch.sum_s) * 1e6 / (double)r->batches;
  r->dispatch_p50_us = dispatch_quantile(&s1, &s2, 0.50);
  r->dispatch_p99_us = dispatch_quantile(&s1, &s2, 0.99);
  if (s2.hits + s2.misses > s1.hits + s1.misses)
    r->hit_ratio = (double)(s2.hits - s1.hits) /
                   (double)(s2.hits - s1.hits + s2.misses - s1.misses);
  r->redis_cmds_per_s = (s2.redis.cmds - s1.redis.cmds) / wall;
  r->redis_scripts_per_s = (s2.redis.scripts - s1.redis.scripts) / wall;
  r->redis_cores = (s2.redis.cpu_secs - s1.redis.cpu_secs) / wall;
  r->engine_cores = (s2.cpu_self - s1.cpu_self) / wall;
  r->machine_cores = (s2.cpu_machine - s1.cpu_machine) / wall;
  r->cpu_us_per_delivery =
      (s2.cpu_self - s1.cpu_self) * 1e6 / (double)t.deliveries;
  r->redis_cpu_us_per_delivery =
      (s2.redis.cpu_secs - s1.redis.cpu_secs) * 1e6 / (double)t.deliveries;
  r->pg_cores = (s2.cpu_pg - s1.cpu_pg) / wall;
  r->pg_cpu_us_per_delivery =
      (s2.cpu_pg - s1.cpu_pg) * 1e6 / (double)t.deliveries;

out:
  rc2 = pipe_stop(&p);
  if (rc == FO_OK && rc2 != FO_OK) {
    snprintf(err, errlen, "policy stage: drain: %s", fo_strerror(rc2));
    rc = rc2;
  }
  if (rc == FO_OK) {
    int64_t t0 = fo_now_us();

    /* What is left of the dedup marks and the log, as at a stop. */
    fo_policy_flush(st->policy);
    if (fo_dlog_flush(st->dlog, BENCH_DLOG_FLUSH_MS) != FO_OK) {
      snprintf(err, errlen, "delivery log: not written within %d s",
               BENCH_DLOG_FLUSH_MS / 1000);
      rc = FO_ETIMEDOUT;
    }
    r->dlog_flush_secs = (double)(fo_now_us() - t0) / 1e6;
    r->dlog_written = counter("fanout_delivery_log_written_total");
    r->dlog_dropped = counter("fanout_delivery_log_dropped_total");
  }
  return rc;
}

static int run_once(const bench_opts *o, const bench_env *env, long run,
                    bench_result *r) {
  redisContext *redis = NULL;
  bench_sink sink;
  struct rusage ru;
  char err[512] = "";
  stage st;
  int rc;

  sink_init(&sink);
  memset(&st, 0, sizeof(st));
  if ((redis = redis_open(env->redis_url, err, sizeof(err))) == NULL) {
    rc = FO_EIO;
    goto out;
  }
  if ((rc = stage_open(env, &st, err, sizeof(err))) != FO_OK)
    goto out;
  if ((rc = run_nogate(o, env, run, redis, &sink, r, err, sizeof(err))) !=
      FO_OK)
    goto out;
  rc = run_gated(o, env, run, redis, &st, &sink, r, err, sizeof(err));

out:
  stage_close(&st);
  if (redis != NULL)
    redisFree(redis);
  if (getrusage(RUSAGE_SELF, &ru) == 0)
    r->peak_rss_kb = ru.ru_maxrss;
  if (rc != FO_OK)
    snprintf(r->error, sizeof(r->error), "%s", err[0] ? err : "failed");
  r->ok = rc == FO_OK;
  return rc;
}

/* ---- the caps check (a child process) ---- */

/* Counts the check's rows in the delivery log by outcome. */
static int check_log(const bench_env *env, const char *prefix,
                     check_result *r, char *err, size_t errlen) {
  PGconn *c = PQconnectdb(env->dsn);
  const char *p[] = {prefix};
  PGresult *res = NULL;
  int rc = FO_EIO;

  if (PQstatus(c) != CONNECTION_OK) {
    snprintf(err, errlen, "delivery log: cannot connect: %s",
             PQerrorMessage(c));
    goto out;
  }
  res = PQexecParams(c,
                     "SELECT status, coalesce(reason, ''), count(*)"
                     " FROM delivery_log WHERE event_id LIKE $1 || '%'"
                     " GROUP BY 1, 2",
                     1, NULL, p, NULL, NULL, 0);
  if (PQresultStatus(res) != PGRES_TUPLES_OK) {
    snprintf(err, errlen, "delivery log: %s", PQresultErrorMessage(res));
    goto out;
  }
  for (int i = 0; i < PQntuples(res); i++) {
    uint64_t n = strtoull(PQgetvalue(res, i, 2), NULL, 10);

    if (strcmp(PQgetvalue(res, i, 0), "sent") == 0)
      r->log_sent += n;
    else if (strcmp(PQgetvalue(res, i, 0), "suppressed") == 0 &&
             strcmp(PQgetvalue(res, i, 1), "capped") == 0)
      r->log_capped += n;
    else
      r->log_other += n;
  }
  rc = FO_OK;

out:
  PQclear(res);
  PQfinish(c);
  return rc;
}

static int caps_check(const bench_opts *o, const bench_env *env,
                      check_result *r) {
  fo_dispatch_stats s;
  char err[512] = "", prefix[64];
  bench_sink sink;
  pipe_ctx p;
  double secs;
  stage st;
  feed f;
  int64_t hour;
  int rc, rc2 = FO_OK;
  /* Fixed windows: a check that crosses an hour starts a new window,
   * so it is run again (at most once more). */
  long attempt = 0;

again:
  sink_init(&sink);
  feed_init(&f, o, env->tag, PASS_CHECK, attempt);
  memset(r, 0, sizeof(*r));
  if ((rc = stage_open(env, &st, err, sizeof(err))) != FO_OK)
    goto out;
  if ((rc = pipe_start(&p, o, st.policy, &sink, err, sizeof(err))) !=
      FO_OK) {
    pipe_stop(&p);
    goto out;
  }
  hour = fo_wall_ms() / 3600000;
  rc = pipe_feed(&p, &f, &secs, err, sizeof(err));
  fo_dispatch_get_stats(p.d, &s);
  rc2 = pipe_stop(&p);
  if (rc != FO_OK)
    goto out;
  if (rc2 != FO_OK) {
    rc = rc2;
    snprintf(err, sizeof(err), "drain: %s", fo_strerror(rc2));
    goto out;
  }
  if (fo_wall_ms() / 3600000 != hour && attempt == 0) {
    stage_close(&st);
    attempt++;
    goto again;
  }
  r->sent = s.final_by_status[FO_STATUS_SENT];
  r->capped = atomic_load(&sink.suppressed[FO_SUP_CAPPED]);
  for (int k = 0; k < FO_STATUS_COUNT; k++)
    r->other += s.final_by_status[k];
  r->other -= r->sent + r->capped;
  fo_policy_flush(st.policy);
  if ((rc = fo_dlog_flush(st.dlog, 10000)) != FO_OK) {
    snprintf(err, sizeof(err), "delivery log: not written");
    goto out;
  }
  snprintf(prefix, sizeof(prefix), "%s-r%ld-%c", env->tag, attempt,
           (char)PASS_CHECK);
  if ((rc = check_log(env, prefix, r, err, sizeof(err))) != FO_OK)
    goto out;
  if (r->sent != CHECK_LIMIT || r->capped != CHECK_EVENTS - CHECK_LIMIT ||
      r->other != 0 || r->log_sent != r->sent ||
      r->log_capped != r->capped || r->log_other != 0) {
    snprintf(err, sizeof(err), "expected %d sent and %d capped",
             CHECK_LIMIT, CHECK_EVENTS - CHECK_LIMIT);
    rc = FO_EINVAL;
  }

out:
  stage_close(&st);
  if (rc != FO_OK)
    snprintf(r->error, sizeof(r->error), "%s", err[0] ? err : "failed");
  r->ok = rc == FO_OK;
  return rc;
}

/* ---- the data set (loaded once, by a child) ---- */

/* A COPY FROM STDIN writer that sends its buffer in large pieces. */
typedef struct copier {
  PGconn *c;
  char buf[1 << 16];
  size_t len;
  bool failed;
} copier;

static void copy_send(copier *w) {
  if (w->len > 0 && !w->failed &&
      PQputCopyData(w->c, w->buf, (int)w->len) != 1)
    w->failed = true;
  w->len = 0;
}

static void copy_row(copier *w, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void copy_row(copier *w, const char *fmt, ...) {
  va_list ap;
  int n;

  if (sizeof(w->buf) - w->len < 1024)
    copy_send(w);
  va_start(ap, fmt);
  n = vsnprintf(w->buf + w->len, sizeof(w->buf) - w->len, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= sizeof(w->buf) - w->len)
    w->failed = true;
  else
    w->len += (size_t)n;
}

static int copy_begin(copier *w, const char *sql, char *err,
                      size_t errlen) {
  PGresult *res = PQexec(w->c, sql);
  int ok = PQresultStatus(res) == PGRES_COPY_IN;

  if (!ok)
    snprintf(err, errlen, "%s", PQresultErrorMessage(res));
  PQclear(res);
  w->len = 0;
  w->failed = false;
  return ok ? FO_OK : FO_EIO;
}

static int copy_end(copier *w, char *err, size_t errlen) {
  PGresult *res;
  int rc = FO_OK;

  copy_send(w);
  if (PQputCopyEnd(w->c, w->failed ? "bench: row too long" : NULL) != 1)
    rc = FO_EIO;
  while ((res = PQgetResult(w->c)) != NULL) {
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
      snprintf(err, errlen, "copy: %s", PQresultErrorMessage(res));
      rc = FO_EIO;
    }
    PQclear(res);
  }
  return w->failed ? FO_EIO : rc;
}

static int load_users(const bench_opts *o, const bench_env *env, char *err,
                      size_t errlen) {
  static const char *chans[] = {"push", "email", "sms", "inapp"};
  copier *w = calloc(1, sizeof(*w));
  char caps[256];
  size_t n = 0;
  int rc = FO_ENOMEM;

  if (w == NULL)
    goto out;
  w->c = PQconnectdb(env->dsn);
  if (PQstatus(w->c) != CONNECTION_OK) {
    snprintf(err, errlen, "cannot connect: %s", PQerrorMessage(w->c));
    rc = FO_EIO;
    goto out;
  }
  n = (size_t)snprintf(caps, sizeof(caps), "{\"caps\":{");
  for (int k = 0; k < FO_CH_COUNT; k++)
    n += (size_t)snprintf(caps + n, sizeof(caps) - n,
                          "%s\"%s\":{\"limit\":%d,\"per\":\"day\"}",
                          k ? "," : "", chans[k], BENCH_CAP_LIMIT);
  snprintf(caps + n, sizeof(caps) - n, "}}");

  rc = copy_begin(w, "COPY users (id, email, phone, timezone, locale)"
                     " FROM STDIN", err, errlen);
  if (rc != FO_OK)
    goto out;
  for (long u = 0; u < o->users; u++)
    copy_row(w, "%s-u%ld\tu%ld@bench.example\t+1555%07ld\tUTC\ten\n",
             env->tag, u, u, u);
  copy_row(w, "%s-capped\tcapped@bench.example\t\\N\tUTC\ten\n", env->tag);
  if ((rc = copy_end(w, err, errlen)) != FO_OK)
    goto out;

  rc = copy_begin(w, "COPY devices (user_id, platform, token, app)"
                     " FROM STDIN", err, errlen);
  if (rc != FO_OK)
    goto out;
  for (long u = 0; u < o->users; u++)
    copy_row(w, "%s-u%ld\tapns\t%064lx\tdefault\n", env->tag, u,
             (unsigned long)u);
  copy_row(w, "%s-capped\tapns\t%064x\tdefault\n", env->tag, 0xcafe);
  if ((rc = copy_end(w, err, errlen)) != FO_OK)
    goto out;

  rc = copy_begin(w, "COPY preferences (user_id, doc) FROM STDIN", err,
                  errlen);
  if (rc != FO_OK)
    goto out;
  for (long u = 0; u < o->users; u++)
    copy_row(w, "%s-u%ld\t%s\n", env->tag, u, caps);
  copy_row(w, "%s-capped\t{\"caps\":{\"push\":{\"limit\":%d,\"per\":"
           "\"hour\"}}}\n", env->tag, CHECK_LIMIT);
  if ((rc = copy_end(w, err, errlen)) != FO_OK)
    goto out;

  {
    PGresult *res = PQexec(w->c, "ANALYZE");

    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
      snprintf(err, errlen, "analyze: %s", PQresultErrorMessage(res));
      rc = FO_EIO;
    }
    PQclear(res);
  }

out:
  if (rc == FO_ENOMEM)
    snprintf(err, errlen, "out of memory");
  if (w != NULL)
    PQfinish(w->c);
  free(w);
  return rc;
}

/* Creates the schema through the store (its migrations), then loads. */
static int setup_data(const bench_opts *o, const bench_env *env,
                      bench_result *r) {
  fo_store *s = NULL;
  char err[512] = "";
  int rc;

  rc = fo_store_open(env->dsn, 1, &s, err, sizeof(err));
  if (rc == FO_OK) {
    fo_store_close(s);
    rc = load_users(o, env, err, sizeof(err));
  }
  if (rc != FO_OK)
    snprintf(r->error, sizeof(r->error), "set-up: %s", err);
  r->ok = rc == FO_OK;
  return rc;
}

/* ---- the parent ---- */

typedef enum job_kind { JOB_SETUP, JOB_CHECK, JOB_RUN } job_kind;

typedef struct job {
  job_kind kind;
  const bench_opts *o;
  const bench_env *env;
  long run;
} job;

/*
 * Runs a job in a child, so each starts from a fresh process (its own
 * metrics registry, cache and peak RSS), and reads back its result, which
 * begins with an `ok` int and ends with an error string of `errcap`.
 */
static void in_child(const job *j, void *res, size_t size, char *errp,
                     size_t errcap) {
  int fds[2], status = 0;
  ssize_t got = 0;
  pid_t pid;

  memset(res, 0, size);
  if (pipe(fds) != 0) {
    snprintf(errp, errcap, "pipe: %s", strerror(errno));
    return;
  }
  fflush(stdout);
  fflush(stderr);
  if ((pid = fork()) < 0) {
    snprintf(errp, errcap, "fork: %s", strerror(errno));
    close(fds[0]);
    close(fds[1]);
    return;
  }
  if (pid == 0) {
    int rc;

    close(fds[0]);
    switch (j->kind) {
    case JOB_SETUP:
      rc = setup_data(j->o, j->env, res);
      break;
    case JOB_CHECK:
      rc = caps_check(j->o, j->env, res);
      break;
    default:
      rc = run_once(j->o, j->env, j->run, res);
      break;
    }
    if (write(fds[1], res, size) != (ssize_t)size)
      rc = FO_EIO;
    _exit(rc == FO_OK ? 0 : 1);
  }

  close(fds[1]);
  while ((size_t)got < size) {
    ssize_t n = read(fds[0], (char *)res + got, size - (size_t)got);

    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    got += n;
  }
  close(fds[0]);
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
    continue;
  if ((size_t)got != size) {
    memset(res, 0, size);
    if (WIFSIGNALED(status))
      snprintf(errp, errcap, "died of signal %d", WTERMSIG(status));
    else
      snprintf(errp, errcap, "gave no result");
  }
}

/* Runs one statement on the admin database; FO_OK or FO_EIO. */
static int admin_exec(const bench_env *env, const char *sql, char *err,
                      size_t errlen) {
  PGconn *c = PQconnectdb(env->admin_dsn);
  PGresult *res = NULL;
  int rc = FO_EIO;

  if (PQstatus(c) != CONNECTION_OK) {
    snprintf(err, errlen, "PostgreSQL: cannot connect: %s",
             PQerrorMessage(c));
    goto out;
  }
  res = PQexec(c, sql);
  if (PQresultStatus(res) != PGRES_COMMAND_OK) {
    snprintf(err, errlen, "PostgreSQL: %s", PQresultErrorMessage(res));
    goto out;
  }
  rc = FO_OK;

out:
  PQclear(res);
  PQfinish(c);
  return rc;
}

static void usage(FILE *to) {
  fprintf(to,
          "usage: policy [--users N] [--events N] [--recipients N]\n"
          "              [--runs N] [--workers N] [--window N]\n"
          "\n"
          "Loads --users users (email, phone, one APNs device, a cap on\n"
          "every channel) into a database of its own and times events\n"
          "through the queue, the dispatcher and the policy stage to a\n"
          "channel that only counts, against the same events with no\n"
          "policy stage. Needs FANOUT_POSTGRES_DSN and FANOUT_REDIS_URL\n"
          "(read from " BENCH_ENV_FILE " when unset).\n"
          "\n"
          "  --users N       users loaded and cached [100000]\n"
          "  --events N      events of the timed pass [4000]\n"
          "  --recipients N  recipients per event, all four channels [50]\n"
          "  --runs N        runs, each in a fresh process [3]\n"
          "  --workers N     dispatcher threads [2]\n"
          "  --window N      most events queued ahead of completion [8]\n");
}

static int parse_args(int argc, char **argv, bench_opts *o) {
  static const bench_flag flags[] = {
      {"--users", offsetof(bench_opts, users), 1, 10000000},
      {"--events", offsetof(bench_opts, events), 1, 100000000},
      {"--recipients", offsetof(bench_opts, recipients), 1, 10000},
      {"--runs", offsetof(bench_opts, runs), 1, 99},
      {"--workers", offsetof(bench_opts, workers), 1, 64},
      {"--window", offsetof(bench_opts, window), 1, 4096},
  };

  if (bench_parse_flags(argc, argv, flags, sizeof(flags) / sizeof(flags[0]),
                        o, "policy", usage) != FO_OK)
    return FO_EINVAL;
  if (o->recipients > o->users) {
    fprintf(stderr, "policy: --recipients must not exceed --users\n");
    return FO_EINVAL;
  }
  return FO_OK;
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
  BENCH_MEDIAN(per_s, double);
  BENCH_MEDIAN(nogate_secs, double);
  BENCH_MEDIAN(nogate_per_s, double);
  BENCH_MEDIAN(warm_secs, double);
  BENCH_MEDIAN(warm_users_per_s, double);
  BENCH_MEDIAN(warm_misses, uint64_t);
  BENCH_MEDIAN(batch_p50_us, int64_t);
  BENCH_MEDIAN(batch_p99_us, int64_t);
  BENCH_MEDIAN(batch_mean_us, double);
  BENCH_MEDIAN(batches, uint64_t);
  BENCH_MEDIAN(dispatch_p50_us, int64_t);
  BENCH_MEDIAN(dispatch_p99_us, int64_t);
  BENCH_MEDIAN(nogate_dispatch_p99_us, int64_t);
  BENCH_MEDIAN(hit_ratio, double);
  BENCH_MEDIAN(redis_cmds_per_s, double);
  BENCH_MEDIAN(redis_scripts_per_s, double);
  BENCH_MEDIAN(redis_cores, double);
  BENCH_MEDIAN(engine_cores, double);
  BENCH_MEDIAN(machine_cores, double);
  BENCH_MEDIAN(nogate_engine_cores, double);
  BENCH_MEDIAN(cpu_us_per_delivery, double);
  BENCH_MEDIAN(nogate_cpu_us_per_delivery, double);
  BENCH_MEDIAN(redis_cpu_us_per_delivery, double);
  BENCH_MEDIAN(pg_cores, double);
  BENCH_MEDIAN(pg_cpu_us_per_delivery, double);
  BENCH_MEDIAN(dlog_written, uint64_t);
  BENCH_MEDIAN(dlog_dropped, uint64_t);
  BENCH_MEDIAN(dlog_flush_secs, double);
  BENCH_MEDIAN(peak_rss_kb, long);
#undef BENCH_MEDIAN
}

static void print_figures(const char *label, const bench_result *r) {
  double added = 1e6 / r->per_s - 1e6 / r->nogate_per_s;

  printf("%-7s %" PRIu64 " deliveries in %.2f s: %.0f deliveries/s with "
         "the policy stage,\n"
         "        %.0f/s without it (%.2f s): +%.2f us of wall time per "
         "delivery;\n"
         "        policy batch p50 %" PRId64 " us, p99 %" PRId64 " us, "
         "mean %.0f us over %" PRIu64 " batches;\n"
         "        dispatch latency p50 %" PRId64 " us, p99 %" PRId64
         " us (without the stage: p99 %" PRId64 " us);\n"
         "        cache hit ratio %.4f; warm-up %.2f s: %.0f users/s "
         "loaded, %" PRIu64 " cache misses;\n"
         "        Redis %.0f commands/s, %.0f script calls/s; CPU cores: "
         "engine %.2f, Redis %.2f,\n"
         "        PostgreSQL %.2f, whole machine %.2f;\n"
         "        CPU per delivery: engine %.2f us (%.2f us without the "
         "stage), Redis %.2f us, PostgreSQL %.2f us;\n"
         "        delivery log %" PRIu64 " written, %" PRIu64 " dropped, "
         "%.2f s to write the rest; peak RSS %.1f MB\n",
         label, r->deliveries, r->secs, r->per_s, r->nogate_per_s,
         r->nogate_secs, added, r->batch_p50_us, r->batch_p99_us,
         r->batch_mean_us, r->batches, r->dispatch_p50_us,
         r->dispatch_p99_us, r->nogate_dispatch_p99_us, r->hit_ratio,
         r->warm_secs, r->warm_users_per_s, r->warm_misses,
         r->redis_cmds_per_s, r->redis_scripts_per_s, r->engine_cores,
         r->redis_cores, r->pg_cores, r->machine_cores,
         r->cpu_us_per_delivery, r->nogate_cpu_us_per_delivery,
         r->redis_cpu_us_per_delivery, r->pg_cpu_us_per_delivery,
         r->dlog_written, r->dlog_dropped, r->dlog_flush_secs,
         (double)r->peak_rss_kb / 1024.0);
}

/* Deletes this invocation's Redis keys matching `pattern`; reports. */
static void clean_redis(const bench_env *env, const char *what,
                        const char *suffix) {
  char err[256], pattern[96];
  redisContext *c = redis_open(env->redis_url, err, sizeof(err));
  int64_t t0 = fo_now_us();
  long long n;

  if (c == NULL) {
    printf("clean-up: %s\n", err);
    return;
  }
  snprintf(pattern, sizeof(pattern), "*%s-%s*", env->tag, suffix);
  n = redis_delete(c, pattern);
  if (n < 0)
    printf("clean-up: Redis refused to delete the %s keys\n", what);
  else
    printf("clean-up: %lld Redis keys of %s deleted in %.1f s\n", n, what,
           (double)(fo_now_us() - t0) / 1e6);
  redisFree(c);
}

int main(int argc, char **argv) {
  bench_opts o = {.users = 100000, .events = 4000, .recipients = 50,
                  .runs = 3, .workers = 2, .window = 8};
  bench_result rs[99], med, setup;
  check_result check;
  char sql[192], err[512];
  bench_env env;
  job j;
  int failed = 0;
  int64_t t0;

  if (parse_args(argc, argv, &o) != FO_OK)
    return 2;
  if (env_load(&env) != FO_OK)
    return 2;
  /* The engine logs only what goes wrong; info lines would interleave
   * with the report. */
  fo_log_set_level(FO_LOG_WARN);
  printf("policy: %ld users cached, caps on every channel; timed pass "
         "%ld events x %ld users x %d channels = %" PRIu64 " deliveries; "
         "%ld workers, window %ld events, %ld runs\n",
         o.users, o.events, o.recipients, FO_CH_COUNT,
         (uint64_t)o.events * (uint64_t)o.recipients * FO_CH_COUNT,
         o.workers, o.window, o.runs);

  snprintf(sql, sizeof(sql), "CREATE DATABASE %s", env.db);
  if (admin_exec(&env, sql, err, sizeof(err)) != FO_OK) {
    printf("policy: cannot create database %s: %s\n", env.db, err);
    return 1;
  }

  j = (job){.kind = JOB_SETUP, .o = &o, .env = &env};
  t0 = fo_now_us();
  in_child(&j, &setup, sizeof(setup), setup.error, sizeof(setup.error));
  if (!setup.ok) {
    printf("policy: %s\n", setup.error);
    failed = 1;
    goto out;
  }
  printf("set-up  database %s, %ld users loaded in %.1f s\n", env.db,
         o.users, (double)(fo_now_us() - t0) / 1e6);

  j.kind = JOB_CHECK;
  in_child(&j, &check, sizeof(check), check.error, sizeof(check.error));
  printf("caps    one user capped at %d an hour, %d deliveries: %" PRIu64
         " sent, %" PRIu64 " capped, %" PRIu64 " other; delivery log: %"
         PRIu64 " sent, %" PRIu64 " capped, %" PRIu64 " other%s%s\n",
         CHECK_LIMIT, CHECK_EVENTS, check.sent, check.capped, check.other,
         check.log_sent, check.log_capped, check.log_other,
         check.ok ? "" : ": FAILED: ", check.ok ? "" : check.error);
  if (!check.ok)
    failed = 1;

  for (long i = 0; i < o.runs; i++) {
    char label[16], suffix[24];

    j.kind = JOB_RUN;
    j.run = i + 1;
    in_child(&j, &rs[i], sizeof(rs[i]), rs[i].error, sizeof(rs[i].error));
    snprintf(label, sizeof(label), "run %ld", i + 1);
    if (!rs[i].ok) {
      printf("%-7s FAILED: %s\n", label, rs[i].error);
      failed++;
    } else {
      print_figures(label, &rs[i]);
    }
    fflush(stdout);
    /* Each run's dedup keys go now, so the next run finds Redis as
     * this one did. */
    snprintf(suffix, sizeof(suffix), "r%ld-", i + 1);
    clean_redis(&env, label, suffix);
  }
  if (failed > 0) {
    printf("policy: %d checks or runs failed\n", failed);
    goto out;
  }

  memset(&med, 0, sizeof(med));
  medians(rs, o.runs, &med);
  med.deliveries = rs[0].deliveries;
  print_figures("median", &med);
  printf("every delivery ended sent, counted once, in every pass of every "
         "run; caps evaluated (%d of %d sent)\n",
         CHECK_LIMIT, CHECK_EVENTS);
  printf("target %.0f deliveries/s %s; target policy batch p99 under "
         "%d us %s\n",
         BENCH_TARGET_PER_S,
         med.per_s >= BENCH_TARGET_PER_S ? "met" : "NOT met",
         BENCH_TARGET_P99_US,
         med.batch_p99_us <= BENCH_TARGET_P99_US ? "met" : "NOT met");
  printf("reproduce: make build/bench/policy && build/bench/policy "
         "--users %ld --events %ld --recipients %ld --runs %ld "
         "--workers %ld --window %ld\n",
         o.users, o.events, o.recipients, o.runs, o.workers, o.window);

out:
  clean_redis(&env, "the users", "");
  snprintf(sql, sizeof(sql), "DROP DATABASE IF EXISTS %s WITH (FORCE)",
           env.db);
  if (admin_exec(&env, sql, err, sizeof(err)) != FO_OK)
    printf("clean-up: cannot drop database %s: %s\n", env.db, err);
  return failed > 0 ? 1 : 0;
}
