/* SPDX-License-Identifier: MIT */
/*
 * Unit tests for the metrics registry: series identity, exact concurrent
 * counts, gauges, histogram buckets and quantiles, and the Prometheus text
 * rendering byte for byte.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fanout/common.h"
#include "metrics.h"

static int reset(void **state) {
  (void)state;
  fo_metrics_reset();
  return 0;
}

/* Renders the registry; the caller frees the result. */
static char *render(void) {
  char *out = NULL;
  size_t len = 0;

  assert_int_equal(fo_metrics_render(&out, &len), FO_OK);
  assert_non_null(out);
  assert_int_equal(strlen(out), len);
  return out;
}

static int count_substr(const char *hay, const char *needle) {
  int n = 0;
  size_t step = strlen(needle);

  for (const char *p = strstr(hay, needle); p != NULL;
       p = strstr(p + step, needle)) {
    n++;
  }
  return n;
}

static void test_counter_identity(void **state) {
  fo_counter *a = fo_metrics_counter("fo_sent_total", "Sent.",
                                     "channel=\"push\"");
  fo_counter *a2 = fo_metrics_counter("fo_sent_total", "Other help.",
                                      "channel=\"push\"");
  fo_counter *b = fo_metrics_counter("fo_sent_total", NULL,
                                     "channel=\"email\"");
  fo_counter *bare = fo_metrics_counter("fo_sent_total", NULL, NULL);
  fo_counter *bare2 = fo_metrics_counter("fo_sent_total", NULL, "");

  (void)state;
  assert_non_null(a);
  assert_non_null(b);
  assert_non_null(bare);
  assert_ptr_equal(a, a2);
  assert_ptr_not_equal(a, b);
  assert_ptr_not_equal(a, bare);
  assert_ptr_equal(bare, bare2);

  assert_int_equal(fo_counter_value(a), 0);
  fo_counter_add(a, 5);
  fo_counter_add(a2, 2);
  fo_counter_add(b, 1);
  assert_int_equal(fo_counter_value(a), 7);
  assert_int_equal(fo_counter_value(b), 1);
  assert_int_equal(fo_counter_value(bare), 0);
}

enum { THREADS = 4, PER_THREAD = 100000 };

static void *bump(void *arg) {
  (void)arg;
  /* Registration races too: every thread must get the same series. */
  fo_counter *c = fo_metrics_counter("fo_bumps_total", "Bumps.", NULL);
  fo_histogram *h = fo_metrics_histogram("fo_bump_seconds", "Bumps.", NULL);

  for (int i = 0; i < PER_THREAD; i++) {
    fo_counter_add(c, 1);
    fo_histogram_observe_us(h, i % 3000);
  }
  return NULL;
}

static void test_concurrent_increments(void **state) {
  pthread_t t[THREADS];
  fo_counter *c;
  fo_histogram *h;

  (void)state;
  for (int i = 0; i < THREADS; i++) {
    assert_int_equal(pthread_create(&t[i], NULL, bump, NULL), 0);
  }
  for (int i = 0; i < THREADS; i++) {
    assert_int_equal(pthread_join(t[i], NULL), 0);
  }
  c = fo_metrics_counter("fo_bumps_total", NULL, NULL);
  h = fo_metrics_histogram("fo_bump_seconds", NULL, NULL);
  assert_int_equal(fo_counter_value(c), THREADS * PER_THREAD);
  assert_int_equal(fo_histogram_count(h), THREADS * PER_THREAD);
}

static void test_gauge(void **state) {
  fo_gauge *g = fo_metrics_gauge("fo_queue_items", "Items.", NULL);
  fo_gauge *g2 = fo_metrics_gauge("fo_queue_items", NULL, NULL);

  (void)state;
  assert_non_null(g);
  assert_ptr_equal(g, g2);
  assert_int_equal(fo_gauge_value(g), 0);
  fo_gauge_set(g, 42);
  assert_int_equal(fo_gauge_value(g), 42);
  fo_gauge_add(g, -50);
  assert_int_equal(fo_gauge_value(g), -8);
  fo_gauge_add(g, 10);
  assert_int_equal(fo_gauge_value(g), 2);
  fo_gauge_set(g, INT64_MIN);
  assert_true(fo_gauge_value(g) == INT64_MIN);
}

static void test_histogram_buckets(void **state) {
  fo_histogram *h = fo_metrics_histogram("fo_h_seconds", "H.", NULL);
  char *out;

  (void)state;
  fo_histogram_observe_us(h, -5);        /* counted as 0 */
  fo_histogram_observe_us(h, 50);        /* bounds are inclusive */
  fo_histogram_observe_us(h, 51);
  fo_histogram_observe_us(h, 1000000);
  fo_histogram_observe_us(h, 60000001);  /* past the last bound */
  assert_int_equal(fo_histogram_count(h), 5);

  out = render();
  assert_non_null(strstr(out, "fo_h_seconds_bucket{le=\"0.00005\"} 2\n"));
  assert_non_null(strstr(out, "fo_h_seconds_bucket{le=\"0.0001\"} 3\n"));
  assert_non_null(strstr(out, "fo_h_seconds_bucket{le=\"0.5\"} 3\n"));
  assert_non_null(strstr(out, "fo_h_seconds_bucket{le=\"1\"} 4\n"));
  assert_non_null(strstr(out, "fo_h_seconds_bucket{le=\"60\"} 4\n"));
  assert_non_null(strstr(out, "fo_h_seconds_bucket{le=\"+Inf\"} 5\n"));
  assert_non_null(strstr(out, "fo_h_seconds_sum 61.000102\n"));
  assert_non_null(strstr(out, "fo_h_seconds_count 5\n"));
  assert_int_equal(count_substr(out, "fo_h_seconds_bucket{"), 20);
  free(out);
}

static void test_histogram_quantiles(void **state) {
  fo_histogram *h = fo_metrics_histogram("fo_q_seconds", NULL, NULL);
  fo_histogram *slow = fo_metrics_histogram("fo_slow_seconds", NULL, NULL);

  (void)state;
  assert_int_equal(fo_histogram_quantile_us(h, 0.5), 0);
  for (int i = 0; i < 90; i++) {
    fo_histogram_observe_us(h, 80);
  }
  for (int i = 0; i < 10; i++) {
    fo_histogram_observe_us(h, 3000);
  }
  assert_int_equal(fo_histogram_quantile_us(h, 0.01), 100);
  assert_int_equal(fo_histogram_quantile_us(h, 0.5), 100);
  assert_int_equal(fo_histogram_quantile_us(h, 0.9), 100);
  assert_int_equal(fo_histogram_quantile_us(h, 0.95), 5000);
  assert_int_equal(fo_histogram_quantile_us(h, 0.99), 5000);
  assert_int_equal(fo_histogram_quantile_us(h, 0.0), 0);

  /* Everything in +Inf: the answer is the last finite bound. */
  fo_histogram_observe_us(slow, 100000000);
  fo_histogram_observe_us(slow, 200000000);
  assert_int_equal(fo_histogram_quantile_us(slow, 0.5), 60000000);
  assert_int_equal(fo_histogram_quantile_us(slow, 0.99), 60000000);
}

static void test_render_exact(void **state) {
  fo_counter *push = fo_metrics_counter(
    "fo_sent_total", "Deliveries the providers accepted.",
    "channel=\"push\"");
  fo_gauge *items = fo_metrics_gauge("fo_queue_items",
                                     "Items waiting in the queue.", NULL);
  fo_counter *email = fo_metrics_counter("fo_sent_total", "Ignored.",
                                         "channel=\"email\"");
  fo_histogram *lat = fo_metrics_histogram(
    "fo_delivery_seconds", "Time from consume to outcome.",
    "channel=\"push\"");
  const char *want =
    "# HELP fo_sent_total Deliveries the providers accepted.\n"
    "# TYPE fo_sent_total counter\n"
    "fo_sent_total{channel=\"push\"} 3\n"
    "fo_sent_total{channel=\"email\"} 1\n"
    "# HELP fo_queue_items Items waiting in the queue.\n"
    "# TYPE fo_queue_items gauge\n"
    "fo_queue_items -7\n"
    "# HELP fo_delivery_seconds Time from consume to outcome.\n"
    "# TYPE fo_delivery_seconds histogram\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"0.00005\"} 0\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"0.0001\"} 1\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"0.00025\"} 1\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"0.0005\"} 1\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"0.001\"} 1\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"0.0025\"} 1\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"0.005\"} 1\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"0.01\"} 1\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"0.025\"} 1\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"0.05\"} 1\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"0.1\"} 1\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"0.25\"} 1\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"0.5\"} 1\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"1\"} 1\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"2.5\"} 2\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"5\"} 2\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"10\"} 2\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"30\"} 2\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"60\"} 2\n"
    "fo_delivery_seconds_bucket{channel=\"push\",le=\"+Inf\"} 3\n"
    "fo_delivery_seconds_sum{channel=\"push\"} 72.000075\n"
    "fo_delivery_seconds_count{channel=\"push\"} 3\n";
  char *out;

  (void)state;
  fo_counter_add(push, 3);
  fo_counter_add(email, 1);
  fo_gauge_set(items, -7);
  fo_histogram_observe_us(lat, 75);
  fo_histogram_observe_us(lat, 2000000);
  fo_histogram_observe_us(lat, 70000000);
  out = render();
  assert_string_equal(out, want);
  free(out);
}

static void test_help_type_once_per_family(void **state) {
  const char *chans[] = {"push", "email", "sms", "inapp"};
  char labels[64];
  char *out;

  (void)state;
  for (int i = 0; i < 4; i++) {
    snprintf(labels, sizeof(labels), "channel=\"%s\"", chans[i]);
    assert_non_null(fo_metrics_counter("fo_a_total", "A.", labels));
    assert_non_null(fo_metrics_histogram("fo_b_seconds", "B.", labels));
  }
  out = render();
  assert_int_equal(count_substr(out, "# HELP fo_a_total "), 1);
  assert_int_equal(count_substr(out, "# TYPE fo_a_total counter\n"), 1);
  assert_int_equal(count_substr(out, "# HELP fo_b_seconds "), 1);
  assert_int_equal(count_substr(out, "# TYPE fo_b_seconds histogram\n"), 1);
  assert_int_equal(count_substr(out, "\nfo_a_total{"), 4);
  assert_int_equal(count_substr(out, "fo_b_seconds_count{"), 4);
  /* Series stay grouped under their family, not in registration order. */
  assert_true(strstr(out, "fo_a_total{channel=\"inapp\"}") <
              strstr(out, "# TYPE fo_b_seconds"));
  free(out);
}

static void test_help_escaped_and_optional(void **state) {
  char *out;

  (void)state;
  assert_non_null(fo_metrics_counter("fo_x_total", "a\\b\nc", NULL));
  assert_non_null(fo_metrics_gauge("fo_y", NULL, NULL));
  out = render();
  assert_string_equal(out,
                      "# HELP fo_x_total a\\\\b\\nc\n"
                      "# TYPE fo_x_total counter\n"
                      "fo_x_total 0\n"
                      "# TYPE fo_y gauge\n"
                      "fo_y 0\n");
  free(out);
}

static void test_invalid_names_and_labels(void **state) {
  const char *bad_names[] = {"", "9lives", "a-b", "a b", "\xc3\xa9", "a.b"};
  const char *bad_labels[] = {
    "channel=push", "channel=\"push", "\"a\"=\"b\"", "a=\"b\",",
    "a=\"b\\q\"", "1a=\"b\"", "a=\"b\" ", "=\"b\"", "a=\"b\"c=\"d\"",
    "a=\"line\nbreak\"",
  };
  char *out;

  (void)state;
  assert_null(fo_metrics_counter(NULL, "x", NULL));
  for (size_t i = 0; i < sizeof(bad_names) / sizeof(bad_names[0]); i++) {
    assert_null(fo_metrics_counter(bad_names[i], "x", NULL));
    assert_null(fo_metrics_gauge(bad_names[i], "x", NULL));
    assert_null(fo_metrics_histogram(bad_names[i], "x", NULL));
  }
  for (size_t i = 0; i < sizeof(bad_labels) / sizeof(bad_labels[0]); i++) {
    assert_null(fo_metrics_counter("fo_ok_total", "x", bad_labels[i]));
  }
  out = render();
  assert_string_equal(out, "");
  free(out);

  assert_non_null(fo_metrics_counter("_a:b_9", NULL, NULL));
  assert_non_null(fo_metrics_counter(
    "fo_ok_total", NULL, "a=\"q\\\"\\\\\\n\",b_2=\"\",C=\"x y\""));
}

/* One name is one type. */
static void test_type_conflict_refused(void **state) {
  (void)state;
  assert_non_null(fo_metrics_counter("fo_z", NULL, NULL));
  assert_null(fo_metrics_gauge("fo_z", NULL, NULL));
  assert_null(fo_metrics_histogram("fo_z", NULL, "a=\"b\""));
}

static void test_null_safe(void **state) {
  char *out = NULL;
  size_t len = 0;

  (void)state;
  fo_counter_add(NULL, 1);
  assert_int_equal(fo_counter_value(NULL), 0);
  fo_gauge_set(NULL, 1);
  fo_gauge_add(NULL, 1);
  assert_int_equal(fo_gauge_value(NULL), 0);
  fo_histogram_observe_us(NULL, 10);
  assert_int_equal(fo_histogram_count(NULL), 0);
  assert_int_equal(fo_histogram_quantile_us(NULL, 0.5), 0);
  assert_int_equal(fo_metrics_render(NULL, &len), FO_EINVAL);
  assert_int_equal(fo_metrics_render(&out, NULL), FO_EINVAL);
  assert_null(out);
}

static void test_reset_drops_everything(void **state) {
  fo_counter *c = fo_metrics_counter("fo_r_total", NULL, NULL);
  char *out;

  (void)state;
  fo_counter_add(c, 9);
  fo_metrics_reset();
  out = render();
  assert_string_equal(out, "");
  free(out);
  c = fo_metrics_counter("fo_r_total", NULL, NULL);
  assert_int_equal(fo_counter_value(c), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup(test_counter_identity, reset),
    cmocka_unit_test_setup(test_concurrent_increments, reset),
    cmocka_unit_test_setup(test_gauge, reset),
    cmocka_unit_test_setup(test_histogram_buckets, reset),
    cmocka_unit_test_setup(test_histogram_quantiles, reset),
    cmocka_unit_test_setup(test_render_exact, reset),
    cmocka_unit_test_setup(test_help_type_once_per_family, reset),
    cmocka_unit_test_setup(test_help_escaped_and_optional, reset),
    cmocka_unit_test_setup(test_invalid_names_and_labels, reset),
    cmocka_unit_test_setup(test_type_conflict_refused, reset),
    cmocka_unit_test_setup(test_null_safe, reset),
    cmocka_unit_test_setup(test_reset_drops_everything, reset),
  };
  int rc = cmocka_run_group_tests(tests, NULL, NULL);

  fo_metrics_reset();
  return rc;
}
