/* SPDX-License-Identifier: MIT */
/*
 * Percent-decoding of urlenc.h. The output is never longer than the
 * input, so one allocation of n + 1 bytes holds any result.
 */
#include "urlenc.h"

#include <stdlib.h>

#include "fanout/common.h"

static int fo_url_hex(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

char *fo_url_unescape(const char *s, size_t n, bool plus_is_space,
                      int *rc) {
  char *out = malloc(n + 1);
  size_t o = 0;

  if (out == NULL) {
    *rc = FO_ENOMEM;
    return NULL;
  }
  for (size_t i = 0; i < n; i++) {
    int hi, lo;

    if (s[i] == '+' && plus_is_space) {
      out[o++] = ' ';
      continue;
    }
    if (s[i] != '%') {
      if (s[i] == '\0')
        goto bad;
      out[o++] = s[i];
      continue;
    }
    if (i + 2 >= n)
      goto bad;
    hi = fo_url_hex(s[i + 1]);
    lo = fo_url_hex(s[i + 2]);
    if (hi < 0 || lo < 0 || (hi == 0 && lo == 0))
      goto bad;
    out[o++] = (char)(hi * 16 + lo);
    i += 2;
  }
  out[o] = '\0';
  return out;

bad:
  free(out);
  *rc = FO_EINVAL;
  return NULL;
}
