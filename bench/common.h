/* SPDX-License-Identifier: MIT */
/*
 * What every benchmark under bench/ needs: its integer flags, medians of
 * its runs, CPU clocks, and a sleep.
 */
#ifndef FO_BENCH_COMMON_H
#define FO_BENCH_COMMON_H

#include <stddef.h>
#include <stdio.h>

/* An integer flag: `--name N`, stored as a long at `off` in the options
 * struct, accepted within [lo, hi]. */
typedef struct bench_flag {
  const char *flag;
  size_t off;
  long lo, hi;
} bench_flag;

/*
 * Parses argv against `flags` into the struct at `opts`. `-h`/`--help`
 * prints `usage` to stdout and exits 0. Returns FO_OK, or FO_EINVAL after
 * one line naming the argument and the usage on stderr.
 */
int bench_parse_flags(int argc, char **argv, const bench_flag *flags,
                      size_t nflags, void *opts, const char *prog,
                      void (*usage)(FILE *to));

/* Median of `n` values (n >= 1); sorts them in place. */
double bench_median(double *v, long n);

/* CPU seconds (user + system) of this process, and busy CPU seconds of
 * the whole machine (all but idle and iowait, from /proc/stat). */
double bench_cpu_self_secs(void);
double bench_cpu_machine_secs(void);

void bench_sleep_ms(int ms);

#endif /* FO_BENCH_COMMON_H */
