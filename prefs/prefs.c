/* SPDX-License-Identifier: MIT */
/*
 * The preference model of one user: turns the JSON document of the REST
 * API into an immutable fo_prefs with the defaults applied, or says in one
 * line which field is wrong, and turns it back into the canonical
 * document. It also holds the JSON merge patch (RFC 7396) that PATCH
 * applies to a stored document before it is validated again. Quiet hours
 * and time zones live in quiet.c.
 */
#include "prefs.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fanout/common.h"

/* More categories than this in one user's preferences is a mistake. */
#define FO_PREFS_CATEGORIES_MAX 1000
#define FO_PREFS_CAP_LIMIT_MAX 1000000

#define FO_QUIET_DEFAULT_CHANNELS ((1u << FO_CH_PUSH) | (1u << FO_CH_SMS))

static const char *const top_keys[] = {
  "channels", "categories", "quiet_hours", "caps", NULL
};

static const char *const quiet_keys[] = {
  "start", "end", "timezone", "channels", NULL
};

static const char *const cap_keys[] = { "limit", "per", NULL };

static const char *const period_names[] = { "", "minute", "hour", "day" };

/*
 * Memory comes from jansson's allocator, like the documents this module
 * reads and writes, so one hook (json_set_alloc_funcs) governs every
 * allocation; the tests use it to fail each one in turn.
 */
static void *prefs_alloc(size_t size) {
  json_malloc_t alloc_fn;
  json_free_t free_fn;

  json_get_alloc_funcs(&alloc_fn, &free_fn);
  return alloc_fn(size);
}

static void prefs_release(void *p) {
  json_malloc_t alloc_fn;
  json_free_t free_fn;

  json_get_alloc_funcs(&alloc_fn, &free_fn);
  free_fn(p);
}

/* Keeps field and message to printable ASCII: both end up in a JSON
 * error body, and a key cut in the middle of a UTF-8 sequence would make
 * that body invalid. */
static void to_printable(char *s) {
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;

    if (c < 0x20 || c >= 0x7f) {
      *s = '?';
    }
  }
}

/* Fills *err (when given) and returns FO_EINVAL. */
__attribute__((format(printf, 3, 4)))
static int fail(fo_prefs_error *err, const char *field, const char *fmt,
                ...) {
  va_list ap;

  if (!err) {
    return FO_EINVAL;
  }
  snprintf(err->field, sizeof(err->field), "%s", field);
  va_start(ap, fmt);
  vsnprintf(err->message, sizeof(err->message), fmt, ap);
  va_end(ap);
  to_printable(err->field);
  to_printable(err->message);
  return FO_EINVAL;
}

static const char *type_name(const json_t *v) {
  if (!v) {
    return "nothing";
  }
  switch (json_typeof(v)) {
  case JSON_OBJECT:
    return "object";
  case JSON_ARRAY:
    return "array";
  case JSON_STRING:
    return "string";
  case JSON_INTEGER:
    return "integer";
  case JSON_REAL:
    return "number";
  case JSON_TRUE:
  case JSON_FALSE:
    return "boolean";
  case JSON_NULL:
    return "null";
  }
  return "unknown";
}

/* A null member means the same as a missing one, as it does for events
 * and for a merge patch. */
static json_t *member(const json_t *obj, const char *key) {
  json_t *v = json_object_get(obj, key);

  return json_is_null(v) ? NULL : v;
}

/* jansson keys may hold NUL bytes; such a key matches no name. */
static bool key_is(const char *key, size_t key_len, const char *name) {
  return strlen(key) == key_len && strcmp(key, name) == 0;
}

static bool parse_channel_key(const char *key, size_t key_len,
                              fo_channel_kind *out) {
  return strlen(key) == key_len && fo_channel_parse(key, out) == FO_OK;
}

static int check_keys(const json_t *obj, const char *const *allowed,
                      const char *prefix, fo_prefs_error *err) {
  const char *key;
  size_t key_len;
  json_t *v;

  json_object_keylen_foreach((json_t *)obj, key, key_len, v) {
    bool known = false;

    for (size_t i = 0; allowed[i]; i++) {
      if (key_is(key, key_len, allowed[i])) {
        known = true;
        break;
      }
    }
    if (!known) {
      char field[sizeof(err->field)];

      snprintf(field, sizeof(field), "%s%s", prefix, key);
      return fail(err, field, "field \"%s\" is not a known key", field);
    }
  }
  return FO_OK;
}

static int need_object(const json_t *v, const char *field,
                       fo_prefs_error *err) {
  if (!json_is_object(v)) {
    return fail(err, field, "field \"%s\" must be an object, got %s", field,
                type_name(v));
  }
  return FO_OK;
}

/*
 * Reads {"push": true, "sms": false, ...} at `obj` (whose path is
 * `prefix`): every key must be a channel and every value a boolean. Sets
 * a channel's bit in *set for each key given, and in *on when it is true.
 */
static int parse_switches(const json_t *obj, const char *prefix,
                          unsigned *set, unsigned *on, fo_prefs_error *err) {
  char field[sizeof(err->field)];
  const char *key;
  size_t key_len;
  json_t *v;
  int rc = need_object(obj, prefix, err);

  if (rc != FO_OK) {
    return rc;
  }
  *set = 0;
  *on = 0;
  json_object_keylen_foreach((json_t *)obj, key, key_len, v) {
    fo_channel_kind ch;

    snprintf(field, sizeof(field), "%s.%s", prefix, key);
    if (!parse_channel_key(key, key_len, &ch)) {
      return fail(err, field, "field \"%s\" is not a channel (push, email, "
                  "sms, inapp)", field);
    }
    if (json_is_null(v)) {
      continue;
    }
    if (!json_is_boolean(v)) {
      return fail(err, field, "field \"%s\" must be a boolean, got %s",
                  field, type_name(v));
    }
    *set |= 1u << ch;
    if (json_is_true(v)) {
      *on |= 1u << ch;
    }
  }
  return FO_OK;
}

static int parse_channels(const json_t *doc, fo_prefs *p,
                          fo_prefs_error *err) {
  json_t *v = member(doc, "channels");
  unsigned set;
  unsigned on;
  int rc;

  if (!v) {
    return FO_OK;
  }
  rc = parse_switches(v, "channels", &set, &on, err);
  if (rc != FO_OK) {
    return rc;
  }
  p->channels_on = (p->channels_on & ~set) | on;
  return FO_OK;
}

static int category_cmp(const void *a, const void *b) {
  const fo_prefs_category *x = a;
  const fo_prefs_category *y = b;

  return strcmp(x->name, y->name);
}

static int parse_one_category(const char *key, size_t key_len,
                              const json_t *v, fo_prefs_category *c,
                              fo_prefs_error *err) {
  char field[sizeof(err->field)];
  int rc;

  snprintf(field, sizeof(field), "categories.%s", key);
  /* The rule of event categories, so every event category can be
   * named here. */
  if (!fo_event_category_valid(key, key_len)) {
    return fail(err, field, "field \"%s\": a category name must match "
                "[a-z0-9_.-]{1,64}", field);
  }
  rc = parse_switches(v, field, &c->set, &c->on, err);
  if (rc != FO_OK) {
    return rc;
  }
  c->name = prefs_alloc(key_len + 1);
  if (!c->name) {
    return FO_ENOMEM;
  }
  memcpy(c->name, key, key_len + 1);
  return FO_OK;
}

/* On failure, p->categories holds the ncategories entries filled so far,
 * which fo_prefs_clear() releases. */
static int parse_categories(const json_t *doc, fo_prefs *p,
                            fo_prefs_error *err) {
  json_t *obj = member(doc, "categories");
  const char *key;
  size_t key_len;
  size_t n;
  json_t *v;
  int rc;

  if (!obj) {
    return FO_OK;
  }
  rc = need_object(obj, "categories", err);
  if (rc != FO_OK) {
    return rc;
  }
  n = json_object_size(obj);
  if (n > FO_PREFS_CATEGORIES_MAX) {
    return fail(err, "categories", "field \"categories\" names %zu "
                "categories, at most %d are allowed", n,
                FO_PREFS_CATEGORIES_MAX);
  }
  if (n == 0) {
    return FO_OK;
  }
  p->categories = prefs_alloc(n * sizeof(*p->categories));
  if (!p->categories) {
    return FO_ENOMEM;
  }
  json_object_keylen_foreach(obj, key, key_len, v) {
    fo_prefs_category *c = &p->categories[p->ncategories];

    if (json_is_null(v)) {
      continue;
    }
    memset(c, 0, sizeof(*c));
    rc = parse_one_category(key, key_len, v, c, err);
    if (rc != FO_OK) {
      return rc;
    }
    p->ncategories++;
  }
  qsort(p->categories, p->ncategories, sizeof(*p->categories),
        category_cmp);
  return FO_OK;
}

/* Strict "HH:MM": two digits each, 00-23 and 00-59. */
static int parse_hhmm(const json_t *obj, const char *key,
                      uint16_t *out, fo_prefs_error *err) {
  char field[32];
  json_t *v = member(obj, key);
  const char *s;

  snprintf(field, sizeof(field), "quiet_hours.%s", key);
  if (!v) {
    return fail(err, field, "field \"%s\" is required", field);
  }
  if (!json_is_string(v)) {
    return fail(err, field, "field \"%s\" must be a string \"HH:MM\", got %s",
                field, type_name(v));
  }
  s = json_string_value(v);
  if (json_string_length(v) != 5 || s[2] != ':' ||
      s[0] < '0' || s[0] > '2' || s[1] < '0' || s[1] > '9' ||
      s[3] < '0' || s[3] > '5' || s[4] < '0' || s[4] > '9' ||
      (s[0] == '2' && s[1] > '3')) {
    return fail(err, field, "field \"%s\" must be a time \"HH:MM\" from "
                "00:00 to 23:59", field);
  }
  *out = (uint16_t)(((s[0] - '0') * 10 + (s[1] - '0')) * 60 +
                    (s[3] - '0') * 10 + (s[4] - '0'));
  return FO_OK;
}

static int parse_quiet_tz(const json_t *obj, fo_quiet *q,
                          fo_prefs_error *err) {
  json_t *v = member(obj, "timezone");

  if (!v) {
    return FO_OK;
  }
  if (!json_is_string(v)) {
    return fail(err, "quiet_hours.timezone", "field \"quiet_hours.timezone\" "
                "must be a string, got %s", type_name(v));
  }
  if (json_string_length(v) >= sizeof(q->timezone) ||
      !fo_tz_valid(json_string_value(v))) {
    return fail(err, "quiet_hours.timezone", "field \"quiet_hours.timezone\" "
                "is not a known time zone");
  }
  memcpy(q->timezone, json_string_value(v), json_string_length(v) + 1);
  return FO_OK;
}

static int parse_quiet_channels(const json_t *obj, fo_quiet *q,
                                fo_prefs_error *err) {
  const char *field = "quiet_hours.channels";
  json_t *v = member(obj, "channels");
  size_t n;

  q->channels = FO_QUIET_DEFAULT_CHANNELS;
  if (!v) {
    return FO_OK;
  }
  if (!json_is_array(v)) {
    return fail(err, field, "field \"%s\" must be an array, got %s", field,
                type_name(v));
  }
  n = json_array_size(v);
  if (n == 0) {
    return fail(err, field, "field \"%s\" must list at least one channel",
                field);
  }
  q->channels = 0;
  for (size_t i = 0; i < n; i++) {
    const json_t *c = json_array_get(v, i);
    fo_channel_kind ch;

    if (!json_is_string(c) ||
        strlen(json_string_value(c)) != json_string_length(c) ||
        fo_channel_parse(json_string_value(c), &ch) != FO_OK) {
      return fail(err, field, "field \"%s\" element %zu is not a channel "
                  "(push, email, sms, inapp)", field, i);
    }
    q->channels |= 1u << ch;
  }
  return FO_OK;
}

static int parse_quiet(const json_t *doc, fo_prefs *p, fo_prefs_error *err) {
  json_t *obj = member(doc, "quiet_hours");
  fo_quiet q;
  int rc;

  if (!obj) {
    return FO_OK;
  }
  memset(&q, 0, sizeof(q));
  rc = need_object(obj, "quiet_hours", err);
  if (rc == FO_OK) {
    rc = check_keys(obj, quiet_keys, "quiet_hours.", err);
  }
  if (rc == FO_OK) {
    rc = parse_hhmm(obj, "start", &q.start_min, err);
  }
  if (rc == FO_OK) {
    rc = parse_hhmm(obj, "end", &q.end_min, err);
  }
  if (rc == FO_OK && q.start_min == q.end_min) {
    rc = fail(err, "quiet_hours.end", "field \"quiet_hours.end\" equals "
              "\"quiet_hours.start\": the window would be empty");
  }
  if (rc == FO_OK) {
    rc = parse_quiet_tz(obj, &q, err);
  }
  if (rc == FO_OK) {
    rc = parse_quiet_channels(obj, &q, err);
  }
  if (rc != FO_OK) {
    return rc;
  }
  q.enabled = true;
  p->quiet = q;
  return FO_OK;
}

static int parse_one_cap(const json_t *obj, const char *channel,
                         fo_cap *cap, fo_prefs_error *err) {
  char prefix[24];
  char field[32];
  json_t *limit;
  json_t *per;
  int rc;

  snprintf(prefix, sizeof(prefix), "caps.%s", channel);
  rc = need_object(obj, prefix, err);
  if (rc != FO_OK) {
    return rc;
  }
  snprintf(prefix, sizeof(prefix), "caps.%s.", channel);
  rc = check_keys(obj, cap_keys, prefix, err);
  if (rc != FO_OK) {
    return rc;
  }

  limit = member(obj, "limit");
  snprintf(field, sizeof(field), "caps.%s.limit", channel);
  if (!limit) {
    return fail(err, field, "field \"%s\" is required", field);
  }
  if (!json_is_integer(limit)) {
    return fail(err, field, "field \"%s\" must be an integer, got %s", field,
                type_name(limit));
  }
  if (json_integer_value(limit) < 1 ||
      json_integer_value(limit) > FO_PREFS_CAP_LIMIT_MAX) {
    return fail(err, field, "field \"%s\" must be from 1 to %d", field,
                FO_PREFS_CAP_LIMIT_MAX);
  }

  per = member(obj, "per");
  snprintf(field, sizeof(field), "caps.%s.per", channel);
  if (!per) {
    return fail(err, field, "field \"%s\" is required", field);
  }
  cap->per = FO_CAP_NONE;
  for (int i = FO_CAP_MINUTE; i <= FO_CAP_DAY && json_is_string(per); i++) {
    if (strcmp(json_string_value(per), period_names[i]) == 0) {
      cap->per = (fo_cap_period)i;
    }
  }
  if (cap->per == FO_CAP_NONE) {
    return fail(err, field, "field \"%s\" must be one of minute, hour, day",
                field);
  }
  cap->limit = (uint32_t)json_integer_value(limit);
  return FO_OK;
}

static int parse_caps(const json_t *doc, fo_prefs *p, fo_prefs_error *err) {
  json_t *obj = member(doc, "caps");
  const char *key;
  size_t key_len;
  json_t *v;
  int rc;

  if (!obj) {
    return FO_OK;
  }
  rc = need_object(obj, "caps", err);
  if (rc != FO_OK) {
    return rc;
  }
  json_object_keylen_foreach(obj, key, key_len, v) {
    fo_channel_kind ch;

    if (!parse_channel_key(key, key_len, &ch)) {
      char field[sizeof(err->field)];

      snprintf(field, sizeof(field), "caps.%s", key);
      return fail(err, field, "field \"%s\" is not a channel (push, email, "
                  "sms, inapp)", field);
    }
    if (json_is_null(v)) {
      continue;
    }
    rc = parse_one_cap(v, fo_channel_name(ch), &p->caps[ch], err);
    if (rc != FO_OK) {
      return rc;
    }
  }
  return FO_OK;
}

void fo_prefs_init_default(fo_prefs *p) {
  memset(p, 0, sizeof(*p));
  p->channels_on = FO_CH_MASK_ALL;
}

int fo_prefs_parse(const json_t *doc, fo_prefs *out, fo_prefs_error *err) {
  fo_prefs p;
  int rc;

  fo_prefs_init_default(&p);
  if (!json_is_object(doc)) {
    return fail(err, "", "preferences must be a JSON object, got %s",
                type_name(doc));
  }
  rc = check_keys(doc, top_keys, "", err);
  if (rc == FO_OK) {
    rc = parse_channels(doc, &p, err);
  }
  if (rc == FO_OK) {
    rc = parse_categories(doc, &p, err);
  }
  if (rc == FO_OK) {
    rc = parse_quiet(doc, &p, err);
  }
  if (rc == FO_OK) {
    rc = parse_caps(doc, &p, err);
  }
  if (rc != FO_OK) {
    fo_prefs_clear(&p);
    return rc;
  }
  if (err) {
    memset(err, 0, sizeof(*err));
  }
  *out = p;
  return FO_OK;
}

void fo_prefs_clear(fo_prefs *p) {
  if (!p) {
    return;
  }
  for (size_t i = 0; i < p->ncategories; i++) {
    prefs_release(p->categories[i].name);
  }
  if (p->categories) {
    prefs_release(p->categories);
  }
  p->categories = NULL;
  p->ncategories = 0;
}

/* Adds `value` (consumed, may be NULL after a failed allocation) to
 * `obj` as `key`; returns FO_OK or FO_ENOMEM. */
static int put(json_t *obj, const char *key, json_t *value) {
  if (!value) {
    return FO_ENOMEM;
  }
  return json_object_set_new(obj, key, value) == 0 ? FO_OK : FO_ENOMEM;
}

static json_t *switches_json(unsigned set, unsigned on) {
  json_t *obj = json_object();

  if (!obj) {
    return NULL;
  }
  for (int ch = 0; ch < FO_CH_COUNT; ch++) {
    unsigned bit = 1u << ch;

    if ((set & bit) &&
        put(obj, fo_channel_name((fo_channel_kind)ch),
            json_boolean(on & bit)) != FO_OK) {
      json_decref(obj);
      return NULL;
    }
  }
  return obj;
}

static json_t *categories_json(const fo_prefs *p) {
  json_t *obj = json_object();

  if (!obj) {
    return NULL;
  }
  for (size_t i = 0; i < p->ncategories; i++) {
    const fo_prefs_category *c = &p->categories[i];

    if (put(obj, c->name, switches_json(c->set, c->on)) != FO_OK) {
      json_decref(obj);
      return NULL;
    }
  }
  return obj;
}

static json_t *quiet_json(const fo_quiet *q) {
  char start[8];
  char end[8];
  json_t *obj = json_object();
  json_t *chans = json_array();
  int rc = obj && chans ? FO_OK : FO_ENOMEM;

  snprintf(start, sizeof(start), "%02u:%02u", (unsigned)(q->start_min / 60),
           (unsigned)(q->start_min % 60));
  snprintf(end, sizeof(end), "%02u:%02u", (unsigned)(q->end_min / 60),
           (unsigned)(q->end_min % 60));
  for (int ch = 0; rc == FO_OK && ch < FO_CH_COUNT; ch++) {
    if ((q->channels & (1u << ch)) &&
        json_array_append_new(chans, json_string(fo_channel_name(
                                (fo_channel_kind)ch))) != 0) {
      rc = FO_ENOMEM;
    }
  }
  if (rc == FO_OK) {
    rc = put(obj, "start", json_string(start));
  }
  if (rc == FO_OK) {
    rc = put(obj, "end", json_string(end));
  }
  if (rc == FO_OK && q->timezone[0] != '\0') {
    rc = put(obj, "timezone", json_string(q->timezone));
  }
  if (rc == FO_OK) {
    rc = put(obj, "channels", chans);
    chans = NULL;
  }
  json_decref(chans);
  if (rc != FO_OK) {
    json_decref(obj);
    return NULL;
  }
  return obj;
}

static json_t *caps_json(const fo_prefs *p) {
  json_t *obj = json_object();
  int rc = obj ? FO_OK : FO_ENOMEM;

  for (int ch = 0; rc == FO_OK && ch < FO_CH_COUNT; ch++) {
    const fo_cap *cap = &p->caps[ch];
    json_t *one;

    if (cap->per < FO_CAP_MINUTE || cap->per > FO_CAP_DAY) {
      continue;
    }
    one = json_object();
    rc = one ? FO_OK : FO_ENOMEM;
    if (rc == FO_OK) {
      rc = put(one, "limit", json_integer(cap->limit));
    }
    if (rc == FO_OK) {
      rc = put(one, "per", json_string(period_names[cap->per]));
    }
    if (rc == FO_OK) {
      rc = put(obj, fo_channel_name((fo_channel_kind)ch), one);
      one = NULL;
    }
    json_decref(one);
  }
  if (rc != FO_OK) {
    json_decref(obj);
    return NULL;
  }
  return obj;
}

/* NULL when an allocation fails (or `p` is NULL); never a partial
 * document. */
json_t *fo_prefs_to_json(const fo_prefs *p) {
  json_t *doc = p ? json_object() : NULL;
  int rc = doc ? FO_OK : FO_ENOMEM;

  if (rc == FO_OK) {
    rc = put(doc, "channels", switches_json(FO_CH_MASK_ALL, p->channels_on));
  }
  if (rc == FO_OK) {
    rc = put(doc, "categories", categories_json(p));
  }
  if (rc == FO_OK && p->quiet.enabled) {
    rc = put(doc, "quiet_hours", quiet_json(&p->quiet));
  }
  if (rc == FO_OK) {
    rc = put(doc, "caps", caps_json(p));
  }
  if (rc != FO_OK) {
    json_decref(doc);
    return NULL;
  }
  return doc;
}

bool fo_prefs_allows(const fo_prefs *p, const char *category,
                     fo_channel_kind channel) {
  unsigned bit;
  size_t lo = 0;
  size_t hi;

  if ((unsigned)channel >= FO_CH_COUNT) {
    return false;
  }
  bit = 1u << channel;
  if (!p) {
    return true;
  }
  hi = p->ncategories;
  while (category && lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    const fo_prefs_category *c = &p->categories[mid];
    int cmp = strcmp(category, c->name);

    if (cmp == 0) {
      if (c->set & bit) {
        return (c->on & bit) != 0;
      }
      break;
    }
    if (cmp < 0) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return (p->channels_on & bit) != 0;
}

/*
 * RFC 7396, section 2, step by step. Recursion depth is that of the
 * patch, which jansson's parser already bounds.
 */
json_t *fo_json_merge_patch(json_t *target, const json_t *patch) {
  const char *key;
  size_t key_len;
  json_t *value;

  if (!json_is_object(patch)) {
    json_decref(target);
    return json_deep_copy(patch);
  }
  if (!json_is_object(target)) {
    json_decref(target);
    target = json_object();
    if (!target) {
      return NULL;
    }
  }
  json_object_keylen_foreach((json_t *)patch, key, key_len, value) {
    json_t *merged;

    if (json_is_null(value)) {
      json_object_deln(target, key, key_len);
      continue;
    }
    /* The recursive call consumes its target, and the member stays in
     * `target` until it is replaced, so it needs a reference of its own. */
    merged = fo_json_merge_patch(
        json_incref(json_object_getn(target, key, key_len)), value);
    if (!merged || json_object_setn_new(target, key, key_len, merged) != 0) {
      json_decref(target);
      return NULL;
    }
  }
  return target;
}
