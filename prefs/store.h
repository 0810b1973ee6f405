/* SPDX-License-Identifier: MIT */
/*
 * PostgreSQL state: users, devices, preferences, deferred deliveries and
 * the delivery log, with the schema created and upgraded by versioned
 * migrations. All SQL is parameterised.
 *
 * A fo_store is a small pool of connections guarded by a mutex: any
 * thread may call any function; each call borrows one connection. A lost
 * connection is reset on the next use, so a PostgreSQL restart degrades
 * service (FO_EIO) and work resumes once it is back.
 */
#ifndef FO_STORE_H
#define FO_STORE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "fanout/channel.h"
#include "fanout/event.h"
#include "prefs.h"

typedef struct fo_store fo_store;

/*
 * Connects `pool` connections to `dsn` and applies the migrations (under
 * a PostgreSQL advisory lock, so instances starting together are safe).
 * Returns FO_OK and sets *out, or FO_EIO with one line in `err` (never
 * the DSN's password).
 */
int fo_store_open(const char *dsn, int pool, fo_store **out, char *err,
                  size_t errlen);
void fo_store_close(fo_store *s);

/* True when a connection answers now (for /healthz). */
bool fo_store_ping(fo_store *s);

/* ---- users, devices, preferences (REST API) ----
 * Each returns FO_OK, FO_ENOENT (no such user / device), FO_EINVAL (a
 * constraint refused the input), FO_EIO (database unreachable) or
 * FO_ENOMEM. JSON results are new references the caller decrefs. Every
 * change sends NOTIFY fanout_user with the user id in its transaction. */

/* Creates or replaces the user's fields; NULL fields are stored NULL.
 * *out is the user as GET returns it; *created says whether it is new. */
int fo_store_user_put(fo_store *s, const char *id, const char *email,
                      const char *phone, const char *timezone,
                      const char *locale, json_t **out, bool *created);
int fo_store_user_get(fo_store *s, const char *id, json_t **out);
/* Erases the user, devices, preferences and inbox. */
int fo_store_user_delete(fo_store *s, const char *id);

/* platform: "apns" or "fcm"; app: NULL means "default". Registering a
 * token again clears its invalid_since. */
int fo_store_device_add(fo_store *s, const char *user, const char *platform,
                        const char *token, const char *app, json_t **out);
int fo_store_device_list(fo_store *s, const char *user, json_t **out);
int fo_store_device_delete(fo_store *s, const char *user,
                           const char *token);
/* Marks a token invalid as of `at_ms` unless it was registered again
 * after that time. */
int fo_store_device_invalidate(fo_store *s, const char *platform,
                               const char *token, int64_t at_ms);

/* The stored preferences document ({} when none). FO_ENOENT: no user. */
int fo_store_prefs_get(fo_store *s, const char *user, json_t **out);
/* Replaces the document (already validated by the caller). */
int fo_store_prefs_put(fo_store *s, const char *user, const json_t *doc);

/*
 * Read-modify-write of the preferences in one transaction (the row is
 * locked): `fn` gets the current document and returns the new one (a new
 * reference) or NULL to abort with its own error code in *fn_rc. Used by
 * PATCH. Returns FO_OK with *out the stored document.
 */
typedef json_t *(*fo_prefs_update_fn)(const json_t *current, void *arg,
                                      int *fn_rc);
int fo_store_prefs_update(fo_store *s, const char *user,
                          fo_prefs_update_fn fn, void *arg, json_t **out);

/* ---- the policy's view of a user ---- */

typedef struct fo_device {
  char *token;
  char *app;
  fo_channel_kind kind;         /* always FO_CH_PUSH */
  bool apns;                    /* else fcm */
  int64_t invalid_since_ms;     /* 0 when valid */
} fo_device;

/*
 * Everything the policy needs about one user, loaded in one round trip.
 * Immutable once loaded and reference counted, so the cache can hand it
 * to several threads and drop it when a change arrives.
 */
typedef struct fo_recipient {
  atomic_int refs;
  char *id;
  char *email;                  /* NULL when absent */
  char *phone;                  /* NULL when absent */
  char *timezone;               /* NULL when absent */
  char *locale;
  fo_device *devices;
  size_t ndevices;
  fo_prefs prefs;
} fo_recipient;

/* Loads a user with one reference held by the caller; FO_ENOENT when
 * there is no such user. */
int fo_store_load_recipient(fo_store *s, const char *user,
                            fo_recipient **out);
void fo_recipient_ref(fo_recipient *r);
void fo_recipient_unref(fo_recipient *r);

/*
 * Runs a thread with its own connection that LISTENs on fanout_user and
 * calls `cb(user_id, arg)` for each change (from that thread), and
 * `cb(NULL, arg)` after a reconnection, when changes may have been
 * missed. Reconnects with backoff. Stopped by fo_store_close().
 */
typedef void (*fo_store_change_fn)(const char *user, void *arg);
int fo_store_listen(fo_store *s, fo_store_change_fn cb, void *arg);

/* ---- deferred deliveries (quiet hours) ---- */

/* Stores one (event, user, channel) to send at `due_ms` unless the event
 * expires at `expires_ms` first. `event_json` is the event's document. */
int fo_store_defer(fo_store *s, const char *event_json, const char *user,
                   fo_channel_kind channel, int64_t due_ms,
                   int64_t expires_ms);

typedef struct fo_deferred {
  int64_t id;
  char *event_json;
  char *user;
  fo_channel_kind channel;
  int64_t expires_ms;
} fo_deferred;

/*
 * Claims up to `max` deferred rows due by now (FOR UPDATE SKIP LOCKED, so
 * several instances share the work): they are hidden from other claims
 * for `lease_ms`, and come back if not finished by then. Returns how many
 * (array in *out, free with fo_deferred_free), or a negative error.
 */
int fo_store_claim_due(fo_store *s, int max, int64_t lease_ms,
                       fo_deferred **out);
void fo_deferred_free(fo_deferred *rows, int n);
/* Deletes a claimed row once its delivery reached a final outcome. */
int fo_store_deferred_done(fo_store *s, int64_t id);

/* ---- delivery log ---- */

/* GET /v1/events/{id}: {"id", "deliveries": [...]}, FO_ENOENT if none. */
int fo_store_event_get(fo_store *s, const char *event_id, json_t **out);

/* True when the log has a `sent` outcome for this delivery (dedup's
 * fallback while Redis is down). FO_OK / FO_ENOENT / FO_EIO. */
int fo_store_delivery_sent(fo_store *s, const char *event_id,
                           const char *user, fo_channel_kind channel);

/* ---- provider feedback ---- */

/*
 * Marks the user's phone unusable for SMS as of `at_ms` (the provider
 * said the number is invalid or not a mobile), when `phone` is still the
 * user's number and not marked already. The recipient the policy loads
 * then has no phone; fo_store_user_put() with a different number clears
 * the mark. Returns FO_OK, FO_ENOENT (no such user with that number, or
 * marked already), FO_EIO or FO_ENOMEM.
 */
int fo_store_phone_unusable(fo_store *s, const char *user,
                            const char *phone, int64_t at_ms);

/*
 * Turns `channel` off in the user's preferences (channels.NAME = false),
 * keeping the rest of the document, as a PATCH would. Returns FO_OK,
 * FO_ENOENT (no such user), FO_EIO or FO_ENOMEM.
 */
int fo_store_channel_off(fo_store *s, const char *user,
                         fo_channel_kind channel);

/*
 * Sets the status (and reason, NULL for none) of the delivery log rows of
 * `channel` whose provider message id is `provider_id`; used by status
 * callbacks ("delivered", "undelivered"). Returns FO_OK, FO_ENOENT (no
 * such message), FO_EINVAL, FO_EIO or FO_ENOMEM.
 */
int fo_store_delivery_update_by_provider(fo_store *s,
                                         fo_channel_kind channel,
                                         const char *provider_id,
                                         const char *status,
                                         const char *reason);

/*
 * The delivery log writer: outcomes are queued in memory and written by a
 * thread of its own in batches (one multi-row upsert per batch), so the
 * hot path makes no round trip. The queue is bounded; when the database
 * is down it keeps what fits and counts what it had to drop.
 */
typedef struct fo_dlog fo_dlog;
int fo_dlog_start(fo_store *s, size_t capacity, fo_dlog **out);
/* Copies the strings. Thread-safe; never blocks on the database. */
void fo_dlog_record(fo_dlog *l, const char *event_id, const char *user,
                    fo_channel_kind channel, fo_status status,
                    const char *reason, uint32_t attempts,
                    const char *provider_id);
/* Writes what is queued, waiting at most `timeout_ms`. */
int fo_dlog_flush(fo_dlog *l, int timeout_ms);
void fo_dlog_stop(fo_dlog *l);

#endif /* FO_STORE_H */
