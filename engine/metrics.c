/* SPDX-License-Identifier: MIT */
/*
 * The process-wide metrics registry. Families (one per metric name) and
 * their series live in two append-only linked lists under one mutex that
 * only registration, rendering and reset take; a registered series never
 * moves, so hot paths update it through its pointer with relaxed atomics
 * and no lock. Registration is rare (mostly at start), so lookups walk the
 * lists rather than hash.
 */
#include "metrics.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "fanout/common.h"

typedef enum fo_metrics_type {
  FO_METRIC_COUNTER,
  FO_METRIC_GAUGE,
  FO_METRIC_HISTOGRAM
} fo_metrics_type;

/* Finite bucket bounds in microseconds; one more bucket holds +Inf. */
static const uint64_t fo_metrics_bounds_us[] = {
  50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000,
  250000, 500000, 1000000, 2500000, 5000000, 10000000, 30000000, 60000000
};

#define FO_METRICS_NBOUNDS \
  (sizeof(fo_metrics_bounds_us) / sizeof(fo_metrics_bounds_us[0]))
#define FO_METRICS_NBUCKETS (FO_METRICS_NBOUNDS + 1)

struct fo_counter {
  atomic_uint_fast64_t value;
};

struct fo_gauge {
  atomic_int_fast64_t value;
};

/* Buckets are not cumulative; the count is their sum, so a render always
 * shows a +Inf bucket equal to _count. */
struct fo_histogram {
  atomic_uint_fast64_t buckets[FO_METRICS_NBUCKETS];
  atomic_uint_fast64_t sum_us;
};

typedef struct fo_metrics_series {
  struct fo_metrics_series *next;
  union {
    struct fo_counter counter;
    struct fo_gauge gauge;
    struct fo_histogram histogram;
  } u;
  char labels[];        /* "" when the series has none */
} fo_metrics_series;

typedef struct fo_metrics_family {
  struct fo_metrics_family *next;
  fo_metrics_type type;
  fo_metrics_series *series;
  fo_metrics_series *series_tail;
  char *help;           /* points into the same allocation; may be "" */
  char name[];
} fo_metrics_family;

static pthread_mutex_t fo_metrics_mu = PTHREAD_MUTEX_INITIALIZER;
static fo_metrics_family *fo_metrics_head;
static fo_metrics_family *fo_metrics_tail;

static bool fo_metrics_name_ok(const char *name) {
  if (name == NULL || name[0] == '\0') {
    return false;
  }
  for (const char *p = name; *p != '\0'; p++) {
    char c = *p;
    bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                 c == '_' || c == ':';

    if (!alpha && !(p != name && c >= '0' && c <= '9')) {
      return false;
    }
  }
  return true;
}

/*
 * Checks that `labels` is a comma-separated list of name="value" pairs
 * with Prometheus escapes, since it is written into the exposition as is
 * and one malformed series would make the whole scrape fail.
 */
static bool fo_metrics_labels_ok(const char *labels) {
  const char *p = labels;

  while (*p != '\0') {
    const char *start = p;

    while ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
           *p == '_' || (p != start && *p >= '0' && *p <= '9')) {
      p++;
    }
    if (p == start || p[0] != '=' || p[1] != '"') {
      return false;
    }
    for (p += 2; *p != '"'; p++) {
      if (*p == '\0' || *p == '\n') {
        return false;
      }
      if (*p == '\\') {
        p++;
        if (*p != '\\' && *p != '"' && *p != 'n') {
          return false;
        }
      }
    }
    p++;
    if (*p == ',') {
      p++;
      if (*p == '\0') {
        return false;
      }
    } else if (*p != '\0') {
      return false;
    }
  }
  return true;
}

/* Called locked. */
static fo_metrics_family *fo_metrics_family_get(const char *name,
                                                const char *help,
                                                fo_metrics_type type) {
  fo_metrics_family *f;
  size_t name_len;
  size_t help_len;

  for (f = fo_metrics_head; f != NULL; f = f->next) {
    if (strcmp(f->name, name) == 0) {
      /* One name is one type; asking for another is refused. */
      return f->type == type ? f : NULL;
    }
  }

  name_len = strlen(name);
  help_len = help != NULL ? strlen(help) : 0;
  f = calloc(1, sizeof(*f) + name_len + 1 + help_len + 1);
  if (f == NULL) {
    return NULL;
  }
  f->type = type;
  memcpy(f->name, name, name_len + 1);
  f->help = f->name + name_len + 1;
  if (help_len > 0) {
    memcpy(f->help, help, help_len);
  }
  f->help[help_len] = '\0';

  if (fo_metrics_tail != NULL) {
    fo_metrics_tail->next = f;
  } else {
    fo_metrics_head = f;
  }
  fo_metrics_tail = f;
  return f;
}

static fo_metrics_series *fo_metrics_get(const char *name, const char *help,
                                         const char *labels,
                                         fo_metrics_type type) {
  fo_metrics_family *f;
  fo_metrics_series *s = NULL;
  size_t labels_len;

  if (labels == NULL) {
    labels = "";
  }
  if (!fo_metrics_name_ok(name) || !fo_metrics_labels_ok(labels)) {
    return NULL;
  }

  pthread_mutex_lock(&fo_metrics_mu);
  f = fo_metrics_family_get(name, help, type);
  if (f == NULL) {
    goto out;
  }
  for (s = f->series; s != NULL; s = s->next) {
    if (strcmp(s->labels, labels) == 0) {
      goto out;
    }
  }
  labels_len = strlen(labels);
  s = calloc(1, sizeof(*s) + labels_len + 1);
  if (s == NULL) {
    goto out;
  }
  memcpy(s->labels, labels, labels_len + 1);
  if (f->series_tail != NULL) {
    f->series_tail->next = s;
  } else {
    f->series = s;
  }
  f->series_tail = s;

out:
  pthread_mutex_unlock(&fo_metrics_mu);
  return s;
}

fo_counter *fo_metrics_counter(const char *name, const char *help,
                               const char *labels) {
  fo_metrics_series *s = fo_metrics_get(name, help, labels,
                                        FO_METRIC_COUNTER);

  return s != NULL ? &s->u.counter : NULL;
}

fo_gauge *fo_metrics_gauge(const char *name, const char *help,
                           const char *labels) {
  fo_metrics_series *s = fo_metrics_get(name, help, labels, FO_METRIC_GAUGE);

  return s != NULL ? &s->u.gauge : NULL;
}

fo_histogram *fo_metrics_histogram(const char *name, const char *help,
                                   const char *labels) {
  fo_metrics_series *s = fo_metrics_get(name, help, labels,
                                        FO_METRIC_HISTOGRAM);

  return s != NULL ? &s->u.histogram : NULL;
}

void fo_counter_add(fo_counter *c, uint64_t n) {
  if (c != NULL) {
    atomic_fetch_add_explicit(&c->value, n, memory_order_relaxed);
  }
}

uint64_t fo_counter_value(const fo_counter *c) {
  if (c == NULL) {
    return 0;
  }
  return atomic_load_explicit(&c->value, memory_order_relaxed);
}

void fo_gauge_set(fo_gauge *g, int64_t v) {
  if (g != NULL) {
    atomic_store_explicit(&g->value, v, memory_order_relaxed);
  }
}

void fo_gauge_add(fo_gauge *g, int64_t delta) {
  if (g != NULL) {
    atomic_fetch_add_explicit(&g->value, delta, memory_order_relaxed);
  }
}

int64_t fo_gauge_value(const fo_gauge *g) {
  if (g == NULL) {
    return 0;
  }
  return atomic_load_explicit(&g->value, memory_order_relaxed);
}

void fo_histogram_observe_us(fo_histogram *h, int64_t us) {
  uint64_t v;
  size_t i = 0;

  if (h == NULL) {
    return;
  }
  /* A clock step can make a duration negative; count it as zero. */
  v = us > 0 ? (uint64_t)us : 0;
  while (i < FO_METRICS_NBOUNDS && v > fo_metrics_bounds_us[i]) {
    i++;
  }
  atomic_fetch_add_explicit(&h->buckets[i], 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&h->sum_us, v, memory_order_relaxed);
}

/* Copies the bucket counts and returns their total. */
static uint64_t fo_histogram_snapshot(const fo_histogram *h,
                                      uint64_t b[FO_METRICS_NBUCKETS]) {
  uint64_t total = 0;

  for (size_t i = 0; i < FO_METRICS_NBUCKETS; i++) {
    b[i] = atomic_load_explicit(&h->buckets[i], memory_order_relaxed);
    total += b[i];
  }
  return total;
}

uint64_t fo_histogram_count(const fo_histogram *h) {
  uint64_t b[FO_METRICS_NBUCKETS];

  if (h == NULL) {
    return 0;
  }
  return fo_histogram_snapshot(h, b);
}

int64_t fo_histogram_quantile_us(const fo_histogram *h, double q) {
  uint64_t b[FO_METRICS_NBUCKETS];
  uint64_t total;
  uint64_t rank;
  uint64_t cum = 0;
  double want;

  if (h == NULL || !(q > 0.0)) {
    return 0;
  }
  total = fo_histogram_snapshot(h, b);
  if (total == 0) {
    return 0;
  }
  /* The rank of the observation that holds the quantile, 1-based. */
  want = q * (double)total;
  rank = want >= (double)total ? total : (uint64_t)want;
  if ((double)rank < want) {
    rank++;
  }
  if (rank == 0) {
    rank = 1;
  }
  for (size_t i = 0; i < FO_METRICS_NBOUNDS; i++) {
    cum += b[i];
    if (cum >= rank) {
      return (int64_t)fo_metrics_bounds_us[i];
    }
  }
  return (int64_t)fo_metrics_bounds_us[FO_METRICS_NBOUNDS - 1];
}

/* A growable output buffer; `failed` sticks after the first error. */
/* HELP text escapes only backslash and newline. */
static void fo_metrics_put_help(fo_buf *b, const char *help) {
  for (const char *p = help; *p != '\0'; p++) {
    if (*p == '\\') {
      fo_buf_appendf(b, "\\\\");
    } else if (*p == '\n') {
      fo_buf_appendf(b, "\\n");
    } else {
      fo_buf_appendf(b, "%c", *p);
    }
  }
}

/*
 * Writes microseconds as seconds in plain decimal ("0.00005", "2.5",
 * "60"), exactly, without going through a double.
 */
static void fo_metrics_fmt_seconds(char out[32], uint64_t us) {
  uint64_t whole = us / 1000000u;
  uint64_t frac = us % 1000000u;
  int n;

  if (frac == 0) {
    snprintf(out, 32, "%" PRIu64, whole);
    return;
  }
  n = snprintf(out, 32, "%" PRIu64 ".%06" PRIu64, whole, frac);
  while (n > 0 && out[n - 1] == '0') {
    out[--n] = '\0';
  }
}

static void fo_metrics_put_histogram(fo_buf *b, const char *name,
                                     const fo_metrics_series *s) {
  uint64_t bk[FO_METRICS_NBUCKETS];
  uint64_t cum = 0;
  uint64_t total = fo_histogram_snapshot(&s->u.histogram, bk);
  const char *sep = s->labels[0] != '\0' ? "," : "";
  char num[32];

  for (size_t i = 0; i < FO_METRICS_NBUCKETS; i++) {
    cum += bk[i];
    if (i < FO_METRICS_NBOUNDS) {
      fo_metrics_fmt_seconds(num, fo_metrics_bounds_us[i]);
    } else {
      snprintf(num, sizeof(num), "+Inf");
    }
    fo_buf_appendf(b, "%s_bucket{%s%sle=\"%s\"} %" PRIu64 "\n", name,
                      s->labels, sep, num, cum);
  }
  fo_metrics_fmt_seconds(num, atomic_load_explicit(&s->u.histogram.sum_us,
                                                   memory_order_relaxed));
  if (s->labels[0] != '\0') {
    fo_buf_appendf(b, "%s_sum{%s} %s\n", name, s->labels, num);
    fo_buf_appendf(b, "%s_count{%s} %" PRIu64 "\n", name, s->labels,
                      total);
  } else {
    fo_buf_appendf(b, "%s_sum %s\n%s_count %" PRIu64 "\n", name, num,
                      name, total);
  }
}

static void fo_metrics_put_series(fo_buf *b,
                                  const fo_metrics_family *f,
                                  const fo_metrics_series *s) {
  const char *open = s->labels[0] != '\0' ? "{" : "";
  const char *close = s->labels[0] != '\0' ? "}" : "";

  switch (f->type) {
  case FO_METRIC_COUNTER:
    fo_buf_appendf(b, "%s%s%s%s %" PRIu64 "\n", f->name, open, s->labels,
                      close, fo_counter_value(&s->u.counter));
    break;
  case FO_METRIC_GAUGE:
    fo_buf_appendf(b, "%s%s%s%s %" PRId64 "\n", f->name, open, s->labels,
                      close, fo_gauge_value(&s->u.gauge));
    break;
  case FO_METRIC_HISTOGRAM:
    fo_metrics_put_histogram(b, f->name, s);
    break;
  }
}

static const char *fo_metrics_type_name(fo_metrics_type t) {
  switch (t) {
  case FO_METRIC_COUNTER:
    return "counter";
  case FO_METRIC_GAUGE:
    return "gauge";
  case FO_METRIC_HISTOGRAM:
    return "histogram";
  }
  return "untyped";
}

int fo_metrics_render(char **out, size_t *len) {
  fo_buf b = FO_BUF_INIT;
  char *text;

  if (out == NULL || len == NULL) {
    return FO_EINVAL;
  }

  pthread_mutex_lock(&fo_metrics_mu);
  for (const fo_metrics_family *f = fo_metrics_head; f != NULL;
       f = f->next) {
    /* A family with no help text gets no HELP line rather than an
     * empty one. */
    if (f->help[0] != '\0') {
      fo_buf_appendf(&b, "# HELP %s ", f->name);
      fo_metrics_put_help(&b, f->help);
      fo_buf_appendf(&b, "\n");
    }
    fo_buf_appendf(&b, "# TYPE %s %s\n", f->name,
                      fo_metrics_type_name(f->type));
    for (const fo_metrics_series *s = f->series; s != NULL; s = s->next) {
      fo_metrics_put_series(&b, f, s);
    }
  }
  pthread_mutex_unlock(&fo_metrics_mu);

  text = fo_buf_take(&b, len);
  if (text == NULL) {
    return FO_ENOMEM;
  }
  *out = text;
  return FO_OK;
}

void fo_metrics_reset(void) {
  fo_metrics_family *f;

  pthread_mutex_lock(&fo_metrics_mu);
  f = fo_metrics_head;
  fo_metrics_head = NULL;
  fo_metrics_tail = NULL;
  while (f != NULL) {
    fo_metrics_family *fnext = f->next;
    fo_metrics_series *s = f->series;

    while (s != NULL) {
      fo_metrics_series *snext = s->next;

      free(s);
      s = snext;
    }
    free(f);
    f = fnext;
  }
  pthread_mutex_unlock(&fo_metrics_mu);
}
