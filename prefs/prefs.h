/* SPDX-License-Identifier: MIT */
/*
 * The preference model of one user: which channels and categories are on,
 * quiet hours in a time zone, and rate caps; parsed and validated from the
 * JSON of the REST API (docs/preferences.md), with the defaults applied.
 *
 * A parsed fo_prefs is immutable, so any thread may read it.
 */
#ifndef FO_PREFS_H
#define FO_PREFS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "fanout/event.h"

#define FO_TZ_MAX 64

typedef enum fo_cap_period {
  FO_CAP_NONE = 0,
  FO_CAP_MINUTE,
  FO_CAP_HOUR,
  FO_CAP_DAY
} fo_cap_period;

typedef struct fo_cap {
  fo_cap_period per;            /* FO_CAP_NONE: no cap */
  uint32_t limit;               /* > 0 when per is set */
} fo_cap;

typedef struct fo_quiet {
  bool enabled;
  uint16_t start_min;           /* minutes after local midnight, 0-1439 */
  uint16_t end_min;             /* may be <= start_min: crosses midnight */
  char timezone[FO_TZ_MAX];     /* "" means the user's, then UTC */
  unsigned channels;            /* bit (1u << fo_channel_kind) */
} fo_quiet;

/* One category's overrides: a channel bit in `set` says the category
 * names it, and the same bit in `on` gives its value. */
typedef struct fo_prefs_category {
  char *name;
  unsigned set;
  unsigned on;
} fo_prefs_category;

typedef struct fo_prefs {
  unsigned channels_on;         /* default: all four */
  fo_prefs_category *categories;  /* sorted by name */
  size_t ncategories;
  fo_quiet quiet;
  fo_cap caps[FO_CH_COUNT];
} fo_prefs;

/* Where validation failed: the field path ("quiet_hours.start",
 * "caps.push.limit", "channels.fax") and a one-line message. */
typedef struct fo_prefs_error {
  char field[96];
  char message[160];
} fo_prefs_error;

/* The defaults: every channel on, no quiet hours, no caps. */
void fo_prefs_init_default(fo_prefs *p);

/*
 * Parses and validates a preferences document (a JSON object). Unknown
 * time zone (checked with ICU), bad "HH:MM", unknown channel, unknown key,
 * wrong type, non-positive cap limit and unknown cap period are refused
 * with FO_EINVAL and *err naming the field. Returns FO_OK and fills *out
 * (release with fo_prefs_clear()), FO_EINVAL, or FO_ENOMEM. Does not take
 * ownership of `doc`.
 */
int fo_prefs_parse(const json_t *doc, fo_prefs *out, fo_prefs_error *err);

/* Frees what fo_prefs_parse() allocated inside `p`. */
void fo_prefs_clear(fo_prefs *p);

/* The preferences as the canonical JSON document (caller decrefs). */
json_t *fo_prefs_to_json(const fo_prefs *p);

/*
 * True when `channel` is on for `category`: the category's override when
 * it names the channel, else the channel switch.
 */
bool fo_prefs_allows(const fo_prefs *p, const char *category,
                     fo_channel_kind channel);

/*
 * Applies an RFC 7396 JSON merge patch to `target` in place (null removes
 * a member, objects merge recursively, anything else replaces). Returns
 * the patched document, which may be a new value when `patch` is not an
 * object; the caller owns the result and `target` is consumed.
 */
json_t *fo_json_merge_patch(json_t *target, const json_t *patch);

/* True when `tz` is an IANA time zone ICU knows ("UTC" included). */
bool fo_tz_valid(const char *tz);

/*
 * Quiet hours at wall-clock time `now_ms` for `channel`: returns true when
 * the channel is quiet then, and sets *end_ms to the wall-clock time the
 * window ends (the next local end_min in the time zone, DST included).
 * `user_tz` is used when the window names no zone ("" or NULL: UTC).
 * Always false for a channel the window does not list.
 */
bool fo_quiet_active(const fo_quiet *q, const char *user_tz,
                     fo_channel_kind channel, int64_t now_ms,
                     int64_t *end_ms);

#endif /* FO_PREFS_H */
