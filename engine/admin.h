/* SPDX-License-Identifier: MIT */
/*
 * The REST admin API (docs/rest.md): users, devices, preferences, event
 * submission and delivery lookup, plus /healthz and /metrics, served by
 * libmicrohttpd on `[admin] listen`. Every route but /healthz, /metrics
 * and Twilio's status callbacks (signed by Twilio instead) needs the
 * admin bearer token; bodies and errors are JSON, except the callbacks'
 * form bodies.
 *
 * Threads: libmicrohttpd runs a small pool of its own threads; store and
 * Redis calls run on them. POST /v1/events does not hold a thread while
 * it waits for Kafka: its connection is parked until the acknowledgement
 * (or the deadline) arrives.
 */
#ifndef FO_ADMIN_H
#define FO_ADMIN_H

#include <stddef.h>

#include "limiter.h"
#include "publish.h"
#include "store.h"

typedef struct fo_admin fo_admin;

typedef struct fo_admin_conf {
  /* "HOST:PORT", "[IPV6]:PORT"; port 0 picks a free one (fo_admin_port) */
  const char *listen;
  const char *token;            /* the bearer token; required */
  fo_store *store;              /* users, devices, preferences, log */
  fo_limiter *limits;            /* for /healthz only */
  fo_publish *publish;          /* POST /v1/events */
  size_t max_body;              /* request body bound; 0: 1 MiB */
  size_t max_event_bytes;       /* POST /v1/events bound; 0: 1 MiB */
  int timeout_s;                /* idle connection timeout; 0: 30 */
  int publish_timeout_ms;       /* wait for Kafka's ack; 0: 5000 */
  /* POST /v1/callbacks/twilio, Twilio's SMS status callbacks: checked
   * with the X-Twilio-Signature of `twilio_auth_token` (a secret) over
   * `twilio_callback_url`, the public URL Twilio was given. The route
   * answers 404 while either is NULL. */
  const char *twilio_auth_token;
  const char *twilio_callback_url;
} fo_admin_conf;

/*
 * Starts listening and serving. Strings in `c` are copied; `store`,
 * `limits` and `publish` are not owned and must outlive the admin (any
 * of them may be NULL: the routes that need it then answer 503 and
 * /healthz leaves it out). Returns FO_OK and sets *out, FO_ECONFIG for a
 * bad `listen` or a missing token, FO_EIO when the address cannot be
 * bound, or FO_ENOMEM; with one line in `err` (never the token).
 */
int fo_admin_start(const fo_admin_conf *c, fo_admin **out, char *err,
                   size_t errlen);

/* The TCP port the admin listens on (useful when `listen` said 0). */
int fo_admin_port(fo_admin *a);

/*
 * Stops accepting events, waits for the ones waiting on Kafka (at most
 * about publish_timeout_ms), then closes every connection and joins the
 * threads. `a` is invalid after the call; NULL is allowed.
 */
void fo_admin_stop(fo_admin *a);

#endif /* FO_ADMIN_H */
