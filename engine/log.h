/* SPDX-License-Identifier: MIT */
/*
 * Structured logging: one line per record,
 *   ts=2026-12-03T13:37:54.123Z level=info mod=queue msg="..." k=v ...
 * written to stderr (or a stream set at start) with one write per line, so
 * lines from several threads never interleave.
 *
 * No secret (token, key, password) is ever passed to these functions; the
 * config module hands out secrets only to the code that uses them.
 */
#ifndef FO_LOG_H
#define FO_LOG_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

typedef enum fo_log_level {
  FO_LOG_ERROR = 0,
  FO_LOG_WARN = 1,
  FO_LOG_INFO = 2,
  FO_LOG_DEBUG = 3
} fo_log_level;

/* Sets the most verbose level written; the default is FO_LOG_INFO. */
void fo_log_set_level(fo_log_level level);

/* Parses "error", "warn", "info", "debug"; FO_OK or FO_EINVAL. */
int fo_log_level_parse(const char *name, fo_log_level *out);

/* Sends records to `stream` (NULL restores stderr). Not thread-safe:
 * call before any thread logs. Does not take ownership of `stream`. */
void fo_log_set_stream(FILE *stream);

bool fo_log_enabled(fo_log_level level);

/*
 * Writes one record. `msg` is quoted and escaped; `kvfmt` is a printf
 * format for the trailing key=value pairs ("" or NULL for none). Any
 * newline or control byte that reaches the line is escaped, so a record
 * is always one line. A string value that may hold spaces should be
 * formatted as k="%s"; its quotes and backslashes are escaped.
 */
void fo_log_write(fo_log_level level, const char *mod, const char *msg,
                  const char *kvfmt, ...)
    __attribute__((format(printf, 4, 5)));

#define fo_log(level, mod, msg, ...)                                       \
  do {                                                                     \
    if (fo_log_enabled(level))                                             \
      fo_log_write(level, mod, msg, __VA_ARGS__);                          \
  } while (0)

#define fo_log_error(mod, msg, ...) fo_log(FO_LOG_ERROR, mod, msg, __VA_ARGS__)
#define fo_log_warn(mod, msg, ...) fo_log(FO_LOG_WARN, mod, msg, __VA_ARGS__)
#define fo_log_info(mod, msg, ...) fo_log(FO_LOG_INFO, mod, msg, __VA_ARGS__)
#define fo_log_debug(mod, msg, ...) fo_log(FO_LOG_DEBUG, mod, msg, __VA_ARGS__)

/*
 * A rate limit for a repeating record: at most one record per interval.
 * Zero-initialise it (static storage is fine); it is thread-safe.
 */
typedef struct fo_ratelimit {
  atomic_int_fast64_t next_ms;
  atomic_uint_fast64_t suppressed;
} fo_ratelimit;

/*
 * Returns true when a record may be written now. When it returns true,
 * *suppressed (if not NULL) is set to the number of records held back
 * since the last one written, so the caller can add `suppressed=N`.
 */
bool fo_ratelimit_allow(fo_ratelimit *rl, int64_t interval_ms,
                        uint64_t *suppressed);

/* Logs through a rate limit; appends suppressed=N when some were held. */
#define fo_log_rl(rl, interval_ms, level, mod, msg, kvfmt, ...)            \
  do {                                                                     \
    uint64_t fo__sup;                                                      \
    if (fo_log_enabled(level) &&                                           \
        fo_ratelimit_allow((rl), (interval_ms), &fo__sup)) {               \
      if (fo__sup > 0)                                                     \
        fo_log_write(level, mod, msg, kvfmt " suppressed=%llu",            \
                     ##__VA_ARGS__, (unsigned long long)fo__sup);         \
      else                                                                 \
        fo_log_write(level, mod, msg, kvfmt, ##__VA_ARGS__);               \
    }                                                                      \
  } while (0)

#endif /* FO_LOG_H */
