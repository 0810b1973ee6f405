/* SPDX-License-Identifier: MIT */
/*
 * The growable byte string of buf.h. Capacity doubles from a small start,
 * so building a string of n bytes costs O(n) copies in all.
 */
#include "buf.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FO_BUF_START 256

void fo_buf_init(fo_buf *b) {
  b->p = NULL;
  b->len = 0;
  b->cap = 0;
  b->oom = false;
}

/* Makes room for `n` more bytes and the terminator; false on failure,
 * with `oom` set. */
static bool fo_buf_reserve(fo_buf *b, size_t n) {
  size_t cap;
  char *p;

  if (b->oom)
    return false;
  if (n > SIZE_MAX / 2 - b->len) {
    b->oom = true;
    return false;
  }
  if (b->len + n + 1 <= b->cap)
    return true;
  cap = b->cap > 0 ? b->cap : FO_BUF_START;
  while (cap < b->len + n + 1)
    cap *= 2;
  p = realloc(b->p, cap);
  if (p == NULL) {
    b->oom = true;
    return false;
  }
  b->p = p;
  b->cap = cap;
  return true;
}

void fo_buf_append(fo_buf *b, const void *s, size_t n) {
  if (!fo_buf_reserve(b, n))
    return;
  if (n > 0)
    memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

void fo_buf_append_str(fo_buf *b, const char *s) {
  fo_buf_append(b, s, strlen(s));
}

void fo_buf_appendf(fo_buf *b, const char *fmt, ...) {
  va_list ap;
  int n;

  if (b->oom)
    return;
  /* First try in the room left; format again only when it is short. */
  va_start(ap, fmt);
  n = vsnprintf(b->p != NULL ? b->p + b->len : NULL,
                b->p != NULL ? b->cap - b->len : 0, fmt, ap);
  va_end(ap);
  if (n < 0) {
    b->oom = true;
    return;
  }
  if (b->p != NULL && (size_t)n < b->cap - b->len) {
    b->len += (size_t)n;
    return;
  }
  if (!fo_buf_reserve(b, (size_t)n))
    return;
  va_start(ap, fmt);
  n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
  va_end(ap);
  if (n < 0) {
    b->oom = true;
    return;
  }
  b->len += (size_t)n;
}

char *fo_buf_take(fo_buf *b, size_t *len) {
  char *p = b->p;

  if (b->oom) {
    fo_buf_free(b);
    return NULL;
  }
  if (p == NULL) {
    p = calloc(1, 1);
    if (p == NULL)
      return NULL;
  }
  if (len != NULL)
    *len = b->len;
  fo_buf_init(b);
  return p;
}

void fo_buf_free(fo_buf *b) {
  free(b->p);
  fo_buf_init(b);
}
