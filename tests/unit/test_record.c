/* SPDX-License-Identifier: MIT */
/*
 * Unit tests for the record channel, driven through a real dispatcher and
 * queue: every delivery becomes one whole JSON line naming the event,
 * user, channel and attempt, and ends sent with a provider id; two
 * workers writing 2,000 lines at once produce 2,000 whole lines; a write
 * error is a retryable failure; submit after shutdown and an unwritable
 * path are refused.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "dispatch.h"
#include "fanout/channel.h"
#include "fanout/common.h"
#include "fanout/event.h"
#include "log.h"
#include "queue.h"
#include "record.h"

#define WAIT_MS 20000
#define MAX_OUTS 4096

/* A private directory per test, removed with its file at teardown. */
typedef struct rec_fixture {
  char dir[256];
  char path[300];
} rec_fixture;

static int fx_setup(void **state) {
  rec_fixture *fx = calloc(1, sizeof(*fx));
  const char *base = getenv("TMPDIR");

  if (fx == NULL) {
    return -1;
  }
  if (base == NULL || base[0] == '\0') {
    base = P_tmpdir;
  }
  snprintf(fx->dir, sizeof(fx->dir), "%s/fanout-record-XXXXXX", base);
  if (mkdtemp(fx->dir) == NULL) {
    free(fx);
    return -1;
  }
  snprintf(fx->path, sizeof(fx->path), "%s/deliveries.jsonl", fx->dir);
  *state = fx;
  return 0;
}

static int fx_teardown(void **state) {
  rec_fixture *fx = *state;

  unlink(fx->path);
  rmdir(fx->dir);
  free(fx);
  return 0;
}

/* What the dispatcher's callbacks saw. */
typedef struct seen {
  pthread_mutex_t lock;
  size_t done;
  size_t unfinished;
  size_t nouts;
  struct {
    fo_status status;
    bool retryable;
    char reason[128];
    char provider_id[96];
  } outs[MAX_OUTS];
} seen;

static void on_done(fo_event *ev, bool finished, void *arg) {
  seen *s = arg;

  pthread_mutex_lock(&s->lock);
  s->done++;
  if (!finished) {
    s->unfinished++;
  }
  pthread_mutex_unlock(&s->lock);
  fo_event_free(ev);
}

static void on_outcome(const fo_delivery *d, const fo_outcome *o,
                       void *arg) {
  seen *s = arg;

  (void)d;
  pthread_mutex_lock(&s->lock);
  if (s->nouts < MAX_OUTS) {
    s->outs[s->nouts].status = o->status;
    s->outs[s->nouts].retryable = o->retryable;
    snprintf(s->outs[s->nouts].reason, sizeof(s->outs[0].reason), "%s",
             o->reason);
    snprintf(s->outs[s->nouts].provider_id,
             sizeof(s->outs[0].provider_id), "%s", o->provider_id);
  }
  s->nouts++;
  pthread_mutex_unlock(&s->lock);
}

/* A dispatcher over a new queue with `ch` on every channel kind. */
typedef struct rig {
  fo_queue *q;
  fo_dispatch *d;
  fo_channel *ch;
  seen *s;
} rig;

static void rig_init(rig *r, fo_channel *ch, int workers) {
  fo_dispatch_conf conf = {
      .workers = workers,
      .retry_base_ms = 10,
      .retry_max_ms = 40,
      .on_done = on_done,
      .on_outcome = on_outcome,
  };

  r->ch = ch;
  r->s = calloc(1, sizeof(*r->s));
  assert_non_null(r->s);
  pthread_mutex_init(&r->s->lock, NULL);
  conf.done_arg = r->s;
  conf.outcome_arg = r->s;
  r->q = fo_queue_new(100000, 1000);
  assert_non_null(r->q);
  r->d = fo_dispatch_new(r->q, &conf);
  assert_non_null(r->d);
  for (int k = 0; k < FO_CH_COUNT; k++) {
    fo_dispatch_set_channel(r->d, (fo_channel_kind)k, ch);
  }
  assert_int_equal(fo_dispatch_start(r->d), FO_OK);
}

/* Decodes `json` and stamps it as the consumer does, then queues it. */
static void rig_push(rig *r, const char *json) {
  fo_event *ev = NULL;
  fo_event_error err;

  memset(&err, 0, sizeof(err));
  assert_int_equal(fo_event_decode(json, strlen(json), 0, &ev, &err),
                   FO_OK);
  ev->consumed_us = fo_now_us();
  ev->expires_ms = fo_wall_ms() + ev->ttl_s * 1000;
  atomic_store(&ev->pending, (uint_fast32_t)fo_event_items(ev));
  assert_int_equal(fo_queue_push(r->q, ev), FO_OK);
}

/* Drains (everything must finish), shuts the channel down and frees. */
static void rig_finish(rig *r) {
  assert_int_equal(fo_dispatch_drain(r->d, WAIT_MS), FO_OK);
  r->ch->ops->shutdown(r->ch->self);
  fo_dispatch_free(r->d);
  fo_queue_free(r->q);
  r->ch->ops->destroy(r->ch->self);
  pthread_mutex_destroy(&r->s->lock);
  free(r->s);
}

/* Reads the whole file; caller frees. */
static char *slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  char *buf;
  long n;

  assert_non_null(f);
  assert_int_equal(fseek(f, 0, SEEK_END), 0);
  n = ftell(f);
  assert_true(n >= 0);
  assert_int_equal(fseek(f, 0, SEEK_SET), 0);
  buf = malloc((size_t)n + 1);
  assert_non_null(buf);
  assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
  buf[n] = '\0';
  fclose(f);
  *len = (size_t)n;
  return buf;
}

/*
 * Splits the file into lines, checks each is a whole JSON object with
 * the fields of a record, and returns them (caller frees each with
 * json_decref() and the array with free()).
 */
static json_t **read_lines(const char *path, size_t *count) {
  size_t len;
  char *buf = slurp(path, &len);
  json_t **lines = NULL;
  size_t n = 0;
  char *p = buf;

  assert_true(len == 0 || buf[len - 1] == '\n');
  while (*p != '\0') {
    char *nl = strchr(p, '\n');
    json_error_t jerr;
    json_t *o;

    assert_non_null(nl);
    *nl = '\0';
    o = json_loads(p, 0, &jerr);
    assert_non_null(o);
    assert_true(json_is_object(o));
    assert_true(json_is_string(json_object_get(o, "event")));
    assert_true(json_is_string(json_object_get(o, "user")));
    assert_true(json_is_string(json_object_get(o, "channel")));
    assert_true(json_is_integer(json_object_get(o, "attempt")));
    assert_true(json_is_integer(json_object_get(o, "seq")));
    lines = realloc(lines, (n + 1) * sizeof(*lines));
    assert_non_null(lines);
    lines[n++] = o;
    p = nl + 1;
  }
  free(buf);
  *count = n;
  return lines;
}

static void free_lines(json_t **lines, size_t n) {
  for (size_t i = 0; i < n; i++) {
    json_decref(lines[i]);
  }
  free(lines);
}

static const char *str_of(json_t *o, const char *key) {
  return json_string_value(json_object_get(o, key));
}

static void test_lines_and_outcomes(void **state) {
  rec_fixture *fx = *state;
  fo_channel *ch = NULL;
  json_t **lines;
  size_t n;
  rig r;
  bool got[2][FO_CH_COUNT] = {{false}};

  assert_int_equal(fo_record_new(fx->path, &ch), FO_OK);
  assert_non_null(ch);
  rig_init(&r, ch, 1);
  rig_push(&r, "{\"id\":\"rec-1\",\"category\":\"order_update\","
               "\"to\":[\"u1\",\"u2\"],\"channels\":[\"push\",\"email\"],"
               "\"title\":\"Line\\nbreak \\\"quoted\\\"\","
               "\"priority\":\"high\"}");
  rig_push(&r, "{\"id\":\"rec-2\",\"category\":\"c\",\"to\":[\"u1\"],"
               "\"channels\":[\"sms\"]}");
  rig_finish(&r);

  lines = read_lines(fx->path, &n);
  assert_int_equal(n, 5);
  for (size_t i = 0; i < n; i++) {
    json_t *o = lines[i];
    fo_channel_kind k;

    assert_int_equal(json_integer_value(json_object_get(o, "attempt")), 1);
    assert_int_equal(fo_channel_parse(str_of(o, "channel"), &k), FO_OK);
    if (strcmp(str_of(o, "event"), "rec-2") == 0) {
      assert_string_equal(str_of(o, "user"), "u1");
      assert_int_equal(k, FO_CH_SMS);
      assert_string_equal(str_of(o, "category"), "c");
      assert_null(json_object_get(o, "title"));
      continue;
    }
    assert_string_equal(str_of(o, "event"), "rec-1");
    assert_string_equal(str_of(o, "category"), "order_update");
    assert_string_equal(str_of(o, "priority"), "high");
    assert_string_equal(str_of(o, "title"), "Line\nbreak \"quoted\"");
    assert_true(k == FO_CH_PUSH || k == FO_CH_EMAIL);
    if (strcmp(str_of(o, "user"), "u1") == 0) {
      assert_false(got[0][k]);
      got[0][k] = true;
    } else {
      assert_string_equal(str_of(o, "user"), "u2");
      assert_false(got[1][k]);
      got[1][k] = true;
    }
  }
  assert_true(got[0][FO_CH_PUSH] && got[0][FO_CH_EMAIL]);
  assert_true(got[1][FO_CH_PUSH] && got[1][FO_CH_EMAIL]);
  free_lines(lines, n);
}

/* Outcomes are read between the drain and rig_finish(), which frees
 * them. */
static void test_outcomes_sent_with_provider_id(void **state) {
  rec_fixture *fx = *state;
  fo_channel *ch = NULL;
  rig r;

  assert_int_equal(fo_record_new(fx->path, &ch), FO_OK);
  rig_init(&r, ch, 2);
  rig_push(&r, "{\"id\":\"ids\",\"category\":\"c\",\"to\":[\"a\",\"b\"]}");
  assert_int_equal(fo_dispatch_drain(r.d, WAIT_MS), FO_OK);

  assert_int_equal(r.s->done, 1);
  assert_int_equal(r.s->unfinished, 0);
  assert_int_equal(r.s->nouts, 8);
  for (size_t i = 0; i < 8; i++) {
    assert_int_equal(r.s->outs[i].status, FO_STATUS_SENT);
    assert_true(r.s->outs[i].provider_id[0] != '\0');
    for (size_t j = 0; j < i; j++) {
      assert_string_not_equal(r.s->outs[i].provider_id,
                              r.s->outs[j].provider_id);
    }
  }
  rig_finish(&r);
}

static void test_concurrent_whole_lines(void **state) {
  rec_fixture *fx = *state;
  fo_channel *ch = NULL;
  json_t **lines;
  char json[512];
  bool *seq_seen;
  size_t n;
  rig r;

  assert_int_equal(fo_record_new(fx->path, &ch), FO_OK);
  rig_init(&r, ch, 2);
  /* 20 events x 25 users x 4 channels = 2,000 items. */
  for (int e = 0; e < 20; e++) {
    size_t len = (size_t)snprintf(json, sizeof(json),
                                  "{\"id\":\"c%d\",\"category\":\"c\","
                                  "\"to\":[\"u0\"", e);

    for (int u = 1; u < 25; u++) {
      len += (size_t)snprintf(json + len, sizeof(json) - len, ",\"u%d\"",
                              u);
    }
    snprintf(json + len, sizeof(json) - len, "]}");
    rig_push(&r, json);
  }
  assert_int_equal(fo_dispatch_drain(r.d, WAIT_MS), FO_OK);
  assert_int_equal(r.s->done, 20);
  assert_int_equal(r.s->unfinished, 0);
  assert_int_equal(r.s->nouts, 2000);
  rig_finish(&r);

  /* Whole lines only, and each sequence number once. */
  lines = read_lines(fx->path, &n);
  assert_int_equal(n, 2000);
  seq_seen = calloc(2001, sizeof(*seq_seen));
  assert_non_null(seq_seen);
  for (size_t i = 0; i < n; i++) {
    json_int_t seq = json_integer_value(json_object_get(lines[i], "seq"));

    assert_in_range(seq, 1, 2000);
    assert_false(seq_seen[seq]);
    seq_seen[seq] = true;
  }
  free(seq_seen);
  free_lines(lines, n);
}

/* A write that fails (a full device) is a retryable failure; best-effort
 * makes it final at once so the test need not wait for the ttl. */
static void test_write_error_is_retryable(void **state) {
  fo_channel *ch = NULL;
  rig r;

  (void)state;
  if (access("/dev/full", W_OK) != 0) {
    skip();
  }
  assert_int_equal(fo_record_new("/dev/full", &ch), FO_OK);
  rig_init(&r, ch, 1);
  rig_push(&r, "{\"id\":\"full\",\"category\":\"c\",\"to\":[\"u1\"],"
               "\"channels\":[\"inapp\"],\"delivery\":\"best_effort\"}");
  assert_int_equal(fo_dispatch_drain(r.d, WAIT_MS), FO_OK);
  assert_int_equal(r.s->nouts, 1);
  assert_int_equal(r.s->outs[0].status, FO_STATUS_FAILED);
  assert_true(r.s->outs[0].retryable);
  assert_true(r.s->outs[0].reason[0] != '\0');
  assert_true(r.s->outs[0].provider_id[0] == '\0');
  assert_int_equal(r.s->done, 1);
  rig_finish(&r);
}

static void test_submit_after_shutdown(void **state) {
  rec_fixture *fx = *state;
  fo_channel *ch = NULL;
  fo_delivery d;
  struct stat st;

  assert_int_equal(fo_record_new(fx->path, &ch), FO_OK);
  assert_int_equal(ch->ops->flush(ch->self, 100), FO_OK);
  ch->ops->shutdown(ch->self);

  /* Refused before the delivery is even read. */
  memset(&d, 0, sizeof(d));
  d.attempt = 1;
  assert_int_equal(ch->ops->submit(ch->self, &d), FO_ECLOSED);
  assert_int_equal(ch->ops->flush(ch->self, 100), FO_OK);
  ch->ops->destroy(ch->self);

  assert_int_equal(stat(fx->path, &st), 0);
  assert_int_equal(st.st_size, 0);
}

static void test_appends_to_existing(void **state) {
  rec_fixture *fx = *state;
  fo_channel *ch = NULL;
  json_t **lines;
  size_t n;
  FILE *f;
  rig r;

  f = fopen(fx->path, "w");
  assert_non_null(f);
  fputs("{\"event\":\"old\",\"user\":\"u\",\"channel\":\"sms\","
        "\"attempt\":1,\"seq\":1}\n", f);
  fclose(f);

  assert_int_equal(fo_record_new(fx->path, &ch), FO_OK);
  rig_init(&r, ch, 1);
  rig_push(&r, "{\"id\":\"new\",\"category\":\"c\",\"to\":[\"u\"],"
               "\"channels\":[\"sms\"]}");
  rig_finish(&r);

  lines = read_lines(fx->path, &n);
  assert_int_equal(n, 2);
  assert_string_equal(str_of(lines[0], "event"), "old");
  assert_string_equal(str_of(lines[1], "event"), "new");
  free_lines(lines, n);
}

static void test_unwritable_path(void **state) {
  rec_fixture *fx = *state;
  fo_channel sentinel;
  fo_channel *ch = &sentinel;
  char bad[400];

  snprintf(bad, sizeof(bad), "%s/no-such-dir/deliveries.jsonl", fx->dir);
  assert_int_equal(fo_record_new(bad, &ch), FO_EIO);
  assert_ptr_equal(ch, &sentinel);

  /* A directory is not a file to append to either. */
  assert_int_equal(fo_record_new(fx->dir, &ch), FO_EIO);
  assert_ptr_equal(ch, &sentinel);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_lines_and_outcomes, fx_setup,
                                      fx_teardown),
      cmocka_unit_test_setup_teardown(test_outcomes_sent_with_provider_id,
                                      fx_setup, fx_teardown),
      cmocka_unit_test_setup_teardown(test_concurrent_whole_lines,
                                      fx_setup, fx_teardown),
      cmocka_unit_test(test_write_error_is_retryable),
      cmocka_unit_test_setup_teardown(test_submit_after_shutdown, fx_setup,
                                      fx_teardown),
      cmocka_unit_test_setup_teardown(test_appends_to_existing, fx_setup,
                                      fx_teardown),
      cmocka_unit_test_setup_teardown(test_unwritable_path, fx_setup,
                                      fx_teardown),
  };

  fo_log_set_level(FO_LOG_WARN);
  return cmocka_run_group_tests(tests, NULL, NULL);
}
