/* SPDX-License-Identifier: MIT */
/*
 * Structured logging. Each record is built in a bounded buffer on the
 * caller's stack and handed to the stream in one locked write, so records
 * from several threads never interleave and a record is always exactly one
 * line: quotes and backslashes inside quoted values are escaped, and every
 * control byte becomes \n, \r, \t or \xHH. A record too long for the buffer
 * is cut and ends with truncated=1. Also holds the lock-free rate limiter
 * used to keep a repeating warning from flooding the log.
 */
#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdarg.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>

#include "fanout/common.h"
#include "log.h"

/* Longest record, newline included; below PIPE_BUF, so one write(2) of a
 * record to a pipe is atomic even across processes. */
#define FO_LOG_LINE_MAX 2048
#define FO_LOG_TRUNC " truncated=1"
/* Room kept back for a closing quote, the marker and the newline. */
#define FO_LOG_TAIL (1 + sizeof(FO_LOG_TRUNC) - 1 + 1)

static atomic_int fo_log_level_cur = FO_LOG_INFO;
static _Atomic(FILE *) fo_log_stream = NULL;
static pthread_mutex_t fo_log_mu = PTHREAD_MUTEX_INITIALIZER;

static const char *const fo_log_names[] = {"error", "warn", "info",
                                           "debug"};

struct fo_log_buf {
  char *p;
  size_t len;
  size_t limit;   /* bytes usable before FO_LOG_TAIL */
  bool in_quote;  /* inside a quoted value */
  bool truncated; /* something did not fit; later appends are dropped */
};

void fo_log_set_level(fo_log_level level) {
  if (level < FO_LOG_ERROR) {
    level = FO_LOG_ERROR;
  }
  if (level > FO_LOG_DEBUG) {
    level = FO_LOG_DEBUG;
  }
  atomic_store_explicit(&fo_log_level_cur, (int)level, memory_order_relaxed);
}

int fo_log_level_parse(const char *name, fo_log_level *out) {
  if (name == NULL || out == NULL) {
    return FO_EINVAL;
  }
  for (size_t i = 0; i < sizeof(fo_log_names) / sizeof(fo_log_names[0]);
       i++) {
    if (strcmp(name, fo_log_names[i]) == 0) {
      *out = (fo_log_level)i;
      return FO_OK;
    }
  }
  return FO_EINVAL;
}

void fo_log_set_stream(FILE *stream) {
  atomic_store(&fo_log_stream, stream);
}

bool fo_log_enabled(fo_log_level level) {
  return (int)level <=
         atomic_load_explicit(&fo_log_level_cur, memory_order_relaxed);
}

/* Appends n bytes as they are, or marks the record truncated. */
static void fo_log__put(struct fo_log_buf *b, const char *s, size_t n) {
  if (b->truncated) {
    return;
  }
  if (n > b->limit - b->len) {
    b->truncated = true;
    return;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
}

/* Appends one byte, escaped so that the record stays on one line; quotes
 * and backslashes are escaped too inside a quoted value. */
static void fo_log__putc(struct fo_log_buf *b, unsigned char c) {
  char tmp[5];
  size_t n = 0;

  if (c == '\n') {
    tmp[n++] = '\\';
    tmp[n++] = 'n';
  } else if (c == '\r') {
    tmp[n++] = '\\';
    tmp[n++] = 'r';
  } else if (c == '\t') {
    tmp[n++] = '\\';
    tmp[n++] = 't';
  } else if (c < 0x20 || c == 0x7f) {
    static const char hex[] = "0123456789abcdef";
    tmp[n++] = '\\';
    tmp[n++] = 'x';
    tmp[n++] = hex[c >> 4];
    tmp[n++] = hex[c & 0xf];
  } else if (b->in_quote && (c == '"' || c == '\\')) {
    tmp[n++] = '\\';
    tmp[n++] = (char)c;
  } else {
    tmp[n++] = (char)c;
  }
  fo_log__put(b, tmp, n);
}

static void fo_log__puts(struct fo_log_buf *b, const char *s, size_t n) {
  for (size_t i = 0; i < n && !b->truncated; i++) {
    fo_log__putc(b, (unsigned char)s[i]);
  }
}

/* Appends a quote that opens or closes a value, tracking which. */
static void fo_log__quote(struct fo_log_buf *b) {
  size_t before = b->len;

  fo_log__put(b, "\"", 1);
  if (b->len != before) {
    b->in_quote = !b->in_quote;
  }
}

enum fo_log_len {
  FO_LEN_NONE,
  FO_LEN_HH,
  FO_LEN_H,
  FO_LEN_L,
  FO_LEN_LL,
  FO_LEN_J,
  FO_LEN_Z,
  FO_LEN_T,
  FO_LEN_BIGL
};

/* Copies digits of a width or precision into spec; false if too long. */
static bool fo_log__digits(const char **p, char *spec, size_t *n,
                           size_t cap) {
  size_t count = 0;

  while (isdigit((unsigned char)**p)) {
    if (++count > 10 || *n + 1 >= cap) {
      return false;
    }
    spec[(*n)++] = *(*p)++;
  }
  return true;
}

/* Reads a length modifier into spec and returns it. */
static enum fo_log_len fo_log__length(const char **p, char *spec,
                                      size_t *n) {
  const char *s = *p;
  enum fo_log_len len = FO_LEN_NONE;
  size_t k = 0;

  if (s[0] == 'h' && s[1] == 'h') {
    len = FO_LEN_HH;
    k = 2;
  } else if (s[0] == 'l' && s[1] == 'l') {
    len = FO_LEN_LL;
    k = 2;
  } else if (s[0] == 'h') {
    len = FO_LEN_H;
    k = 1;
  } else if (s[0] == 'l') {
    len = FO_LEN_L;
    k = 1;
  } else if (s[0] == 'j') {
    len = FO_LEN_J;
    k = 1;
  } else if (s[0] == 'z') {
    len = FO_LEN_Z;
    k = 1;
  } else if (s[0] == 't') {
    len = FO_LEN_T;
    k = 1;
  } else if (s[0] == 'L') {
    len = FO_LEN_BIGL;
    k = 1;
  }
  memcpy(spec + *n, s, k);
  *n += k;
  *p = s + k;
  return len;
}

static int fo_log__fmt_signed(char *out, size_t cap, const char *spec,
                              enum fo_log_len len, va_list *ap) {
  switch (len) {
  case FO_LEN_L:
    return snprintf(out, cap, spec, va_arg(*ap, long));
  case FO_LEN_LL:
    return snprintf(out, cap, spec, va_arg(*ap, long long));
  case FO_LEN_J:
    return snprintf(out, cap, spec, va_arg(*ap, intmax_t));
  case FO_LEN_Z:
    return snprintf(out, cap, spec, va_arg(*ap, ssize_t));
  case FO_LEN_T:
    return snprintf(out, cap, spec, va_arg(*ap, ptrdiff_t));
  case FO_LEN_BIGL:
    return -1;
  default:
    return snprintf(out, cap, spec, va_arg(*ap, int));
  }
}

static int fo_log__fmt_unsigned(char *out, size_t cap, const char *spec,
                                enum fo_log_len len, va_list *ap) {
  switch (len) {
  case FO_LEN_L:
    return snprintf(out, cap, spec, va_arg(*ap, unsigned long));
  case FO_LEN_LL:
    return snprintf(out, cap, spec, va_arg(*ap, unsigned long long));
  case FO_LEN_J:
    return snprintf(out, cap, spec, va_arg(*ap, uintmax_t));
  case FO_LEN_Z:
    return snprintf(out, cap, spec, va_arg(*ap, size_t));
  case FO_LEN_T:
    return snprintf(out, cap, spec, va_arg(*ap, ptrdiff_t));
  case FO_LEN_BIGL:
    return -1;
  default:
    return snprintf(out, cap, spec, va_arg(*ap, unsigned int));
  }
}

/*
 * Formats one conversion of the key=value format, starting at the '%'
 * at *p, and appends its escaped output. We format conversions one at a
 * time, not the whole string at once, so that quotes inside a value can be
 * told apart from the quotes the format puts around it. Returns false on a
 * conversion it does not know, after which the arguments cannot be
 * followed any further. Known limitation: wide conversions (%lc, %ls) are
 * among those; the record then ends with kvfmt=bad.
 */
static bool fo_log__conv(struct fo_log_buf *b, const char **pp,
                         va_list *ap, int saved_errno) {
  const char *p = *pp;
  char spec[48];
  char out[FO_LOG_LINE_MAX];
  size_t n = 0;
  enum fo_log_len len;
  int r = -1;

  spec[n++] = *p++;
  while (*p != '\0' && strchr("-+ #0'", *p) != NULL && n < 6) {
    spec[n++] = *p++;
  }
  if (*p == '*') {
    n += (size_t)snprintf(spec + n, 12, "%d", va_arg(*ap, int));
    p++;
  } else if (!fo_log__digits(&p, spec, &n, sizeof(spec) - 16)) {
    return false;
  }
  if (*p == '.') {
    p++;
    if (*p == '*') {
      int prec = va_arg(*ap, int);

      /* A negative precision means none was given. */
      if (prec >= 0) {
        n += (size_t)snprintf(spec + n, 13, ".%d", prec);
      }
      p++;
    } else {
      spec[n++] = '.';
      if (!fo_log__digits(&p, spec, &n, sizeof(spec) - 4)) {
        return false;
      }
    }
  }
  len = fo_log__length(&p, spec, &n);
  spec[n++] = *p;
  spec[n] = '\0';

  switch (*p) {
  case 'd':
  case 'i':
    r = fo_log__fmt_signed(out, sizeof(out), spec, len, ap);
    break;
  case 'u':
  case 'o':
  case 'x':
  case 'X':
    r = fo_log__fmt_unsigned(out, sizeof(out), spec, len, ap);
    break;
  case 'c':
    if (len == FO_LEN_NONE) {
      r = snprintf(out, sizeof(out), spec, va_arg(*ap, int));
    }
    break;
  case 's':
    if (len == FO_LEN_NONE) {
      const char *s = va_arg(*ap, const char *);

      if (s == NULL) {
        s = "(null)";
      }
      if (n == 2) {
        /* A plain %s can be of any length: copy it without a bound. */
        fo_log__puts(b, s, strlen(s));
        *pp = p + 1;
        return true;
      }
      r = snprintf(out, sizeof(out), spec, s);
    }
    break;
  case 'p':
    r = snprintf(out, sizeof(out), spec, va_arg(*ap, void *));
    break;
  case 'f':
  case 'F':
  case 'e':
  case 'E':
  case 'g':
  case 'G':
  case 'a':
  case 'A':
    if (len == FO_LEN_BIGL) {
      r = snprintf(out, sizeof(out), spec, va_arg(*ap, long double));
    } else if (len == FO_LEN_NONE || len == FO_LEN_L) {
      r = snprintf(out, sizeof(out), spec, va_arg(*ap, double));
    }
    break;
  case 'm': {
    char ebuf[128];
    const char *e = strerror_r(saved_errno, ebuf, sizeof(ebuf));

    fo_log__puts(b, e, strlen(e));
    *pp = p + 1;
    return true;
  }
  case 'n':
    /* Writing back a count has no use in a log record; skip it. */
    (void)va_arg(*ap, void *);
    r = 0;
    out[0] = '\0';
    break;
  default:
    break;
  }
  if (r < 0) {
    return false;
  }
  if ((size_t)r >= sizeof(out)) {
    fo_log__puts(b, out, sizeof(out) - 1);
    b->truncated = true;
  } else {
    fo_log__puts(b, out, (size_t)r);
  }
  *pp = p + 1;
  return true;
}

/* Appends the key=value part: literal text with its quotes tracked, and
 * each conversion escaped. */
static void fo_log__kv(struct fo_log_buf *b, const char *fmt, va_list *ap,
                       int saved_errno) {
  const char *p = fmt;

  while (*p != '\0' && !b->truncated) {
    if (p[0] == '%' && p[1] == '%') {
      fo_log__put(b, "%", 1);
      p += 2;
    } else if (p[0] == '%') {
      if (!fo_log__conv(b, &p, ap, saved_errno)) {
        fo_log__put(b, " kvfmt=bad", 10);
        return;
      }
    } else if (p[0] == '"') {
      fo_log__quote(b);
      p++;
    } else if (p[0] == '\\' && p[1] >= 0x20 && p[1] != 0x7f) {
      /* An escape the caller wrote on purpose; keep it as it is. */
      fo_log__put(b, p, 2);
      p += 2;
    } else if (p[0] == '\\') {
      fo_log__put(b, p, 1);
      p++;
    } else {
      fo_log__putc(b, (unsigned char)*p);
      p++;
    }
  }
}

static void fo_log__timestamp(struct fo_log_buf *b) {
  char ts[64];
  int64_t ms = fo_wall_ms();
  time_t secs = (time_t)(ms / 1000);
  struct tm tm;
  int n;

  if (gmtime_r(&secs, &tm) == NULL) {
    memset(&tm, 0, sizeof(tm));
  }
  n = snprintf(ts, sizeof(ts), "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
               tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
               tm.tm_min, tm.tm_sec, (int)(ms % 1000));
  if (n > 0 && (size_t)n < sizeof(ts)) {
    fo_log__put(b, ts, (size_t)n);
  }
}

static void fo_log__emit(const char *line, size_t len) {
  FILE *f = atomic_load(&fo_log_stream);
  size_t wrote;

  if (f == NULL) {
    f = stderr;
  }
  /* Our own mutex rather than flockfile(): the stdio lock would do, but
   * ThreadSanitizer cannot see it. A failed write of a log record has
   * nowhere to be reported, so the results are not acted on. */
  pthread_mutex_lock(&fo_log_mu);
  wrote = fwrite(line, 1, len, f);
  if (wrote == len) {
    (void)fflush(f);
  }
  pthread_mutex_unlock(&fo_log_mu);
}

void fo_log_write(fo_log_level level, const char *mod, const char *msg,
                  const char *kvfmt, ...) {
  char line[FO_LOG_LINE_MAX];
  struct fo_log_buf b = {line, 0, sizeof(line) - FO_LOG_TAIL, false, false};
  int saved_errno = errno;
  const char *name = "unknown";

  if (!fo_log_enabled(level)) {
    return;
  }
  if (level >= FO_LOG_ERROR && level <= FO_LOG_DEBUG) {
    name = fo_log_names[level];
  }
  mod = mod != NULL ? mod : "-";
  msg = msg != NULL ? msg : "";

  fo_log__timestamp(&b);
  fo_log__put(&b, " level=", 7);
  fo_log__put(&b, name, strlen(name));
  fo_log__put(&b, " mod=", 5);
  fo_log__puts(&b, mod, strlen(mod));
  fo_log__put(&b, " msg=", 5);
  fo_log__quote(&b);
  fo_log__puts(&b, msg, strlen(msg));
  fo_log__quote(&b);

  while (kvfmt != NULL && *kvfmt == ' ') {
    kvfmt++;
  }
  if (kvfmt != NULL && *kvfmt != '\0') {
    va_list ap;

    fo_log__put(&b, " ", 1);
    va_start(ap, kvfmt);
    fo_log__kv(&b, kvfmt, &ap, saved_errno);
    va_end(ap);
  }

  /* The tail was kept back, so these always fit. */
  if (b.in_quote) {
    line[b.len++] = '"';
  }
  if (b.truncated) {
    memcpy(line + b.len, FO_LOG_TRUNC, sizeof(FO_LOG_TRUNC) - 1);
    b.len += sizeof(FO_LOG_TRUNC) - 1;
  }
  line[b.len++] = '\n';

  fo_log__emit(line, b.len);
  errno = saved_errno;
}

bool fo_ratelimit_allow(fo_ratelimit *rl, int64_t interval_ms,
                        uint64_t *suppressed) {
  int64_t now = fo_now_ms();
  int_fast64_t next =
      atomic_load_explicit(&rl->next_ms, memory_order_relaxed);
  uint64_t held;

  if (interval_ms < 0) {
    interval_ms = 0;
  }
  /* Of the threads that see the interval over, only the one whose CAS
   * moves next_ms on may write; the others count as held back. */
  if (now < next || !atomic_compare_exchange_strong(&rl->next_ms, &next,
                                                    now + interval_ms)) {
    atomic_fetch_add_explicit(&rl->suppressed, 1, memory_order_relaxed);
    return false;
  }
  held = atomic_exchange(&rl->suppressed, 0);
  if (suppressed != NULL) {
    *suppressed = held;
  }
  return true;
}
