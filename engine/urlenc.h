/* SPDX-License-Identifier: MIT */
/*
 * Percent-decoding for the pieces of URLs and form bodies the daemon
 * reads: path segments of the admin API, the user and password of a
 * redis:// URL, and the fields of an application/x-www-form-urlencoded
 * body. Decoding is strict, so a malformed value is refused rather than
 * guessed at.
 */
#ifndef FO_URLENC_H
#define FO_URLENC_H

#include <stdbool.h>
#include <stddef.h>

/*
 * Decodes the `n` bytes at `s` (which need not be NUL-terminated) into a
 * new NUL-terminated string that the caller frees. Every %XX is replaced
 * by its byte (either case of hex digit); with `plus_is_space`, as in a
 * form body, '+' becomes a space. A '%' without two hex digits after it,
 * the escape %00 or a NUL byte in the input is refused, so the result
 * never holds a NUL and strlen() is its length.
 *
 * Returns NULL with *rc set to FO_EINVAL (malformed) or FO_ENOMEM; *rc is
 * untouched on success.
 */
char *fo_url_unescape(const char *s, size_t n, bool plus_is_space, int *rc);

#endif /* FO_URLENC_H */
