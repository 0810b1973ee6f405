/* SPDX-License-Identifier: MIT */
/*
 * E-mail and SMS benchmark: deliveries per second through the real
 * SendGrid and Twilio channels to their fakes (build/fake-sendgrid and
 * build/fake-twilio) over HTTPS on loopback, each channel measured on its
 * own. Events are decoded and pushed straight into the queue (no Kafka),
 * and a small policy stage only attaches a recipient with a valid address
 * and number to each delivery, so the figures are the queue, the
 * dispatcher, the channel and its HTTPS client against a provider that
 * answers at once.
 *
 * The parent forks one child per run (fresh metrics registry), and each
 * child starts its fake as a process of its own on a free port, feeds the
 * events, checks that every delivery ended sent and that the fake
 * accepted exactly those messages, and reports. The parent prints every
 * run, the medians per channel and the command that reproduces them, and
 * exits non-zero when a run failed or a count was wrong.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>

#include "../common.h"
#include "dispatch.h"
#include "fanout/channel.h"
#include "fanout/common.h"
#include "fanout/event.h"
#include "log.h"
#include "metrics.h"
#include "queue.h"
#include "sendgrid.h"
#include "store.h"
#include "twilio.h"

#define BENCH_STALL_MS 30000      /* no event finished for this long */
#define BENCH_DRAIN_MS 10000
#define BENCH_FAKE_START_MS 15000 /* the fake must say where it listens */
#define BENCH_FAKE_STOP_MS 5000
#define BENCH_ACCEPTED_MS 60000   /* GET /_fake/accepted */
#define BENCH_QUEUE_ITEMS 1000000
#define BENCH_QUEUE_EVENTS 4096
#define BENCH_RETRY_BASE_MS 1000
#define BENCH_RETRY_MAX_MS 300000

/* Credentials the fakes are started with; not secrets. */
#define BENCH_SG_KEY "SG.bench-key.0123456789abcdef"
#define BENCH_SG_FROM "bench@fanout.example"
#define BENCH_TW_SID "AC0123456789abcdef0123456789abcdef"
#define BENCH_TW_TOKEN "0123456789abcdef0123456789abcdef"
#define BENCH_TW_FROM "+15005550006"

/* Addresses of recipient N: distinct, so SendGrid can batch them. */
#define BENCH_EMAIL_FMT "u%ld@bench.example"
#define BENCH_PHONE_PREFIX "+1555"
#define BENCH_PHONE_FMT BENCH_PHONE_PREFIX "%07ld"

typedef enum bench_kind { BENCH_EMAIL = 0, BENCH_SMS, BENCH_KINDS } bench_kind;

typedef struct bench_opts {
  long events[BENCH_KINDS];
  long recipients[BENCH_KINDS];
  long runs;
  long workers;
  long max_inflight[BENCH_KINDS];
  long window;                  /* unfinished, times max_inflight */
} bench_opts;

/* What one run reports to the parent, through a pipe. */
typedef struct bench_result {
  int ok;
  uint64_t deliveries;          /* ended sent, as on_outcome counted */
  uint64_t accepted;            /* messages the fake accepted */
  uint64_t requests;            /* provider requests the fake saw */
  uint64_t retries;
  double secs;                  /* first push to last event done */
  double per_s;
  double requests_per_s;
  double per_request;           /* deliveries a request */
  int64_t lat_p50_us;           /* fanout_delivery_latency_seconds */
  int64_t lat_p99_us;
  int64_t req_p50_us;           /* fanout_provider_request_seconds */
  int64_t req_p99_us;
  double engine_cores;
  double fake_cores;
  double machine_cores;
  double engine_us;             /* CPU per delivery */
  double fake_us;
  char error[640];
} bench_result;

static const char *kind_name(bench_kind k) {
  return k == BENCH_EMAIL ? "email" : "sms";
}

/* ---- small helpers ---- */

/* User plus system CPU seconds of another process, from /proc. */
static double cpu_pid_secs(pid_t pid) {
  char path[64], buf[1024], *p;
  unsigned long ut = 0, st = 0;
  size_t n;
  FILE *f;

  snprintf(path, sizeof(path), "/proc/%ld/stat", (long)pid);
  if ((f = fopen(path, "r")) == NULL)
    return 0;
  n = fread(buf, 1, sizeof(buf) - 1, f);
  fclose(f);
  buf[n] = '\0';
  /* The command name may hold spaces: count fields after its ')'. */
  if ((p = strrchr(buf, ')')) == NULL ||
      sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu",
             &ut, &st) != 2)
    return 0;
  return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* ---- the fake provider, a child process ---- */

typedef struct fake_proc {
  pid_t pid;
  int out;                      /* its stdout, read for the port line */
  int port;
  char dir[PATH_MAX];           /* temporary directory of the CA file */
  char ca[PATH_MAX + 16];
} fake_proc;

/* The fake's binary: next to the bench's own directory, as `make` builds
 * build/bench/NAME and build/fake-NAME. */
static int fake_path(const char *name, char *out, size_t cap) {
  char self[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  char *slash;

  if (n <= 0)
    return FO_EIO;
  self[n] = '\0';
  /* .../build/bench/email-sms -> .../build */
  for (int i = 0; i < 2; i++) {
    if ((slash = strrchr(self, '/')) == NULL)
      return FO_EIO;
    *slash = '\0';
  }
  if ((size_t)snprintf(out, cap, "%s/%s", self, name) >= cap)
    return FO_EINVAL;
  return access(out, X_OK) == 0 ? FO_OK : FO_ENOENT;
}

/* Reads the fake's stdout until "listening port=P"; FO_OK with f->port. */
static int fake_wait_port(fake_proc *f, char *err, size_t errlen) {
  int64_t deadline = fo_now_ms() + BENCH_FAKE_START_MS;
  char buf[512];
  size_t len = 0;

  for (;;) {
    struct pollfd pfd = {.fd = f->out, .events = POLLIN};
    int64_t left = deadline - fo_now_ms();
    char *line;
    ssize_t n;

    buf[len] = '\0';
    if ((line = strstr(buf, "listening port=")) != NULL &&
        strchr(line, '\n') != NULL) {
      f->port = atoi(line + strlen("listening port="));
      if (f->port > 0)
        return FO_OK;
      snprintf(err, errlen, "the fake printed no port");
      return FO_EIO;
    }
    if (left <= 0) {
      snprintf(err, errlen, "the fake did not start within %d s",
               BENCH_FAKE_START_MS / 1000);
      return FO_ETIMEDOUT;
    }
    if (poll(&pfd, 1, (int)left) < 0 && errno != EINTR) {
      snprintf(err, errlen, "poll: %s", strerror(errno));
      return FO_EIO;
    }
    if (!(pfd.revents & (POLLIN | POLLHUP)))
      continue;
    n = read(f->out, buf + len, sizeof(buf) - 1 - len);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      snprintf(err, errlen, "the fake exited before listening");
      return FO_EIO;
    }
    len += (size_t)n;
    if (len == sizeof(buf) - 1) {
      /* Keep the tail: the line may still come. */
      memmove(buf, buf + len / 2, len - len / 2);
      len -= len / 2;
    }
  }
}

/*
 * Starts the fake for `kind` on a free port, its CA file in a new
 * temporary directory. The caller stops it with fake_stop() whatever this
 * returns.
 */
static int fake_start(bench_kind kind, fake_proc *f, char *err,
                      size_t errlen) {
  const char *tmp = getenv("TMPDIR");
  char bin[PATH_MAX];
  char *argv[12];
  int fds[2], rc, n = 0;

  memset(f, 0, sizeof(*f));
  f->pid = -1;
  f->out = -1;
  rc = fake_path(kind == BENCH_EMAIL ? "fake-sendgrid" : "fake-twilio", bin,
                 sizeof(bin));
  if (rc != FO_OK) {
    snprintf(err, errlen, "cannot find the fake next to the benchmark "
             "(make build/fake-sendgrid build/fake-twilio): %s",
             fo_strerror(rc));
    return rc;
  }
  snprintf(f->dir, sizeof(f->dir), "%s/fanout-bench-XXXXXX",
           tmp != NULL && tmp[0] != '\0' ? tmp : P_tmpdir);
  if (mkdtemp(f->dir) == NULL) {
    snprintf(err, errlen, "mkdtemp: %s", strerror(errno));
    f->dir[0] = '\0';
    return FO_EIO;
  }
  snprintf(f->ca, sizeof(f->ca), "%s/ca.pem", f->dir);

  argv[n++] = bin;
  argv[n++] = "--port";
  argv[n++] = "0";
  argv[n++] = "--ca";
  argv[n++] = f->ca;
  if (kind == BENCH_EMAIL) {
    argv[n++] = "--api-key";
    argv[n++] = BENCH_SG_KEY;
  } else {
    argv[n++] = "--account-sid";
    argv[n++] = BENCH_TW_SID;
    argv[n++] = "--auth-token";
    argv[n++] = BENCH_TW_TOKEN;
  }
  argv[n] = NULL;

  if (pipe(fds) != 0) {
    snprintf(err, errlen, "pipe: %s", strerror(errno));
    return FO_EIO;
  }
  /* No thread runs in this process yet, so the fork is clean. */
  fflush(stdout);
  fflush(stderr);
  if ((f->pid = fork()) < 0) {
    snprintf(err, errlen, "fork: %s", strerror(errno));
    close(fds[0]);
    close(fds[1]);
    return FO_EIO;
  }
  if (f->pid == 0) {
    /* Dies with the run rather than outliving a failed one. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    close(fds[0]);
    if (dup2(fds[1], STDOUT_FILENO) < 0)
      _exit(127);
    close(fds[1]);
    execv(bin, argv);
    _exit(127);
  }
  close(fds[1]);
  f->out = fds[0];
  return fake_wait_port(f, err, errlen);
}

/* Stops the fake (SIGTERM, then SIGKILL) and removes its files. */
static void fake_stop(fake_proc *f) {
  int64_t deadline = fo_now_ms() + BENCH_FAKE_STOP_MS;
  int status;

  if (f->pid > 0) {
    kill(f->pid, SIGTERM);
    while (waitpid(f->pid, &status, WNOHANG) == 0) {
      if (fo_now_ms() > deadline) {
        kill(f->pid, SIGKILL);
        waitpid(f->pid, &status, 0);
        break;
      }
      bench_sleep_ms(10);
    }
    f->pid = -1;
  }
  if (f->out >= 0)
    close(f->out);
  f->out = -1;
  if (f->dir[0] != '\0') {
    unlink(f->ca);
    rmdir(f->dir);
    f->dir[0] = '\0';
  }
}

/* GET /_fake/accepted over HTTPS; *out is a new reference. */
static int fake_accepted(const fake_proc *f, json_t **out, char *err,
                         size_t errlen) {
  CURL *h = curl_easy_init();
  char url[64], *body = NULL;
  size_t len = 0;
  json_error_t je;
  long code = 0;
  CURLcode cc;
  FILE *mem;
  int rc = FO_EIO;

  *out = NULL;
  if (h == NULL || (mem = open_memstream(&body, &len)) == NULL) {
    snprintf(err, errlen, "accepted: out of memory");
    if (h != NULL)
      curl_easy_cleanup(h);
    return FO_ENOMEM;
  }
  snprintf(url, sizeof(url), "https://127.0.0.1:%d/_fake/accepted",
           f->port);
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_CAINFO, f->ca);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, mem);
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)BENCH_ACCEPTED_MS);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  cc = curl_easy_perform(h);
  if (cc == CURLE_OK)
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
  curl_easy_cleanup(h);
  fclose(mem);
  if (cc != CURLE_OK || code != 200) {
    snprintf(err, errlen, "GET /_fake/accepted: %s",
             cc != CURLE_OK ? curl_easy_strerror(cc) : "status not 200");
    goto out;
  }
  if ((*out = json_loadb(body, len, 0, &je)) == NULL) {
    snprintf(err, errlen, "GET /_fake/accepted: %s", je.text);
    goto out;
  }
  rc = FO_OK;

out:
  free(body);
  return rc;
}

/*
 * Checks what the fake accepted: exactly `events` messages to each of the
 * first `recipients` addresses and nothing else. Sets the counts in *r.
 */
static int check_accepted(bench_kind kind, const json_t *doc, long events,
                          long recipients, bench_result *r, char *err,
                          size_t errlen) {
  const json_t *items = json_object_get(doc, "items");
  long *per = calloc((size_t)recipients, sizeof(*per));
  const json_t *it;
  size_t i, stray = 0;
  int rc = FO_OK;

  if (per == NULL) {
    snprintf(err, errlen, "out of memory");
    return FO_ENOMEM;
  }
  r->accepted = (uint64_t)json_integer_value(json_object_get(doc, "count"));
  r->requests =
      (uint64_t)json_integer_value(json_object_get(doc, "requests"));
  json_array_foreach(items, i, it) {
    const char *to = json_string_value(json_object_get(it, "to"));
    long u = -1;

    if (to != NULL && kind == BENCH_EMAIL && to[0] == 'u')
      u = strtol(to + 1, NULL, 10);
    else if (to != NULL && kind == BENCH_SMS &&
             strncmp(to, BENCH_PHONE_PREFIX,
                     strlen(BENCH_PHONE_PREFIX)) == 0)
      u = strtol(to + strlen(BENCH_PHONE_PREFIX), NULL, 10);
    if (u >= 0 && u < recipients)
      per[u]++;
    else
      stray++;
  }
  if (r->accepted != json_array_size(items) || stray > 0) {
    snprintf(err, errlen, "the fake lists %zu items for a count of %"
             PRIu64 ", %zu to unknown addresses",
             json_array_size(items), r->accepted, stray);
    rc = FO_EINVAL;
    goto out;
  }
  for (long u = 0; u < recipients; u++) {
    if (per[u] != events) {
      snprintf(err, errlen, "the fake accepted %ld messages to recipient "
               "%ld, expected %ld (one an event)", per[u], u, events);
      rc = FO_EINVAL;
      goto out;
    }
  }

out:
  free(per);
  return rc;
}

/* ---- the bench's policy stage: a recipient for every delivery ---- */

/* Recipient N has id "uN", address BENCH_EMAIL_FMT and number
 * BENCH_PHONE_FMT; the array outlives the dispatcher. */
typedef struct bench_gate {
  fo_recipient *recips;
  long n;
} bench_gate;

static int gate_init(bench_gate *g, long n) {
  g->n = 0;
  g->recips = calloc((size_t)n, sizeof(*g->recips));
  if (g->recips == NULL)
    return FO_ENOMEM;
  for (long u = 0; u < n; u++) {
    fo_recipient *r = &g->recips[u];
    char id[32], email[64], phone[32];

    g->n = u + 1;
    atomic_init(&r->refs, 1);
    fo_prefs_init_default(&r->prefs);
    snprintf(id, sizeof(id), "u%ld", u);
    snprintf(email, sizeof(email), BENCH_EMAIL_FMT, u);
    snprintf(phone, sizeof(phone), BENCH_PHONE_FMT, u);
    r->id = strdup(id);
    r->email = strdup(email);
    r->phone = strdup(phone);
    if (r->id == NULL || r->email == NULL || r->phone == NULL)
      return FO_ENOMEM;
  }
  return FO_OK;
}

static void gate_clear(bench_gate *g) {
  for (long u = 0; u < g->n; u++) {
    free(g->recips[u].id);
    free(g->recips[u].email);
    free(g->recips[u].phone);
  }
  free(g->recips);
  g->recips = NULL;
  g->n = 0;
}

static void gate_check(void *self, fo_delivery *const *ds, size_t n,
                       fo_verdict *out) {
  bench_gate *g = self;

  for (size_t i = 0; i < n; i++) {
    const char *user = ds[i]->user;
    long u = user[0] == 'u' ? strtol(user + 1, NULL, 10) : -1;

    if (u < 0 || u >= g->n) {
      out[i].kind = FO_VERDICT_FINAL;
      fo_outcome_init(&out[i].outcome, FO_STATUS_SUPPRESSED);
      out[i].outcome.suppress = FO_SUP_UNKNOWN_USER;
      continue;
    }
    ds[i]->recipient = &g->recips[u];
    out[i].kind = FO_VERDICT_SEND;
  }
}

static void gate_release(void *self, fo_delivery *d) {
  /* The recipients are the bench's own and outlive every delivery. */
  (void)self;
  (void)d;
}

/* ---- the pipeline: queue, dispatcher, one real channel ---- */

typedef struct pipe_ctx {
  fo_queue *q;
  fo_dispatch *d;
  fo_channel *ch;
  bool ch_shut;

  atomic_uint_fast64_t by_status[FO_STATUS_COUNT];
  pthread_mutex_t lock;         /* guards done and last_done_us */
  pthread_cond_t cond;
  long done;
  int64_t last_done_us;
  atomic_long unfinished;
} pipe_ctx;

static void on_outcome(const fo_delivery *d, const fo_outcome *o,
                       void *arg) {
  pipe_ctx *p = arg;

  (void)d;
  if (o->status < FO_STATUS_COUNT)
    atomic_fetch_add_explicit(&p->by_status[o->status], 1,
                              memory_order_relaxed);
}

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

/* Creates the channel of `kind` against the fake; FO_OK or an error
 * with one line in `err`. */
static int channel_new(bench_kind kind, const bench_opts *o,
                       const fake_proc *f, fo_channel **out, char *err,
                       size_t errlen) {
  char url[64];

  snprintf(url, sizeof(url), "https://127.0.0.1:%d", f->port);
  if (kind == BENCH_EMAIL) {
    fo_sendgrid_conf c = {.url = url,
                          .api_key = BENCH_SG_KEY,
                          .from = BENCH_SG_FROM,
                          .ca_file = f->ca,
                          .max_inflight = (int)o->max_inflight[kind]};

    return fo_sendgrid_new(&c, out, err, errlen);
  } else {
    /* No rate and no store: nothing here is refused or limited. */
    fo_twilio_conf c = {.url = url,
                        .account_sid = BENCH_TW_SID,
                        .auth_token = BENCH_TW_TOKEN,
                        .from = BENCH_TW_FROM,
                        .ca_file = f->ca,
                        .max_inflight = (int)o->max_inflight[kind]};

    return fo_twilio_new(&c, out, err, errlen);
  }
}

static int pipe_start(pipe_ctx *p, bench_kind kind, const bench_opts *o,
                      const fo_gate *gate, const fake_proc *f, char *err,
                      size_t errlen) {
  fo_dispatch_conf dc;
  int rc;

  memset(p, 0, sizeof(*p));
  for (int s = 0; s < FO_STATUS_COUNT; s++)
    atomic_init(&p->by_status[s], 0);
  atomic_init(&p->unfinished, 0);
  pthread_mutex_init(&p->lock, NULL);
  pthread_cond_init(&p->cond, NULL);
  if ((rc = channel_new(kind, o, f, &p->ch, err, errlen)) != FO_OK)
    return rc;
  if ((p->q = fo_queue_new(BENCH_QUEUE_ITEMS, BENCH_QUEUE_EVENTS)) ==
      NULL) {
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
  dc.outcome_arg = p;
  dc.gate = gate;
  if ((p->d = fo_dispatch_new(p->q, &dc)) == NULL) {
    snprintf(err, errlen, "dispatch: cannot create");
    return FO_ENOMEM;
  }
  fo_dispatch_set_channel(p->d, kind == BENCH_EMAIL ? FO_CH_EMAIL
                                                    : FO_CH_SMS,
                          p->ch);
  if (fo_dispatch_start(p->d) != FO_OK) {
    snprintf(err, errlen, "dispatch: cannot start");
    return FO_EIO;
  }
  return FO_OK;
}

/* Drains the dispatcher; the channel must then shut down before the
 * dispatcher is freed. Returns the drain's result. */
static int pipe_drain(pipe_ctx *p) {
  int rc = FO_OK;

  if (p->d != NULL)
    rc = fo_dispatch_drain(p->d, BENCH_DRAIN_MS);
  if (p->ch != NULL && !p->ch_shut) {
    p->ch->ops->shutdown(p->ch->self);
    p->ch_shut = true;
  }
  return rc;
}

static void pipe_free(pipe_ctx *p) {
  pipe_drain(p);
  fo_dispatch_free(p->d);
  if (p->ch != NULL)
    p->ch->ops->destroy(p->ch->self);
  if (p->q != NULL)
    fo_queue_free(p->q);
  pthread_cond_destroy(&p->cond);
  pthread_mutex_destroy(&p->lock);
  memset(p, 0, sizeof(*p));
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

/* The JSON of event `i`: recipients u0 .. u(n-1), one channel. Returns
 * its length, or 0 when it does not fit. */
static size_t event_json(bench_kind kind, long run, long i, long n,
                         char *buf, size_t cap) {
  size_t len;

  len = (size_t)snprintf(buf, cap,
                         "{\"id\":\"es-%s-r%ld-%ld\",\"category\":\"bench\","
                         "\"channels\":[\"%s\"],\"to\":[",
                         kind_name(kind), run, i, kind_name(kind));
  for (long u = 0; u < n && len < cap; u++)
    len += (size_t)snprintf(buf + len, cap - len, "%s\"u%ld\"",
                            u > 0 ? "," : "", u);
  if (len < cap)
    len += (size_t)snprintf(buf + len, cap - len,
                            "],\"title\":\"Benchmark\",\"body\":\"One "
                            "event of the e-mail and SMS benchmark\"}");
  return len < cap ? len : 0;
}

/*
 * Decodes and queues `events` events, keeping at most `ahead` unfinished
 * as the consumer's bounded queue would, and waits for the last one. Sets
 * *secs from the first push to the last event done.
 */
static int pipe_feed(pipe_ctx *p, bench_kind kind, long run, long events,
                     long recipients, long ahead, double *secs, char *err,
                     size_t errlen) {
  size_t cap = 256 + (size_t)recipients * 16;
  char *buf = malloc(cap);
  int64_t t0 = fo_now_us();
  int rc = FO_OK;

  if (buf == NULL) {
    snprintf(err, errlen, "out of memory");
    return FO_ENOMEM;
  }
  for (long i = 0; i < events; i++) {
    size_t n = event_json(kind, run, i, recipients, buf, cap);
    fo_event_error e;
    fo_event *ev = NULL;

    if ((rc = wait_done(p, i, ahead)) != FO_OK)
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
    rc = wait_done(p, events, 1);
  if (rc != FO_OK) {
    long done;

    pthread_mutex_lock(&p->lock);
    done = p->done;
    pthread_mutex_unlock(&p->lock);
    snprintf(err, errlen, "stalled: %ld of %ld events finished, %" PRIu64
             " deliveries sent", done, events,
             (uint64_t)atomic_load(&p->by_status[FO_STATUS_SENT]));
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

/* Every delivery ended sent, none otherwise, as both the dispatcher and
 * on_outcome count. */
static int check_sent(pipe_ctx *p, uint64_t want, bench_result *r,
                      char *err, size_t errlen) {
  fo_dispatch_stats st;
  uint64_t all = 0, mine = 0;

  fo_dispatch_get_stats(p->d, &st);
  for (int s = 0; s < FO_STATUS_COUNT; s++) {
    all += st.final_by_status[s];
    mine += atomic_load(&p->by_status[s]);
  }
  r->deliveries = atomic_load(&p->by_status[FO_STATUS_SENT]);
  r->retries = st.retries;
  if (r->deliveries == want && mine == want &&
      st.final_by_status[FO_STATUS_SENT] == want && all == want)
    return FO_OK;
  snprintf(err, errlen,
           "%" PRIu64 " deliveries ended: %" PRIu64 " sent, %" PRIu64
           " failed, %" PRIu64 " deferred, %" PRIu64 " suppressed; "
           "expected %" PRIu64 " sent",
           mine, r->deliveries,
           (uint64_t)atomic_load(&p->by_status[FO_STATUS_FAILED]),
           (uint64_t)atomic_load(&p->by_status[FO_STATUS_DEFERRED]),
           (uint64_t)atomic_load(&p->by_status[FO_STATUS_SUPPRESSED]),
           want);
  return FO_EINVAL;
}

/* Provider requests that the channel saw answered with `code`. */
static uint64_t requests_answered(bench_kind kind, int code) {
  char labels[64];

  snprintf(labels, sizeof(labels), "channel=\"%s\",code=\"%d\"",
           kind_name(kind), code);
  return fo_counter_value(
      fo_metrics_counter("fanout_provider_requests_total", "", labels));
}

/* ---- one run (a child process) ---- */

/* Events kept unfinished: enough queued work to keep the channel full,
 * as a busy consumer would, rounded up to whole events. */
static long events_ahead(const bench_opts *o, bench_kind kind) {
  return (o->window * o->max_inflight[kind] + o->recipients[kind] - 1) /
         o->recipients[kind];
}

static int run_once(bench_kind kind, const bench_opts *o, long run,
                    bench_result *r) {
  long events = o->events[kind], recipients = o->recipients[kind];
  uint64_t want = (uint64_t)events * (uint64_t)recipients;
  long ahead = events_ahead(o, kind);
  bench_gate g = {NULL, 0};
  fo_gate gate = {.check = gate_check, .release = gate_release, .self = &g};
  double cpu0, fake0, mach0, wall;
  int64_t t0;
  char labels[48], err[512] = "";
  json_t *doc = NULL;
  fake_proc f;
  pipe_ctx p;
  uint64_t ok_answers;
  int rc;

  memset(&p, 0, sizeof(p));
  memset(&f, 0, sizeof(f));
  f.pid = -1;
  f.out = -1;
  if ((rc = gate_init(&g, recipients)) != FO_OK) {
    snprintf(err, sizeof(err), "out of memory");
    goto out;
  }
  /* Before any thread: the fork, and libcurl's global set-up. */
  if ((rc = fake_start(kind, &f, err, sizeof(err))) != FO_OK)
    goto out;
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
    snprintf(err, sizeof(err), "libcurl: cannot initialise");
    rc = FO_EIO;
    goto out;
  }
  if ((rc = pipe_start(&p, kind, o, &gate, &f, err, sizeof(err))) != FO_OK)
    goto out;

  t0 = fo_now_us();
  cpu0 = bench_cpu_self_secs();
  fake0 = cpu_pid_secs(f.pid);
  mach0 = bench_cpu_machine_secs();
  rc = pipe_feed(&p, kind, run, events, recipients, ahead, &r->secs, err,
                 sizeof(err));
  if (rc != FO_OK)
    goto out;
  wall = (double)(fo_now_us() - t0) / 1e6;
  r->engine_cores = (bench_cpu_self_secs() - cpu0) / wall;
  r->fake_cores = (cpu_pid_secs(f.pid) - fake0) / wall;
  r->machine_cores = (bench_cpu_machine_secs() - mach0) / wall;
  r->engine_us = r->engine_cores * wall * 1e6 / (double)want;
  r->fake_us = r->fake_cores * wall * 1e6 / (double)want;

  snprintf(labels, sizeof(labels), "channel=\"%s\"", kind_name(kind));
  {
    fo_histogram *h = fo_metrics_histogram(
        "fanout_delivery_latency_seconds", "", labels);
    fo_histogram *q = fo_metrics_histogram(
        "fanout_provider_request_seconds", "", labels);

    r->lat_p50_us = fo_histogram_quantile_us(h, 0.50);
    r->lat_p99_us = fo_histogram_quantile_us(h, 0.99);
    r->req_p50_us = fo_histogram_quantile_us(q, 0.50);
    r->req_p99_us = fo_histogram_quantile_us(q, 0.99);
  }

  if ((rc = pipe_drain(&p)) != FO_OK) {
    snprintf(err, sizeof(err), "drain: %s", fo_strerror(rc));
    goto out;
  }
  if ((rc = check_sent(&p, want, r, err, sizeof(err))) != FO_OK)
    goto out;
  if ((rc = fake_accepted(&f, &doc, err, sizeof(err))) != FO_OK)
    goto out;
  if ((rc = check_accepted(kind, doc, events, recipients, r, err,
                           sizeof(err))) != FO_OK)
    goto out;
  /* The fake saw exactly the requests the channel got a success for:
   * none was lost or sent twice. */
  ok_answers = requests_answered(kind, kind == BENCH_EMAIL ? 202 : 201);
  if (r->requests != ok_answers) {
    snprintf(err, sizeof(err), "the fake saw %" PRIu64 " requests, the "
             "channel counted %" PRIu64 " successful answers",
             r->requests, ok_answers);
    rc = FO_EINVAL;
    goto out;
  }
  r->per_s = (double)want / r->secs;
  r->requests_per_s = (double)r->requests / r->secs;
  r->per_request = r->requests > 0 ? (double)want / (double)r->requests : 0;

out:
  pipe_free(&p);
  json_decref(doc);
  fake_stop(&f);
  gate_clear(&g);
  curl_global_cleanup();
  if (rc != FO_OK)
    snprintf(r->error, sizeof(r->error), "%s", err[0] ? err : "failed");
  r->ok = rc == FO_OK;
  return rc;
}

/* ---- the parent: options, one child per run, report ---- */

/* Runs one benchmark in a child, so each starts from a fresh process
 * (its own metrics registry and fake), and reads back its result. */
static void run_child(bench_kind kind, const bench_opts *o, long run,
                      bench_result *r) {
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
  if ((pid = fork()) < 0) {
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
    rc = run_once(kind, o, run, &mine);
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

static void usage(FILE *to) {
  fprintf(to,
          "usage: email-sms [--email-events N] [--email-recipients N]\n"
          "                 [--email-max-inflight N] [--sms-events N]\n"
          "                 [--sms-recipients N] [--sms-max-inflight N]\n"
          "                 [--runs N] [--workers N] [--window N]\n"
          "\n"
          "Times deliveries through the SendGrid and the Twilio channel\n"
          "to their fakes (build/fake-sendgrid, build/fake-twilio, which\n"
          "must be built) over HTTPS on loopback, one channel at a time.\n"
          "\n"
          "  --email-events N        e-mail events per run [6000]\n"
          "  --email-recipients N    recipients per e-mail event [100]\n"
          "  --email-max-inflight N  [sendgrid] max_inflight [2000]\n"
          "  --sms-events N          SMS events per run [6000]\n"
          "  --sms-recipients N      recipients per SMS event [10]\n"
          "  --sms-max-inflight N    [twilio] max_inflight [64]\n"
          "  --runs N                runs per channel, each in a fresh\n"
          "                          process [3]\n"
          "  --workers N             dispatcher threads [2]\n"
          "  --window N              most deliveries unfinished, as a\n"
          "                          multiple of the channel's\n"
          "                          max_inflight, in whole events [2]\n");
}

static int parse_args(int argc, char **argv, bench_opts *o) {
  static const bench_flag flags[] = {
      {"--email-events", offsetof(bench_opts, events[BENCH_EMAIL]), 1,
       10000000},
      {"--email-recipients", offsetof(bench_opts, recipients[BENCH_EMAIL]),
       1, FO_EVENT_TO_MAX},
      {"--sms-events", offsetof(bench_opts, events[BENCH_SMS]), 1,
       10000000},
      {"--sms-recipients", offsetof(bench_opts, recipients[BENCH_SMS]), 1,
       FO_EVENT_TO_MAX},
      {"--runs", offsetof(bench_opts, runs), 1, 99},
      {"--workers", offsetof(bench_opts, workers), 1, 64},
      {"--email-max-inflight",
       offsetof(bench_opts, max_inflight[BENCH_EMAIL]), 1, 100000},
      {"--sms-max-inflight", offsetof(bench_opts, max_inflight[BENCH_SMS]),
       1, 10000},
      {"--window", offsetof(bench_opts, window), 1, 100},
  };

  if (bench_parse_flags(argc, argv, flags, sizeof(flags) / sizeof(flags[0]),
                        o, "email-sms", usage) != FO_OK)
    return FO_EINVAL;
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

  BENCH_MEDIAN(deliveries, uint64_t);
  BENCH_MEDIAN(accepted, uint64_t);
  BENCH_MEDIAN(requests, uint64_t);
  BENCH_MEDIAN(retries, uint64_t);
  BENCH_MEDIAN(secs, double);
  BENCH_MEDIAN(per_s, double);
  BENCH_MEDIAN(requests_per_s, double);
  BENCH_MEDIAN(per_request, double);
  BENCH_MEDIAN(lat_p50_us, int64_t);
  BENCH_MEDIAN(lat_p99_us, int64_t);
  BENCH_MEDIAN(req_p50_us, int64_t);
  BENCH_MEDIAN(req_p99_us, int64_t);
  BENCH_MEDIAN(engine_cores, double);
  BENCH_MEDIAN(fake_cores, double);
  BENCH_MEDIAN(machine_cores, double);
  BENCH_MEDIAN(engine_us, double);
  BENCH_MEDIAN(fake_us, double);
#undef BENCH_MEDIAN
}

static void print_figures(const char *label, const bench_result *r) {
  printf("%-12s %" PRIu64 " deliveries in %.2f s: %.0f deliveries/s, "
         "%.0f requests/s (%.1f deliveries a request);\n"
         "             accepted by the fake %" PRIu64 " in %" PRIu64
         " requests; %" PRIu64 " retries;\n"
         "             delivery latency p50 %" PRId64 " us, p99 %" PRId64
         " us; request latency p50 %" PRId64 " us, p99 %" PRId64 " us;\n"
         "             CPU cores: engine %.2f, fake %.2f, whole machine "
         "%.2f; CPU a delivery: engine %.1f us, fake %.1f us\n",
         label, r->deliveries, r->secs, r->per_s, r->requests_per_s,
         r->per_request, r->accepted, r->requests, r->retries,
         r->lat_p50_us, r->lat_p99_us, r->req_p50_us, r->req_p99_us,
         r->engine_cores, r->fake_cores, r->machine_cores, r->engine_us,
         r->fake_us);
}

int main(int argc, char **argv) {
  bench_opts o = {.events = {6000, 6000},
                  .recipients = {100, 10},
                  .runs = 3,
                  .workers = 2,
                  .max_inflight = {2000, 64},
                  .window = 2};
  static bench_result rs[BENCH_KINDS][99];
  bench_result med[BENCH_KINDS];
  int failed = 0;

  if (parse_args(argc, argv, &o) != FO_OK)
    return 2;
  /* The engine logs only what goes wrong; info lines would interleave
   * with the report. */
  fo_log_set_level(FO_LOG_WARN);
  printf("email-sms: %ld workers, %ld runs per channel\n", o.workers,
         o.runs);
  for (int k = 0; k < BENCH_KINDS; k++)
    printf("  %-5s %ld events x %ld recipients = %" PRIu64 " deliveries "
           "per run; max_inflight %ld, %ld events queued ahead\n",
           kind_name((bench_kind)k), o.events[k], o.recipients[k],
           (uint64_t)o.events[k] * (uint64_t)o.recipients[k],
           o.max_inflight[k], events_ahead(&o, (bench_kind)k));

  for (int k = 0; k < BENCH_KINDS; k++) {
    for (long i = 0; i < o.runs; i++) {
      char label[40];

      run_child((bench_kind)k, &o, i + 1, &rs[k][i]);
      snprintf(label, sizeof(label), "%s run %ld", kind_name((bench_kind)k),
               i + 1);
      if (!rs[k][i].ok) {
        printf("%-12s FAILED: %s\n", label, rs[k][i].error);
        failed++;
      } else {
        print_figures(label, &rs[k][i]);
      }
      fflush(stdout);
    }
  }
  if (failed > 0) {
    printf("email-sms: %d of %ld runs failed\n", failed, 2 * o.runs);
    return 1;
  }

  for (int k = 0; k < BENCH_KINDS; k++) {
    char label[40];

    memset(&med[k], 0, sizeof(med[k]));
    medians(rs[k], o.runs, &med[k]);
    snprintf(label, sizeof(label), "%s median", kind_name((bench_kind)k));
    print_figures(label, &med[k]);
  }
  printf("every delivery of every run ended sent, and each fake accepted "
         "exactly one message a delivery\n");
  printf("reproduce: make build/fake-sendgrid build/fake-twilio "
         "build/bench/email-sms && build/bench/email-sms --email-events %ld "
         "--email-recipients %ld --email-max-inflight %ld --sms-events %ld "
         "--sms-recipients %ld --sms-max-inflight %ld --runs %ld "
         "--workers %ld --window %ld\n",
         o.events[BENCH_EMAIL], o.recipients[BENCH_EMAIL],
         o.max_inflight[BENCH_EMAIL], o.events[BENCH_SMS],
         o.recipients[BENCH_SMS], o.max_inflight[BENCH_SMS], o.runs,
         o.workers, o.window);
  return 0;
}
