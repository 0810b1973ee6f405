/* SPDX-License-Identifier: MIT */
/*
 * The delivery log writer. Outcomes are copied into a bounded ring and a
 * thread of its own writes them in batches, each one INSERT ... SELECT
 * FROM unnest() over array parameters, so a batch of any size is one
 * round trip with one constant statement. When the database is down the
 * ring keeps the newest records and the writer retries with backoff.
 */
#include "store_priv.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fanout/common.h"
#include "log.h"
#include "metrics.h"

#define FLUSH_AT 500            /* records that wake the writer early */
#define FLUSH_EVERY_MS 100
#define BATCH_MAX 2000          /* rows per statement */
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000

/* One outcome; the four strings share one allocation at `event_id`. */
typedef struct rec {
  char *event_id;
  char *user;
  char *reason;                 /* NULL when none */
  char *provider_id;            /* NULL when none */
  uint32_t attempts;
  uint8_t channel;
  uint8_t status;
} rec;

struct fo_dlog {
  fo_store *s;
  pthread_mutex_t mu;
  pthread_cond_t wake;          /* the writer waits here */
  pthread_cond_t idle;          /* flushers wait here */
  rec *ring;
  size_t cap;
  size_t head;
  size_t len;
  bool busy;                    /* a batch is out of the ring */
  bool flush_req;
  bool stop;
  pthread_t thread;
  fo_counter *m_written;
  fo_counter *m_batches;
  fo_counter *m_dropped;
};

static fo_ratelimit rl_down;
static fo_ratelimit rl_bad;
static fo_ratelimit rl_drop;

static const char sql_batch[] =
    "INSERT INTO delivery_log"
    " (event_id, user_id, channel, status, reason, attempts, provider_id)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],"
    "  $5::text[], $6::int[], $7::text[])"
    " ON CONFLICT (event_id, user_id, channel) DO UPDATE SET"
    "  status = EXCLUDED.status, reason = EXCLUDED.reason,"
    "  attempts = EXCLUDED.attempts,"
    "  provider_id = COALESCE(EXCLUDED.provider_id,"
    "   delivery_log.provider_id),"
    "  updated_at = now()";

/* ---- strings and array literals ---- */

void fo_pg_array_open(fo_buf *b) {
  fo_buf_append(b, "{", 1);
}

void fo_pg_array_elem(fo_buf *b, const char *v) {
  if (b->len > 0 && b->p[b->len - 1] != '{')
    fo_buf_append(b, ",", 1);
  if (v == NULL) {
    fo_buf_append(b, "NULL", 4);
    return;
  }
  fo_buf_append(b, "\"", 1);
  while (*v != '\0') {
    size_t run = strcspn(v, "\"\\");

    fo_buf_append(b, v, run);
    v += run;
    if (*v == '\0')
      break;
    fo_buf_append(b, "\\", 1);
    fo_buf_append(b, v, 1);
    v++;
  }
  fo_buf_append(b, "\"", 1);
}

void fo_pg_array_close(fo_buf *b) {
  fo_buf_append(b, "}", 1);
}

/*
 * Length of the valid UTF-8 sequence at s, or 0. A reason cut to fit a
 * fixed buffer can end inside a character, and one bad byte would make
 * PostgreSQL refuse the whole batch.
 */
static size_t utf8_len(const unsigned char *s) {
  size_t n;
  unsigned min;
  unsigned cp;

  if (s[0] < 0x80)
    return 1;
  if (s[0] >= 0xc2 && s[0] <= 0xdf) {
    n = 2;
    cp = s[0] & 0x1f;
    min = 0x80;
  } else if (s[0] >= 0xe0 && s[0] <= 0xef) {
    n = 3;
    cp = s[0] & 0x0f;
    min = 0x800;
  } else if (s[0] >= 0xf0 && s[0] <= 0xf4) {
    n = 4;
    cp = s[0] & 0x07;
    min = 0x10000;
  } else {
    return 0;
  }
  for (size_t i = 1; i < n; i++) {
    if ((s[i] & 0xc0) != 0x80)
      return 0;
    cp = (cp << 6) | (s[i] & 0x3f);
  }
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
    return 0;
  return n;
}

/* Copies `v` to `dst` with each invalid UTF-8 byte replaced by '?';
 * returns the byte after the copy's NUL. */
static char *copy_utf8(char *dst, const char *v) {
  const unsigned char *s = (const unsigned char *)v;

  while (*s != '\0') {
    size_t n = utf8_len(s);

    if (n == 0) {
      *dst++ = '?';
      s++;
      continue;
    }
    memcpy(dst, s, n);
    dst += n;
    s += n;
  }
  *dst++ = '\0';
  return dst;
}

/* ---- the ring ---- */

static rec *at(fo_dlog *l, size_t i) {
  return &l->ring[(l->head + i) % l->cap];
}

static void rec_free(rec *r) {
  free(r->event_id);
}

static void drop_oldest_locked(fo_dlog *l) {
  rec_free(at(l, 0));
  l->head = (l->head + 1) % l->cap;
  l->len--;
  fo_counter_add(l->m_dropped, 1);
}

static void log_drops(size_t n, const char *why) {
  fo_log_rl(&rl_drop, 5000, FO_LOG_WARN, FO_STORE_MOD,
            "delivery log records dropped", "count=%zu why=%s", n, why);
}

void fo_dlog_record(fo_dlog *l, const char *event_id, const char *user,
                    fo_channel_kind channel, fo_status status,
                    const char *reason, uint32_t attempts,
                    const char *provider_id) {
  size_t ne, nu, nr = 0, np = 0;
  char *mem, *p;
  rec r;

  if (event_id == NULL || user == NULL)
    return;
  /* An empty reason or provider id is none. */
  if (reason != NULL && reason[0] == '\0')
    reason = NULL;
  if (provider_id != NULL && provider_id[0] == '\0')
    provider_id = NULL;
  ne = strlen(event_id) + 1;
  nu = strlen(user) + 1;
  if (reason != NULL)
    nr = strlen(reason) + 1;
  if (provider_id != NULL)
    np = strlen(provider_id) + 1;
  mem = malloc(ne + nu + nr + np);
  if (mem == NULL) {
    fo_counter_add(l->m_dropped, 1);
    log_drops(1, "out_of_memory");
    return;
  }
  r.event_id = mem;
  r.user = copy_utf8(mem, event_id);
  p = copy_utf8(r.user, user);
  r.reason = reason != NULL ? p : NULL;
  if (reason != NULL)
    p = copy_utf8(p, reason);
  r.provider_id = provider_id != NULL ? p : NULL;
  if (provider_id != NULL)
    copy_utf8(p, provider_id);
  /* The column is a PostgreSQL int. */
  r.attempts = attempts > INT32_MAX ? INT32_MAX : attempts;
  r.channel = (uint8_t)channel;
  r.status = (uint8_t)status;

  pthread_mutex_lock(&l->mu);
  if (l->len == l->cap) {
    drop_oldest_locked(l);
    log_drops(1, "queue_full");
  }
  *at(l, l->len) = r;
  l->len++;
  if (l->len >= FLUSH_AT)
    pthread_cond_signal(&l->wake);
  pthread_mutex_unlock(&l->mu);
}

/* Puts a batch that could not be written back at the front, oldest
 * first out when the ring is short of room. */
static void requeue_locked(fo_dlog *l, rec *batch, size_t n) {
  size_t room = l->cap - l->len, skip = n > room ? n - room : 0;

  for (size_t i = 0; i < skip; i++)
    rec_free(&batch[i]);
  if (skip > 0) {
    fo_counter_add(l->m_dropped, skip);
    log_drops(skip, "database_down");
  }
  for (size_t i = n; i > skip; i--) {
    l->head = (l->head + l->cap - 1) % l->cap;
    l->len++;
    *at(l, 0) = batch[i - 1];
  }
}

/* ---- writing ---- */

static int cmp_key(const rec *a, const rec *b) {
  int c = strcmp(a->event_id, b->event_id);

  if (c == 0)
    c = strcmp(a->user, b->user);
  if (c == 0)
    c = (int)a->channel - (int)b->channel;
  return c;
}

static int cmp_idx(const void *pa, const void *pb, void *base) {
  const rec *batch = base;
  size_t a = *(const size_t *)pa, b = *(const size_t *)pb;
  int c = cmp_key(&batch[a], &batch[b]);

  if (c != 0)
    return c;
  return a < b ? -1 : a > b;
}

/*
 * ON CONFLICT cannot touch one row twice in a statement, and a batch may
 * hold two outcomes of one delivery (deferred, then sent): keep the
 * later. Fills `keep` with the indexes to write; returns how many.
 */
static size_t collapse(const rec *batch, size_t n, size_t *keep) {
  size_t k = 0;

  for (size_t i = 0; i < n; i++)
    keep[i] = i;
  qsort_r(keep, n, sizeof(*keep), cmp_idx, (void *)batch);
  for (size_t i = 0; i < n; i++) {
    if (i + 1 < n && cmp_key(&batch[keep[i]], &batch[keep[i + 1]]) == 0)
      continue;
    keep[k++] = keep[i];
  }
  return k;
}

/* One statement for the rows batch[idx[0..n)], counted as a batch when
 * it succeeds. */
static int write_rows(fo_dlog *l, PGconn *c, const rec *batch,
                      const size_t *idx, size_t n) {
  fo_buf a[7] = {{0}};
  const char *params[7];
  int rc = FO_OK;

  for (int k = 0; k < 7; k++)
    fo_pg_array_open(&a[k]);
  for (size_t i = 0; i < n; i++) {
    const rec *r = &batch[idx[i]];
    char num[16];

    snprintf(num, sizeof(num), "%u", (unsigned)r->attempts);
    fo_pg_array_elem(&a[0], r->event_id);
    fo_pg_array_elem(&a[1], r->user);
    fo_pg_array_elem(&a[2], fo_channel_name((fo_channel_kind)r->channel));
    fo_pg_array_elem(&a[3], fo_status_name((fo_status)r->status));
    fo_pg_array_elem(&a[4], r->reason);
    fo_pg_array_elem(&a[5], num);
    fo_pg_array_elem(&a[6], r->provider_id);
  }
  for (int k = 0; k < 7; k++) {
    fo_pg_array_close(&a[k]);
    if (a[k].oom)
      rc = FO_ENOMEM;
    params[k] = a[k].p;
  }
  if (rc == FO_OK)
    rc = fo_pg_exec_prepared(c, "fo_dlog_batch", sql_batch, 7, params,
                             true, NULL);
  if (rc == FO_OK)
    fo_counter_add(l->m_batches, 1);
  for (int k = 0; k < 7; k++)
    fo_buf_free(&a[k]);
  return rc;
}

/*
 * Writes a batch. FO_OK when it is done with (written, or rows the
 * database refuses dropped); FO_EIO or FO_ENOMEM when it should be tried
 * again later.
 */
static int write_batch(fo_dlog *l, rec *batch, size_t n) {
  size_t *keep = malloc(n * sizeof(*keep));
  size_t k, refused = 0;
  PGconn *c;
  int rc;

  if (keep == NULL)
    return FO_ENOMEM;
  k = collapse(batch, n, keep);
  if ((rc = fo_pool_get(l->s, &c)) != FO_OK)
    goto out;
  rc = write_rows(l, c, batch, keep, k);
  if (rc == FO_EINVAL || rc == FO_ENOENT) {
    /* Some row is refused (a value out of range): find it by writing
     * one row at a time, so the others still land. */
    rc = FO_OK;
    for (size_t i = 0; i < k && rc == FO_OK; i++) {
      rc = write_rows(l, c, batch, &keep[i], 1);
      if (rc == FO_EINVAL || rc == FO_ENOENT) {
        refused++;
        rc = FO_OK;
      }
    }
    if (refused > 0) {
      fo_counter_add(l->m_dropped, refused);
      fo_log_rl(&rl_bad, 5000, FO_LOG_ERROR, FO_STORE_MOD,
                "delivery log refused records", "count=%zu", refused);
    }
  }
  fo_pool_put(l->s, c);
  if (rc == FO_OK)
    fo_counter_add(l->m_written, n - refused);
out:
  free(keep);
  return rc;
}

/* Waits up to `ms` with mu held. Stopping ends the wait; so do a flush
 * request and a full batch when `early` is set. */
static void wait_ms(fo_dlog *l, int ms, bool early) {
  struct timespec ts;

  clock_gettime(CLOCK_MONOTONIC, &ts);
  ts.tv_sec += ms / 1000;
  ts.tv_nsec += (long)(ms % 1000) * 1000000;
  if (ts.tv_nsec >= 1000000000) {
    ts.tv_sec++;
    ts.tv_nsec -= 1000000000;
  }
  while (!l->stop && !(early && (l->flush_req || l->len >= FLUSH_AT)) &&
         pthread_cond_timedwait(&l->wake, &l->mu, &ts) == 0)
    ;
}

static void *writer_main(void *arg) {
  fo_dlog *l = arg;
  int backoff = 0;
  rec *batch = malloc(BATCH_MAX * sizeof(*batch));

  pthread_mutex_lock(&l->mu);
  for (;;) {
    size_t n;
    int rc;

    if (backoff > 0) {
      /* The database is down: only stopping cuts the wait short. */
      wait_ms(l, backoff, false);
    } else {
      wait_ms(l, FLUSH_EVERY_MS, true);
    }
    l->flush_req = false;
    if (l->len == 0) {
      pthread_cond_broadcast(&l->idle);
      if (l->stop)
        break;
      continue;
    }
    if (batch == NULL) {
      /* Without a batch array nothing can be written; keep the ring
       * bounded and try the allocation again. */
      batch = malloc(BATCH_MAX * sizeof(*batch));
      if (batch == NULL) {
        backoff = BACKOFF_MAX_MS;
        if (l->stop)
          break;
        continue;
      }
    }
    n = l->len < BATCH_MAX ? l->len : BATCH_MAX;
    for (size_t i = 0; i < n; i++)
      batch[i] = *at(l, i);
    l->head = (l->head + n) % l->cap;
    l->len -= n;
    l->busy = true;
    pthread_mutex_unlock(&l->mu);

    rc = write_batch(l, batch, n);

    pthread_mutex_lock(&l->mu);
    l->busy = false;
    if (rc == FO_OK) {
      for (size_t i = 0; i < n; i++)
        rec_free(&batch[i]);
      backoff = 0;
    } else if (l->stop) {
      /* Stopping with the database away: what is left is lost. */
      for (size_t i = 0; i < n; i++)
        rec_free(&batch[i]);
      fo_counter_add(l->m_dropped, n + l->len);
      log_drops(n + l->len, "stopped_while_database_down");
      while (l->len > 0) {
        rec_free(at(l, 0));
        l->head = (l->head + 1) % l->cap;
        l->len--;
      }
    } else {
      requeue_locked(l, batch, n);
      backoff = backoff == 0 ? BACKOFF_MIN_MS
                             : (backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS
                                                             : backoff * 2);
      fo_log_rl(&rl_down, 5000, FO_LOG_WARN, FO_STORE_MOD,
                "delivery log write failed; retrying", "queued=%zu",
                l->len);
    }
    pthread_cond_broadcast(&l->idle);
  }
  pthread_mutex_unlock(&l->mu);
  free(batch);
  return NULL;
}

int fo_dlog_start(fo_store *s, size_t capacity, fo_dlog **out) {
  pthread_condattr_t ca;
  fo_dlog *l;

  if (s == NULL || capacity == 0)
    return FO_EINVAL;
  l = calloc(1, sizeof(*l));
  if (l == NULL)
    return FO_ENOMEM;
  l->ring = malloc(capacity * sizeof(*l->ring));
  if (l->ring == NULL) {
    free(l);
    return FO_ENOMEM;
  }
  l->s = s;
  l->cap = capacity;
  pthread_mutex_init(&l->mu, NULL);
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&l->wake, &ca);
  pthread_cond_init(&l->idle, &ca);
  pthread_condattr_destroy(&ca);
  l->m_written = fo_metrics_counter("fanout_delivery_log_written_total",
                                    "Delivery log records written.", NULL);
  l->m_batches = fo_metrics_counter(
      "fanout_delivery_log_batches_total",
      "Delivery log batches written (one statement each).", NULL);
  l->m_dropped = fo_metrics_counter(
      "fanout_delivery_log_dropped_total",
      "Delivery log records dropped (queue full, or refused).", NULL);
  if (pthread_create(&l->thread, NULL, writer_main, l) != 0) {
    pthread_cond_destroy(&l->wake);
    pthread_cond_destroy(&l->idle);
    pthread_mutex_destroy(&l->mu);
    free(l->ring);
    free(l);
    return FO_ENOMEM;
  }
  *out = l;
  return FO_OK;
}

int fo_dlog_flush(fo_dlog *l, int timeout_ms) {
  struct timespec ts;
  int rc = FO_OK;

  clock_gettime(CLOCK_MONOTONIC, &ts);
  ts.tv_sec += timeout_ms / 1000;
  ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
  if (ts.tv_nsec >= 1000000000) {
    ts.tv_sec++;
    ts.tv_nsec -= 1000000000;
  }
  pthread_mutex_lock(&l->mu);
  l->flush_req = true;
  pthread_cond_signal(&l->wake);
  while (l->len > 0 || l->busy) {
    if (pthread_cond_timedwait(&l->idle, &l->mu, &ts) != 0) {
      rc = (l->len > 0 || l->busy) ? FO_ETIMEDOUT : FO_OK;
      break;
    }
  }
  pthread_mutex_unlock(&l->mu);
  return rc;
}

/* Writes what is queued (one attempt per batch), then ends the thread.
 * The store must stay open until this returns. */
void fo_dlog_stop(fo_dlog *l) {
  if (l == NULL)
    return;
  pthread_mutex_lock(&l->mu);
  l->stop = true;
  pthread_cond_signal(&l->wake);
  pthread_mutex_unlock(&l->mu);
  pthread_join(l->thread, NULL);
  if (l->len > 0) {
    fo_counter_add(l->m_dropped, l->len);
    log_drops(l->len, "stopped");
  }
  while (l->len > 0) {
    rec_free(at(l, 0));
    l->head = (l->head + 1) % l->cap;
    l->len--;
  }
  pthread_cond_destroy(&l->wake);
  pthread_cond_destroy(&l->idle);
  pthread_mutex_destroy(&l->mu);
  free(l->ring);
  free(l);
}
