/* SPDX-License-Identifier: MIT */
/*
 * The decoded form of one notification event (the Kafka message value, or
 * the body of POST /v1/events), and its validation against the event
 * contract documented in docs/events.md.
 */
#ifndef FANOUT_EVENT_H
#define FANOUT_EVENT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

typedef enum fo_priority {
  FO_PRIO_CRITICAL = 0,
  FO_PRIO_HIGH = 1,
  FO_PRIO_NORMAL = 2,
  FO_PRIO_LOW = 3
} fo_priority;
#define FO_PRIO_COUNT 4

typedef enum fo_channel_kind {
  FO_CH_PUSH = 0,
  FO_CH_EMAIL = 1,
  FO_CH_SMS = 2,
  FO_CH_INAPP = 3
} fo_channel_kind;
#define FO_CH_COUNT 4
#define FO_CH_MASK_ALL 0xFu

typedef enum fo_delivery_mode {
  FO_DELIVERY_AT_LEAST_ONCE = 0,
  FO_DELIVERY_BEST_EFFORT = 1
} fo_delivery_mode;

/* Limits of the contract; the decoder enforces them. */
#define FO_EVENT_ID_MAX 128
#define FO_EVENT_CATEGORY_MAX 64
#define FO_EVENT_TO_MAX 10000
#define FO_EVENT_USER_MAX 128
#define FO_EVENT_TTL_DEFAULT 86400
#define FO_EVENT_BYTES_DEFAULT (1024 * 1024)

/*
 * One valid event. String fields point into `root`, which the event owns,
 * so they live exactly as long as the event. `to` holds each recipient
 * once, in first-seen order: a user listed twice is one recipient.
 */
typedef struct fo_event {
  json_t *root;
  const char *id;
  const char *category;
  const char *title;        /* NULL when absent */
  const char *body;         /* NULL when absent */
  const char **to;
  uint32_t to_count;
  unsigned channels;        /* bit (1u << fo_channel_kind) per channel */
  fo_priority priority;
  fo_delivery_mode delivery;
  int64_t ttl_s;

  /* Engine bookkeeping, not part of the contract. */
  int64_t consumed_us;      /* monotonic time the engine took it in */
  int64_t expires_ms;       /* wall-clock deadline from ttl */
  atomic_uint_fast32_t pending;  /* work items not yet completed */
  atomic_bool abandoned;    /* some item was given up at shutdown */
  void *origin;             /* who to tell when all work is done */
  int64_t origin_seq;       /* e.g. the Kafka offset */
  /* When set, called instead of the dispatcher's done callback. */
  void (*done_fn)(struct fo_event *ev, bool finished, void *arg);
  void *done_arg;
  bool released;            /* taken out of deferral: skip quiet hours */
} fo_event;

/* Why an event was refused; the names are the dead-letter reasons. */
typedef enum fo_event_reason {
  FO_EVR_NONE = 0,
  FO_EVR_TOO_LARGE,          /* "too_large" */
  FO_EVR_INVALID_JSON,       /* "invalid_json" */
  FO_EVR_NOT_OBJECT,         /* "not_object" */
  FO_EVR_MISSING_FIELD,      /* "missing_field" */
  FO_EVR_INVALID_FIELD,      /* "invalid_field" */
  FO_EVR_TOO_MANY_RECIPIENTS /* "too_many_recipients" */
} fo_event_reason;

typedef struct fo_event_error {
  fo_event_reason reason;
  char field[32];            /* the offending field, "" when none */
  char message[160];         /* one line, names the field */
} fo_event_error;

/*
 * Decodes and validates `len` bytes at `buf` (not NUL-terminated).
 * `max_bytes` bounds the input; 0 means FO_EVENT_BYTES_DEFAULT.
 *
 * Returns FO_OK and sets *out (caller frees with fo_event_free()), or
 * FO_EINVAL and fills *err, or FO_ENOMEM. Does not take ownership of buf.
 */
int fo_event_decode(const void *buf, size_t len, size_t max_bytes,
                    fo_event **out, fo_event_error *err);

/* Frees an event and everything it owns; NULL is allowed. */
void fo_event_free(fo_event *ev);

/* Number of (user, channel) work items the event expands into. */
uint64_t fo_event_items(const fo_event *ev);

/* True when s[0..len) is a valid category name, [a-z0-9_.-]{1,64}; a
 * NUL byte inside makes it invalid. Events and preferences share it. */
bool fo_event_category_valid(const char *s, size_t len);

/* Static names: "too_large", "critical", "push", "at_least_once"... */
const char *fo_event_reason_name(fo_event_reason r);
const char *fo_priority_name(fo_priority p);
const char *fo_channel_name(fo_channel_kind c);

/* Parses a channel name; returns FO_OK or FO_EINVAL. */
int fo_channel_parse(const char *name, fo_channel_kind *out);

#endif /* FANOUT_EVENT_H */
