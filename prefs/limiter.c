/* SPDX-License-Identifier: MIT */
/*
 * Rate caps and deduplication claims shared by every fanoutd through one
 * Redis. A Lua script, loaded once per connection, decides up to
 * LIMITS_CHUNK operations per call, one after the other, each with its
 * own atomic read-then-write; a batch is cut into such calls, sent as one
 * pipeline, so it costs one round trip, and Redis pays the fixed cost of
 * an EVALSHA (about that of a decision) once per call, not once per
 * operation. When Redis cannot be reached the module answers at once from
 * the configured fallback and reconnects in the background of later
 * calls, never more often than every 500 ms.
 *
 * Keys. Every variable part is written with its length in front, so no
 * user or event id, whatever bytes it holds (':' '{' ' ' included), can
 * make two deliveries share a key:
 *   fo:cap:<len>:<user>:<channel>:<period_s>:<window_start_s>
 *       the count of a cap window; windows are fixed and aligned on UTC
 *       (period 60, 3600 or 86400 s); it expires period + 60 s after its
 *       first count.
 *   fo:dd:<len>:<event>:<len>:<user>:<channel>
 *       "claim:<token>" while an attempt holds the delivery (token: 16 hex
 *       digits, random per fo_limiter), then "done" once it was sent.
 *   fo:rate:<len>:<sender>:<window_start_s>
 *       sends of one sender (an SMS number) in a 1-second window; counted
 *       like a cap, by the same script function, and expires 2 s after
 *       its first count.
 * <len> is the byte length in decimal and <channel> the channel's name.
 *
 * Known limitation: one script call touches the keys of many users, so
 * the module needs a Redis that holds every key (one server, or the
 * primary of a Sentinel group); Redis Cluster refuses such calls.
 */
#include "limiter.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "fanout/common.h"
#include "log.h"
#include "metrics.h"
#include "urlenc.h"

#define LIMITS_MOD "limits"
#define LIMITS_CONNECT_MS 500
#define LIMITS_COMMAND_MS 1000
#define LIMITS_RETRY_MS 500
#define LIMITS_LOG_MS 30000
#define LIMITS_CAP_GRACE_S 60
#define LIMITS_RATE_TTL_S 2
#define LIMITS_DEFAULT_PORT 6379
#define LIMITS_SHA_LEN 40
#define LIMITS_TOKEN_LEN 16
/* Operations per script call: enough that the fixed cost of a call is
 * small beside the decisions, few enough that one call keeps the server
 * busy well under a millisecond. */
#define LIMITS_CHUNK 128

/*
 * KEYS[i] is the key of operation i, ARGV[1] the token of this fo_limiter
 * and ARGV[3i-1 .. 3i+1] the kind of operation i ('c' cap, 'l' claim,
 * 'd' done, 'r' release) and its two arguments. The reply holds two
 * entries per operation, in order: code 0 pass, 1 capped (then the
 * count), 2 already sent, 3 claimed by someone else (then the claim's
 * PTTL), or 4 and the error that operation met. Each operation runs under
 * pcall, so that one foreign value fails its own decision only: the ones
 * before and after it stand.
 */
static const char limits_script[] =
    "local mine = 'claim:' .. ARGV[1]\n"
    "local function cap(k, limit, ttl)\n"
    "  local n = tonumber(redis.call('GET', k) or '0')\n"
    "  if n >= tonumber(limit) then return 1, n end\n"
    "  n = redis.call('INCR', k)\n"
    "  if n == 1 then redis.call('EXPIRE', k, ttl) end\n"
    "  return 0, n\n"
    "end\n"
    "local function claim(k, ms)\n"
    "  if redis.call('SET', k, mine, 'NX', 'PX', ms) then\n"
    "    return 0, 0\n"
    "  end\n"
    "  if redis.call('GET', k) == 'done' then return 2, 0 end\n"
    "  return 3, redis.call('PTTL', k)\n"
    "end\n"
    "local function done(k, ms)\n"
    "  redis.call('SET', k, 'done', 'PX', ms)\n"
    "  return 0, 0\n"
    "end\n"
    "local function release(k)\n"
    "  if redis.call('GET', k) == mine then\n"
    "    redis.call('DEL', k)\n"
    "  end\n"
    "  return 0, 0\n"
    "end\n"
    "local run = {c = cap, l = claim, d = done, r = release}\n"
    "local out = {}\n"
    "for i = 1, #KEYS do\n"
    "  local a = 3 * i - 1\n"
    "  local ok, code, n = pcall(run[ARGV[a]], KEYS[i], ARGV[a + 1],\n"
    "                            ARGV[a + 2])\n"
    "  if not ok then\n"
    "    if type(code) == 'table' then code = code.err end\n"
    "    code, n = 4, tostring(code)\n"
    "  end\n"
    "  out[2 * i - 1] = code\n"
    "  out[2 * i] = n\n"
    "end\n"
    "return out\n";

enum {
  LIMITS_R_PASS = 0,
  LIMITS_R_CAPPED,
  LIMITS_R_DUP,
  LIMITS_R_BUSY,
  LIMITS_R_ERROR
};

struct fo_limiter {
  pthread_mutex_t lock;

  /* Set at open, read-only after: safe to read without the lock. */
  char *host;
  int port;
  int db;
  char *user;                   /* ACL user, NULL for none */
  char *password;               /* NULL for none; never logged */
  bool fail_closed;
  char token[LIMITS_TOKEN_LEN + 1];

  /* Under the lock. */
  redisContext *ctx;            /* NULL while Redis is down */
  char sha[LIMITS_SHA_LEN + 1];
  bool connecting;              /* a caller is connecting, lock dropped */
  int64_t next_try_ms;          /* monotonic: no connect before this */
  int64_t up_since_ms;
  int64_t down_since_ms;        /* 0 while up (or never tried) */
  size_t *idx;                  /* scratch: ops sent in this batch */
  size_t idx_cap;
  char *buf;                    /* scratch: the call being built */
  size_t buf_cap;
  char *key;                    /* scratch: the key being written */
  size_t key_cap;

  fo_ratelimit rl_down;
  fo_ratelimit rl_reply;
  fo_counter *errors;
  fo_counter *failed_open;
};

/* ---- URL ------------------------------------------------------------- */

/* Parses a decimal number in s[0..n) within [min, max]. */
static int limits_number(const char *s, size_t n, long min, long max,
                         long *out) {
  long v = 0;

  if (n == 0 || n > 10)
    return FO_EINVAL;
  for (size_t i = 0; i < n; i++) {
    if (s[i] < '0' || s[i] > '9')
      return FO_EINVAL;
    v = v * 10 + (s[i] - '0');
  }
  if (v < min || v > max)
    return FO_EINVAL;
  *out = v;
  return FO_OK;
}

static bool limits_host_char(char c, bool bracketed) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
      (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_')
    return true;
  return bracketed && (c == ':' || c == '%');
}

/*
 * redis://[[user]:password@]host[:port][/db]. The password may hold any
 * byte as %XX. A userinfo without ':' is refused rather than guessed at.
 */
static int limits_parse_url(fo_limiter *l, const char *url) {
  static const char scheme[] = "redis://";
  const char *p, *at, *host, *end, *hend, *slash;
  bool bracketed = false;
  long v;
  int rc = FO_OK;

  if (url == NULL || strncmp(url, scheme, sizeof(scheme) - 1) != 0)
    return FO_EINVAL;
  p = url + sizeof(scheme) - 1;

  /* The password may hold '/' unescaped; the host part starts after the
   * last '@'. */
  at = strrchr(p, '@');
  host = at != NULL ? at + 1 : p;
  if (at != NULL) {
    const char *colon = memchr(p, ':', (size_t)(at - p));

    if (colon == NULL)
      return FO_EINVAL;
    if (colon > p) {
      l->user = fo_url_unescape(p, (size_t)(colon - p), false, &rc);
      if (l->user == NULL)
        return rc;
    }
    if (at > colon + 1) {
      l->password = fo_url_unescape(colon + 1, (size_t)(at - colon - 1),
                                    false, &rc);
      if (l->password == NULL)
        return rc;
    }
  }

  slash = strchr(host, '/');
  end = slash != NULL ? slash : host + strlen(host);
  if (*host == '[') {
    bracketed = true;
    host++;
    hend = memchr(host, ']', (size_t)(end - host));
    if (hend == NULL)
      return FO_EINVAL;
  } else {
    hend = memchr(host, ':', (size_t)(end - host));
    if (hend == NULL)
      hend = end;
  }
  if (hend == host)
    return FO_EINVAL;
  for (const char *c = host; c < hend; c++) {
    if (!limits_host_char(*c, bracketed))
      return FO_EINVAL;
  }
  l->host = strndup(host, (size_t)(hend - host));
  if (l->host == NULL)
    return FO_ENOMEM;

  p = hend + (bracketed ? 1 : 0);
  l->port = LIMITS_DEFAULT_PORT;
  if (p < end) {
    if (*p != ':')
      return FO_EINVAL;
    p++;
    if (limits_number(p, (size_t)(end - p), 1, 65535, &v) != FO_OK)
      return FO_EINVAL;
    l->port = (int)v;
  }

  l->db = 0;
  if (slash != NULL && slash[1] != '\0') {
    if (limits_number(slash + 1, strlen(slash + 1), 0, 1000000, &v) !=
        FO_OK)
      return FO_EINVAL;
    l->db = (int)v;
  }
  return FO_OK;
}

/* ---- Connection ------------------------------------------------------- */

/*
 * Writes the pending commands. SIGPIPE is held back in this thread while
 * doing so, because a peer that died mid-batch must give an error here,
 * not end a process that did not ignore the signal.
 */
static int limits_flush(redisContext *c) {
  sigset_t pipe_set, old, pending;
  bool was_pending;
  int done = 0, rc = REDIS_OK;

  sigemptyset(&pipe_set);
  sigaddset(&pipe_set, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
  sigpending(&pending);
  was_pending = sigismember(&pending, SIGPIPE) == 1;

  while (!done && rc == REDIS_OK)
    rc = redisBufferWrite(c, &done);

  if (rc != REDIS_OK && !was_pending) {
    struct timespec zero = {0, 0};

    /* Consume the SIGPIPE this write raised, if it raised one. */
    sigpending(&pending);
    if (sigismember(&pending, SIGPIPE) == 1)
      (void)sigtimedwait(&pipe_set, NULL, &zero);
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  return rc;
}

/* The context's error. hiredis words a read or write that ran into the
 * socket timeout as EAGAIN's text; say what it means instead. */
static const char *limits_ctx_err(const redisContext *c) {
  if (c->err == REDIS_ERR_IO &&
      strcmp(c->errstr, strerrordesc_np(EAGAIN)) == 0)
    return "timed out";
  return c->errstr;
}

/* One command, sent and answered; NULL when the connection failed. */
static redisReply *limits_command(redisContext *c, int argc,
                                  const char **argv, const size_t *lens) {
  void *r = NULL;

  if (redisAppendCommandArgv(c, argc, argv, lens) != REDIS_OK)
    return NULL;
  if (limits_flush(c) != REDIS_OK)
    return NULL;
  if (redisGetReply(c, &r) != REDIS_OK)
    return NULL;
  return r;
}

/* Runs one setup command; false (with `why`) unless the reply has
 * `type`. */
static bool limits_setup(redisContext *c, int argc, const char **argv,
                         int type, const char *what, redisReply **keep,
                         char *why, size_t cap) {
  redisReply *r = limits_command(c, argc, argv, NULL);

  if (r == NULL) {
    snprintf(why, cap, "%s: %s", what, limits_ctx_err(c));
    return false;
  }
  if (r->type != type) {
    /* An error reply names the problem, never the password. */
    snprintf(why, cap, "%s: %s", what,
             r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
    freeReplyObject(r);
    return false;
  }
  if (keep != NULL)
    *keep = r;
  else
    freeReplyObject(r);
  return true;
}

/*
 * Connects, authenticates, selects the database and loads the script.
 * Reads only the fields fixed at open, so it runs without the lock.
 * Returns the context and fills `sha`, or NULL with a reason in `why`.
 */
static redisContext *limits_connect(const fo_limiter *l, char *sha,
                                    char *why, size_t cap) {
  struct timeval ctv = {0, LIMITS_CONNECT_MS * 1000};
  struct timeval ttv = {LIMITS_COMMAND_MS / 1000,
                        (LIMITS_COMMAND_MS % 1000) * 1000};
  redisContext *c = redisConnectWithTimeout(l->host, l->port, ctv);
  const char *load[] = {"SCRIPT", "LOAD", limits_script, NULL};
  redisReply *r = NULL;
  char db[16];

  if (c == NULL) {
    snprintf(why, cap, "connect: out of memory");
    return NULL;
  }
  if (c->err) {
    snprintf(why, cap, "connect: %s", c->errstr);
    goto fail;
  }
  if (redisSetTimeout(c, ttv) != REDIS_OK ||
      redisEnableKeepAlive(c) != REDIS_OK) {
    snprintf(why, cap, "socket options: %s", c->errstr);
    goto fail;
  }

  if (l->password != NULL || l->user != NULL) {
    const char *pass = l->password != NULL ? l->password : "";
    const char *auth2[] = {"AUTH", pass, NULL};
    const char *auth3[] = {"AUTH", l->user, pass, NULL};

    if (!limits_setup(c, l->user != NULL ? 3 : 2,
                      l->user != NULL ? auth3 : auth2, REDIS_REPLY_STATUS,
                      "AUTH", NULL, why, cap))
      goto fail;
  }
  if (l->db != 0) {
    const char *sel[] = {"SELECT", db, NULL};

    snprintf(db, sizeof(db), "%d", l->db);
    if (!limits_setup(c, 2, sel, REDIS_REPLY_STATUS, "SELECT", NULL, why,
                      cap))
      goto fail;
  }

  if (!limits_setup(c, 3, load, REDIS_REPLY_STRING, "SCRIPT LOAD", &r,
                    why, cap))
    goto fail;
  if (r->len != LIMITS_SHA_LEN) {
    snprintf(why, cap, "SCRIPT LOAD: unexpected reply");
    freeReplyObject(r);
    goto fail;
  }
  memcpy(sha, r->str, LIMITS_SHA_LEN);
  sha[LIMITS_SHA_LEN] = '\0';
  freeReplyObject(r);
  return c;

fail:
  redisFree(c);
  return NULL;
}

/*
 * Drops the connection after a failure. The first reconnect may be tried
 * at once when the connection had served a while (a server restart or an
 * idle timeout), else after the retry interval, so a server that accepts
 * and then fails is not hammered. Lock held.
 */
static void limits_mark_down(fo_limiter *l, const char *reason) {
  int64_t now = fo_now_ms();
  char why[256];

  /* `reason` may be the context's own error text, freed below. */
  snprintf(why, sizeof(why), "%s", reason);
  fo_counter_add(l->errors, 1);
  if (l->ctx != NULL) {
    redisFree(l->ctx);
    l->ctx = NULL;
    l->next_try_ms = now - l->up_since_ms >= LIMITS_RETRY_MS
                         ? now
                         : now + LIMITS_RETRY_MS;
  }
  if (l->down_since_ms == 0) {
    l->down_since_ms = now;
    fo_log_rl(&l->rl_down, LIMITS_LOG_MS, FO_LOG_WARN, LIMITS_MOD,
              "redis unreachable", "host=%s port=%d err=\"%s\"", l->host,
              l->port, why);
  } else {
    fo_log_debug(LIMITS_MOD, "redis still unreachable",
                 "host=%s port=%d err=\"%s\"", l->host, l->port, why);
  }
}

/*
 * True when connected, connecting first if the retry interval allows.
 * The lock is dropped while connecting so that other callers get their
 * fallback at once instead of waiting behind a connect timeout. Lock held.
 * Known limitation: the one caller that makes the attempt waits for it,
 * up to the connect timeout plus a command timeout per setup command when
 * a server accepts connections but does not answer.
 */
static bool limits_ensure_up(fo_limiter *l) {
  char why[256] = "";
  char sha[LIMITS_SHA_LEN + 1];
  redisContext *c;
  int64_t now = fo_now_ms();

  if (l->ctx != NULL)
    return true;
  if (l->connecting || now < l->next_try_ms)
    return false;

  l->connecting = true;
  l->next_try_ms = now + LIMITS_RETRY_MS;
  pthread_mutex_unlock(&l->lock);
  c = limits_connect(l, sha, why, sizeof(why));
  pthread_mutex_lock(&l->lock);
  l->connecting = false;

  if (c == NULL) {
    /* Spaced from the end of the attempt: a connect or AUTH that waited
     * for its timeout must not be retried at once. */
    l->next_try_ms = fo_now_ms() + LIMITS_RETRY_MS;
    limits_mark_down(l, why);
    return false;
  }
  l->ctx = c;
  memcpy(l->sha, sha, sizeof(sha));
  l->up_since_ms = fo_now_ms();
  if (l->down_since_ms != 0) {
    fo_log_info(LIMITS_MOD, "redis reachable again",
                "host=%s port=%d db=%d down_ms=%lld", l->host, l->port,
                l->db, (long long)(l->up_since_ms - l->down_since_ms));
    l->down_since_ms = 0;
  } else {
    fo_log_info(LIMITS_MOD, "redis connected", "host=%s port=%d db=%d",
                l->host, l->port, l->db);
  }
  return true;
}

/* ---- Open and close ---------------------------------------------------- */

static void limits_make_token(char *out) {
  uint64_t v = 0;

  /* getrandom() on Linux does not fail for 8 bytes once the pool is
   * ready; the clock mix only keeps the token distinct should it. */
  if (getrandom(&v, sizeof(v), 0) != (ssize_t)sizeof(v))
    v = (uint64_t)fo_now_us() * 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid();
  snprintf(out, LIMITS_TOKEN_LEN + 1, "%016llx", (unsigned long long)v);
}

void fo_limiter_close(fo_limiter *l) {
  if (l == NULL)
    return;
  if (l->ctx != NULL)
    redisFree(l->ctx);
  pthread_mutex_destroy(&l->lock);
  free(l->host);
  free(l->user);
  if (l->password != NULL) {
    explicit_bzero(l->password, strlen(l->password));
    free(l->password);
  }
  free(l->idx);
  free(l->buf);
  free(l->key);
  free(l);
}

int fo_limiter_open(const char *url, bool fail_closed, fo_limiter **out) {
  fo_limiter *l;
  int rc;

  if (out == NULL)
    return FO_EINVAL;
  l = calloc(1, sizeof(*l));
  if (l == NULL)
    return FO_ENOMEM;
  if (pthread_mutex_init(&l->lock, NULL) != 0) {
    free(l);
    return FO_ENOMEM;
  }
  rc = limits_parse_url(l, url);
  if (rc != FO_OK)
    goto fail;
  l->fail_closed = fail_closed;
  limits_make_token(l->token);
  l->errors = fo_metrics_counter(
      "fanout_redis_errors_total",
      "Redis connects, commands and replies that failed", NULL);
  l->failed_open = fo_metrics_counter(
      "fanout_caps_failed_open_total",
      "Rate caps passed without a count because Redis was unavailable",
      NULL);

  /* A failure here is logged and retried by later calls. */
  pthread_mutex_lock(&l->lock);
  (void)limits_ensure_up(l);
  pthread_mutex_unlock(&l->lock);
  *out = l;
  return FO_OK;

fail:
  fo_limiter_close(l);
  return rc;
}

bool fo_limiter_ping(fo_limiter *l) {
  const char *argv[] = {"PING", NULL};
  redisReply *r;
  bool ok = false;

  if (l == NULL)
    return false;
  pthread_mutex_lock(&l->lock);
  if (!limits_ensure_up(l))
    goto out;
  r = limits_command(l->ctx, 1, argv, NULL);
  if (r == NULL) {
    limits_mark_down(l, limits_ctx_err(l->ctx));
    goto out;
  }
  ok = r->type == REDIS_REPLY_STATUS && strcmp(r->str, "PONG") == 0;
  freeReplyObject(r);

out:
  pthread_mutex_unlock(&l->lock);
  return ok;
}

/* ---- Decisions --------------------------------------------------------- */

static int64_t limits_period_s(fo_cap_period per) {
  switch (per) {
  case FO_CAP_MINUTE:
    return 60;
  case FO_CAP_HOUR:
    return 3600;
  case FO_CAP_DAY:
    return 86400;
  default:
    return 0;
  }
}

static int64_t limits_floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;

  return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

static bool limits_op_valid(const fo_limit_op *op) {
  if (op->kind == FO_LIMIT_RATE)
    return op->sender != NULL && op->rate > 0;
  if (op->user == NULL || (int)op->channel < 0 ||
      (int)op->channel >= FO_CH_COUNT)
    return false;
  switch (op->kind) {
  case FO_LIMIT_CAP:
    if (op->cap.per == FO_CAP_NONE)
      return true;
    return limits_period_s(op->cap.per) > 0 && op->cap.limit > 0;
  case FO_LIMIT_CLAIM:
    return op->event_id != NULL && op->claim_ms > 0;
  case FO_LIMIT_DONE:
    return op->event_id != NULL && op->ttl_ms > 0;
  case FO_LIMIT_RELEASE:
    return op->event_id != NULL;
  default:
    return false;
  }
}

/* The result an op gets when Redis gave none. */
static void limits_fallback(fo_limiter *l, fo_limit_op *op) {
  op->retry_after_ms = 0;
  if (op->kind != FO_LIMIT_CAP) {
    op->result = FO_LIMIT_UNAVAILABLE;
  } else if (l->fail_closed) {
    op->result = FO_LIMIT_CAPPED;
  } else {
    op->result = FO_LIMIT_PASS;
    fo_counter_add(l->failed_open, 1);
  }
}

/* Grows *buf, of *cap bytes, to hold at least `need`. */
static int limits_reserve(char **buf, size_t *cap, size_t need) {
  size_t c = *cap > 0 ? *cap : 1024;
  char *b;

  if (need <= *cap)
    return FO_OK;
  while (c < need)
    c *= 2;
  b = realloc(*buf, c);
  if (b == NULL)
    return FO_ENOMEM;
  *buf = b;
  *cap = c;
  return FO_OK;
}

/* Writes v in decimal at p, which has room for 20 bytes; returns the
 * length. Hand-made because printf was a fifth of the client's time. */
static size_t limits_dec(char *p, long long v) {
  unsigned long long u = v < 0 ? 0ull - (unsigned long long)v
                                : (unsigned long long)v;
  char tmp[24];
  size_t n = 0, len;

  do {
    tmp[n++] = (char)('0' + u % 10);
    u /= 10;
  } while (u > 0);
  if (v < 0)
    tmp[n++] = '-';
  len = n;
  while (n > 0)
    *p++ = tmp[--n];
  return len;
}

static size_t limits_put(char *p, const char *s, size_t n) {
  memcpy(p, s, n);
  return n;
}

/* Writes s[0..n) as a RESP bulk string at p, which has room for n + 32
 * bytes; returns the length written. */
static size_t limits_bulk(char *p, const char *s, size_t n) {
  size_t o = 0;

  p[o++] = '$';
  o += limits_dec(p + o, (long long)n);
  o += limits_put(p + o, "\r\n", 2);
  o += limits_put(p + o, s, n);
  o += limits_put(p + o, "\r\n", 2);
  return o;
}

static size_t limits_bulk_num(char *p, long long v) {
  char d[24];

  return limits_bulk(p, d, limits_dec(d, v));
}

/* Writes the key of a rate op into l->key. */
static int limits_rate_key(fo_limiter *l, const fo_limit_op *op,
                           size_t *len) {
  size_t sl = strlen(op->sender), n = 0;
  char *k;

  if (limits_reserve(&l->key, &l->key_cap, sl + 64) != FO_OK)
    return FO_ENOMEM;
  k = l->key;
  n += limits_put(k + n, "fo:rate:", 8);
  n += limits_dec(k + n, (long long)sl);
  k[n++] = ':';
  n += limits_put(k + n, op->sender, sl);
  k[n++] = ':';
  n += limits_dec(k + n, (long long)limits_floor_div(op->now_ms, 1000));
  *len = n;
  return FO_OK;
}

/* Writes the op's key (format in the file header) into l->key. */
static int limits_key(fo_limiter *l, const fo_limit_op *op, size_t *len) {
  const char *ch;
  size_t ul, cl, el, n = 0;
  char *k;

  if (op->kind == FO_LIMIT_RATE)
    return limits_rate_key(l, op, len);
  ch = fo_channel_name(op->channel);
  ul = strlen(op->user);
  cl = strlen(ch);
  el = op->kind == FO_LIMIT_CAP ? 0 : strlen(op->event_id);

  /* Room for the text, three numbers and the separators. */
  if (limits_reserve(&l->key, &l->key_cap, ul + el + cl + 96) != FO_OK)
    return FO_ENOMEM;
  k = l->key;
  if (op->kind == FO_LIMIT_CAP) {
    int64_t per = limits_period_s(op->cap.per);
    int64_t start =
        limits_floor_div(limits_floor_div(op->now_ms, 1000), per) * per;

    n += limits_put(k + n, "fo:cap:", 7);
    n += limits_dec(k + n, (long long)ul);
    k[n++] = ':';
    n += limits_put(k + n, op->user, ul);
    k[n++] = ':';
    n += limits_put(k + n, ch, cl);
    k[n++] = ':';
    n += limits_dec(k + n, (long long)per);
    k[n++] = ':';
    n += limits_dec(k + n, (long long)start);
  } else {
    n += limits_put(k + n, "fo:dd:", 6);
    n += limits_dec(k + n, (long long)el);
    k[n++] = ':';
    n += limits_put(k + n, op->event_id, el);
    k[n++] = ':';
    n += limits_dec(k + n, (long long)ul);
    k[n++] = ':';
    n += limits_put(k + n, op->user, ul);
    k[n++] = ':';
    n += limits_put(k + n, ch, cl);
  }
  *len = n;
  return FO_OK;
}

/*
 * Queues one script call deciding ops[idx[0..cnt)], cnt at most
 * LIMITS_CHUNK, in that order: EVALSHA sha cnt, the keys, the token, then
 * the kind and two arguments of each op. The request is written in RESP
 * straight into l->buf, which saves the per-argument formatting that
 * hiredis would do.
 */
static int limits_append(fo_limiter *l, const fo_limit_op *ops,
                         const size_t *idx, size_t cnt) {
  size_t used = 0, klen;
  char *b;

  /* The header, the sha and the count. */
  if (limits_reserve(&l->buf, &l->buf_cap, 128) != FO_OK)
    return FO_ENOMEM;
  b = l->buf;
  b[used++] = '*';
  used += limits_dec(b + used, (long long)(4 + 4 * cnt));
  used += limits_put(b + used, "\r\n", 2);
  used += limits_bulk(b + used, "EVALSHA", 7);
  used += limits_bulk(b + used, l->sha, LIMITS_SHA_LEN);
  used += limits_bulk_num(b + used, (long long)cnt);

  for (size_t j = 0; j < cnt; j++) {
    if (limits_key(l, &ops[idx[j]], &klen) != FO_OK ||
        limits_reserve(&l->buf, &l->buf_cap, used + klen + 32) != FO_OK)
      return FO_ENOMEM;
    used += limits_bulk(l->buf + used, l->key, klen);
  }

  /* The token, then at most 3 short arguments of up to 20 digits each
   * per op. */
  if (limits_reserve(&l->buf, &l->buf_cap,
                     used + LIMITS_TOKEN_LEN + 32 + cnt * 3 * 56) != FO_OK)
    return FO_ENOMEM;
  b = l->buf;
  used += limits_bulk(b + used, l->token, LIMITS_TOKEN_LEN);
  for (size_t j = 0; j < cnt; j++) {
    const fo_limit_op *op = &ops[idx[j]];

    switch (op->kind) {
    case FO_LIMIT_CAP:
      used += limits_bulk(b + used, "c", 1);
      used += limits_bulk_num(b + used, (long long)op->cap.limit);
      used += limits_bulk_num(
          b + used, (long long)(limits_period_s(op->cap.per) +
                                LIMITS_CAP_GRACE_S));
      break;
    case FO_LIMIT_RATE:
      used += limits_bulk(b + used, "c", 1);
      used += limits_bulk_num(b + used, (long long)op->rate);
      used += limits_bulk_num(b + used, LIMITS_RATE_TTL_S);
      break;
    case FO_LIMIT_CLAIM:
      used += limits_bulk(b + used, "l", 1);
      used += limits_bulk_num(b + used, (long long)op->claim_ms);
      used += limits_bulk(b + used, "", 0);
      break;
    case FO_LIMIT_DONE:
      used += limits_bulk(b + used, "d", 1);
      used += limits_bulk_num(b + used, (long long)op->ttl_ms);
      used += limits_bulk(b + used, "", 0);
      break;
    default:
      used += limits_bulk(b + used, "r", 1);
      used += limits_bulk(b + used, "", 0);
      used += limits_bulk(b + used, "", 0);
      break;
    }
  }
  if (redisAppendFormattedCommand(l->ctx, l->buf, used) != REDIS_OK)
    return FO_ENOMEM;
  return FO_OK;
}

/* Counts and logs a decision Redis did not make (a foreign value under
 * the op's key, out of memory): the op gets the fallback, the batch goes
 * on. */
static void limits_refused(fo_limiter *l, fo_limit_op *op, const char *why) {
  fo_counter_add(l->errors, 1);
  fo_log_rl(&l->rl_reply, LIMITS_LOG_MS, FO_LOG_WARN, LIMITS_MOD,
            "redis refused a decision", "err=\"%s\"", why);
  limits_fallback(l, op);
}

/* Reads one op's pair of reply entries into its result. */
static void limits_read_op(fo_limiter *l, fo_limit_op *op,
                           const redisReply *c, const redisReply *v) {
  if (c->type == REDIS_REPLY_INTEGER && v->type == REDIS_REPLY_INTEGER) {
    long long n = v->integer;

    op->retry_after_ms = 0;
    switch (c->integer) {
    case LIMITS_R_PASS:
      op->result = FO_LIMIT_PASS;
      return;
    case LIMITS_R_CAPPED:
      if (op->kind == FO_LIMIT_RATE) {
        op->result = FO_LIMIT_THROTTLED;
        op->retry_after_ms = 1000 - (op->now_ms % 1000 + 1000) % 1000;
        return;
      }
      op->result = FO_LIMIT_CAPPED;
      return;
    case LIMITS_R_DUP:
      op->result = FO_LIMIT_DUPLICATE;
      return;
    case LIMITS_R_BUSY:
      /* A claim key without a TTL was not written by us; assume it
       * holds as long as ours would. */
      op->result = FO_LIMIT_BUSY;
      op->retry_after_ms = n > 0 ? n : op->claim_ms;
      return;
    default:
      break;
    }
  } else if (c->type == REDIS_REPLY_INTEGER &&
             c->integer == LIMITS_R_ERROR &&
             v->type == REDIS_REPLY_STRING) {
    limits_refused(l, op, v->str);
    return;
  }
  limits_refused(l, op, "unexpected reply");
}

/* Reads the reply of one call into the results of ops[idx[0..cnt)].
 * Returns true when the script was missing (NOSCRIPT): the call did not
 * run at all, so every op of it must be sent again. */
static bool limits_read(fo_limiter *l, fo_limit_op *ops, const size_t *idx,
                        size_t cnt, const redisReply *r) {
  const char *why = "unexpected reply";

  if (r->type == REDIS_REPLY_ERROR &&
      strncmp(r->str, "NOSCRIPT", 8) == 0)
    return true;
  if (r->type == REDIS_REPLY_ARRAY && r->elements == 2 * cnt) {
    for (size_t j = 0; j < cnt; j++)
      limits_read_op(l, &ops[idx[j]], r->element[2 * j],
                     r->element[2 * j + 1]);
    return false;
  }
  /* The whole call was refused (out of memory, a busy script): none of
   * its ops was decided. */
  if (r->type == REDIS_REPLY_ERROR)
    why = r->str;
  for (size_t j = 0; j < cnt; j++)
    limits_refused(l, &ops[idx[j]], why);
  return false;
}

/*
 * Sends ops[idx[0..*m)] as one pipeline of script calls and reads every
 * reply. Each call is written as soon as it is built, so that Redis works
 * on it while the next is being built. On return idx[0..*m) lists the ops
 * of the calls that met NOSCRIPT. When the connection fails, every op
 * without an answer gets the fallback, *m is 0, and the result is FO_EIO
 * (FO_ENOMEM when the pipeline could not be built). Lock held.
 */
static int limits_run(fo_limiter *l, fo_limit_op *ops, size_t *idx,
                      size_t *m) {
  size_t n = *m, keep = 0, i = 0, j, cnt;
  int rc = FO_EIO;
  const char *why = "";

  for (j = 0; j < n; j += cnt) {
    cnt = n - j < LIMITS_CHUNK ? n - j : LIMITS_CHUNK;
    if (limits_append(l, ops, idx + j, cnt) != FO_OK) {
      /* hiredis leaves its context unusable after running out of
       * memory: drop the connection. Calls written before may have run,
       * as when a connection breaks mid-batch; their ops get the
       * fallback all the same. */
      rc = FO_ENOMEM;
      why = "out of memory";
      goto broken;
    }
    if (limits_flush(l->ctx) != REDIS_OK) {
      why = limits_ctx_err(l->ctx);
      goto broken;
    }
  }
  for (i = 0; i < n; i += cnt) {
    void *r = NULL;

    cnt = n - i < LIMITS_CHUNK ? n - i : LIMITS_CHUNK;
    if (redisGetReply(l->ctx, &r) != REDIS_OK) {
      why = limits_ctx_err(l->ctx);
      goto broken;
    }
    if (limits_read(l, ops, idx + i, cnt, r)) {
      /* keep <= i: the list is compacted in place. */
      memmove(idx + keep, idx + i, cnt * sizeof(*idx));
      keep += cnt;
    }
    freeReplyObject(r);
  }
  *m = keep;
  return FO_OK;

broken:
  limits_mark_down(l, why);
  for (j = 0; j < keep; j++)
    limits_fallback(l, &ops[idx[j]]);
  for (j = i; j < n; j++)
    limits_fallback(l, &ops[idx[j]]);
  *m = 0;
  return rc;
}

/* Loads the script again after Redis lost it (SCRIPT FLUSH, restart
 * without persistence of scripts, failover). Lock held. */
static int limits_reload(fo_limiter *l) {
  const char *argv[] = {"SCRIPT", "LOAD", limits_script, NULL};
  redisReply *r = limits_command(l->ctx, 3, argv, NULL);

  if (r == NULL) {
    limits_mark_down(l, limits_ctx_err(l->ctx));
    return FO_EIO;
  }
  if (r->type != REDIS_REPLY_STRING || r->len != LIMITS_SHA_LEN) {
    fo_log_rl(&l->rl_reply, LIMITS_LOG_MS, FO_LOG_WARN, LIMITS_MOD,
              "redis refused the script", "err=\"%s\"",
              r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
    freeReplyObject(r);
    return FO_EIO;
  }
  memcpy(l->sha, r->str, LIMITS_SHA_LEN);
  freeReplyObject(r);
  fo_log_info(LIMITS_MOD, "redis script reloaded", "host=%s port=%d",
              l->host, l->port);
  return FO_OK;
}

int fo_limiter_decide(fo_limiter *l, fo_limit_op *ops, size_t n) {
  size_t m = 0;
  int rc = FO_OK;

  if (l == NULL || (ops == NULL && n > 0))
    return FO_EINVAL;
  for (size_t i = 0; i < n; i++) {
    if (!limits_op_valid(&ops[i]))
      return FO_EINVAL;
  }

  /* A cap without a period needs no count. */
  for (size_t i = 0; i < n; i++) {
    if (ops[i].kind == FO_LIMIT_CAP && ops[i].cap.per == FO_CAP_NONE) {
      ops[i].result = FO_LIMIT_PASS;
      ops[i].retry_after_ms = 0;
    } else {
      m++;
    }
  }
  if (m == 0)
    return FO_OK;

  pthread_mutex_lock(&l->lock);
  if (m > l->idx_cap) {
    size_t *idx = realloc(l->idx, m * sizeof(*idx));

    if (idx == NULL) {
      rc = FO_ENOMEM;
      goto out;
    }
    l->idx = idx;
    l->idx_cap = m;
  }
  m = 0;
  for (size_t i = 0; i < n; i++) {
    if (ops[i].kind != FO_LIMIT_CAP || ops[i].cap.per != FO_CAP_NONE)
      l->idx[m++] = i;
  }

  if (!limits_ensure_up(l)) {
    for (size_t i = 0; i < m; i++)
      limits_fallback(l, &ops[l->idx[i]]);
    rc = FO_EIO;
    goto out;
  }

  /* Only the calls that met NOSCRIPT go again: Redis ran none of their
   * ops, so none is counted twice. */
  for (int attempt = 0; attempt < 2 && m > 0; attempt++) {
    if (attempt > 0 && (rc = limits_reload(l)) != FO_OK)
      break;
    rc = limits_run(l, ops, l->idx, &m);
    if (rc != FO_OK)
      break;
  }
  if (m > 0) {
    for (size_t i = 0; i < m; i++)
      limits_fallback(l, &ops[l->idx[i]]);
    /* The script went missing twice in a row, or Redis refused to load
     * it: Redis is reachable, so the other results stand. */
    if (l->ctx != NULL) {
      fo_counter_add(l->errors, 1);
      rc = FO_OK;
    }
  }

out:
  pthread_mutex_unlock(&l->lock);
  return rc;
}
