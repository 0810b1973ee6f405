/* SPDX-License-Identifier: MIT */
/*
 * Time zones and quiet hours, with ICU: checks that a zone name is one
 * ICU knows, and tells whether a channel is inside a user's quiet window
 * at a given instant and when that window ends, in the user's local wall
 * time with daylight saving transitions applied. The check runs for every
 * (user, channel) delivery, so each thread keeps a calendar for each of
 * the zones it saw last, and with it the span of time around now in
 * which the zone's UTC offset does not change: inside that span the
 * answer is plain arithmetic, and ICU is asked again only when now leaves
 * the span or a window ends beyond it.
 */
/*
 * Known limitation: zone rules come from the data built into ICU (2022e
 * in Debian 12's ICU 72), not from the system's tzdata, so a zone whose
 * rules changed since then follows its old rules unless ICU is given
 * newer data files (environment variable ICU_TIMEZONE_FILES_DIR).
 */
#include "prefs.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <unicode/ucal.h>
#include <unicode/ustring.h>

/*
 * Calendars kept per thread. A policy thread sees users from every zone
 * in turn, and opening a calendar costs about 8 us against well under
 * 0.1 us for a cached answer, so the cache holds more zones than most
 * deployments use: about 3.5 KB each, 450 KB per thread when full.
 */
#define FO_QUIET_CACHE_SLOTS 128
#define FO_MINUTE_MS 60000LL
#define FO_DAY_MS 86400000LL
#define FO_DAY_MIN 1440
/* About 30,000 years either side of 1970: past that, no one is quiet. */
#define FO_QUIET_MS_MAX INT64_C(1000000000000000)

struct fo_quiet_slot {
  char tz[FO_TZ_MAX];
  UCalendar *cal;
  uint64_t used;
  /* The zone is offset_ms ahead of UTC on [from_ms, until_ms). */
  int64_t from_ms;
  int64_t until_ms;
  int64_t offset_ms;
};

/* One per thread, created on first use and freed when the thread exits.
 * The hashes sit apart from the slots so a lookup scans one small array;
 * 0 marks a free slot (a name's hash always has its top bit set). */
struct fo_quiet_cache {
  uint32_t hash[FO_QUIET_CACHE_SLOTS];
  struct fo_quiet_slot slots[FO_QUIET_CACHE_SLOTS];
  uint64_t clock;
};

static pthread_key_t cache_key;
static pthread_once_t cache_once = PTHREAD_ONCE_INIT;
static bool cache_key_ok;

static void cache_free(void *arg) {
  struct fo_quiet_cache *c = arg;

  for (int i = 0; i < FO_QUIET_CACHE_SLOTS; i++) {
    if (c->slots[i].cal) {
      ucal_close(c->slots[i].cal);
    }
  }
  free(c);
}

static void cache_key_init(void) {
  cache_key_ok = pthread_key_create(&cache_key, cache_free) == 0;
}

/*
 * Zone names are short ASCII words ("America/Argentina/Buenos_Aires",
 * "Etc/GMT+5"); anything else is no zone. Keeping to these characters is
 * also what lets u_charsToUChars() widen them: they are all in ICU's
 * invariant set. Returns the length, or 0 for no zone.
 */
static size_t tz_name_len(const char *tz) {
  size_t n;

  if (!tz) {
    return 0;
  }
  n = strnlen(tz, FO_TZ_MAX);
  if (n >= FO_TZ_MAX) {
    return 0;
  }
  for (size_t i = 0; i < n; i++) {
    char c = tz[i];

    if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
          (c >= '0' && c <= '9') || c == '/' || c == '_' || c == '-' ||
          c == '+')) {
      return 0;
    }
  }
  return n;
}

/* Widens a zone name to UTF-16 into `out` (FO_TZ_MAX units). */
static bool tz_widen(const char *tz, UChar *out, int32_t *len) {
  size_t n = tz_name_len(tz);

  if (n == 0) {
    return false;
  }
  u_charsToUChars(tz, out, (int32_t)n);
  *len = (int32_t)n;
  return true;
}

/*
 * ICU answers any name, falling back to "Etc/Unknown" (which behaves as
 * UTC), so the check asks for the canonical form instead: only zones of
 * ICU's own database are "system" zones, which leaves out both unknown
 * names and custom offsets such as "GMT+05:00". The lookup is case
 * sensitive, like ucal_open(), so an accepted name opens that very zone.
 */
bool fo_tz_valid(const char *tz) {
  UChar id[FO_TZ_MAX];
  UChar canon[2 * FO_TZ_MAX];
  UBool is_system = false;
  UErrorCode st = U_ZERO_ERROR;
  int32_t len;

  if (!tz_widen(tz, id, &len) || strcmp(tz, "Etc/Unknown") == 0) {
    return false;
  }
  ucal_getCanonicalTimeZoneID(id, len, canon, (int32_t)(sizeof(canon) /
                              sizeof(canon[0])), &is_system, &st);
  return U_SUCCESS(st) && is_system;
}

static UCalendar *cal_open(const char *tz) {
  UChar id[FO_TZ_MAX];
  UErrorCode st = U_ZERO_ERROR;
  UCalendar *cal;
  int32_t len;

  if (!tz_widen(tz, id, &len)) {
    return NULL;
  }
  cal = ucal_open(id, len, "", UCAL_GREGORIAN, &st);
  if (U_FAILURE(st)) {
    if (cal) {
      ucal_close(cal);
    }
    return NULL;
  }
  /* A local end time the clocks skip over (spring forward) becomes the
   * first instant after the gap: that is when the wall clock first reads
   * a time past the end. One they pass twice (fall back) means its first
   * pass; quiet_icu() asks for the second when the first is gone. */
  ucal_setAttribute(cal, UCAL_SKIPPED_WALL_TIME, UCAL_WALLTIME_NEXT_VALID);
  ucal_setAttribute(cal, UCAL_REPEATED_WALL_TIME, UCAL_WALLTIME_FIRST);
  return cal;
}

static uint32_t tz_hash(const char *tz) {
  uint32_t h = 2166136261u;

  for (; *tz; tz++) {
    h = (h ^ (unsigned char)*tz) * 16777619u;
  }
  return h | 0x80000000u;
}

static struct fo_quiet_cache *cache_get(void) {
  struct fo_quiet_cache *c;

  pthread_once(&cache_once, cache_key_init);
  if (!cache_key_ok) {
    return NULL;
  }
  c = pthread_getspecific(cache_key);
  if (!c) {
    c = calloc(1, sizeof(*c));
    if (!c) {
      return NULL;
    }
    if (pthread_setspecific(cache_key, c) != 0) {
      free(c);
      return NULL;
    }
  }
  return c;
}

/* This thread's slot for `tz`, with its calendar, or NULL when none can
 * be had. The slot stays owned by the cache. */
static struct fo_quiet_slot *slot_for(const char *tz) {
  struct fo_quiet_cache *c = cache_get();
  struct fo_quiet_slot *s;
  uint32_t h = tz_hash(tz);
  int victim = 0;

  if (!c) {
    return NULL;
  }
  c->clock++;
  for (int i = 0; i < FO_QUIET_CACHE_SLOTS; i++) {
    if (c->hash[i] == h && strcmp(c->slots[i].tz, tz) == 0) {
      c->slots[i].used = c->clock;
      return &c->slots[i];
    }
  }

  /* A miss: the least recently used slot (a free one has used == 0). */
  for (int i = 1; i < FO_QUIET_CACHE_SLOTS; i++) {
    if (c->slots[i].used < c->slots[victim].used) {
      victim = i;
    }
  }
  s = &c->slots[victim];
  if (s->cal) {
    ucal_close(s->cal);
  }
  memset(s, 0, sizeof(*s));
  c->hash[victim] = 0;
  s->cal = cal_open(tz);
  if (!s->cal) {
    return NULL;
  }
  snprintf(s->tz, sizeof(s->tz), "%s", tz);
  s->used = c->clock;
  c->hash[victim] = h;
  return s;
}

/* Asks ICU for the offset at `now_ms` and the transitions around it.
 * Returns false, leaving the span empty, when ICU fails. */
static bool span_refresh(struct fo_quiet_slot *s, int64_t now_ms) {
  UErrorCode st = U_ZERO_ERROR;
  UDate prev = 0;
  UDate next = 0;
  UBool has_prev;
  UBool has_next;
  int64_t offset;

  s->from_ms = 0;
  s->until_ms = 0;
  ucal_setMillis(s->cal, (UDate)now_ms, &st);
  offset = (int64_t)ucal_get(s->cal, UCAL_ZONE_OFFSET, &st) +
           ucal_get(s->cal, UCAL_DST_OFFSET, &st);
  has_prev = ucal_getTimeZoneTransitionDate(
      s->cal, UCAL_TZ_TRANSITION_PREVIOUS_INCLUSIVE, &prev, &st);
  has_next = ucal_getTimeZoneTransitionDate(s->cal, UCAL_TZ_TRANSITION_NEXT,
                                            &next, &st);
  if (U_FAILURE(st)) {
    return false;
  }
  s->offset_ms = offset;
  s->from_ms = has_prev ? (int64_t)prev : INT64_MIN;
  s->until_ms = has_next ? (int64_t)next : INT64_MAX;
  return s->from_ms <= now_ms && now_ms < s->until_ms;
}

/* Whether local minute `m` is in the window [start, end), and whether
 * the end that closes it is on the next local day. */
static bool in_window(const fo_quiet *q, unsigned m, bool *next_day) {
  *next_day = false;
  if (q->start_min < q->end_min) {
    return m >= q->start_min && m < q->end_min;
  }
  if (m >= q->start_min) {
    *next_day = true;
    return true;
  }
  return m < q->end_min;
}

/*
 * The answer at `now_ms` in a zone `offset_ms` ahead of UTC until
 * `until_ms`. Returns 1 (quiet) or 0, or -1 when the window's end comes
 * after `until_ms`, where the offset changes: ICU must place it then.
 */
static int quiet_offset(const fo_quiet *q, int64_t offset_ms,
                        int64_t until_ms, int64_t now_ms, int64_t *end_ms) {
  int64_t local = now_ms + offset_ms;
  int64_t day = local / FO_DAY_MS;
  int64_t end;
  bool next_day;

  if (local % FO_DAY_MS < 0) {
    day--;
  }
  day *= FO_DAY_MS;
  if (!in_window(q, (unsigned)((local - day) / FO_MINUTE_MS), &next_day)) {
    return 0;
  }
  end = day + (next_day ? FO_DAY_MS : 0) + q->end_min * FO_MINUTE_MS -
        offset_ms;
  if (end >= until_ms) {
    return -1;
  }
  *end_ms = end;
  return 1;
}

/* The instant of local date (y, mo, d) at the window's end time. */
static int64_t local_end(UCalendar *cal, const fo_quiet *q, int32_t y,
                         int32_t mo, int32_t d, UErrorCode *st) {
  ucal_clear(cal);
  ucal_setDateTime(cal, y, mo, d, q->end_min / 60, q->end_min % 60, 0, st);
  return (int64_t)ucal_getMillis(cal, st);
}

/* The answer from ICU's calendar fields, for when a transition comes
 * before the window's end or the offset span is unknown. Returns 1
 * (quiet) or 0, or -1 when ICU failed. */
static int quiet_icu(const fo_quiet *q, UCalendar *cal, int64_t now_ms,
                     int64_t *end_ms) {
  UErrorCode st = U_ZERO_ERROR;
  int32_t hour;
  int32_t minute;
  int32_t y;
  int32_t mo;
  int32_t d;
  int64_t end;
  bool next_day;

  ucal_setMillis(cal, (UDate)now_ms, &st);
  hour = ucal_get(cal, UCAL_HOUR_OF_DAY, &st);
  minute = ucal_get(cal, UCAL_MINUTE, &st);
  if (U_FAILURE(st)) {
    return -1;
  }
  if (!in_window(q, (unsigned)(hour * 60 + minute), &next_day)) {
    return 0;
  }

  y = ucal_get(cal, UCAL_YEAR, &st);
  mo = ucal_get(cal, UCAL_MONTH, &st);
  d = ucal_get(cal, UCAL_DATE, &st) + (next_day ? 1 : 0);
  end = local_end(cal, q, y, mo, d, &st);

  /* When the first pass of a repeated end time is already behind us, we
   * are in the repeated hour and the window ends at the second pass. */
  if (U_SUCCESS(st) && end <= now_ms) {
    ucal_setAttribute(cal, UCAL_REPEATED_WALL_TIME, UCAL_WALLTIME_LAST);
    end = local_end(cal, q, y, mo, d, &st);
    ucal_setAttribute(cal, UCAL_REPEATED_WALL_TIME, UCAL_WALLTIME_FIRST);
  }
  if (U_FAILURE(st)) {
    return -1;
  }
  /* Past both passes cannot happen while inside the window; should a
   * zone's rules ever make it so, the end is the next minute rather than
   * a time already gone, which would release deferred work in a loop. */
  if (end <= now_ms) {
    end = now_ms - now_ms % FO_MINUTE_MS + FO_MINUTE_MS;
  }
  *end_ms = end;
  return 1;
}

/* The answer in zone `tz`, or -1 when ICU could not give one. */
static int quiet_in_zone(const fo_quiet *q, const char *tz, int64_t now_ms,
                         int64_t *end_ms) {
  struct fo_quiet_slot *s;
  int active;

  /* Not even a name: no calendar is evicted for it. */
  if (tz_name_len(tz) == 0) {
    return -1;
  }
  s = slot_for(tz);
  if (!s) {
    return -1;
  }
  if (now_ms < s->from_ms || now_ms >= s->until_ms) {
    if (!span_refresh(s, now_ms)) {
      return quiet_icu(q, s->cal, now_ms, end_ms);
    }
  }
  active = quiet_offset(q, s->offset_ms, s->until_ms, now_ms, end_ms);
  if (active < 0) {
    active = quiet_icu(q, s->cal, now_ms, end_ms);
  }
  return active;
}

static bool is_utc(const char *tz) {
  return strcmp(tz, "UTC") == 0 || strcmp(tz, "Etc/UTC") == 0;
}

/*
 * A zone ICU does not know behaves as UTC (ICU's "Etc/Unknown"), and so
 * does a failure to get a calendar: quiet hours then follow UTC rather
 * than being dropped.
 */
bool fo_quiet_active(const fo_quiet *q, const char *user_tz,
                     fo_channel_kind channel, int64_t now_ms,
                     int64_t *end_ms) {
  const char *tz;
  int64_t end = 0;
  int active = -1;

  if (!q || !q->enabled || (unsigned)channel >= FO_CH_COUNT ||
      !(q->channels & (1u << channel)) || q->start_min == q->end_min ||
      q->start_min >= FO_DAY_MIN || q->end_min >= FO_DAY_MIN ||
      now_ms > FO_QUIET_MS_MAX || now_ms < -FO_QUIET_MS_MAX) {
    return false;
  }
  tz = q->timezone[0] != '\0' ? q->timezone : user_tz;
  if (!tz || tz[0] == '\0') {
    tz = "UTC";
  }
  if (!is_utc(tz)) {
    active = quiet_in_zone(q, tz, now_ms, &end);
  }
  if (active < 0) {
    active = quiet_offset(q, 0, INT64_MAX, now_ms, &end);
  }
  if (active && end_ms) {
    *end_ms = end;
  }
  return active == 1;
}
