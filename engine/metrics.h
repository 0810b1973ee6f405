/* SPDX-License-Identifier: MIT */
/*
 * In-process metrics: counters and latency histograms, each a named series
 * with an optional fixed label set, rendered in the Prometheus text
 * exposition format for the admin API's GET /metrics.
 *
 * Series are registered once (usually at start) and never freed before
 * fo_metrics_reset(); updating one is a few relaxed atomic operations, so
 * hot paths may update from any thread.
 */
#ifndef FO_METRICS_H
#define FO_METRICS_H

#include <stddef.h>
#include <stdint.h>

typedef struct fo_counter fo_counter;
typedef struct fo_gauge fo_gauge;
typedef struct fo_histogram fo_histogram;

/*
 * Returns the series `name{labels}`, registering it on first use; the
 * same name and labels give the same pointer. `labels` is NULL or the
 * inside of the braces, e.g. "channel=\"push\",status=\"sent\"". `help`
 * is used by the first registration of `name`. Returns NULL only when out
 * of memory, and the update functions accept NULL and do nothing, so a
 * failed registration never crashes a hot path.
 */
fo_counter *fo_metrics_counter(const char *name, const char *help,
                               const char *labels);
fo_gauge *fo_metrics_gauge(const char *name, const char *help,
                           const char *labels);
fo_histogram *fo_metrics_histogram(const char *name, const char *help,
                                   const char *labels);

void fo_counter_add(fo_counter *c, uint64_t n);
uint64_t fo_counter_value(const fo_counter *c);

void fo_gauge_set(fo_gauge *g, int64_t v);
void fo_gauge_add(fo_gauge *g, int64_t delta);
int64_t fo_gauge_value(const fo_gauge *g);

/*
 * Records one observation in microseconds. Buckets are fixed: 50 us to
 * 60 s, about four per power of ten, rendered in seconds.
 */
void fo_histogram_observe_us(fo_histogram *h, int64_t us);
uint64_t fo_histogram_count(const fo_histogram *h);

/*
 * Estimates the q-quantile (0 < q < 1) in microseconds from the buckets
 * (upper bound of the bucket that holds it); 0 when empty.
 */
int64_t fo_histogram_quantile_us(const fo_histogram *h, double q);

/*
 * Renders every series in Prometheus text format (# HELP, # TYPE, then
 * the samples; histograms as _bucket{le=...}, _sum, _count). Returns FO_OK
 * and sets *out to a NUL-terminated string the caller frees with free(),
 * and *len to its length; or FO_ENOMEM.
 */
int fo_metrics_render(char **out, size_t *len);

/* Drops every series; for tests only, with no other thread using them. */
void fo_metrics_reset(void);

#endif /* FO_METRICS_H */
