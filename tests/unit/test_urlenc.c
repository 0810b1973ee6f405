/* SPDX-License-Identifier: MIT */
/*
 * Unit tests for percent-decoding: escapes in either case decode, '+' is
 * a space only in form mode, the length bounds the input (no terminator
 * needed), and a truncated or non-hex escape, %00 and a NUL byte are
 * refused with FO_EINVAL.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "fanout/common.h"
#include "urlenc.h"

static void expect_ok(const char *in, size_t n, bool plus, const char *want) {
  int rc = FO_OK;
  char *out = fo_url_unescape(in, n, plus, &rc);

  assert_non_null(out);
  assert_int_equal(rc, FO_OK);
  assert_string_equal(out, want);
  free(out);
}

static void expect_bad(const char *in, size_t n, bool plus) {
  int rc = FO_OK;

  assert_null(fo_url_unescape(in, n, plus, &rc));
  assert_int_equal(rc, FO_EINVAL);
}

static void test_decodes(void **state) {
  (void)state;
  expect_ok("", 0, false, "");
  expect_ok("plain", 5, false, "plain");
  expect_ok("a%2Fb%2fc", 9, false, "a/b/c");
  expect_ok("%C3%BC", 6, false, "\xc3\xbc");
  expect_ok("a+b%2B", 6, false, "a+b+");
  expect_ok("a+b%2B", 6, true, "a b+");
  /* Only n bytes are read: the escape past them is not seen. */
  expect_ok("ab%zz", 2, false, "ab");
  expect_ok("%41", 3, true, "A");
}

static void test_refuses(void **state) {
  (void)state;
  expect_bad("%", 1, false);
  expect_bad("a%4", 3, false);
  expect_bad("%41", 2, false);
  expect_bad("%g1", 3, true);
  expect_bad("%1g", 3, true);
  expect_bad("%00", 3, false);
  expect_bad("a\0b", 3, true);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_decodes),
      cmocka_unit_test(test_refuses),
  };

  return cmocka_run_group_tests(tests, NULL, NULL);
}
