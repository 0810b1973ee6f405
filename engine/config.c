/* SPDX-License-Identifier: MIT */
/*
 * Configuration loader. inih reads the INI file; this module checks every
 * section and key against one static schema, applies FANOUT_<SECTION>_<KEY>
 * environment overrides, fills defaults and validates each value by type.
 * The first problem found becomes one line naming its source (file and
 * line, or environment variable), the section and the key. Secret values
 * are never copied into that line. docs/config.md describes the schema for
 * users; keep the two in step.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/types.h>

#include <ini.h>

#include "config.h"
#include "fanout/common.h"

#include <libpq-fe.h>

extern char **environ;

enum fo_cfg_type {
  FO_CT_STRING,    /* any text */
  FO_CT_PATH,      /* a file name */
  FO_CT_INT,       /* a decimal integer within [min, max] */
  FO_CT_BOOL,      /* true/false, yes/no, on/off, 1/0 */
  FO_CT_CHOICE,    /* one of the '|'-separated words in `choices` */
  FO_CT_LISTEN,    /* HOST:PORT, port 0-65535 */
  FO_CT_URL,       /* http:// or https:// */
  FO_CT_REDIS_URL, /* redis:// */
  FO_CT_BROKERS,   /* "embedded" or HOST:PORT[,HOST:PORT...] */
  FO_CT_CHANNELS,  /* a non-empty list of push, email, sms, inapp */
  FO_CT_PG_DSN     /* a libpq connection string or URI */
};

#define FO_CK_REQUIRED 0x1u   /* must have a value */
#define FO_CK_SECRET 0x2u     /* never logged nor echoed in errors */
#define FO_CK_IF_PRESENT 0x4u /* must have a value when the section does */

struct fo_cfg_key {
  const char *name;
  enum fo_cfg_type type;
  const char *def; /* default, as text; NULL for none */
  int64_t min;     /* FO_CT_INT: lowest value; text: shortest length */
  int64_t max;     /* FO_CT_INT: highest value */
  unsigned flags;
  const char *choices; /* FO_CT_CHOICE only */
};

struct fo_cfg_section {
  const char *name;
  bool named; /* [name.INSTANCE] sections are allowed */
  const struct fo_cfg_key *keys;
  size_t nkeys;
};

#define FO_CFG_INT(n, d, lo, hi)                                           \
  { .name = n, .type = FO_CT_INT, .def = d, .min = lo, .max = hi }
#define FO_CFG_STR(n, d) { .name = n, .type = FO_CT_STRING, .def = d }
#define FO_CFG_PATH(n, d) { .name = n, .type = FO_CT_PATH, .def = d }
#define FO_CFG_URL(n) { .name = n, .type = FO_CT_URL }

static const struct fo_cfg_key fo_cfg_log[] = {
    {.name = "level",
     .type = FO_CT_CHOICE,
     .def = "info",
     .choices = "error|warn|info|debug"},
};

static const struct fo_cfg_key fo_cfg_kafka[] = {
    {.name = "brokers", .type = FO_CT_BROKERS, .def = "embedded"},
    FO_CFG_STR("group", "fanout"),
    FO_CFG_STR("topic", "notifications"),
    FO_CFG_STR("chat_topic", "chat"),
    FO_CFG_STR("dlq_topic", "notifications.dlq"),
    FO_CFG_INT("session_timeout_ms", "10000", 1000, 300000),
    FO_CFG_INT("embedded_partitions", "4", 1, 64),
    FO_CFG_PATH("bootstrap_file", "var/kafka.bootstrap"),
    FO_CFG_INT("max_event_bytes", "1048576", 1024, 16777216),
};

static const struct fo_cfg_key fo_cfg_engine[] = {
    FO_CFG_INT("queue_items", "1000000", 1, 100000000),
    FO_CFG_INT("queue_events", "4096", 1, 10000000),
    FO_CFG_INT("workers", "2", 1, 64),
    FO_CFG_INT("commit_interval_ms", "1000", 10, 60000),
    FO_CFG_INT("drain_timeout_ms", "10000", 0, 600000),
    FO_CFG_INT("summary_interval_s", "10", 0, 3600),
    FO_CFG_INT("retry_base_ms", "1000", 1, 600000),
    FO_CFG_INT("retry_max_ms", "300000", 1, 86400000),
    FO_CFG_INT("cache_users", "1000000", 1, 100000000),
    FO_CFG_INT("dedup_claim_ms", "300000", 1000, 86400000),
    FO_CFG_INT("deferred_poll_ms", "1000", 10, 600000),
};

static const struct fo_cfg_key fo_cfg_postgres[] = {
    {.name = "dsn", .type = FO_CT_PG_DSN, .flags = FO_CK_SECRET},
    FO_CFG_INT("pool", "4", 1, 64),
};

static const struct fo_cfg_key fo_cfg_redis[] = {
    {.name = "url",
     .type = FO_CT_REDIS_URL,
     .def = "redis://127.0.0.1:6379",
     .flags = FO_CK_SECRET},
    {.name = "caps_fail_closed", .type = FO_CT_BOOL, .def = "false"},
};

static const struct fo_cfg_key fo_cfg_admin[] = {
    {.name = "listen", .type = FO_CT_LISTEN, .def = "127.0.0.1:8080"},
    {.name = "token",
     .type = FO_CT_STRING,
     .min = 16,
     .flags = FO_CK_REQUIRED | FO_CK_SECRET},
};

static const struct fo_cfg_key fo_cfg_relay[] = {
    {.name = "listen", .type = FO_CT_LISTEN, .def = "127.0.0.1:8081"},
    {.name = "jwt_secret",
     .type = FO_CT_STRING,
     .min = 16,
     .flags = FO_CK_REQUIRED | FO_CK_SECRET},
};

static const struct fo_cfg_key fo_cfg_apns[] = {
    FO_CFG_URL("url"),
    FO_CFG_PATH("key_file", NULL),
    FO_CFG_STR("key_id", NULL),
    FO_CFG_STR("team_id", NULL),
    FO_CFG_STR("topic", NULL),
    FO_CFG_PATH("ca_file", NULL),
};

static const struct fo_cfg_key fo_cfg_fcm[] = {
    FO_CFG_URL("url"),
    FO_CFG_URL("token_url"),
    FO_CFG_PATH("service_account_file", NULL),
    FO_CFG_PATH("ca_file", NULL),
};

static const struct fo_cfg_key fo_cfg_sendgrid[] = {
    FO_CFG_URL("url"),
    {.name = "api_key", .type = FO_CT_STRING, .flags = FO_CK_SECRET},
    FO_CFG_STR("from", NULL),
    FO_CFG_PATH("ca_file", NULL),
    FO_CFG_INT("max_inflight", "2000", 1, 100000),
    FO_CFG_INT("timeout_ms", "30000", 100, 600000),
};

static const struct fo_cfg_key fo_cfg_twilio[] = {
    FO_CFG_URL("url"),
    FO_CFG_STR("account_sid", NULL),
    {.name = "auth_token", .type = FO_CT_STRING, .flags = FO_CK_SECRET},
    FO_CFG_STR("from", NULL),
    FO_CFG_STR("messaging_service_sid", NULL),
    FO_CFG_PATH("ca_file", NULL),
    FO_CFG_URL("status_callback_url"),
    FO_CFG_INT("max_inflight", "64", 1, 10000),
    FO_CFG_INT("timeout_ms", "30000", 100, 600000),
    FO_CFG_INT("rate_per_second", "0", 0, 100000),
};

static const struct fo_cfg_key fo_cfg_record[] = {
    {.name = "file", .type = FO_CT_PATH, .flags = FO_CK_IF_PRESENT},
    {.name = "channels",
     .type = FO_CT_CHANNELS,
     .def = "push,email,sms,inapp"},
};

#define FO_CFG_SECTION(n, named, keys)                                     \
  { n, named, keys, sizeof(keys) / sizeof(keys[0]) }

static const struct fo_cfg_section fo_cfg_schema[] = {
    FO_CFG_SECTION("log", false, fo_cfg_log),
    FO_CFG_SECTION("kafka", false, fo_cfg_kafka),
    FO_CFG_SECTION("engine", false, fo_cfg_engine),
    FO_CFG_SECTION("postgres", false, fo_cfg_postgres),
    FO_CFG_SECTION("redis", false, fo_cfg_redis),
    FO_CFG_SECTION("admin", false, fo_cfg_admin),
    FO_CFG_SECTION("relay", false, fo_cfg_relay),
    FO_CFG_SECTION("apns", true, fo_cfg_apns),
    FO_CFG_SECTION("fcm", true, fo_cfg_fcm),
    FO_CFG_SECTION("sendgrid", false, fo_cfg_sendgrid),
    FO_CFG_SECTION("twilio", false, fo_cfg_twilio),
    FO_CFG_SECTION("record", false, fo_cfg_record),
};

#define FO_CFG_NSECTIONS (sizeof(fo_cfg_schema) / sizeof(fo_cfg_schema[0]))
#define FO_CFG_INSTANCE_MAX 32
#define FO_CFG_ENV_MAX 128

static const char *const fo_cfg_channels[] = {"push", "email", "sms",
                                              "inapp"};

struct fo_cfg_val {
  char *value; /* owned; NULL when neither the file nor env gave one */
  int line;    /* line in the file, 0 when not from the file */
  bool from_env;
};

struct fo_cfg_sec {
  char *name;           /* "apns" or "apns.ios"; owned */
  const char *instance; /* inside name, after the dot; NULL if none */
  const struct fo_cfg_section *schema;
  bool present;
  int line;                /* first header in the file, 0 if none */
  struct fo_cfg_val *vals; /* one per schema key; owned */
};

struct fo_config {
  struct fo_cfg_sec *secs; /* plain sections in schema order, then named
                            * instances in file order */
  size_t nsecs;
  size_t cap;
};

/* State of one fo_config_load call. */
struct fo_cfg_load {
  fo_config *cfg;
  const char *path;
  FILE *f;
  char *buf; /* getline buffer */
  size_t bufcap;
  int lineno;
  int read_errno;
  int err;      /* first failure: FO_OK, FO_ECONFIG or FO_ENOMEM */
  int err_line; /* its line in the file, 0 when not from the file */
  char *errbuf;
  size_t errlen;
};

bool fo_config__bool_parse(const char *s, bool *out);

/*
 * Records the first failure as one line: "config: " WHERE MESSAGE. Later
 * failures are dropped so the user sees where things first went wrong.
 * Control bytes (from a path or a name in the file) become '?' so the
 * line stays one line.
 */
__attribute__((format(printf, 4, 5))) static void
fo_cfg__fail(struct fo_cfg_load *ld, int line, const char *where,
             const char *fmt, ...) {
  char msg[512];
  va_list ap;

  if (ld->err != FO_OK) {
    return;
  }
  ld->err = FO_ECONFIG;
  ld->err_line = line;
  if (ld->errbuf == NULL || ld->errlen == 0) {
    return;
  }
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  if (line > 0) {
    snprintf(ld->errbuf, ld->errlen, "config: %s:%d: %s", ld->path, line,
             msg);
  } else {
    snprintf(ld->errbuf, ld->errlen, "config: %s%s", where, msg);
  }
  for (char *p = ld->errbuf; *p != '\0'; p++) {
    if ((unsigned char)*p < 0x20 || *p == 0x7f) {
      *p = '?';
    }
  }
}

static void fo_cfg__nomem(struct fo_cfg_load *ld) {
  if (ld->err != FO_OK) {
    return;
  }
  ld->err = FO_ENOMEM;
  if (ld->errbuf != NULL && ld->errlen > 0) {
    snprintf(ld->errbuf, ld->errlen, "config: out of memory");
  }
}

static const struct fo_cfg_section *fo_cfg__family(const char *name,
                                                   size_t len) {
  for (size_t i = 0; i < FO_CFG_NSECTIONS; i++) {
    if (strlen(fo_cfg_schema[i].name) == len &&
        strncmp(fo_cfg_schema[i].name, name, len) == 0) {
      return &fo_cfg_schema[i];
    }
  }
  return NULL;
}

/* Schema of a section name such as "kafka" or "apns.ios"; NULL if none. */
static const struct fo_cfg_section *fo_cfg__schema_of(const char *name) {
  const char *dot;
  const struct fo_cfg_section *sch;

  if (name == NULL) {
    return NULL;
  }
  dot = strchr(name, '.');
  sch = fo_cfg__family(name, dot != NULL ? (size_t)(dot - name)
                                         : strlen(name));
  if (sch != NULL && dot != NULL && !sch->named) {
    return NULL;
  }
  return sch;
}

static int fo_cfg__key_index(const struct fo_cfg_section *sch,
                             const char *key) {
  if (sch == NULL || key == NULL) {
    return -1;
  }
  for (size_t i = 0; i < sch->nkeys; i++) {
    if (strcmp(sch->keys[i].name, key) == 0) {
      return (int)i;
    }
  }
  return -1;
}

static struct fo_cfg_sec *fo_cfg__find_n(const fo_config *cfg,
                                         const char *name, size_t len) {
  for (size_t i = 0; i < cfg->nsecs; i++) {
    if (strlen(cfg->secs[i].name) == len &&
        strncmp(cfg->secs[i].name, name, len) == 0) {
      return &cfg->secs[i];
    }
  }
  return NULL;
}

static struct fo_cfg_sec *fo_cfg__find(const fo_config *cfg,
                                       const char *name) {
  return name != NULL ? fo_cfg__find_n(cfg, name, strlen(name)) : NULL;
}

/* Appends a section record. Returns it, or NULL when out of memory. */
static struct fo_cfg_sec *fo_cfg__add(fo_config *cfg,
                                      const struct fo_cfg_section *sch,
                                      const char *name, size_t len) {
  struct fo_cfg_sec *sec;

  if (cfg->nsecs == cfg->cap) {
    size_t cap = cfg->cap * 2 + 4;
    struct fo_cfg_sec *grown = realloc(cfg->secs, cap * sizeof(*grown));

    if (grown == NULL) {
      return NULL;
    }
    cfg->secs = grown;
    cfg->cap = cap;
  }
  sec = &cfg->secs[cfg->nsecs];
  memset(sec, 0, sizeof(*sec));
  sec->name = strndup(name, len);
  sec->vals = calloc(sch->nkeys, sizeof(*sec->vals));
  if (sec->name == NULL || sec->vals == NULL) {
    free(sec->name);
    free(sec->vals);
    return NULL;
  }
  sec->schema = sch;
  if (strlen(sch->name) < len) {
    sec->instance = sec->name + strlen(sch->name) + 1;
  }
  cfg->nsecs++;
  return sec;
}

static bool fo_cfg__instance_ok(const char *s, size_t len) {
  if (len == 0 || len > FO_CFG_INSTANCE_MAX) {
    return false;
  }
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];

    if (!(islower(c) || isdigit(c) || c == '_' || c == '-')) {
      return false;
    }
  }
  return true;
}

/*
 * Handles a "[name]" header line. inih only reports key=value pairs, so
 * headers are seen here, where an empty section still counts as given and
 * an unknown one is still an error.
 */
static void fo_cfg__header(struct fo_cfg_load *ld, const char *line) {
  const char *end = strchr(line + 1, ']');
  const char *name = line + 1;
  const struct fo_cfg_section *sch;
  const char *dot;
  size_t len;
  struct fo_cfg_sec *sec;

  if (end == NULL) {
    return; /* inih reports the syntax error */
  }
  len = (size_t)(end - name);
  dot = memchr(name, '.', len);
  sch = fo_cfg__family(name, dot != NULL ? (size_t)(dot - name) : len);
  if (sch == NULL) {
    fo_cfg__fail(ld, ld->lineno, "", "[%.*s]: unknown section", (int)len,
                 name);
    return;
  }
  if (dot != NULL && !sch->named) {
    fo_cfg__fail(ld, ld->lineno, "",
                 "[%.*s]: unknown section ([%s] takes no instance name)",
                 (int)len, name, sch->name);
    return;
  }
  if (dot != NULL) {
    size_t ilen = len - (size_t)(dot + 1 - name);

    if (!fo_cfg__instance_ok(dot + 1, ilen)) {
      fo_cfg__fail(ld, ld->lineno, "",
                   "[%.*s]: bad instance name (1-%d characters of a-z, "
                   "0-9, _ and -)",
                   (int)len, name, FO_CFG_INSTANCE_MAX);
      return;
    }
    if (ilen == 7 && strncmp(dot + 1, "default", 7) == 0) {
      fo_cfg__fail(ld, ld->lineno, "",
                   "[%.*s]: the app named default is configured in [%s]",
                   (int)len, name, sch->name);
      return;
    }
  }

  sec = fo_cfg__find_n(ld->cfg, name, len);
  if (sec == NULL) {
    sec = fo_cfg__add(ld->cfg, sch, name, len);
  }
  if (sec == NULL) {
    fo_cfg__nomem(ld);
    return;
  }
  if (!sec->present) {
    sec->present = true;
    sec->line = ld->lineno;
  }
}

/*
 * Line reader handed to inih. Counting lines here gives the handler the
 * line number this inih build does not pass it. Leading blanks are
 * dropped, which turns off inih's continuation lines: an indented line is
 * an ordinary line, never a silent extension of the previous value.
 */
static char *fo_cfg__read(char *str, int num, void *stream) {
  struct fo_cfg_load *ld = stream;
  ssize_t n;
  char *s;
  size_t len;

  if (ld->err != FO_OK) {
    return NULL;
  }
  errno = 0;
  n = getline(&ld->buf, &ld->bufcap, ld->f);
  if (n < 0) {
    if (ferror(ld->f)) {
      ld->read_errno = errno != 0 ? errno : EIO;
    }
    return NULL;
  }
  ld->lineno++;
  while (n > 0 && (ld->buf[n - 1] == '\n' || ld->buf[n - 1] == '\r')) {
    ld->buf[--n] = '\0';
  }
  s = ld->buf;
  if (ld->lineno == 1 && strncmp(s, "\xEF\xBB\xBF", 3) == 0) {
    s += 3;
  }
  while (*s == ' ' || *s == '\t') {
    s++;
  }
  len = strlen(s);
  if (len != (size_t)(n - (s - ld->buf))) {
    fo_cfg__fail(ld, ld->lineno, "", "NUL byte in line");
    return NULL;
  }
  /* inih needs room for the line plus "\r\n" and the terminator.
   * Known limitation: inih as packaged is built with a 200-byte line
   * buffer, so a line in the file holds at most 197 characters; a longer
   * value has to come from the environment. */
  if (num < 4 || len > (size_t)num - 3) {
    fo_cfg__fail(ld, ld->lineno, "", "line too long (at most %d characters)",
                 num - 3);
    return NULL;
  }
  if (*s == '[') {
    fo_cfg__header(ld, s);
    if (ld->err != FO_OK) {
      return NULL;
    }
  }
  memcpy(str, s, len + 1);
  return str;
}

/* inih handler: one key = value pair. Returns 1 to go on, 0 on error. */
static int fo_cfg__pair(void *user, const char *section, const char *name,
                        const char *value) {
  struct fo_cfg_load *ld = user;
  struct fo_cfg_sec *sec;
  struct fo_cfg_val *v;
  int k;

  if (ld->err != FO_OK) {
    return 0;
  }
  if (*section == '\0') {
    fo_cfg__fail(ld, ld->lineno, "", "%s: key outside any [section]", name);
    return 0;
  }
  sec = fo_cfg__find(ld->cfg, section);
  if (sec == NULL || !sec->present) {
    fo_cfg__fail(ld, ld->lineno, "", "[%s]: unknown section", section);
    return 0;
  }
  k = fo_cfg__key_index(sec->schema, name);
  if (k < 0) {
    fo_cfg__fail(ld, ld->lineno, "", "[%s] %s: unknown key", section, name);
    return 0;
  }
  v = &sec->vals[k];
  if (v->value != NULL) {
    fo_cfg__fail(ld, ld->lineno, "", "[%s] %s: given twice (first on line %d)",
                 section, name, v->line);
    return 0;
  }
  v->value = strdup(value);
  if (v->value == NULL) {
    fo_cfg__nomem(ld);
    return 0;
  }
  v->line = ld->lineno;
  return 1;
}

static void fo_cfg__parse_file(struct fo_cfg_load *ld) {
  int r;

  ld->f = fopen(ld->path, "r");
  if (ld->f == NULL) {
    fo_cfg__fail(ld, 0, "", "cannot read %s: %s", ld->path, strerror(errno));
    return;
  }
  r = ini_parse_stream(fo_cfg__read, ld, fo_cfg__pair, ld);
  if (ld->err == FO_ENOMEM) {
    return;
  }
  if (ld->read_errno != 0) {
    ld->err = FO_OK;
    fo_cfg__fail(ld, 0, "", "cannot read %s: %s", ld->path,
                 strerror(ld->read_errno));
    return;
  }
  if (r == -2) {
    fo_cfg__nomem(ld);
    return;
  }
  /* inih returns the first line it failed on, ours or its own; a syntax
   * error before the line we failed on is the one to show. */
  if (r > 0 && (ld->err == FO_OK || r < ld->err_line)) {
    ld->err = FO_OK;
    fo_cfg__fail(ld, r, "",
                 "syntax error (expected [section] or key = value)");
  }
}

/* FANOUT_<SECTION>_<KEY>: upper case, '.' and '-' become '_'. */
static void fo_cfg__env_name(const char *section, const char *key,
                             char *out, size_t cap) {
  size_t n;

  snprintf(out, cap, "FANOUT_%s_%s", section, key);
  n = strlen(out);
  for (size_t i = 0; i < n; i++) {
    if (out[i] == '.' || out[i] == '-') {
      out[i] = '_';
    } else {
      out[i] = (char)toupper((unsigned char)out[i]);
    }
  }
}

static const char *fo_cfg__env_get(char *const *envp, const char *name) {
  size_t n = strlen(name);

  for (; envp != NULL && *envp != NULL; envp++) {
    if (strncmp(*envp, name, n) == 0 && (*envp)[n] == '=') {
      return *envp + n + 1;
    }
  }
  return NULL;
}

/*
 * Two instance names can map to one variable ([fcm.token] url and [fcm]
 * token_url both read FANOUT_FCM_TOKEN_URL; [apns.a-b] and [apns.a_b]
 * share every name). Such a file is refused rather than have one
 * variable set two keys.
 */
static void fo_cfg__env_clashes(struct fo_cfg_load *ld) {
  fo_config *cfg = ld->cfg;
  char a[FO_CFG_ENV_MAX];
  char b[FO_CFG_ENV_MAX];

  for (size_t i = 0; i < cfg->nsecs; i++) {
    struct fo_cfg_sec *si = &cfg->secs[i];

    if (si->instance == NULL) {
      continue;
    }
    for (size_t j = 0; j < cfg->nsecs; j++) {
      struct fo_cfg_sec *sj = &cfg->secs[j];

      if (i == j || sj->schema != si->schema) {
        continue;
      }
      for (size_t ki = 0; ki < si->schema->nkeys; ki++) {
        fo_cfg__env_name(si->name, si->schema->keys[ki].name, a, sizeof(a));
        for (size_t kj = 0; kj < sj->schema->nkeys; kj++) {
          fo_cfg__env_name(sj->name, sj->schema->keys[kj].name, b,
                           sizeof(b));
          if (strcmp(a, b) == 0) {
            fo_cfg__fail(ld, si->line, "",
                         "[%s]: instance name clashes with [%s]: %s would "
                         "set both",
                         si->name, sj->name, a);
            return;
          }
        }
      }
    }
  }
}

static void fo_cfg__apply_env(struct fo_cfg_load *ld, char *const *envp) {
  fo_config *cfg = ld->cfg;
  char name[FO_CFG_ENV_MAX];

  for (size_t i = 0; i < cfg->nsecs && ld->err == FO_OK; i++) {
    struct fo_cfg_sec *sec = &cfg->secs[i];

    for (size_t k = 0; k < sec->schema->nkeys; k++) {
      const char *val;
      char *copy;

      fo_cfg__env_name(sec->name, sec->schema->keys[k].name, name,
                       sizeof(name));
      val = fo_cfg__env_get(envp, name);
      if (val == NULL) {
        continue;
      }
      copy = strdup(val);
      if (copy == NULL) {
        fo_cfg__nomem(ld);
        return;
      }
      free(sec->vals[k].value);
      sec->vals[k].value = copy;
      sec->vals[k].line = 0;
      sec->vals[k].from_env = true;
      sec->present = true;
    }
  }
}

static bool fo_cfg__int_parse(const char *s, int64_t *out) {
  char *end;
  long long v;

  if (!isdigit((unsigned char)s[0]) &&
      !(s[0] == '-' && isdigit((unsigned char)s[1]))) {
    return false;
  }
  errno = 0;
  v = strtoll(s, &end, 10);
  if (errno != 0 || *end != '\0') {
    return false;
  }
  *out = v;
  return true;
}

/* Also reached by the unit tests, as no key of the schema is a boolean
 * yet. */
bool fo_config__bool_parse(const char *s, bool *out) {
  static const char *const yes[] = {"true", "yes", "on", "1"};
  static const char *const no[] = {"false", "no", "off", "0"};

  for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
    if (strcasecmp(s, yes[i]) == 0) {
      *out = true;
      return true;
    }
    if (strcasecmp(s, no[i]) == 0) {
      *out = false;
      return true;
    }
  }
  return false;
}

/* HOST:PORT, or [IPV6]:PORT, in s[0..n). */
static bool fo_cfg__hostport(const char *s, size_t n, long min_port) {
  char buf[256];
  char *colon;
  char *host;
  long port = 0;
  size_t digits;

  if (n == 0 || n >= sizeof(buf)) {
    return false;
  }
  memcpy(buf, s, n);
  buf[n] = '\0';

  colon = strrchr(buf, ':');
  if (colon == NULL) {
    return false;
  }
  *colon = '\0';
  host = buf;
  if (host[0] == '[') {
    struct in6_addr a6;
    size_t hl = strlen(host);

    if (hl < 3 || host[hl - 1] != ']') {
      return false;
    }
    host[hl - 1] = '\0';
    if (inet_pton(AF_INET6, host + 1, &a6) != 1) {
      return false;
    }
  } else {
    if (host[0] == '\0') {
      return false;
    }
    for (char *p = host; *p != '\0'; p++) {
      if (!isalnum((unsigned char)*p) && *p != '.' && *p != '-' &&
          *p != '_') {
        return false;
      }
    }
  }

  digits = strlen(colon + 1);
  if (digits == 0 || digits > 5) {
    return false;
  }
  for (const char *p = colon + 1; *p != '\0'; p++) {
    if (!isdigit((unsigned char)*p)) {
      return false;
    }
    port = port * 10 + (*p - '0');
  }
  return port >= min_port && port <= 65535;
}

/* Splits a comma-separated list, trimming spaces around each item, and
 * calls `ok` on each; false if any item is empty or refused. */
static bool fo_cfg__list(const char *s, bool (*ok)(const char *, size_t)) {
  for (;;) {
    const char *end = strchr(s, ',');
    const char *stop = end != NULL ? end : s + strlen(s);

    while (s < stop && *s == ' ') {
      s++;
    }
    while (stop > s && stop[-1] == ' ') {
      stop--;
    }
    if (stop == s || !ok(s, (size_t)(stop - s))) {
      return false;
    }
    if (end == NULL) {
      return true;
    }
    s = end + 1;
  }
}

static bool fo_cfg__broker_ok(const char *s, size_t n) {
  return fo_cfg__hostport(s, n, 1);
}

static bool fo_cfg__channel_ok(const char *s, size_t n) {
  for (size_t i = 0; i < sizeof(fo_cfg_channels) / sizeof(fo_cfg_channels[0]);
       i++) {
    if (strlen(fo_cfg_channels[i]) == n &&
        strncmp(fo_cfg_channels[i], s, n) == 0) {
      return true;
    }
  }
  return false;
}

static bool fo_cfg__choice_ok(const char *choices, const char *v) {
  size_t n = strlen(v);

  for (const char *p = choices; *p != '\0';) {
    const char *bar = strchr(p, '|');
    size_t len = bar != NULL ? (size_t)(bar - p) : strlen(p);

    if (len == n && strncmp(p, v, n) == 0) {
      return true;
    }
    p += len + (bar != NULL);
  }
  return false;
}

static bool fo_cfg__prefixed(const char *v, const char *prefix) {
  size_t n = strlen(prefix);

  return strncmp(v, prefix, n) == 0 && v[n] != '\0' &&
         strpbrk(v, " \t") == NULL;
}

/*
 * Checks one value against its key. On failure writes the reason to why
 * and sets *echo when showing the value would help (it is still never
 * shown for a secret). Returns true when the value is good.
 */
static bool fo_cfg__check(const struct fo_cfg_key *key, const char *v,
                          char *why, size_t cap, bool *echo) {
  int64_t n;
  bool b;

  *echo = false;
  if (*v == '\0') {
    snprintf(why, cap, "empty value");
    return false;
  }
  for (const char *p = v; *p != '\0'; p++) {
    if ((unsigned char)*p < 0x20 || *p == 0x7f) {
      snprintf(why, cap, "contains a control character");
      return false;
    }
  }
  *echo = true;

  switch (key->type) {
  case FO_CT_INT:
    if (fo_cfg__int_parse(v, &n) && n >= key->min && n <= key->max) {
      return true;
    }
    snprintf(why, cap, "expected an integer %lld-%lld",
             (long long)key->min, (long long)key->max);
    return false;
  case FO_CT_BOOL:
    if (fo_config__bool_parse(v, &b)) {
      return true;
    }
    snprintf(why, cap, "expected true or false");
    return false;
  case FO_CT_CHOICE:
    if (fo_cfg__choice_ok(key->choices, v)) {
      return true;
    }
    snprintf(why, cap, "expected one of %s", key->choices);
    return false;
  case FO_CT_LISTEN:
    if (fo_cfg__hostport(v, strlen(v), 0)) {
      return true;
    }
    snprintf(why, cap, "expected HOST:PORT");
    return false;
  case FO_CT_URL:
    if (fo_cfg__prefixed(v, "http://") || fo_cfg__prefixed(v, "https://")) {
      return true;
    }
    snprintf(why, cap, "expected an http:// or https:// URL");
    return false;
  case FO_CT_PG_DSN: {
    /* Checked here so that a DSN that can never work stops the start,
     * while an unreachable server is waited for (see fanoutd). */
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(v, &perr);

    PQfreemem(perr);
    if (opts != NULL) {
      PQconninfoFree(opts);
      return true;
    }
    *echo = false;
    snprintf(why, cap, "not a valid PostgreSQL connection string");
    return false;
  }
  case FO_CT_REDIS_URL:
    if (fo_cfg__prefixed(v, "redis://")) {
      return true;
    }
    snprintf(why, cap, "expected a redis:// URL");
    return false;
  case FO_CT_BROKERS:
    if (strcmp(v, "embedded") == 0 || fo_cfg__list(v, fo_cfg__broker_ok)) {
      return true;
    }
    snprintf(why, cap, "expected \"embedded\" or a list of HOST:PORT");
    return false;
  case FO_CT_CHANNELS:
    if (fo_cfg__list(v, fo_cfg__channel_ok)) {
      return true;
    }
    snprintf(why, cap, "expected a comma-separated list of push, email, "
                       "sms, inapp");
    return false;
  case FO_CT_STRING:
  case FO_CT_PATH:
    if ((int64_t)strlen(v) >= key->min) {
      return true;
    }
    *echo = false;
    snprintf(why, cap, "too short (at least %lld characters)",
             (long long)key->min);
    return false;
  }
  return true;
}

/* Where a value came from, as the start of an error line. */
static void fo_cfg__where(const struct fo_cfg_sec *sec,
                          const struct fo_cfg_key *key,
                          const struct fo_cfg_val *v, char *out,
                          size_t cap) {
  if (v->from_env) {
    char env[FO_CFG_ENV_MAX];

    fo_cfg__env_name(sec->name, key->name, env, sizeof(env));
    snprintf(out, cap, "%s: ", env);
  } else {
    out[0] = '\0';
  }
}

static void fo_cfg__validate_key(struct fo_cfg_load *ld,
                                 const struct fo_cfg_sec *sec, size_t k) {
  const struct fo_cfg_key *key = &sec->schema->keys[k];
  const struct fo_cfg_val *v = &sec->vals[k];
  char where[FO_CFG_ENV_MAX + 4];
  char why[160];
  bool echo;

  if (v->value == NULL) {
    if ((key->flags & FO_CK_REQUIRED) != 0) {
      fo_cfg__fail(ld, 0, "", "[%s] %s: required", sec->name, key->name);
    } else if ((key->flags & FO_CK_IF_PRESENT) != 0 && sec->present) {
      fo_cfg__fail(ld, sec->line, "", "[%s] %s: required in [%s]",
                   sec->name, key->name, sec->name);
    }
    return;
  }
  if (fo_cfg__check(key, v->value, why, sizeof(why), &echo)) {
    return;
  }
  fo_cfg__where(sec, key, v, where, sizeof(where));
  if (echo && (key->flags & FO_CK_SECRET) == 0) {
    /* A value shown in an error is cut to keep the line readable. */
    size_t len = strlen(v->value);

    fo_cfg__fail(ld, v->line, where, "[%s] %s: %s, got \"%.80s%s\"",
                 sec->name, key->name, why, v->value,
                 len > 80 ? "..." : "");
  } else {
    fo_cfg__fail(ld, v->line, where, "[%s] %s: %s", sec->name, key->name,
                 why);
  }
}

static void fo_cfg__validate(struct fo_cfg_load *ld) {
  fo_config *cfg = ld->cfg;

  for (size_t i = 0; i < cfg->nsecs && ld->err == FO_OK; i++) {
    for (size_t k = 0; k < cfg->secs[i].schema->nkeys; k++) {
      fo_cfg__validate_key(ld, &cfg->secs[i], k);
    }
  }
  if (ld->err == FO_OK && fo_config_get_int(cfg, "engine", "retry_base_ms") >
                              fo_config_get_int(cfg, "engine",
                                                "retry_max_ms")) {
    fo_cfg__fail(ld, 0, "",
                 "[engine] retry_base_ms: must not be above retry_max_ms");
  }
}

void fo_config_free(fo_config *cfg) {
  if (cfg == NULL) {
    return;
  }
  for (size_t i = 0; i < cfg->nsecs; i++) {
    for (size_t k = 0; k < cfg->secs[i].schema->nkeys; k++) {
      free(cfg->secs[i].vals[k].value);
    }
    free(cfg->secs[i].vals);
    free(cfg->secs[i].name);
  }
  free(cfg->secs);
  free(cfg);
}

int fo_config_load(const char *path, char *const *envp, fo_config **out,
                   char *err, size_t errlen) {
  struct fo_cfg_load ld;
  fo_config *cfg;

  memset(&ld, 0, sizeof(ld));
  ld.errbuf = err;
  ld.errlen = errlen;
  ld.path = path;
  if (err != NULL && errlen > 0) {
    err[0] = '\0';
  }
  if (out == NULL) {
    return FO_EINVAL;
  }

  cfg = calloc(1, sizeof(*cfg));
  if (cfg == NULL) {
    fo_cfg__nomem(&ld);
    return FO_ENOMEM;
  }
  ld.cfg = cfg;
  for (size_t i = 0; i < FO_CFG_NSECTIONS; i++) {
    const struct fo_cfg_section *sch = &fo_cfg_schema[i];

    if (fo_cfg__add(cfg, sch, sch->name, strlen(sch->name)) == NULL) {
      fo_cfg__nomem(&ld);
      goto out;
    }
  }

  if (path != NULL) {
    fo_cfg__parse_file(&ld);
    if (ld.err != FO_OK) {
      goto out;
    }
  }
  fo_cfg__env_clashes(&ld);
  if (ld.err != FO_OK) {
    goto out;
  }
  fo_cfg__apply_env(&ld, envp != NULL ? envp : environ);
  if (ld.err != FO_OK) {
    goto out;
  }
  fo_cfg__validate(&ld);

out:
  if (ld.f != NULL) {
    fclose(ld.f);
  }
  free(ld.buf);
  if (ld.err != FO_OK) {
    fo_config_free(cfg);
    return ld.err;
  }
  *out = cfg;
  return FO_OK;
}

bool fo_config_has_section(const fo_config *cfg, const char *section) {
  const struct fo_cfg_sec *sec;

  if (cfg == NULL) {
    return false;
  }
  sec = fo_cfg__find(cfg, section);
  return sec != NULL && sec->present;
}

const char *fo_config_get(const fo_config *cfg, const char *section,
                          const char *key) {
  const struct fo_cfg_sec *sec;
  const struct fo_cfg_section *sch;
  int k;

  if (cfg == NULL) {
    return NULL;
  }
  sec = fo_cfg__find(cfg, section);
  sch = sec != NULL ? sec->schema : fo_cfg__schema_of(section);
  k = fo_cfg__key_index(sch, key);
  if (k < 0) {
    return NULL;
  }
  if (sec != NULL && sec->vals[k].value != NULL) {
    return sec->vals[k].value;
  }
  return sch->keys[k].def;
}

static const struct fo_cfg_key *fo_cfg__key_of(const char *section,
                                               const char *key) {
  const struct fo_cfg_section *sch = fo_cfg__schema_of(section);
  int k = fo_cfg__key_index(sch, key);

  return k >= 0 ? &sch->keys[k] : NULL;
}

int64_t fo_config_get_int(const fo_config *cfg, const char *section,
                          const char *key) {
  const struct fo_cfg_key *k = fo_cfg__key_of(section, key);
  const char *v;
  int64_t n;

  if (k == NULL || k->type != FO_CT_INT) {
    return 0;
  }
  v = fo_config_get(cfg, section, key);
  if (v == NULL || !fo_cfg__int_parse(v, &n)) {
    return 0;
  }
  return n;
}

bool fo_config_get_bool(const fo_config *cfg, const char *section,
                        const char *key) {
  const struct fo_cfg_key *k = fo_cfg__key_of(section, key);
  const char *v;
  bool b;

  if (k == NULL || k->type != FO_CT_BOOL) {
    return false;
  }
  v = fo_config_get(cfg, section, key);
  if (v == NULL || !fo_config__bool_parse(v, &b)) {
    return false;
  }
  return b;
}

size_t fo_config_instances(const fo_config *cfg, const char *family,
                           const char **names, size_t cap) {
  const struct fo_cfg_section *sch = fo_cfg__schema_of(family);
  size_t n = 0;

  if (cfg == NULL || sch == NULL || strchr(family, '.') != NULL) {
    return 0;
  }
  for (size_t i = 0; i < cfg->nsecs; i++) {
    const struct fo_cfg_sec *sec = &cfg->secs[i];

    if (sec->schema == sch && sec->instance == NULL && sec->present) {
      if (names != NULL && n < cap) {
        names[n] = "default";
      }
      n++;
    }
  }
  for (size_t i = 0; i < cfg->nsecs; i++) {
    const struct fo_cfg_sec *sec = &cfg->secs[i];

    if (sec->schema == sch && sec->instance != NULL && sec->present) {
      if (names != NULL && n < cap) {
        names[n] = sec->instance;
      }
      n++;
    }
  }
  return n;
}

bool fo_config_is_secret(const char *section, const char *key) {
  const struct fo_cfg_key *k = fo_cfg__key_of(section, key);

  return k != NULL && (k->flags & FO_CK_SECRET) != 0;
}
