/* SPDX-License-Identifier: MIT */
/*
 * Unit tests for the logger and the shared helpers in common.c: the exact
 * record format, escaping that keeps a record on one line, level
 * filtering, truncation of long records and the rate limiter.
 */
#include <pthread.h>
#include <regex.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "fanout/common.h"
#include "log.h"

struct capture {
  FILE *f;
  char *buf;
  size_t len;
  size_t mark; /* where the record under test starts */
};

static int capture_setup(void **state) {
  struct capture *c = calloc(1, sizeof(*c));

  if (c == NULL) {
    return -1;
  }
  c->f = open_memstream(&c->buf, &c->len);
  if (c->f == NULL) {
    free(c);
    return -1;
  }
  fo_log_set_stream(c->f);
  fo_log_set_level(FO_LOG_INFO);
  *state = c;
  return 0;
}

static int capture_teardown(void **state) {
  struct capture *c = *state;

  fo_log_set_stream(NULL);
  fo_log_set_level(FO_LOG_INFO);
  fclose(c->f);
  free(c->buf);
  free(c);
  return 0;
}

/* Returns what was logged since the last call (a NUL-terminated copy the
 * caller frees). */
static char *take(struct capture *c) {
  size_t n;
  char *s;

  fflush(c->f);
  n = c->len - c->mark;
  s = malloc(n + 1);
  assert_non_null(s);
  memcpy(s, c->buf + c->mark, n);
  s[n] = '\0';
  c->mark = c->len;
  return s;
}

static size_t count_char(const char *s, char ch) {
  size_t n = 0;

  for (; *s != '\0'; s++) {
    n += *s == ch;
  }
  return n;
}

static void assert_matches(const char *s, const char *pattern) {
  regex_t re;

  assert_int_equal(regcomp(&re, pattern, REG_EXTENDED), 0);
  if (regexec(&re, s, 0, NULL, 0) != 0) {
    regfree(&re);
    fail_msg("\"%s\" does not match /%s/", s, pattern);
  }
  regfree(&re);
}

static void test_format(void **state) {
  struct capture *c = *state;
  struct tm tm;
  int ms = -1;
  char *s;

  fo_log_write(FO_LOG_INFO, "queue", "hello world", "k=%s n=%d", "v", 42);
  s = take(c);
  assert_matches(s, "^ts=[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:"
                    "[0-9]{2}\\.[0-9]{3}Z level=info mod=queue "
                    "msg=\"hello world\" k=v n=42\n$");

  /* The timestamp is UTC and current. */
  memset(&tm, 0, sizeof(tm));
  assert_int_equal(sscanf(s, "ts=%d-%d-%dT%d:%d:%d.%dZ", &tm.tm_year,
                          &tm.tm_mon, &tm.tm_mday, &tm.tm_hour, &tm.tm_min,
                          &tm.tm_sec, &ms),
                   7);
  tm.tm_year -= 1900;
  tm.tm_mon -= 1;
  assert_true(llabs((long long)(timegm(&tm) - time(NULL))) <= 5);
  assert_in_range(ms, 0, 999);
  free(s);

  /* No key=value part: the record ends right after msg. */
  fo_log_error("relay", "boom", NULL);
  s = take(c);
  assert_matches(s, "^ts=[^ ]+ level=error mod=relay msg=\"boom\"\n$");
  free(s);

  fo_log_write(FO_LOG_WARN, "relay", "x", "   ");
  s = take(c);
  assert_matches(s, " level=warn mod=relay msg=\"x\"\n$");
  free(s);
}

static void test_conversions(void **state) {
  struct capture *c = *state;
  /* volatile: hides the NULL from the compiler's format checks. */
  const char *volatile nul = NULL;
  char *s;

  fo_log_info("t", "m",
              "a=%d b=%llu c=%x d=%.2f e=%s f=%c g=%% h=%5d i=%-3d| "
              "j=%*d k=%.*s l=%zu m=%ld n=%hhu o=%08.3f p=%s",
              -7, 18446744073709551615ull, 255, 3.14159, "str", 'Z', 42,
              7, 4, 9, 2, "abcdef", (size_t)12, -5L, (unsigned char)200,
              2.5, nul);
  s = take(c);
  assert_non_null(strstr(s, " msg=\"m\" a=-7 b=18446744073709551615 c=ff "
                            "d=3.14 e=str f=Z g=% h=   42 i=7  | j=   9 "
                            "k=ab l=12 m=-5 n=200 o=0002.500 p=(null)\n"));
  free(s);
}

static void test_escaping(void **state) {
  struct capture *c = *state;
  char *s;

  fo_log_info("t", "say \"hi\"\nthen\\go\r\tend\x01", NULL);
  s = take(c);
  assert_non_null(
      strstr(s, " msg=\"say \\\"hi\\\"\\nthen\\\\go\\r\\tend\\x01\"\n"));
  assert_int_equal(count_char(s, '\n'), 1);
  free(s);

  /* Quoted values get their quotes and backslashes escaped; unquoted
   * ones only their control bytes. */
  fo_log_info("t", "m", "path=\"%s\" raw=%s n=%d", "a\"b\\c d", "x\ny\x7f",
              1);
  s = take(c);
  assert_non_null(
      strstr(s, " path=\"a\\\"b\\\\c d\" raw=x\\ny\\x7f n=1\n"));
  assert_int_equal(count_char(s, '\n'), 1);
  free(s);

  /* Control bytes in the module name and the format's own text too. */
  fo_log_info("a\nb", "m", "k=1\tj=2");
  s = take(c);
  assert_non_null(strstr(s, " mod=a\\nb msg=\"m\" k=1\\tj=2\n"));
  assert_int_equal(count_char(s, '\n'), 1);
  free(s);
}

static void test_levels(void **state) {
  struct capture *c = *state;
  fo_log_level lv = FO_LOG_ERROR;
  char *s;

  fo_log_set_level(FO_LOG_WARN);
  assert_true(fo_log_enabled(FO_LOG_ERROR));
  assert_true(fo_log_enabled(FO_LOG_WARN));
  assert_false(fo_log_enabled(FO_LOG_INFO));
  assert_false(fo_log_enabled(FO_LOG_DEBUG));
  fo_log_info("t", "hidden", NULL);
  fo_log_debug("t", "hidden", NULL);
  fo_log_write(FO_LOG_INFO, "t", "hidden", NULL);
  fo_log_warn("t", "shown-warn", NULL);
  fo_log_error("t", "shown-error", NULL);
  s = take(c);
  assert_null(strstr(s, "hidden"));
  assert_non_null(strstr(s, "level=warn mod=t msg=\"shown-warn\"\n"));
  assert_non_null(strstr(s, "level=error mod=t msg=\"shown-error\"\n"));
  assert_int_equal(count_char(s, '\n'), 2);
  free(s);

  fo_log_set_level(FO_LOG_DEBUG);
  fo_log_debug("t", "dbg", "x=%d", 1);
  s = take(c);
  assert_non_null(strstr(s, "level=debug mod=t msg=\"dbg\" x=1\n"));
  free(s);

  assert_int_equal(fo_log_level_parse("debug", &lv), FO_OK);
  assert_int_equal(lv, FO_LOG_DEBUG);
  assert_int_equal(fo_log_level_parse("warn", &lv), FO_OK);
  assert_int_equal(lv, FO_LOG_WARN);
  assert_int_equal(fo_log_level_parse("error", &lv), FO_OK);
  assert_int_equal(lv, FO_LOG_ERROR);
  assert_int_equal(fo_log_level_parse("info", &lv), FO_OK);
  assert_int_equal(lv, FO_LOG_INFO);
  assert_int_equal(fo_log_level_parse("verbose", &lv), FO_EINVAL);
  assert_int_equal(fo_log_level_parse("INFO ", &lv), FO_EINVAL);
  assert_int_equal(fo_log_level_parse(NULL, &lv), FO_EINVAL);
  assert_int_equal(lv, FO_LOG_INFO);
}

static void test_truncation(void **state) {
  struct capture *c = *state;
  char big[5000];
  char *s;
  size_t n;

  memset(big, 'a', sizeof(big) - 1);
  big[sizeof(big) - 1] = '\0';

  /* Cut inside msg: the quote is closed before the marker. */
  fo_log_info("t", big, "k=%d", 1);
  s = take(c);
  n = strlen(s);
  assert_true(n <= 2048);
  assert_true(n > 2000);
  assert_int_equal(count_char(s, '\n'), 1);
  assert_int_equal(count_char(s, '"'), 2);
  assert_string_equal(s + n - 15, "a\" truncated=1\n");
  free(s);

  /* Cut in a key=value part made of escapes: no escape is split. */
  memset(big, '\n', sizeof(big) - 1);
  fo_log_info("t", "m", "v=%s", big);
  s = take(c);
  n = strlen(s);
  assert_true(n <= 2048);
  assert_int_equal(count_char(s, '\n'), 1);
  assert_string_equal(s + n - 17, "\\n\\n truncated=1\n");
  free(s);

  /* A long value that fits is not marked. */
  memset(big, 'b', sizeof(big) - 1);
  fo_log_info("t", "m", "v=%.1000s", big);
  s = take(c);
  assert_null(strstr(s, "truncated=1"));
  free(s);
}

static void test_ratelimit(void **state) {
  struct capture *c = *state;
  static fo_ratelimit rl;
  struct timespec nap = {0, 150 * 1000 * 1000};
  uint64_t sup = 99;
  char *s;

  assert_true(fo_ratelimit_allow(&rl, 100, &sup));
  assert_int_equal(sup, 0);
  assert_false(fo_ratelimit_allow(&rl, 100, &sup));
  assert_false(fo_ratelimit_allow(&rl, 100, &sup));
  assert_false(fo_ratelimit_allow(&rl, 100, NULL));
  nanosleep(&nap, NULL);
  assert_true(fo_ratelimit_allow(&rl, 100, &sup));
  assert_int_equal(sup, 3);
  assert_false(fo_ratelimit_allow(&rl, 100, &sup));
  nanosleep(&nap, NULL);
  assert_true(fo_ratelimit_allow(&rl, 100, &sup));
  assert_int_equal(sup, 1);

  /* Through the logging macro, the count is appended to the record. */
  {
    static fo_ratelimit rl2;

    for (int i = 0; i < 4; i++) {
      fo_log_rl(&rl2, 100, FO_LOG_WARN, "t", "slow", "n=%d", i);
    }
    nanosleep(&nap, NULL);
    fo_log_rl(&rl2, 100, FO_LOG_WARN, "t", "slow", "n=%d", 9);
  }
  s = take(c);
  assert_int_equal(count_char(s, '\n'), 2);
  assert_non_null(strstr(s, "msg=\"slow\" n=0\n"));
  assert_non_null(strstr(s, "msg=\"slow\" n=9 suppressed=3\n"));
  free(s);
}

struct rl_thread {
  fo_ratelimit *rl;
  int allowed;
};

static void *rl_worker(void *arg) {
  struct rl_thread *t = arg;

  for (int i = 0; i < 10000; i++) {
    if (fo_ratelimit_allow(t->rl, 60000, NULL)) {
      t->allowed++;
    }
  }
  return NULL;
}

static void test_ratelimit_threads(void **state) {
  static fo_ratelimit rl;
  pthread_t th[4];
  struct rl_thread t[4];
  int allowed = 0;
  uint64_t sup = 0;

  (void)state;
  for (int i = 0; i < 4; i++) {
    t[i].rl = &rl;
    t[i].allowed = 0;
    assert_int_equal(pthread_create(&th[i], NULL, rl_worker, &t[i]), 0);
  }
  for (int i = 0; i < 4; i++) {
    assert_int_equal(pthread_join(th[i], NULL), 0);
    allowed += t[i].allowed;
  }
  /* One record in a long interval, every other call counted. */
  assert_int_equal(allowed, 1);
  sup = atomic_load(&rl.suppressed);
  assert_int_equal(sup, 4 * 10000 - 1);
}

static void *log_worker(void *arg) {
  int id = *(int *)arg;

  for (int i = 0; i < 200; i++) {
    fo_log_info("t", "from a thread", "thread=%d i=%d pad=\"%s\"", id, i,
                "................................................");
  }
  return NULL;
}

static void test_threads_do_not_interleave(void **state) {
  struct capture *c = *state;
  pthread_t th[4];
  int ids[4];
  size_t lines = 0;
  char *s;
  regex_t re;

  for (int i = 0; i < 4; i++) {
    ids[i] = i;
    assert_int_equal(pthread_create(&th[i], NULL, log_worker, &ids[i]), 0);
  }
  for (int i = 0; i < 4; i++) {
    assert_int_equal(pthread_join(th[i], NULL), 0);
  }
  s = take(c);
  assert_int_equal(regcomp(&re,
                           "^ts=[^ ]+ level=info mod=t msg=\"from a "
                           "thread\" thread=[0-3] i=[0-9]+ pad=\"\\.+\"$",
                           REG_EXTENDED | REG_NOSUB),
                   0);
  for (char *save = NULL, *l = strtok_r(s, "\n", &save); l != NULL;
       l = strtok_r(NULL, "\n", &save)) {
    if (regexec(&re, l, 0, NULL, 0) != 0) {
      regfree(&re);
      fail_msg("mangled line: %s", l);
    }
    lines++;
  }
  regfree(&re);
  free(s);
  assert_int_equal(lines, 4 * 200);
}

static void test_common(void **state) {
  int64_t a;
  int64_t b;
  int64_t wall;

  (void)state;
  assert_string_equal(fo_strerror(FO_OK), "success");
  assert_string_equal(fo_strerror(FO_ENOMEM), "out of memory");
  assert_string_equal(fo_strerror(FO_ECONFIG), "invalid configuration");
  assert_string_equal(fo_strerror(FO_ETIMEDOUT), "timed out");
  assert_string_equal(fo_strerror(-1000), "unknown error");
  for (int e = FO_ETIMEDOUT; e <= FO_OK; e++) {
    assert_string_not_equal(fo_strerror(e), "unknown error");
  }

  a = fo_now_us();
  b = fo_now_us();
  assert_true(a > 0);
  assert_true(b >= a);
  assert_true(llabs((long long)(fo_now_ms() - b / 1000)) <= 1000);
  wall = fo_wall_ms();
  assert_true(llabs((long long)(wall / 1000 - time(NULL))) <= 2);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_format, capture_setup,
                                      capture_teardown),
      cmocka_unit_test_setup_teardown(test_conversions, capture_setup,
                                      capture_teardown),
      cmocka_unit_test_setup_teardown(test_escaping, capture_setup,
                                      capture_teardown),
      cmocka_unit_test_setup_teardown(test_levels, capture_setup,
                                      capture_teardown),
      cmocka_unit_test_setup_teardown(test_truncation, capture_setup,
                                      capture_teardown),
      cmocka_unit_test_setup_teardown(test_ratelimit, capture_setup,
                                      capture_teardown),
      cmocka_unit_test_setup_teardown(test_threads_do_not_interleave,
                                      capture_setup, capture_teardown),
      cmocka_unit_test(test_ratelimit_threads),
      cmocka_unit_test(test_common),
  };

  return cmocka_run_group_tests(tests, NULL, NULL);
}
