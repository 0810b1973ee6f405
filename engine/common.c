/* SPDX-License-Identifier: MIT */
/*
 * Shared helpers: names for the fo_err codes and the two clocks every
 * module reads. The monotonic clock measures intervals and deadlines; the
 * wall clock is only for timestamps shown to people or stored.
 */
#include <time.h>

#include "fanout/common.h"

const char *fo_strerror(int err) {
  switch (err) {
  case FO_OK:
    return "success";
  case FO_ENOMEM:
    return "out of memory";
  case FO_EINVAL:
    return "invalid argument";
  case FO_EIO:
    return "input/output error";
  case FO_EFULL:
    return "full";
  case FO_ECLOSED:
    return "closed";
  case FO_ENOENT:
    return "not found";
  case FO_EKAFKA:
    return "kafka error";
  case FO_ECONFIG:
    return "invalid configuration";
  case FO_ETIMEDOUT:
    return "timed out";
  default:
    return "unknown error";
  }
}

static int64_t fo_common__clock_us(clockid_t id) {
  struct timespec ts;

  /* clock_gettime cannot fail for these clock ids on Linux; the zero
   * fallback keeps the result defined should it ever do so. */
  if (clock_gettime(id, &ts) != 0) {
    return 0;
  }
  return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t fo_now_us(void) {
  return fo_common__clock_us(CLOCK_MONOTONIC);
}

int64_t fo_now_ms(void) {
  return fo_common__clock_us(CLOCK_MONOTONIC) / 1000;
}

int64_t fo_wall_ms(void) {
  return fo_common__clock_us(CLOCK_REALTIME) / 1000;
}
