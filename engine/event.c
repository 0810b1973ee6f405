/* SPDX-License-Identifier: MIT */
/*
 * Decoding and validation of notification events: turns the bytes of one
 * Kafka message (or POST /v1/events body) into an fo_event, or says in one
 * line why it cannot, so the consumer can dead-letter it with a reason.
 * This runs for every event on the hot path, so it parses once with
 * jansson, points into the parsed tree instead of copying strings, and
 * removes duplicate recipients with a flat open-addressing set.
 */
#include "fanout/event.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "fanout/common.h"

#define FO_EVENT_TTL_MAX 2419200      /* 28 days */
#define FO_EVENT_COLLAPSE_MAX 64      /* APNs limit on apns-collapse-id */

/* Slots of the on-stack recipient set: enough for 128 recipients. */
#define FO_EVENT_SET_STACK 256

/*
 * The event and its recipient array in one allocation: the array is sized
 * for the listed recipients before duplicates are dropped.
 */
struct fo_event_block {
  fo_event ev;
  const char *to[];
};

static const char *const reason_names[] = {
  "none", "too_large", "invalid_json", "not_object", "missing_field",
  "invalid_field", "too_many_recipients"
};

static const char *const priority_names[FO_PRIO_COUNT] = {
  "critical", "high", "normal", "low"
};

static const char *const channel_names[FO_CH_COUNT] = {
  "push", "email", "sms", "inapp"
};

/*
 * The event's own memory comes from jansson's allocator, like its tree, so
 * one hook (json_set_alloc_funcs) governs every allocation a decode makes;
 * the tests use it to fail each one in turn.
 */
static void *ev_alloc(size_t size) {
  json_malloc_t alloc_fn;
  json_free_t free_fn;

  json_get_alloc_funcs(&alloc_fn, &free_fn);
  return alloc_fn(size);
}

static void ev_release(void *p) {
  json_malloc_t alloc_fn;
  json_free_t free_fn;

  json_get_alloc_funcs(&alloc_fn, &free_fn);
  free_fn(p);
}

/*
 * Fills *err and returns FO_EINVAL. The message ends up in a Kafka header
 * and in logs, so it is kept to printable ASCII: anything else (a byte of
 * a token jansson quoted, or a UTF-8 sequence the length limit cut) becomes
 * '?'.
 */
__attribute__((format(printf, 4, 5)))
static int fail(fo_event_error *err, fo_event_reason reason,
                const char *field, const char *fmt, ...) {
  va_list ap;

  if (!err) {
    return FO_EINVAL;
  }
  err->reason = reason;
  snprintf(err->field, sizeof(err->field), "%s", field);
  va_start(ap, fmt);
  vsnprintf(err->message, sizeof(err->message), fmt, ap);
  va_end(ap);
  for (char *p = err->message; *p; p++) {
    unsigned char c = (unsigned char)*p;

    if (c < 0x20 || c >= 0x7f) {
      *p = '?';
    }
  }
  return FO_EINVAL;
}

static const char *type_name(const json_t *v) {
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

/*
 * Returns the member `key`, or NULL when it is absent or null: producers'
 * serializers often write null for an unset optional field, and that
 * means the same as leaving it out.
 */
static json_t *member(const json_t *obj, const char *key) {
  json_t *v = json_object_get(obj, key);

  return json_is_null(v) ? NULL : v;
}

/*
 * True when `s` holds a C0 control, DEL, or a C1 control (U+0080-U+009F,
 * UTF-8 C2 80-9F). Ids and user ids become log fields, header values and
 * database keys, where such characters only cause harm. jansson has
 * already checked that the string is valid UTF-8.
 */
static bool has_control(const char *s, size_t len) {
  const unsigned char *p = (const unsigned char *)s;

  for (size_t i = 0; i < len; i++) {
    if (p[i] < 0x20 || p[i] == 0x7f) {
      return true;
    }
    if (p[i] == 0xc2 && i + 1 < len && p[i + 1] <= 0x9f) {
      return true;
    }
  }
  return false;
}

bool fo_event_category_valid(const char *s, size_t len) {
  if (len < 1 || len > FO_EVENT_CATEGORY_MAX) {
    return false;
  }
  for (size_t i = 0; i < len; i++) {
    char c = s[i];

    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
          c == '.' || c == '-')) {
      return false;
    }
  }
  return true;
}

/*
 * FNV-1a, then a final mix so the low bits used as the slot are good.
 * Known limitation: the hash is not seeded, so a producer that crafts
 * colliding user ids can make de-duplication quadratic, bounded by the
 * 10000-entry limit (about 5e7 short comparisons for one event).
 */
static uint32_t hash_bytes(const char *s, size_t len) {
  uint32_t h = 2166136261u;

  for (size_t i = 0; i < len; i++) {
    h = (h ^ (unsigned char)s[i]) * 16777619u;
  }
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

/* Optional string member; *out stays NULL when absent. */
static int opt_string(const json_t *obj, const char *key, const char *field,
                      const char **out, fo_event_error *err) {
  json_t *v = member(obj, key);

  if (!v) {
    return FO_OK;
  }
  if (!json_is_string(v)) {
    return fail(err, FO_EVR_INVALID_FIELD, field,
                "field \"%s\" must be a string, got %s", field,
                type_name(v));
  }
  if (out) {
    *out = json_string_value(v);
  }
  return FO_OK;
}

static int opt_object(const json_t *obj, const char *key, const char *field,
                      json_t **out, fo_event_error *err) {
  json_t *v = member(obj, key);

  if (v && !json_is_object(v)) {
    return fail(err, FO_EVR_INVALID_FIELD, field,
                "field \"%s\" must be an object, got %s", field,
                type_name(v));
  }
  if (out) {
    *out = v;
  }
  return FO_OK;
}

static int decode_id(const json_t *root, const char **out,
                     fo_event_error *err) {
  json_t *v = member(root, "id");
  size_t len;

  if (!v) {
    return fail(err, FO_EVR_MISSING_FIELD, "id", "field \"id\" is required");
  }
  if (!json_is_string(v)) {
    return fail(err, FO_EVR_INVALID_FIELD, "id",
                "field \"id\" must be a string, got %s", type_name(v));
  }
  len = json_string_length(v);
  if (len < 1 || len > FO_EVENT_ID_MAX) {
    return fail(err, FO_EVR_INVALID_FIELD, "id",
                "field \"id\" must be 1-%d bytes, got %zu", FO_EVENT_ID_MAX,
                len);
  }
  if (has_control(json_string_value(v), len)) {
    return fail(err, FO_EVR_INVALID_FIELD, "id",
                "field \"id\" must not contain control characters");
  }
  *out = json_string_value(v);
  return FO_OK;
}

static int decode_category(const json_t *root, const char **out,
                           fo_event_error *err) {
  json_t *v = member(root, "category");

  if (!v) {
    return fail(err, FO_EVR_MISSING_FIELD, "category",
                "field \"category\" is required");
  }
  if (!json_is_string(v)) {
    return fail(err, FO_EVR_INVALID_FIELD, "category",
                "field \"category\" must be a string, got %s", type_name(v));
  }
  if (!fo_event_category_valid(json_string_value(v), json_string_length(v))) {
    return fail(err, FO_EVR_INVALID_FIELD, "category",
                "field \"category\" must match [a-z0-9_.-]{1,64}");
  }
  *out = json_string_value(v);
  return FO_OK;
}

static int check_user(const json_t *v, size_t i, fo_event_error *err) {
  size_t len;

  if (!json_is_string(v)) {
    return fail(err, FO_EVR_INVALID_FIELD, "to",
                "field \"to\" element %zu must be a string, got %s", i,
                type_name(v));
  }
  len = json_string_length(v);
  if (len < 1 || len > FO_EVENT_USER_MAX) {
    return fail(err, FO_EVR_INVALID_FIELD, "to",
                "field \"to\" element %zu must be 1-%d bytes, got %zu", i,
                FO_EVENT_USER_MAX, len);
  }
  if (has_control(json_string_value(v), len)) {
    return fail(err, FO_EVR_INVALID_FIELD, "to",
                "field \"to\" element %zu must not contain control "
                "characters", i);
  }
  return FO_OK;
}

/*
 * Validates every element of `arr` (n of them, n <= FO_EVENT_TO_MAX) and
 * stores each distinct user once, in first-seen order, in `to`. The set
 * holds indexes into `to` plus one (0 is an empty slot) at a load of at
 * most one half, so lookups stay about one probe long.
 */
static int dedup_to(const json_t *arr, size_t n, const char **to,
                    uint32_t *count, fo_event_error *err) {
  uint32_t stack_slots[FO_EVENT_SET_STACK];
  uint32_t *slots = stack_slots;
  size_t cap = 16;
  size_t mask;
  uint32_t kept = 0;
  int rc = FO_OK;

  while (cap < 2 * n) {
    cap <<= 1;
  }
  if (cap > FO_EVENT_SET_STACK) {
    slots = ev_alloc(cap * sizeof(*slots));
    if (!slots) {
      return FO_ENOMEM;
    }
  }
  memset(slots, 0, cap * sizeof(*slots));
  mask = cap - 1;

  for (size_t i = 0; i < n; i++) {
    const json_t *v = json_array_get(arr, i);
    const char *s;
    size_t slot;
    bool seen = false;

    rc = check_user(v, i, err);
    if (rc != FO_OK) {
      goto out;
    }
    s = json_string_value(v);
    slot = hash_bytes(s, json_string_length(v)) & mask;
    while (slots[slot] != 0) {
      if (strcmp(to[slots[slot] - 1], s) == 0) {
        seen = true;
        break;
      }
      slot = (slot + 1) & mask;
    }
    if (!seen) {
      to[kept] = s;
      kept++;
      slots[slot] = kept;
    }
  }
  *count = kept;

out:
  if (slots != stack_slots) {
    ev_release(slots);
  }
  return rc;
}

static int decode_priority(const json_t *root, fo_event *ev,
                           fo_event_error *err) {
  json_t *v = member(root, "priority");

  ev->priority = FO_PRIO_NORMAL;
  if (!v) {
    return FO_OK;
  }
  if (json_is_string(v)) {
    for (int p = 0; p < FO_PRIO_COUNT; p++) {
      if (strcmp(json_string_value(v), priority_names[p]) == 0) {
        ev->priority = (fo_priority)p;
        return FO_OK;
      }
    }
  }
  return fail(err, FO_EVR_INVALID_FIELD, "priority",
              "field \"priority\" must be one of critical, high, normal, "
              "low");
}

static int decode_channels(const json_t *root, fo_event *ev,
                           fo_event_error *err) {
  json_t *v = member(root, "channels");
  size_t n;

  ev->channels = FO_CH_MASK_ALL;
  if (!v) {
    return FO_OK;
  }
  if (!json_is_array(v)) {
    return fail(err, FO_EVR_INVALID_FIELD, "channels",
                "field \"channels\" must be an array, got %s", type_name(v));
  }
  n = json_array_size(v);
  if (n == 0) {
    return fail(err, FO_EVR_INVALID_FIELD, "channels",
                "field \"channels\" must list at least one channel");
  }
  ev->channels = 0;
  for (size_t i = 0; i < n; i++) {
    const json_t *c = json_array_get(v, i);
    fo_channel_kind kind;

    if (!json_is_string(c) ||
        fo_channel_parse(json_string_value(c), &kind) != FO_OK) {
      return fail(err, FO_EVR_INVALID_FIELD, "channels",
                  "field \"channels\" element %zu must be one of push, "
                  "email, sms, inapp", i);
    }
    ev->channels |= 1u << kind;
  }
  return FO_OK;
}

static int decode_delivery(const json_t *root, fo_event *ev,
                           fo_event_error *err) {
  json_t *v = member(root, "delivery");
  const char *s = json_string_value(v);

  ev->delivery = FO_DELIVERY_AT_LEAST_ONCE;
  if (!v) {
    return FO_OK;
  }
  if (s && strcmp(s, "best_effort") == 0) {
    ev->delivery = FO_DELIVERY_BEST_EFFORT;
  } else if (!s || strcmp(s, "at_least_once") != 0) {
    return fail(err, FO_EVR_INVALID_FIELD, "delivery",
                "field \"delivery\" must be at_least_once or best_effort");
  }
  return FO_OK;
}

static int decode_ttl(const json_t *root, fo_event *ev, fo_event_error *err) {
  json_t *v = member(root, "ttl");

  ev->ttl_s = FO_EVENT_TTL_DEFAULT;
  if (!v) {
    return FO_OK;
  }
  if (!json_is_integer(v) || json_integer_value(v) < 1 ||
      json_integer_value(v) > FO_EVENT_TTL_MAX) {
    return fail(err, FO_EVR_INVALID_FIELD, "ttl",
                "field \"ttl\" must be an integer from 1 to %d",
                FO_EVENT_TTL_MAX);
  }
  ev->ttl_s = json_integer_value(v);
  return FO_OK;
}

/* The channel sections are read by the channel workers; here we only
 * check the types of the sub-fields they rely on. */
static int check_push(const json_t *root, fo_event_error *err) {
  json_t *push = NULL;
  json_t *v;
  int rc;

  rc = opt_object(root, "push", "push", &push, err);
  if (rc != FO_OK || !push) {
    return rc;
  }
  v = member(push, "collapse_id");
  if (v && (!json_is_string(v) || json_string_length(v) < 1 ||
            json_string_length(v) > FO_EVENT_COLLAPSE_MAX)) {
    return fail(err, FO_EVR_INVALID_FIELD, "push.collapse_id",
                "field \"push.collapse_id\" must be a string of 1-%d bytes",
                FO_EVENT_COLLAPSE_MAX);
  }
  rc = opt_string(push, "sound", "push.sound", NULL, err);
  if (rc != FO_OK) {
    return rc;
  }
  v = member(push, "badge");
  if (v && (!json_is_integer(v) || json_integer_value(v) < 0)) {
    return fail(err, FO_EVR_INVALID_FIELD, "push.badge",
                "field \"push.badge\" must be an integer >= 0");
  }
  return FO_OK;
}

static int check_email(const json_t *root, fo_event_error *err) {
  static const char *const keys[][2] = {
    {"subject", "email.subject"},
    {"html", "email.html"},
    {"text", "email.text"},
    {"template_id", "email.template_id"}
  };
  json_t *email = NULL;
  int rc;

  rc = opt_object(root, "email", "email", &email, err);
  if (rc != FO_OK || !email) {
    return rc;
  }
  for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
    rc = opt_string(email, keys[i][0], keys[i][1], NULL, err);
    if (rc != FO_OK) {
      return rc;
    }
  }
  return opt_object(email, "template_data", "email.template_data", NULL,
                    err);
}

static int check_sms(const json_t *root, fo_event_error *err) {
  json_t *sms = NULL;
  int rc;

  rc = opt_object(root, "sms", "sms", &sms, err);
  if (rc != FO_OK || !sms) {
    return rc;
  }
  return opt_string(sms, "text", "sms.text", NULL, err);
}

/* Everything after `to`, in the order docs/events.md lists it. */
static int decode_optional(const json_t *root, fo_event *ev,
                           fo_event_error *err) {
  int rc;

  rc = decode_priority(root, ev, err);
  if (rc == FO_OK) {
    rc = decode_channels(root, ev, err);
  }
  if (rc == FO_OK) {
    rc = opt_string(root, "title", "title", &ev->title, err);
  }
  if (rc == FO_OK) {
    rc = opt_string(root, "body", "body", &ev->body, err);
  }
  if (rc == FO_OK) {
    rc = opt_object(root, "data", "data", NULL, err);
  }
  if (rc == FO_OK) {
    rc = check_push(root, err);
  }
  if (rc == FO_OK) {
    rc = check_email(root, err);
  }
  if (rc == FO_OK) {
    rc = check_sms(root, err);
  }
  if (rc == FO_OK) {
    rc = decode_ttl(root, ev, err);
  }
  if (rc == FO_OK) {
    rc = decode_delivery(root, ev, err);
  }
  if (rc == FO_OK && ev->priority == FO_PRIO_CRITICAL) {
    /* The contract: critical events are always at least once. */
    ev->delivery = FO_DELIVERY_AT_LEAST_ONCE;
  }
  return rc;
}

static int parse(const void *buf, size_t len, json_t **out,
                 fo_event_error *err) {
  json_error_t jerr;
  json_t *root;

  /* JSON_DECODE_ANY lets a scalar through so that it is reported as
   * not_object rather than as a syntax error; the EOF check stays on, so
   * anything after the value is refused. */
  root = json_loadb(len > 0 ? buf : "", len,
                    JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
  if (!root) {
    /* Every syntax error jansson reports has a text; an empty one is an
     * allocation that failed before any error was recorded. */
    if (json_error_code(&jerr) == json_error_out_of_memory ||
        jerr.text[0] == '\0') {
      return FO_ENOMEM;
    }
    if (json_error_code(&jerr) == json_error_null_character) {
      /* jansson's own text here names its API flag, not the problem. */
      return fail(err, FO_EVR_INVALID_JSON, "",
                  "invalid JSON at line %d, column %d: a string contains "
                  "\\u0000", jerr.line, jerr.column);
    }
    return fail(err, FO_EVR_INVALID_JSON, "",
                "invalid JSON at line %d, column %d: %s", jerr.line,
                jerr.column, jerr.text);
  }
  if (!json_is_object(root)) {
    fail(err, FO_EVR_NOT_OBJECT, "", "event must be a JSON object, got %s",
         type_name(root));
    json_decref(root);
    return FO_EINVAL;
  }
  *out = root;
  return FO_OK;
}

int fo_event_decode(const void *buf, size_t len, size_t max_bytes,
                    fo_event **out, fo_event_error *err) {
  struct fo_event_block *blk = NULL;
  const char *id = NULL;
  const char *category = NULL;
  json_t *root = NULL;
  json_t *to;
  size_t n;
  int rc;

  if (!out || (!buf && len > 0)) {
    return FO_EINVAL;
  }
  if (max_bytes == 0) {
    max_bytes = FO_EVENT_BYTES_DEFAULT;
  }
  if (len > max_bytes) {
    return fail(err, FO_EVR_TOO_LARGE, "",
                "event is %zu bytes, over the limit of %zu", len, max_bytes);
  }

  rc = parse(buf, len, &root, err);
  if (rc != FO_OK) {
    return rc;
  }
  rc = decode_id(root, &id, err);
  if (rc == FO_OK) {
    rc = decode_category(root, &category, err);
  }
  if (rc != FO_OK) {
    goto out;
  }

  to = member(root, "to");
  if (!to) {
    rc = fail(err, FO_EVR_MISSING_FIELD, "to", "field \"to\" is required");
    goto out;
  }
  if (!json_is_array(to)) {
    rc = fail(err, FO_EVR_INVALID_FIELD, "to",
              "field \"to\" must be an array, got %s", type_name(to));
    goto out;
  }
  n = json_array_size(to);
  if (n == 0) {
    rc = fail(err, FO_EVR_INVALID_FIELD, "to",
              "field \"to\" must list at least one user");
    goto out;
  }
  if (n > FO_EVENT_TO_MAX) {
    rc = fail(err, FO_EVR_TOO_MANY_RECIPIENTS, "to",
              "field \"to\" lists %zu users, over the limit of %d", n,
              FO_EVENT_TO_MAX);
    goto out;
  }

  blk = ev_alloc(sizeof(*blk) + n * sizeof(blk->to[0]));
  if (!blk) {
    rc = FO_ENOMEM;
    goto out;
  }
  memset(&blk->ev, 0, sizeof(blk->ev));
  atomic_init(&blk->ev.pending, 0);
  blk->ev.id = id;
  blk->ev.category = category;
  blk->ev.to = blk->to;
  rc = dedup_to(to, n, blk->to, &blk->ev.to_count, err);
  if (rc == FO_OK) {
    rc = decode_optional(root, &blk->ev, err);
  }
  if (rc != FO_OK) {
    goto out;
  }

  /* The bookkeeping fields stay zero: the engine sets them when it takes
   * the event in. */
  blk->ev.root = root;
  root = NULL;
  if (err) {
    memset(err, 0, sizeof(*err));
  }
  *out = &blk->ev;
  blk = NULL;

out:
  if (blk) {
    ev_release(blk);
  }
  json_decref(root);
  return rc;
}

void fo_event_free(fo_event *ev) {
  if (!ev) {
    return;
  }
  json_decref(ev->root);
  /* ev is the first member of its block, so this frees the block. */
  ev_release(ev);
}

uint64_t fo_event_items(const fo_event *ev) {
  if (!ev) {
    return 0;
  }
  return (uint64_t)ev->to_count *
         (uint64_t)__builtin_popcount(ev->channels & FO_CH_MASK_ALL);
}

const char *fo_event_reason_name(fo_event_reason r) {
  if ((unsigned)r >= sizeof(reason_names) / sizeof(reason_names[0])) {
    return "unknown";
  }
  return reason_names[r];
}

const char *fo_priority_name(fo_priority p) {
  if ((unsigned)p >= FO_PRIO_COUNT) {
    return "unknown";
  }
  return priority_names[p];
}

const char *fo_channel_name(fo_channel_kind c) {
  if ((unsigned)c >= FO_CH_COUNT) {
    return "unknown";
  }
  return channel_names[c];
}

int fo_channel_parse(const char *name, fo_channel_kind *out) {
  if (!name || !out) {
    return FO_EINVAL;
  }
  for (int c = 0; c < FO_CH_COUNT; c++) {
    if (strcmp(name, channel_names[c]) == 0) {
      *out = (fo_channel_kind)c;
      return FO_OK;
    }
  }
  return FO_EINVAL;
}
