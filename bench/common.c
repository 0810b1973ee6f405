/* SPDX-License-Identifier: MIT */
/*
 * Helpers shared by the benchmarks.
 */
#include "common.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "fanout/common.h"

static int parse_long(const char *s, long lo, long hi, long *out) {
  char *end;
  long v;

  errno = 0;
  v = strtol(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi)
    return FO_EINVAL;
  *out = v;
  return FO_OK;
}

int bench_parse_flags(int argc, char **argv, const bench_flag *flags,
                      size_t nflags, void *opts, const char *prog,
                      void (*usage)(FILE *to)) {
  for (int i = 1; i < argc; i++) {
    size_t f;

    if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
      usage(stdout);
      exit(0);
    }
    for (f = 0; f < nflags; f++)
      if (strcmp(argv[i], flags[f].flag) == 0)
        break;
    if (f == nflags || i + 1 >= argc ||
        parse_long(argv[i + 1], flags[f].lo, flags[f].hi,
                   (long *)((char *)opts + flags[f].off)) != FO_OK) {
      fprintf(stderr, "%s: bad argument '%s'\n", prog, argv[i]);
      usage(stderr);
      return FO_EINVAL;
    }
    i++;
  }
  return FO_OK;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;

  return (x > y) - (x < y);
}

double bench_median(double *v, long n) {
  qsort(v, (size_t)n, sizeof(v[0]), cmp_double);
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

double bench_cpu_self_secs(void) {
  struct rusage ru;

  if (getrusage(RUSAGE_SELF, &ru) != 0)
    return 0;
  return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

double bench_cpu_machine_secs(void) {
  unsigned long long v[8] = {0};
  FILE *f = fopen("/proc/stat", "r");
  int n;

  if (f == NULL)
    return 0;
  n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0],
             &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]);
  fclose(f);
  if (n != 8)
    return 0;
  /* user nice system idle iowait irq softirq steal: all but idle and
   * iowait is work. */
  return (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) /
         (double)sysconf(_SC_CLK_TCK);
}

void bench_sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};

  nanosleep(&ts, NULL);
}
