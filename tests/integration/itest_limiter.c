/* SPDX-License-Identifier: MIT */
/*
 * Rate caps and dedup claims against a real Redis: the private server of
 * the test services (FANOUT_REDIS_URL) for the semantics, and a second
 * redis-server started here on a free port, with a password and a
 * database number, to kill, stop and restart under a live fo_limiter.
 * Every key is derived from ids unique to this run, so runs never meet.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "fanout/common.h"
#include "itest.h"
#include "limiter.h"
#include "log.h"
#include "metrics.h"

#define CHILD_PASS "s3cr/t:x"
#define CHILD_PASS_URL "s3cr%2Ft%3Ax"
#define CHILD_DB 3

/* A fixed wall-clock time at the start of a UTC day, so that windows of
 * every period start there: 2026-12-03T00:00:00Z. */
#define DAY0_MS 1796256000000LL

static char g_run[64];          /* unique to this run of the binary */
static char g_host[256];
static int g_port;

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};

  nanosleep(&ts, NULL);
}

static void uniq(char *out, size_t cap, const char *name) {
  snprintf(out, cap, "itest_limiter-%s-%s", g_run, name);
}

static const char *redis_url(void) {
  const char *u = getenv("FANOUT_REDIS_URL");

  if (u == NULL || *u == '\0')
    fail_msg("FANOUT_REDIS_URL is not set: scripts/services.sh start");
  return u;
}

/* ---- Raw Redis access, to look behind the module ---------------------- */

static redisContext *raw_connect(const char *host, int port,
                                 const char *pass, int db) {
  struct timeval tv = {2, 0};
  redisContext *c = redisConnectWithTimeout(host, port, tv);
  redisReply *r;

  if (c == NULL || c->err) {
    if (c != NULL)
      redisFree(c);
    return NULL;
  }
  if (pass != NULL) {
    r = redisCommand(c, "AUTH %s", pass);
    if (r == NULL || r->type == REDIS_REPLY_ERROR)
      goto fail;
    freeReplyObject(r);
  }
  r = redisCommand(c, "SELECT %d", db);
  if (r == NULL || r->type == REDIS_REPLY_ERROR)
    goto fail;
  freeReplyObject(r);
  return c;

fail:
  if (r != NULL)
    freeReplyObject(r);
  redisFree(c);
  return NULL;
}

static redisContext *raw_main(void) {
  redisContext *c = raw_connect(g_host, g_port, NULL, 0);

  assert_non_null(c);
  return c;
}

/* GET as a string ("" for none), binary-safe key. */
static void raw_get(redisContext *c, const char *key, size_t klen,
                    char *out, size_t cap) {
  redisReply *r = redisCommand(c, "GET %b", key, klen);

  assert_non_null(r);
  out[0] = '\0';
  if (r->type == REDIS_REPLY_STRING)
    snprintf(out, cap, "%s", r->str);
  else
    assert_int_equal(r->type, REDIS_REPLY_NIL);
  freeReplyObject(r);
}

static long long raw_int(redisContext *c, const char *cmd, const char *key,
                         size_t klen) {
  redisReply *r = redisCommand(c, cmd, key, klen);
  long long v;

  assert_non_null(r);
  assert_int_equal(r->type, REDIS_REPLY_INTEGER);
  v = r->integer;
  freeReplyObject(r);
  return v;
}

/* The key formats documented in prefs/limiter.c. */
static size_t key_cap(char *out, size_t cap, const char *user,
                      const char *ch, long long per, long long start) {
  return (size_t)snprintf(out, cap, "fo:cap:%zu:%s:%s:%lld:%lld",
                          strlen(user), user, ch, per, start);
}

static size_t key_dd(char *out, size_t cap, const char *event,
                     const char *user, const char *ch) {
  return (size_t)snprintf(out, cap, "fo:dd:%zu:%s:%zu:%s:%s",
                          strlen(event), event, strlen(user), user, ch);
}

/* ---- Op builders -------------------------------------------------------- */

static fo_limit_op cap_op(const char *user, fo_cap_period per,
                          uint32_t limit, int64_t now_ms) {
  fo_limit_op op = {.kind = FO_LIMIT_CAP,
                    .user = user,
                    .channel = FO_CH_PUSH,
                    .cap = {.per = per, .limit = limit},
                    .now_ms = now_ms,
                    .result = FO_LIMIT_BUSY,
                    .retry_after_ms = -7};

  return op;
}

static fo_limit_op dd_op(fo_limit_kind kind, const char *event,
                         const char *user, int64_t claim_ms,
                         int64_t ttl_ms) {
  fo_limit_op op = {.kind = kind,
                    .user = user,
                    .channel = FO_CH_EMAIL,
                    .event_id = event,
                    .claim_ms = claim_ms,
                    .ttl_ms = ttl_ms,
                    .result = FO_LIMIT_BUSY,
                    .retry_after_ms = -7};

  return op;
}

static fo_limit_result one(fo_limiter *l, fo_limit_op op, int want_rc) {
  assert_int_equal(fo_limiter_decide(l, &op, 1), want_rc);
  return op.result;
}

static fo_limiter *open_main(bool fail_closed) {
  fo_limiter *l = NULL;

  assert_int_equal(fo_limiter_open(redis_url(), fail_closed, &l), FO_OK);
  assert_non_null(l);
  assert_true(fo_limiter_ping(l));
  return l;
}

/* ---- A private redis-server of this test ------------------------------- */

typedef struct child_redis {
  itest_proc proc;
  char dir[512];
  int port;
} child_redis;

/* The child of the running test, in static storage so that the
 * teardown stops it even when an assertion left the test early. */
static child_redis g_child;

static int free_port(void) {
  struct sockaddr_in a = {.sin_family = AF_INET};
  socklen_t len = sizeof(a);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  int port = -1;

  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
      getsockname(fd, (struct sockaddr *)&a, &len) == 0)
    port = ntohs(a.sin_port);
  if (fd >= 0)
    close(fd);
  return port;
}

static const char *redis_server_path(void) {
  static char path[4096];
  const char *env = getenv("PATH");
  char dirs[4096];

  snprintf(dirs, sizeof(dirs), "%s", env != NULL ? env : "/usr/bin");
  for (char *save = NULL, *d = strtok_r(dirs, ":", &save); d != NULL;
       d = strtok_r(NULL, ":", &save)) {
    snprintf(path, sizeof(path), "%s/redis-server", d);
    if (access(path, X_OK) == 0)
      return path;
  }
  return "/usr/bin/redis-server";
}

/* Starts (or restarts, on the same port) the child and waits for it. */
static void child_start(child_redis *cr) {
  char port[16];
  char *argv[] = {(char *)redis_server_path(), "--port", port, "--bind",
                  "127.0.0.1", "--save", "", "--appendonly", "no",
                  "--daemonize", "no", "--requirepass", CHILD_PASS,
                  NULL};

  snprintf(port, sizeof(port), "%d", cr->port);
  assert_int_equal(itest_spawn(&cr->proc, cr->dir, "redis", argv, NULL), 0);
  for (int i = 0; i < 250; i++) {
    redisContext *c = raw_connect("127.0.0.1", cr->port, CHILD_PASS, 0);

    if (c != NULL) {
      redisFree(c);
      return;
    }
    assert_true(itest_alive(&cr->proc));
    sleep_ms(20);
  }
  fail_msg("redis-server did not start on port %d", cr->port);
}

static void child_new(child_redis *cr) {
  assert_int_equal(itest_tmpdir("limits", cr->dir, sizeof(cr->dir)), 0);
  cr->port = free_port();
  assert_true(cr->port > 0);
  child_start(cr);
}

static void child_kill(child_redis *cr) {
  if (cr->proc.pid > 0)
    itest_stop(&cr->proc, SIGKILL, 2000);
}

static void child_url(const child_redis *cr, char *out, size_t cap) {
  snprintf(out, cap, "redis://:%s@127.0.0.1:%d/%d", CHILD_PASS_URL,
           cr->port, CHILD_DB);
}

/* ---- Tests -------------------------------------------------------------- */

static void test_url_refused_or_accepted(void **state) {
  static const char *bad[] = {
      "http://127.0.0.1:6379", "rediss://127.0.0.1", "redis://",
      "redis://:6379", "redis://h:0", "redis://h:65536", "redis://h:12x",
      "redis://h/abc", "redis://h/1/2", "redis://h?db=1", "redis://a b",
      "redis://pass@h", "redis://:bad%zz@h", "redis://:nul%00@h",
      "redis://:cut%4@h", "redis://[::1", "redis://h:"};
  static const char *good[] = {
      "redis://127.0.0.1:1", "redis://127.0.0.1:1/", "redis://127.0.0.1:1/15",
      "redis://:p%40ss/w@127.0.0.1:1/2", "redis://user:pw@127.0.0.1:1",
      "redis://[::1]:1/0"};
  fo_limiter *l = NULL;

  (void)state;
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    fo_limiter *b = (fo_limiter *)&b;

    if (fo_limiter_open(bad[i], false, &b) != FO_EINVAL)
      fail_msg("accepted %s", bad[i]);
    assert_ptr_equal(b, (fo_limiter *)&b);
  }
  assert_int_equal(fo_limiter_open(NULL, false, &l), FO_EINVAL);
  assert_null(l);

  /* Nothing listens on port 1: these open, and stay down. */
  for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
    int64_t t0 = fo_now_ms();

    l = NULL;
    if (fo_limiter_open(good[i], false, &l) != FO_OK)
      fail_msg("refused %s", good[i]);
    assert_true(fo_now_ms() - t0 < 1000);
    assert_false(fo_limiter_ping(l));
    fo_limiter_close(l);
  }
  fo_limiter_close(NULL);
}

static void test_bad_ops_refused(void **state) {
  fo_limiter *l = NULL;
  fo_limit_op ops[2];

  (void)state;
  assert_int_equal(fo_limiter_open("redis://127.0.0.1:1", true, &l), FO_OK);
  assert_int_equal(fo_limiter_decide(l, NULL, 0), FO_OK);
  assert_int_equal(fo_limiter_decide(l, NULL, 1), FO_EINVAL);
  assert_int_equal(fo_limiter_decide(NULL, ops, 0), FO_EINVAL);

  /* One bad op refuses the batch and leaves every result untouched. */
  ops[0] = cap_op("u", FO_CAP_MINUTE, 1, DAY0_MS);
  ops[1] = cap_op(NULL, FO_CAP_MINUTE, 1, DAY0_MS);
  assert_int_equal(fo_limiter_decide(l, ops, 2), FO_EINVAL);
  assert_int_equal(ops[0].result, FO_LIMIT_BUSY);
  assert_int_equal(ops[0].retry_after_ms, -7);
  ops[1] = cap_op("u", FO_CAP_MINUTE, 0, DAY0_MS);
  assert_int_equal(fo_limiter_decide(l, ops, 2), FO_EINVAL);
  ops[1] = cap_op("u", (fo_cap_period)9, 1, DAY0_MS);
  assert_int_equal(fo_limiter_decide(l, ops, 2), FO_EINVAL);
  ops[1] = cap_op("u", FO_CAP_MINUTE, 1, DAY0_MS);
  ops[1].channel = (fo_channel_kind)FO_CH_COUNT;
  assert_int_equal(fo_limiter_decide(l, ops, 2), FO_EINVAL);
  ops[1] = dd_op(FO_LIMIT_CLAIM, NULL, "u", 1000, 1000);
  assert_int_equal(fo_limiter_decide(l, ops, 2), FO_EINVAL);
  ops[1] = dd_op(FO_LIMIT_CLAIM, "e", "u", 0, 1000);
  assert_int_equal(fo_limiter_decide(l, ops, 2), FO_EINVAL);
  ops[1] = dd_op(FO_LIMIT_DONE, "e", "u", 1000, 0);
  assert_int_equal(fo_limiter_decide(l, ops, 2), FO_EINVAL);
  ops[1] = dd_op((fo_limit_kind)7, "e", "u", 1000, 1000);
  assert_int_equal(fo_limiter_decide(l, ops, 2), FO_EINVAL);
  assert_int_equal(ops[0].result, FO_LIMIT_BUSY);
  assert_int_equal(ops[0].retry_after_ms, -7);

  /* A cap with no period needs no Redis, even a dead one. */
  ops[0] = cap_op("u", FO_CAP_NONE, 0, DAY0_MS);
  assert_int_equal(fo_limiter_decide(l, ops, 1), FO_OK);
  assert_int_equal(ops[0].result, FO_LIMIT_PASS);
  fo_limiter_close(l);
}

static void test_cap_counts_exactly_limit(void **state) {
  fo_limiter *l = open_main(false);
  redisContext *raw = raw_main();
  char user[128], key[256], val[64];
  int64_t now = DAY0_MS + 7 * 60000 + 1234;
  size_t klen;

  (void)state;
  uniq(user, sizeof(user), "exact");
  for (int i = 0; i < 5; i++)
    assert_int_equal(one(l, cap_op(user, FO_CAP_MINUTE, 5, now), FO_OK),
                     FO_LIMIT_PASS);
  for (int i = 0; i < 7; i++)
    assert_int_equal(one(l, cap_op(user, FO_CAP_MINUTE, 5, now), FO_OK),
                     FO_LIMIT_CAPPED);

  /* Capped decisions did not count; the window expires after its end. */
  klen = key_cap(key, sizeof(key), user, "push", 60,
                 (DAY0_MS + 7 * 60000) / 1000);
  raw_get(raw, key, klen, val, sizeof(val));
  assert_string_equal(val, "5");
  assert_true(raw_int(raw, "TTL %b", key, klen) > 60);
  assert_true(raw_int(raw, "TTL %b", key, klen) <= 120);

  /* A bigger limit (the preference changed) lets more through. */
  assert_int_equal(one(l, cap_op(user, FO_CAP_MINUTE, 6, now), FO_OK),
                   FO_LIMIT_PASS);
  assert_int_equal(one(l, cap_op(user, FO_CAP_MINUTE, 6, now), FO_OK),
                   FO_LIMIT_CAPPED);

  /* Other channels and other periods count apart. */
  {
    fo_limit_op op = cap_op(user, FO_CAP_MINUTE, 1, now);

    op.channel = FO_CH_SMS;
    assert_int_equal(one(l, op, FO_OK), FO_LIMIT_PASS);
    assert_int_equal(one(l, op, FO_OK), FO_LIMIT_CAPPED);
  }
  assert_int_equal(one(l, cap_op(user, FO_CAP_HOUR, 1, now), FO_OK),
                   FO_LIMIT_PASS);
  assert_int_equal(one(l, cap_op(user, FO_CAP_DAY, 1, now), FO_OK),
                   FO_LIMIT_PASS);
  assert_int_equal(one(l, cap_op(user, FO_CAP_DAY, 1, now), FO_OK),
                   FO_LIMIT_CAPPED);

  redisFree(raw);
  fo_limiter_close(l);
}

static void test_cap_windows_roll_on_utc_boundaries(void **state) {
  fo_limiter *l = open_main(false);
  char user[128];
  /* The minute [DAY0 + 60 s, DAY0 + 120 s). */
  int64_t start = DAY0_MS + 60000;

  (void)state;
  uniq(user, sizeof(user), "roll");
  assert_int_equal(one(l, cap_op(user, FO_CAP_MINUTE, 2, start), FO_OK),
                   FO_LIMIT_PASS);
  assert_int_equal(
      one(l, cap_op(user, FO_CAP_MINUTE, 2, start + 59999), FO_OK),
      FO_LIMIT_PASS);
  assert_int_equal(
      one(l, cap_op(user, FO_CAP_MINUTE, 2, start + 30000), FO_OK),
      FO_LIMIT_CAPPED);
  /* The last millisecond of the previous minute is another window. */
  assert_int_equal(one(l, cap_op(user, FO_CAP_MINUTE, 2, start - 1), FO_OK),
                   FO_LIMIT_PASS);
  assert_int_equal(
      one(l, cap_op(user, FO_CAP_MINUTE, 2, start + 60000), FO_OK),
      FO_LIMIT_PASS);

  /* Hours: 00:59:59.999 and 01:00:00.000 differ; 01:00 and 01:59 not. */
  assert_int_equal(
      one(l, cap_op(user, FO_CAP_HOUR, 1, DAY0_MS + 3599999), FO_OK),
      FO_LIMIT_PASS);
  assert_int_equal(
      one(l, cap_op(user, FO_CAP_HOUR, 1, DAY0_MS + 3600000), FO_OK),
      FO_LIMIT_PASS);
  assert_int_equal(
      one(l, cap_op(user, FO_CAP_HOUR, 1, DAY0_MS + 7199999), FO_OK),
      FO_LIMIT_CAPPED);

  /* Days end at UTC midnight. */
  assert_int_equal(
      one(l, cap_op(user, FO_CAP_DAY, 1, DAY0_MS + 86399999), FO_OK),
      FO_LIMIT_PASS);
  assert_int_equal(one(l, cap_op(user, FO_CAP_DAY, 1, DAY0_MS), FO_OK),
                   FO_LIMIT_CAPPED);
  assert_int_equal(
      one(l, cap_op(user, FO_CAP_DAY, 1, DAY0_MS + 86400000), FO_OK),
      FO_LIMIT_PASS);
  fo_limiter_close(l);
}

enum { RACE_LIMIT = 137, RACE_TOTAL = 1000, RACE_THREADS = 4 };

typedef struct race_arg {
  fo_limiter *l;
  const char *user;
  int seed;
  atomic_int *passed;
  atomic_int *capped;
  atomic_int *errors;
} race_arg;

static void *race_thread(void *p) {
  race_arg *a = p;
  int left = RACE_TOTAL / RACE_THREADS;
  unsigned seed = (unsigned)a->seed;

  /* Batches of 1 to 7, so that pipelines of both instances interleave. */
  while (left > 0) {
    fo_limit_op ops[7];
    int n = 1 + (int)(rand_r(&seed) % 7);

    if (n > left)
      n = left;
    for (int i = 0; i < n; i++)
      ops[i] = cap_op(a->user, FO_CAP_HOUR, RACE_LIMIT,
                      DAY0_MS + 5 * 3600000 + i);
    if (fo_limiter_decide(a->l, ops, (size_t)n) != FO_OK) {
      atomic_fetch_add(a->errors, 1);
      break;
    }
    for (int i = 0; i < n; i++) {
      if (ops[i].result == FO_LIMIT_PASS)
        atomic_fetch_add(a->passed, 1);
      else if (ops[i].result == FO_LIMIT_CAPPED)
        atomic_fetch_add(a->capped, 1);
    }
    left -= n;
  }
  return NULL;
}

static void test_cap_race_across_instances(void **state) {
  fo_limiter *l[2] = {open_main(false), open_main(false)};
  redisContext *raw = raw_main();
  pthread_t th[RACE_THREADS];
  race_arg args[RACE_THREADS];
  atomic_int passed = 0, capped = 0, errors = 0;
  char user[128], key[256], val[64];
  size_t klen;

  (void)state;
  uniq(user, sizeof(user), "race");
  for (int i = 0; i < RACE_THREADS; i++) {
    args[i] = (race_arg){l[i % 2], user, i + 1, &passed, &capped, &errors};
    assert_int_equal(pthread_create(&th[i], NULL, race_thread, &args[i]),
                     0);
  }
  for (int i = 0; i < RACE_THREADS; i++)
    pthread_join(th[i], NULL);

  assert_int_equal(atomic_load(&errors), 0);
  assert_int_equal(atomic_load(&passed), RACE_LIMIT);
  assert_int_equal(atomic_load(&capped), RACE_TOTAL - RACE_LIMIT);
  klen = key_cap(key, sizeof(key), user, "push", 3600,
                 (DAY0_MS + 5 * 3600000) / 1000);
  raw_get(raw, key, klen, val, sizeof(val));
  assert_int_equal(atoi(val), RACE_LIMIT);
  redisFree(raw);
  fo_limiter_close(l[0]);
  fo_limiter_close(l[1]);
}

static void test_claim_busy_done_duplicate_release(void **state) {
  fo_limiter *a = open_main(false);
  fo_limiter *b = open_main(false);
  redisContext *raw = raw_main();
  char ev[128], key[256], val[64];
  fo_limit_op op;
  size_t klen;

  (void)state;
  uniq(ev, sizeof(ev), "claims");
  klen = key_dd(key, sizeof(key), ev, "u1", "email");

  assert_int_equal(one(a, dd_op(FO_LIMIT_CLAIM, ev, "u1", 30000, 0), FO_OK),
                   FO_LIMIT_PASS);
  raw_get(raw, key, klen, val, sizeof(val));
  assert_int_equal(strncmp(val, "claim:", 6), 0);
  assert_int_equal(strlen(val), 6 + 16);

  /* Held: another instance, and this one again, are told when it lapses. */
  op = dd_op(FO_LIMIT_CLAIM, ev, "u1", 30000, 0);
  assert_int_equal(fo_limiter_decide(b, &op, 1), FO_OK);
  assert_int_equal(op.result, FO_LIMIT_BUSY);
  assert_true(op.retry_after_ms > 25000 && op.retry_after_ms <= 30000);
  assert_int_equal(one(a, dd_op(FO_LIMIT_CLAIM, ev, "u1", 30000, 0), FO_OK),
                   FO_LIMIT_BUSY);
  /* Another user or channel of the same event is another delivery. */
  assert_int_equal(one(b, dd_op(FO_LIMIT_CLAIM, ev, "u2", 30000, 0), FO_OK),
                   FO_LIMIT_PASS);
  op = dd_op(FO_LIMIT_CLAIM, ev, "u1", 30000, 0);
  op.channel = FO_CH_SMS;
  assert_int_equal(one(b, op, FO_OK), FO_LIMIT_PASS);

  /* Releasing someone else's claim does nothing. */
  assert_int_equal(one(b, dd_op(FO_LIMIT_RELEASE, ev, "u1", 0, 0), FO_OK),
                   FO_LIMIT_PASS);
  raw_get(raw, key, klen, val, sizeof(val));
  assert_int_equal(strncmp(val, "claim:", 6), 0);
  assert_int_equal(one(b, dd_op(FO_LIMIT_CLAIM, ev, "u1", 30000, 0), FO_OK),
                   FO_LIMIT_BUSY);

  /* The owner's release frees it for the other instance. */
  assert_int_equal(one(a, dd_op(FO_LIMIT_RELEASE, ev, "u1", 0, 0), FO_OK),
                   FO_LIMIT_PASS);
  raw_get(raw, key, klen, val, sizeof(val));
  assert_string_equal(val, "");
  assert_int_equal(one(b, dd_op(FO_LIMIT_CLAIM, ev, "u1", 30000, 0), FO_OK),
                   FO_LIMIT_PASS);

  /* Sent: every later claim is a duplicate, for ttl_ms. */
  assert_int_equal(one(b, dd_op(FO_LIMIT_DONE, ev, "u1", 0, 600000), FO_OK),
                   FO_LIMIT_PASS);
  raw_get(raw, key, klen, val, sizeof(val));
  assert_string_equal(val, "done");
  assert_true(raw_int(raw, "PTTL %b", key, klen) > 590000);
  assert_int_equal(one(a, dd_op(FO_LIMIT_CLAIM, ev, "u1", 30000, 0), FO_OK),
                   FO_LIMIT_DUPLICATE);
  assert_int_equal(one(b, dd_op(FO_LIMIT_CLAIM, ev, "u1", 30000, 0), FO_OK),
                   FO_LIMIT_DUPLICATE);
  /* A release never undoes "done". */
  assert_int_equal(one(b, dd_op(FO_LIMIT_RELEASE, ev, "u1", 0, 0), FO_OK),
                   FO_LIMIT_PASS);
  assert_int_equal(one(a, dd_op(FO_LIMIT_CLAIM, ev, "u1", 30000, 0), FO_OK),
                   FO_LIMIT_DUPLICATE);

  redisFree(raw);
  fo_limiter_close(a);
  fo_limiter_close(b);
}

static void test_claims_and_marks_lapse(void **state) {
  fo_limiter *a = open_main(false);
  fo_limiter *b = open_main(false);
  char ev[128];

  (void)state;
  uniq(ev, sizeof(ev), "lapse");
  assert_int_equal(one(a, dd_op(FO_LIMIT_CLAIM, ev, "u", 400, 0), FO_OK),
                   FO_LIMIT_PASS);
  assert_int_equal(one(b, dd_op(FO_LIMIT_CLAIM, ev, "u", 400, 0), FO_OK),
                   FO_LIMIT_BUSY);
  sleep_ms(600);
  /* The claim of a crashed attempt lapses by itself. */
  assert_int_equal(one(b, dd_op(FO_LIMIT_CLAIM, ev, "u", 400, 0), FO_OK),
                   FO_LIMIT_PASS);
  assert_int_equal(one(b, dd_op(FO_LIMIT_DONE, ev, "u", 0, 400), FO_OK),
                   FO_LIMIT_PASS);
  assert_int_equal(one(a, dd_op(FO_LIMIT_CLAIM, ev, "u", 400, 0), FO_OK),
                   FO_LIMIT_DUPLICATE);
  sleep_ms(600);
  assert_int_equal(one(a, dd_op(FO_LIMIT_CLAIM, ev, "u", 400, 0), FO_OK),
                   FO_LIMIT_PASS);
  fo_limiter_close(a);
  fo_limiter_close(b);
}

static void test_hostile_ids_do_not_collide(void **state) {
  static const char *ids[] = {
      "a",   "a:b",     "b",        "a:1:b",   "1:a",       "{x}",
      "}{",  "u v",     "u  v",     "\xc3\xbc-\xe3\x83\xa6\xf0\x9f\x98\x80",
      "%s%n", "line\nbreak", "",    ":",       "::",        "fo:dd:1:a",
      "1",   "a:email", "a:1:b:email", "\\x00", "b:a"};
  enum { N = sizeof(ids) / sizeof(ids[0]) };
  fo_limiter *l = open_main(false);
  redisContext *raw = raw_main();
  fo_limit_op ops[N * N];
  char pre[128], (*ev)[160] = calloc(N, sizeof(*ev));
  char (*us)[160] = calloc(N, sizeof(*us));
  char key[512], val[64];
  size_t n = 0, klen;

  (void)state;
  assert_non_null(ev);
  assert_non_null(us);
  uniq(pre, sizeof(pre), "hostile");
  for (int i = 0; i < N; i++) {
    snprintf(ev[i], sizeof(ev[i]), "%s:%s", pre, ids[i]);
    snprintf(us[i], sizeof(us[i]), "%s", ids[i]);
  }

  /* Every (event, user) pair is its own delivery: all claims pass, in
   * one batch, and each holds. Among them are pairs that joining with
   * ':' alone would merge, such as ("P:a:b", "a") and ("P:a", "b:a"). */
  for (int i = 0; i < N; i++) {
    for (int j = 0; j < N; j++)
      ops[n++] = dd_op(FO_LIMIT_CLAIM, ev[i], us[j], 60000, 0);
  }
  assert_int_equal(fo_limiter_decide(l, ops, n), FO_OK);
  for (size_t i = 0; i < n; i++) {
    if (ops[i].result != FO_LIMIT_PASS)
      fail_msg("claim %zu (%s, %s) was %d", i, ops[i].event_id,
               ops[i].user, ops[i].result);
  }
  assert_int_equal(fo_limiter_decide(l, ops, n), FO_OK);
  for (size_t i = 0; i < n; i++)
    assert_int_equal(ops[i].result, FO_LIMIT_BUSY);

  /* The key is the documented one, bytes as given. */
  klen = key_dd(key, sizeof(key), ev[9], us[10], "email");
  raw_get(raw, key, klen, val, sizeof(val));
  assert_int_equal(strncmp(val, "claim:", 6), 0);

  /* Caps of hostile users are apart too: one each. */
  n = 0;
  for (int j = 0; j < N; j++) {
    char *u = us[j];

    /* Prefix the run, so that reruns start from zero. */
    snprintf(u, sizeof(us[j]), "%s:%s", pre, ids[j]);
    ops[n++] = cap_op(u, FO_CAP_MINUTE, 1, DAY0_MS);
  }
  assert_int_equal(fo_limiter_decide(l, ops, n), FO_OK);
  for (size_t i = 0; i < n; i++)
    assert_int_equal(ops[i].result, FO_LIMIT_PASS);
  assert_int_equal(fo_limiter_decide(l, ops, n), FO_OK);
  for (size_t i = 0; i < n; i++)
    assert_int_equal(ops[i].result, FO_LIMIT_CAPPED);

  free(ev);
  free(us);
  redisFree(raw);
  fo_limiter_close(l);
}

enum { BIG = 10000, BIG_USERS = 40, BIG_CAPS = 4000, BIG_CLAIMS = 3000 };

static void test_batch_of_ten_thousand(void **state) {
  fo_limiter *l = open_main(false);
  fo_limit_op *ops = calloc(BIG, sizeof(*ops));
  char (*users)[96] = calloc(BIG_USERS, sizeof(*users));
  char (*evs)[96] = calloc(BIG_CLAIMS, sizeof(*evs));
  int counts[FO_LIMIT_UNAVAILABLE + 1] = {0};
  size_t n = 0;
  int64_t t0, us;

  (void)state;
  assert_non_null(ops);
  assert_non_null(users);
  assert_non_null(evs);
  for (int i = 0; i < BIG_USERS; i++) {
    char name[32];

    snprintf(name, sizeof(name), "big-user-%d", i);
    uniq(users[i], sizeof(users[i]), name);
  }
  for (int i = 0; i < BIG_CLAIMS; i++) {
    char name[32];

    snprintf(name, sizeof(name), "big-ev-%d", i);
    uniq(evs[i], sizeof(evs[i]), name);
  }

  /* 100 caps per user at limit 50, then claims of 3000 deliveries, then
   * "done" for the first half and a release of the second. */
  for (int i = 0; i < BIG_CAPS; i++)
    ops[n++] = cap_op(users[i % BIG_USERS], FO_CAP_DAY, 50, DAY0_MS);
  for (int i = 0; i < BIG_CLAIMS; i++)
    ops[n++] = dd_op(FO_LIMIT_CLAIM, evs[i], "u", 60000, 0);
  for (int i = 0; i < BIG_CLAIMS; i++) {
    ops[n++] = dd_op(i < BIG_CLAIMS / 2 ? FO_LIMIT_DONE : FO_LIMIT_RELEASE,
                     evs[i], "u", 60000, 60000);
  }
  assert_int_equal(n, BIG);

  t0 = fo_now_us();
  assert_int_equal(fo_limiter_decide(l, ops, n), FO_OK);
  us = fo_now_us() - t0;
  print_message("10000 mixed ops in one batch: %.1f ms, %.0f ops/s\n",
                (double)us / 1000.0, BIG * 1e6 / (double)(us > 0 ? us : 1));
  for (size_t i = 0; i < n; i++)
    counts[ops[i].result]++;
  assert_int_equal(counts[FO_LIMIT_PASS], BIG - BIG_CAPS / 2);
  assert_int_equal(counts[FO_LIMIT_CAPPED], BIG_CAPS / 2);
  for (int i = 0; i < BIG_CAPS; i++)
    assert_int_equal(ops[i].result,
                     i < BIG_CAPS / 2 ? FO_LIMIT_PASS : FO_LIMIT_CAPPED);
  /* Under ASan and on a shared machine; unsanitized it is much faster. */
  assert_true(us < 5 * 1000 * 1000);

  /* Claiming them all again: sent ones are duplicates, released ones
   * pass. */
  for (int i = 0; i < BIG_CLAIMS; i++)
    ops[i] = dd_op(FO_LIMIT_CLAIM, evs[i], "u", 60000, 0);
  assert_int_equal(fo_limiter_decide(l, ops, BIG_CLAIMS), FO_OK);
  for (int i = 0; i < BIG_CLAIMS; i++)
    assert_int_equal(ops[i].result, i < BIG_CLAIMS / 2 ? FO_LIMIT_DUPLICATE
                                                       : FO_LIMIT_PASS);
  free(ops);
  free(users);
  free(evs);
  fo_limiter_close(l);
}

/* ---- A batch decides as its ops one by one -------------------------- */

enum { EQ_OPS = 10000, EQ_USERS = 8, EQ_EVENTS = 40 };

/* The ids of one key space: users and events under a prefix of its own,
 * so that two spaces share no key. */
typedef struct eq_space {
  char users[EQ_USERS][160];
  char events[EQ_EVENTS][160];
} eq_space;

static const int64_t eq_at[] = {DAY0_MS, DAY0_MS + 30000, DAY0_MS + 61000,
                                DAY0_MS + 3601000};
static const fo_cap_period eq_per[] = {FO_CAP_MINUTE, FO_CAP_HOUR,
                                       FO_CAP_DAY, FO_CAP_NONE};
static const long long eq_per_s[] = {60, 3600, 86400};

static void eq_space_init(eq_space *sp, const char *name) {
  char pre[128];

  uniq(pre, sizeof(pre), name);
  for (int i = 0; i < EQ_USERS; i++)
    snprintf(sp->users[i], sizeof(sp->users[i]), "%s-u%d", pre, i);
  for (int i = 0; i < EQ_EVENTS; i++)
    snprintf(sp->events[i], sizeof(sp->events[i]), "%s-e%d", pre, i);
}

/* The same pseudo-random ops for every space: caps of every period with
 * small limits in a few windows, and claims, marks and releases of a few
 * hundred deliveries, so that each key meets several ops. */
static void eq_ops(fo_limit_op *ops, const eq_space *sp) {
  unsigned seed = 20261203;

  for (int i = 0; i < EQ_OPS; i++) {
    unsigned k = (unsigned)rand_r(&seed) % 20;
    const char *u = sp->users[(unsigned)rand_r(&seed) % EQ_USERS];
    const char *ev = sp->events[(unsigned)rand_r(&seed) % EQ_EVENTS];
    fo_channel_kind ch =
        (fo_channel_kind)((unsigned)rand_r(&seed) % FO_CH_COUNT);
    unsigned r = (unsigned)rand_r(&seed);

    if (k < 8) {
      ops[i] = cap_op(u, eq_per[r % 4], 1 + (r >> 2) % 4,
                      eq_at[(r >> 4) % 4]);
    } else {
      fo_limit_kind kind = k < 15   ? FO_LIMIT_CLAIM
                           : k < 18 ? FO_LIMIT_DONE
                                    : FO_LIMIT_RELEASE;

      ops[i] = dd_op(kind, ev, u, 60000, 60000);
    }
    ops[i].channel = ch;
  }
}

/* A few values of another type under keys the ops use: the ops on them
 * get the fallback, the same in both spaces. */
static void eq_foreign(redisContext *raw, const eq_space *sp) {
  char key[512];
  size_t klen;
  redisReply *r;

  for (int i = 0; i < 8 * FO_CH_COUNT; i++) {
    klen = key_dd(key, sizeof(key), sp->events[2 + i / FO_CH_COUNT],
                  sp->users[3],
                  fo_channel_name((fo_channel_kind)(i % FO_CH_COUNT)));
    r = redisCommand(raw, "SADD %b x", key, klen);
    assert_non_null(r);
    freeReplyObject(r);
  }
  klen = key_cap(key, sizeof(key), sp->users[1], "push", 60,
                 DAY0_MS / 1000);
  r = redisCommand(raw, "SADD %b x", key, klen);
  assert_non_null(r);
  freeReplyObject(r);
}

/* The value under a key as text: "" for none, "<type>" for another
 * type. */
static void eq_value(redisContext *raw, const char *key, size_t klen,
                     char *out, size_t cap) {
  redisReply *r = redisCommand(raw, "GET %b", key, klen);

  assert_non_null(r);
  if (r->type == REDIS_REPLY_STRING)
    snprintf(out, cap, "%s", r->str);
  else if (r->type == REDIS_REPLY_NIL)
    out[0] = '\0';
  else
    snprintf(out, cap, "<type>");
  freeReplyObject(r);
}

/* Every key the ops may have touched holds the same in both spaces. */
static void eq_same_state(redisContext *raw, const eq_space *a,
                          const eq_space *b) {
  char ka[512], kb[512], va[64], vb[64];
  size_t la, lb;
  int keys = 0, set = 0;

  for (int u = 0; u < EQ_USERS; u++) {
    for (int c = 0; c < FO_CH_COUNT; c++) {
      const char *ch = fo_channel_name((fo_channel_kind)c);

      for (int e = 0; e < EQ_EVENTS; e++) {
        la = key_dd(ka, sizeof(ka), a->events[e], a->users[u], ch);
        lb = key_dd(kb, sizeof(kb), b->events[e], b->users[u], ch);
        eq_value(raw, ka, la, va, sizeof(va));
        eq_value(raw, kb, lb, vb, sizeof(vb));
        if (strcmp(va, vb) != 0)
          fail_msg("%s holds \"%s\", %s \"%s\"", ka, va, kb, vb);
        keys++;
        set += va[0] != '\0';
      }
      for (int p = 0; p < 3; p++) {
        for (int t = 0; t < 4; t++) {
          long long start =
              eq_at[t] / 1000 / eq_per_s[p] * eq_per_s[p];

          la = key_cap(ka, sizeof(ka), a->users[u], ch, eq_per_s[p], start);
          lb = key_cap(kb, sizeof(kb), b->users[u], ch, eq_per_s[p], start);
          eq_value(raw, ka, la, va, sizeof(va));
          eq_value(raw, kb, lb, vb, sizeof(vb));
          if (strcmp(va, vb) != 0)
            fail_msg("%s holds \"%s\", %s \"%s\"", ka, va, kb, vb);
          keys++;
          set += va[0] != '\0';
        }
      }
    }
  }
  print_message("%d keys compared, %d of them set\n", keys, set);
  assert_true(set > 500);
}

static void test_batch_equals_one_by_one(void **state) {
  fo_counter *errors = fo_metrics_counter("fanout_redis_errors_total", "",
                                          NULL);
  fo_limiter *l = open_main(true);
  redisContext *raw = raw_main();
  eq_space *sa = calloc(1, sizeof(*sa)), *sb = calloc(1, sizeof(*sb));
  fo_limit_op *a = calloc(EQ_OPS, sizeof(*a));
  fo_limit_op *b = calloc(EQ_OPS, sizeof(*b));
  int counts[FO_LIMIT_UNAVAILABLE + 1] = {0};
  uint64_t e0, err_a, err_b;
  int64_t t0, ms_a, ms_b;

  (void)state;
  assert_non_null(sa);
  assert_non_null(sb);
  assert_non_null(a);
  assert_non_null(b);
  eq_space_init(sa, "eq-batch");
  eq_space_init(sb, "eq-single");
  eq_ops(a, sa);
  eq_ops(b, sb);
  eq_foreign(raw, sa);
  eq_foreign(raw, sb);

  e0 = fo_counter_value(errors);
  t0 = fo_now_ms();
  assert_int_equal(fo_limiter_decide(l, a, EQ_OPS), FO_OK);
  ms_a = fo_now_ms() - t0;
  err_a = fo_counter_value(errors) - e0;

  e0 = fo_counter_value(errors);
  t0 = fo_now_ms();
  for (int i = 0; i < EQ_OPS; i++)
    assert_int_equal(fo_limiter_decide(l, &b[i], 1), FO_OK);
  ms_b = fo_now_ms() - t0;
  err_b = fo_counter_value(errors) - e0;
  print_message("%d ops: %lld ms in one batch, %lld ms one by one\n",
                EQ_OPS, (long long)ms_a, (long long)ms_b);

  for (int i = 0; i < EQ_OPS; i++) {
    if (a[i].result != b[i].result)
      fail_msg("op %d (kind %d): %d in the batch, %d alone", i,
               (int)a[i].kind, (int)a[i].result, (int)b[i].result);
    counts[a[i].result]++;
    if (a[i].result != FO_LIMIT_BUSY) {
      assert_int_equal(a[i].retry_after_ms, 0);
      assert_int_equal(b[i].retry_after_ms, 0);
      continue;
    }
    /* The time left on a claim: both runs read the TTL of a claim taken
     * in their own run, at most both runs' time apart. */
    assert_true(a[i].retry_after_ms > 0 && a[i].retry_after_ms <= 60000);
    assert_true(b[i].retry_after_ms > 0 && b[i].retry_after_ms <= 60000);
    assert_true(llabs((long long)(a[i].retry_after_ms -
                                  b[i].retry_after_ms)) <=
                ms_a + ms_b + 100);
  }
  print_message("pass %d, capped %d, duplicate %d, busy %d, "
                "unavailable %d\n",
                counts[FO_LIMIT_PASS], counts[FO_LIMIT_CAPPED],
                counts[FO_LIMIT_DUPLICATE], counts[FO_LIMIT_BUSY],
                counts[FO_LIMIT_UNAVAILABLE]);
  /* Every outcome occurs, so the comparison covers each path. */
  for (int r = FO_LIMIT_PASS; r <= FO_LIMIT_UNAVAILABLE; r++)
    assert_true(counts[r] >= 10);
  /* The foreign values failed the same decisions, one error each. */
  assert_true(err_a > 0);
  assert_int_equal(err_a, err_b);

  eq_same_state(raw, sa, sb);
  free(a);
  free(b);
  free(sa);
  free(sb);
  redisFree(raw);
  fo_limiter_close(l);
}

static void test_script_flush_is_survived(void **state) {
  fo_limiter *l = open_main(false);
  redisContext *raw = raw_main();
  redisReply *r;
  fo_limit_op ops[7], *many;
  char user[128], key[256], val[64];
  size_t klen;

  (void)state;
  uniq(user, sizeof(user), "noscript");
  assert_int_equal(one(l, cap_op(user, FO_CAP_MINUTE, 5, DAY0_MS), FO_OK),
                   FO_LIMIT_PASS);
  r = redisCommand(raw, "SCRIPT FLUSH");
  assert_non_null(r);
  assert_int_equal(r->type, REDIS_REPLY_STATUS);
  freeReplyObject(r);

  /* The whole batch meets NOSCRIPT, is sent again once, and nothing is
   * counted twice. */
  for (int i = 0; i < 6; i++)
    ops[i] = cap_op(user, FO_CAP_MINUTE, 5, DAY0_MS);
  ops[6] = dd_op(FO_LIMIT_CLAIM, user, "u", 60000, 0);
  assert_int_equal(fo_limiter_decide(l, ops, 7), FO_OK);
  for (int i = 0; i < 6; i++)
    assert_int_equal(ops[i].result,
                     i < 4 ? FO_LIMIT_PASS : FO_LIMIT_CAPPED);
  assert_int_equal(ops[6].result, FO_LIMIT_PASS);
  klen = key_cap(key, sizeof(key), user, "push", 60, DAY0_MS / 1000);
  raw_get(raw, key, klen, val, sizeof(val));
  assert_string_equal(val, "5");

  /* A batch of several script calls: every call meets NOSCRIPT, all are
   * sent again, and each op is still counted once, in order. */
  r = redisCommand(raw, "SCRIPT FLUSH");
  assert_non_null(r);
  freeReplyObject(r);
  many = calloc(300, sizeof(*many));
  assert_non_null(many);
  uniq(user, sizeof(user), "noscript-many");
  for (int i = 0; i < 300; i++)
    many[i] = cap_op(user, FO_CAP_MINUTE, 250, DAY0_MS);
  assert_int_equal(fo_limiter_decide(l, many, 300), FO_OK);
  for (int i = 0; i < 300; i++)
    assert_int_equal(many[i].result,
                     i < 250 ? FO_LIMIT_PASS : FO_LIMIT_CAPPED);
  klen = key_cap(key, sizeof(key), user, "push", 60, DAY0_MS / 1000);
  raw_get(raw, key, klen, val, sizeof(val));
  assert_string_equal(val, "250");
  free(many);
  redisFree(raw);
  fo_limiter_close(l);
}

/* A value under our key that the script cannot read gets the fallback
 * for that op alone. */
static void test_foreign_value_gets_fallback(void **state) {
  fo_limiter *l = open_main(true);
  redisContext *raw = raw_main();
  redisReply *r;
  fo_limit_op ops[2];
  char user[128], key[256];
  size_t klen;

  (void)state;
  uniq(user, sizeof(user), "foreign");
  klen = key_cap(key, sizeof(key), user, "push", 60, DAY0_MS / 1000);
  r = redisCommand(raw, "SADD %b x", key, klen);
  assert_non_null(r);
  freeReplyObject(r);
  ops[0] = cap_op(user, FO_CAP_MINUTE, 5, DAY0_MS);
  ops[1] = cap_op(user, FO_CAP_HOUR, 5, DAY0_MS);
  assert_int_equal(fo_limiter_decide(l, ops, 2), FO_OK);
  assert_int_equal(ops[0].result, FO_LIMIT_CAPPED);
  assert_int_equal(ops[1].result, FO_LIMIT_PASS);
  r = redisCommand(raw, "DEL %b", key, klen);
  freeReplyObject(r);
  redisFree(raw);
  fo_limiter_close(l);
}

/* Auth, database and the password kept out of the log. */
static void test_auth_select_and_secret(void **state) {
  child_redis *cr = &g_child;
  fo_limiter *l = NULL;
  redisContext *raw;
  char url[256], key[256], val[64], logpath[600];
  FILE *logf;
  char *text;
  size_t klen;

  (void)state;
  child_new(cr);
  snprintf(logpath, sizeof(logpath), "%s/limits.log", cr->dir);
  logf = fopen(logpath, "w");
  assert_non_null(logf);
  fo_log_set_stream(logf);
  fo_log_set_level(FO_LOG_DEBUG);

  child_url(cr, url, sizeof(url));
  assert_int_equal(fo_limiter_open(url, false, &l), FO_OK);
  assert_true(fo_limiter_ping(l));
  assert_int_equal(one(l, dd_op(FO_LIMIT_CLAIM, "ev", "u", 60000, 0), FO_OK),
                   FO_LIMIT_PASS);
  fo_limiter_close(l);

  /* The claim landed in the database the URL named. */
  klen = key_dd(key, sizeof(key), "ev", "u", "email");
  raw = raw_connect("127.0.0.1", cr->port, CHILD_PASS, CHILD_DB);
  assert_non_null(raw);
  raw_get(raw, key, klen, val, sizeof(val));
  assert_int_equal(strncmp(val, "claim:", 6), 0);
  redisFree(raw);
  raw = raw_connect("127.0.0.1", cr->port, CHILD_PASS, 0);
  assert_non_null(raw);
  raw_get(raw, key, klen, val, sizeof(val));
  assert_string_equal(val, "");
  redisFree(raw);

  /* An ACL user works; a wrong password is an outage, not a crash. */
  snprintf(url, sizeof(url), "redis://default:%s@127.0.0.1:%d",
           CHILD_PASS_URL, cr->port);
  assert_int_equal(fo_limiter_open(url, false, &l), FO_OK);
  assert_true(fo_limiter_ping(l));
  fo_limiter_close(l);
  snprintf(url, sizeof(url), "redis://:hunter2-wrong@127.0.0.1:%d",
           cr->port);
  assert_int_equal(fo_limiter_open(url, true, &l), FO_OK);
  assert_false(fo_limiter_ping(l));
  assert_int_equal(one(l, cap_op("u", FO_CAP_MINUTE, 5, DAY0_MS), FO_EIO),
                   FO_LIMIT_CAPPED);
  fo_limiter_close(l);

  fo_log_set_stream(NULL);
  fo_log_set_level(FO_LOG_INFO);
  fclose(logf);
  text = itest_slurp(logpath, NULL);
  assert_non_null(text);
  assert_non_null(strstr(text, "redis unreachable"));
  assert_non_null(strstr(text, "AUTH"));
  assert_null(strstr(text, "hunter2"));
  assert_null(strstr(text, "s3cr"));
  free(text);
  child_kill(cr);
}

static void test_outage_fallback_and_recovery(void **state) {
  fo_counter *failed_open = fo_metrics_counter(
      "fanout_caps_failed_open_total", "", NULL);
  fo_counter *errors = fo_metrics_counter("fanout_redis_errors_total", "",
                                          NULL);
  child_redis *cr = &g_child;
  fo_limiter *open_l = NULL, *closed_l = NULL;
  fo_limit_op ops[3];
  char url[256], user[128];
  uint64_t fo0, err0;
  int64_t t0, worst = 0, back_ms = -1;

  (void)state;
  uniq(user, sizeof(user), "outage");
  child_new(cr);
  child_url(cr, url, sizeof(url));
  assert_int_equal(fo_limiter_open(url, false, &open_l), FO_OK);
  assert_int_equal(fo_limiter_open(url, true, &closed_l), FO_OK);
  assert_int_equal(one(open_l, cap_op(user, FO_CAP_DAY, 100, DAY0_MS),
                       FO_OK),
                   FO_LIMIT_PASS);
  assert_int_equal(one(closed_l, cap_op(user, FO_CAP_DAY, 100, DAY0_MS),
                       FO_OK),
                   FO_LIMIT_PASS);
  /* Let the connections age past the retry interval. */
  sleep_ms(600);

  child_kill(cr);
  fo0 = fo_counter_value(failed_open);
  err0 = fo_counter_value(errors);
  for (int i = 0; i < 30; i++) {
    ops[0] = cap_op(user, FO_CAP_DAY, 100, DAY0_MS);
    ops[1] = dd_op(FO_LIMIT_CLAIM, user, "u", 60000, 0);
    ops[2] = cap_op(user, FO_CAP_NONE, 0, DAY0_MS);
    t0 = fo_now_ms();
    assert_int_equal(fo_limiter_decide(open_l, ops, 3), FO_EIO);
    worst = fo_now_ms() - t0 > worst ? fo_now_ms() - t0 : worst;
    assert_int_equal(ops[0].result, FO_LIMIT_PASS);
    assert_int_equal(ops[1].result, FO_LIMIT_UNAVAILABLE);
    assert_int_equal(ops[2].result, FO_LIMIT_PASS);

    t0 = fo_now_ms();
    assert_int_equal(fo_limiter_decide(closed_l, ops, 3), FO_EIO);
    worst = fo_now_ms() - t0 > worst ? fo_now_ms() - t0 : worst;
    assert_int_equal(ops[0].result, FO_LIMIT_CAPPED);
    assert_int_equal(ops[1].result, FO_LIMIT_UNAVAILABLE);
    assert_int_equal(ops[2].result, FO_LIMIT_PASS);
    sleep_ms(20);
  }
  print_message("slowest call with redis down: %lld ms\n",
                (long long)worst);
  assert_true(worst < 50);
  assert_false(fo_limiter_ping(open_l));
  /* Only fail-open caps count, and one per cap decision. */
  assert_int_equal(fo_counter_value(failed_open) - fo0, 30);
  /* Reconnects are spaced: about 2 per second per instance, not one per
   * call, in 30 x 20 ms. */
  assert_true(fo_counter_value(errors) - err0 >= 2);
  assert_true(fo_counter_value(errors) - err0 <= 12);

  /* Back on the same port: decisions resume by themselves. */
  child_start(cr);
  t0 = fo_now_ms();
  while (fo_now_ms() - t0 < 3000) {
    ops[0] = cap_op(user, FO_CAP_DAY, 100, DAY0_MS);
    if (fo_limiter_decide(closed_l, ops, 1) == FO_OK) {
      back_ms = fo_now_ms() - t0;
      break;
    }
    sleep_ms(10);
  }
  print_message("recovered %lld ms after redis came back\n",
                (long long)back_ms);
  assert_true(back_ms >= 0 && back_ms < 1100);
  /* A fresh server: the count starts again, script loaded anew. */
  assert_int_equal(ops[0].result, FO_LIMIT_PASS);
  assert_true(fo_limiter_ping(open_l));
  assert_int_equal(one(open_l, dd_op(FO_LIMIT_CLAIM, user, "u", 60000, 0),
                       FO_OK),
                   FO_LIMIT_PASS);

  fo_limiter_close(open_l);
  fo_limiter_close(closed_l);
  child_kill(cr);
}

/* A server that accepts but never answers: calls end at the command
 * timeout instead of hanging, then fail fast until it answers again. */
static void test_hung_server_times_out(void **state) {
  child_redis *cr = &g_child;
  fo_limiter *l = NULL;
  char url[256];
  int64_t t0, took;

  (void)state;
  child_new(cr);
  child_url(cr, url, sizeof(url));
  assert_int_equal(fo_limiter_open(url, false, &l), FO_OK);
  assert_true(fo_limiter_ping(l));
  sleep_ms(600);

  kill(cr->proc.pid, SIGSTOP);
  t0 = fo_now_ms();
  assert_int_equal(one(l, dd_op(FO_LIMIT_CLAIM, "e", "u", 1000, 0), FO_EIO),
                   FO_LIMIT_UNAVAILABLE);
  took = fo_now_ms() - t0;
  print_message("hung redis: first call gave up after %lld ms\n",
                (long long)took);
  assert_true(took >= 900 && took < 2500);
  /* The immediate reconnect meets the same silence once, then the
   * retry interval holds further attempts back. */
  (void)one(l, dd_op(FO_LIMIT_CLAIM, "e", "u", 1000, 0), FO_EIO);
  t0 = fo_now_ms();
  assert_int_equal(one(l, dd_op(FO_LIMIT_CLAIM, "e", "u", 1000, 0), FO_EIO),
                   FO_LIMIT_UNAVAILABLE);
  assert_true(fo_now_ms() - t0 < 50);

  kill(cr->proc.pid, SIGCONT);
  t0 = fo_now_ms();
  while (!fo_limiter_ping(l) && fo_now_ms() - t0 < 3000)
    sleep_ms(20);
  assert_true(fo_limiter_ping(l));
  assert_int_equal(one(l, dd_op(FO_LIMIT_CLAIM, "e2", "u", 1000, 0), FO_OK),
                   FO_LIMIT_PASS);
  fo_limiter_close(l);
  child_kill(cr);
}

static int stop_child(void **state) {
  (void)state;
  fo_log_set_stream(NULL);
  fo_log_set_level(FO_LOG_INFO);
  child_kill(&g_child);
  return 0;
}

static int setup(void **state) {
  const char *u = redis_url();

  (void)state;
  /* SIGPIPE is left at its default on purpose: the module must not
   * let a write to a dead server end the process. */
  snprintf(g_run, sizeof(g_run), "%d-%lld", (int)getpid(),
           (long long)fo_wall_ms());
  if (sscanf(u, "redis://%255[^:/]:%d", g_host, &g_port) != 2)
    fail_msg("FANOUT_REDIS_URL must be redis://HOST:PORT for this test");
  return 0;
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_url_refused_or_accepted),
      cmocka_unit_test(test_bad_ops_refused),
      cmocka_unit_test(test_cap_counts_exactly_limit),
      cmocka_unit_test(test_cap_windows_roll_on_utc_boundaries),
      cmocka_unit_test(test_cap_race_across_instances),
      cmocka_unit_test(test_claim_busy_done_duplicate_release),
      cmocka_unit_test(test_claims_and_marks_lapse),
      cmocka_unit_test(test_hostile_ids_do_not_collide),
      cmocka_unit_test(test_batch_of_ten_thousand),
      cmocka_unit_test(test_batch_equals_one_by_one),
      cmocka_unit_test(test_script_flush_is_survived),
      cmocka_unit_test(test_foreign_value_gets_fallback),
      cmocka_unit_test_teardown(test_auth_select_and_secret, stop_child),
      cmocka_unit_test_teardown(test_outage_fallback_and_recovery,
                                stop_child),
      cmocka_unit_test_teardown(test_hung_server_times_out, stop_child),
  };

  return cmocka_run_group_tests_name("limits", tests, setup, NULL);
}
