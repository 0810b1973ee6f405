/* SPDX-License-Identifier: MIT */
/*
 * A growable byte string for building request bodies, SQL literals and
 * text reports. Appends never fail loudly: the first allocation failure
 * sets `oom` and later appends do nothing, so a builder makes all its
 * calls and checks the flag once at the end. The content is always
 * NUL-terminated once something was appended.
 *
 * Not thread-safe; one owner at a time.
 */
#ifndef FO_BUF_H
#define FO_BUF_H

#include <stdbool.h>
#include <stddef.h>

/* Zero-initialised (or FO_BUF_INIT) is an empty buffer. `p` is NULL until
 * the first append; the buffer owns `p` until fo_buf_take or
 * fo_buf_free. */
typedef struct fo_buf {
  char *p;
  size_t len;
  size_t cap;
  bool oom;               /* an append failed; the content is cut */
} fo_buf;

#define FO_BUF_INIT {NULL, 0, 0, false}

void fo_buf_init(fo_buf *b);

/* Appends the `n` bytes at `s`. */
void fo_buf_append(fo_buf *b, const void *s, size_t n);

/* Appends the string `s` without its terminator. */
void fo_buf_append_str(fo_buf *b, const char *s);

/* Appends printf output; a formatting error counts as `oom`. */
void fo_buf_appendf(fo_buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/*
 * Hands the content to the caller, who frees it: a NUL-terminated string
 * ("" when nothing was appended), its length in *len when `len` is not
 * NULL. Returns NULL when an append failed or the empty string could not
 * be allocated. Either way the buffer is empty afterwards.
 */
char *fo_buf_take(fo_buf *b, size_t *len);

/* Frees the content and empties the buffer. */
void fo_buf_free(fo_buf *b);

#endif /* FO_BUF_H */
