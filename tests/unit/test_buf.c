/* SPDX-License-Identifier: MIT */
/*
 * Unit tests for the growable string: appends of bytes, strings and
 * printf output accumulate in order across several growths and stay
 * NUL-terminated; take hands over the content and empties the buffer,
 * and gives "" for an empty one; a buffer marked out of memory ignores
 * later appends and take returns NULL.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"

static void test_appends_in_order(void **state) {
  fo_buf b = FO_BUF_INIT;
  char *s;
  size_t len = 0;

  (void)state;
  fo_buf_append(&b, "ab\0cd", 2);
  fo_buf_append_str(&b, "cd");
  fo_buf_appendf(&b, "-%d-%s", 42, "x");
  assert_false(b.oom);
  assert_int_equal(b.len, 9);
  assert_string_equal(b.p, "abcd-42-x");
  s = fo_buf_take(&b, &len);
  assert_non_null(s);
  assert_int_equal(len, 9);
  assert_string_equal(s, "abcd-42-x");
  assert_null(b.p);
  assert_int_equal(b.len, 0);
  free(s);
}

static void test_grows(void **state) {
  fo_buf b = FO_BUF_INIT;
  char want[64];

  (void)state;
  /* 10,000 appends pass the starting capacity many times over; the
   * printf path must also grow when it does not fit. */
  for (int i = 0; i < 5000; i++) {
    fo_buf_appendf(&b, "%04d", i);
    fo_buf_append(&b, ",", 1);
  }
  assert_false(b.oom);
  assert_int_equal(b.len, 5000 * 5);
  assert_int_equal(strlen(b.p), b.len);
  assert_memory_equal(b.p, "0000,0001,", 10);
  assert_memory_equal(b.p + b.len - 5, "4999,", 5);
  fo_buf_free(&b);
  assert_null(b.p);

  memset(want, 'y', sizeof(want) - 1);
  want[sizeof(want) - 1] = '\0';
  for (int i = 0; i < 20; i++)
    fo_buf_appendf(&b, "%s", want);
  assert_int_equal(b.len, 20 * (sizeof(want) - 1));
  assert_int_equal(strlen(b.p), b.len);
  fo_buf_free(&b);
}

static void test_take_empty(void **state) {
  fo_buf b;
  size_t len = 7;
  char *s;

  (void)state;
  fo_buf_init(&b);
  s = fo_buf_take(&b, &len);
  assert_non_null(s);
  assert_string_equal(s, "");
  assert_int_equal(len, 0);
  free(s);
}

static void test_oom_sticks(void **state) {
  fo_buf b = FO_BUF_INIT;
  size_t len = 7;

  (void)state;
  fo_buf_append_str(&b, "kept");
  b.oom = true;
  fo_buf_append_str(&b, "lost");
  fo_buf_appendf(&b, "%d", 1);
  assert_int_equal(b.len, 4);
  assert_null(fo_buf_take(&b, &len));
  assert_int_equal(len, 7);
  assert_null(b.p);
  assert_false(b.oom);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_appends_in_order),
      cmocka_unit_test(test_grows),
      cmocka_unit_test(test_take_empty),
      cmocka_unit_test(test_oom_sticks),
  };

  return cmocka_run_group_tests(tests, NULL, NULL);
}
