/* SPDX-License-Identifier: MIT */
/*
 * Error codes and small helpers shared by every fanout module.
 *
 * Every fallible function returns 0 (FO_OK) or one of the negative codes
 * below. Out-parameters are left untouched when a call fails.
 */
#ifndef FANOUT_COMMON_H
#define FANOUT_COMMON_H

#include <stdint.h>

enum fo_err {
  FO_OK = 0,
  FO_ENOMEM = -1,     /* an allocation failed */
  FO_EINVAL = -2,     /* bad argument or bad input */
  FO_EIO = -3,        /* a system call or file operation failed */
  FO_EFULL = -4,      /* no room now; retry after something drains */
  FO_ECLOSED = -5,    /* the object is shutting down */
  FO_ENOENT = -6,     /* no such thing */
  FO_EKAFKA = -7,     /* librdkafka reported an error */
  FO_ECONFIG = -8,    /* configuration is not valid */
  FO_ETIMEDOUT = -9   /* the deadline passed first */
};

/* Returns a static, human-readable name for an fo_err code. */
const char *fo_strerror(int err);

/* Monotonic clock in milliseconds and microseconds. */
int64_t fo_now_ms(void);
int64_t fo_now_us(void);

/* Wall clock (Unix epoch) in milliseconds. */
int64_t fo_wall_ms(void);

#endif /* FANOUT_COMMON_H */
