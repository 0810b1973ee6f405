/* SPDX-License-Identifier: MIT */
/* Tests of the per-partition offset tracker. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <pthread.h>
#include <cmocka.h>

#include "fanout/common.h"
#include "offsets.h"

static void test_empty_has_no_point(void **state) {
  fo_offsets *t = fo_offsets_new(3);

  (void)state;
  assert_non_null(t);
  assert_int_equal(fo_offsets_partition(t), 3);
  assert_int_equal(fo_offsets_commit_point(t), -1);
  fo_offsets_unref(t);
}

static void test_point_is_oldest_unfinished(void **state) {
  fo_offsets *t = fo_offsets_new(0);

  (void)state;
  for (int64_t o = 10; o < 20; o++)
    assert_int_equal(fo_offsets_add(t, o), FO_OK);
  assert_int_equal(fo_offsets_commit_point(t), 10);

  /* Finishing later offsets first does not move the point. */
  fo_offsets_done(t, 15);
  fo_offsets_done(t, 11);
  assert_int_equal(fo_offsets_commit_point(t), 10);
  fo_offsets_done(t, 10);
  assert_int_equal(fo_offsets_commit_point(t), 12);
  assert_int_equal(fo_offsets_unfinished(t), 7);

  for (int64_t o = 12; o < 20; o++)
    fo_offsets_done(t, o);
  assert_int_equal(fo_offsets_commit_point(t), 20);
  assert_int_equal(fo_offsets_unfinished(t), 0);
  fo_offsets_unref(t);
}

static void test_gaps_and_unknown(void **state) {
  fo_offsets *t = fo_offsets_new(0);

  (void)state;
  /* Compacted topics and transactions leave gaps in offsets. */
  assert_int_equal(fo_offsets_add(t, 5), FO_OK);
  assert_int_equal(fo_offsets_add(t, 9), FO_OK);
  assert_int_equal(fo_offsets_add(t, 9), FO_EINVAL);
  assert_int_equal(fo_offsets_add(t, 7), FO_EINVAL);
  fo_offsets_done(t, 6);
  fo_offsets_done(t, 5);
  fo_offsets_done(t, 5);
  assert_int_equal(fo_offsets_commit_point(t), 9);
  fo_offsets_done(t, 9);
  assert_int_equal(fo_offsets_commit_point(t), 10);
  fo_offsets_unref(t);
}

static void test_growth_and_wrap(void **state) {
  fo_offsets *t = fo_offsets_new(0);
  int64_t next_done = 0;

  (void)state;
  /* Keep a sliding window so the ring wraps, then grow it. */
  for (int64_t o = 0; o < 5000; o++) {
    assert_int_equal(fo_offsets_add(t, o), FO_OK);
    if (o % 3 == 2) {
      fo_offsets_done(t, next_done++);
      fo_offsets_done(t, next_done++);
    }
  }
  assert_int_equal(fo_offsets_commit_point(t), next_done);
  assert_int_equal(fo_offsets_unfinished(t), 5000 - (uint64_t)next_done);
  while (next_done < 5000)
    fo_offsets_done(t, next_done++);
  assert_int_equal(fo_offsets_commit_point(t), 5000);
  fo_offsets_unref(t);
}

typedef struct worker_arg {
  fo_offsets *t;
  int64_t first;
  int64_t step;
  int64_t end;
} worker_arg;

static void *finisher(void *p) {
  worker_arg *a = p;

  for (int64_t o = a->first; o < a->end; o += a->step)
    fo_offsets_done(a->t, o);
  return NULL;
}

static void test_concurrent_done_and_refs(void **state) {
  fo_offsets *t = fo_offsets_new(1);
  pthread_t th[4];
  worker_arg args[4];

  (void)state;
  for (int64_t o = 0; o < 40000; o++)
    assert_int_equal(fo_offsets_add(t, o), FO_OK);
  for (int i = 0; i < 4; i++) {
    args[i] = (worker_arg){.t = t, .first = i, .step = 4, .end = 40000};
    assert_int_equal(pthread_create(&th[i], NULL, finisher, &args[i]), 0);
  }
  for (int i = 0; i < 4; i++)
    pthread_join(th[i], NULL);
  assert_int_equal(fo_offsets_commit_point(t), 40000);

  /* Work keeps the tracker alive after its owner lets go. */
  assert_int_equal(fo_offsets_add(t, 40000), FO_OK);
  fo_offsets_unref(t);
  fo_offsets_done(t, 40000);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_empty_has_no_point),
      cmocka_unit_test(test_point_is_oldest_unfinished),
      cmocka_unit_test(test_gaps_and_unknown),
      cmocka_unit_test(test_growth_and_wrap),
      cmocka_unit_test(test_concurrent_done_and_refs),
  };

  return cmocka_run_group_tests_name("offsets", tests, NULL, NULL);
}
