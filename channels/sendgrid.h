/* SPDX-License-Identifier: MIT */
/*
 * The e-mail channel, through SendGrid's v3 Mail Send API. Deliveries of
 * one event that share its content are gathered into one request with a
 * personalization per recipient (up to 1,000), and each keeps its own
 * outcome: 202 is sent, 429 and 5xx and network faults are retryable, an
 * address that cannot be an e-mail address is suppressed before any
 * request, other 4xx fail with SendGrid's own message.
 */
#ifndef FO_SENDGRID_H
#define FO_SENDGRID_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "fanout/channel.h"

typedef struct fo_sendgrid_conf {
  const char *url;              /* API base, e.g. https://api.sendgrid.com */
  const char *api_key;          /* secret; never logged */
  const char *from;             /* sender address */
  const char *ca_file;          /* extra CA bundle (PEM), or NULL */
  int max_inflight;             /* deliveries accepted, not completed */
  int timeout_ms;               /* one request's limit; 0: 30 s */
} fo_sendgrid_conf;

/*
 * Creates the channel and starts its HTTPS client. Every string of `c` is
 * copied. Returns FO_OK and sets *out, or an error with one line in
 * `err`: FO_ECONFIG for a missing url, api_key or from, or a from that is
 * not an address; FO_ENOMEM; or the HTTPS client's own error. The caller
 * shuts the channel down and then frees it with
 * out->ops->destroy(out->self), which also frees *out.
 */
int fo_sendgrid_new(const fo_sendgrid_conf *c, fo_channel **out, char *err,
                    size_t errlen);

/* ---- internals, declared here for the unit tests ---- */

/* Most personalizations SendGrid takes in one request. */
#define FO_SENDGRID_BATCH_MAX 1000

/*
 * True when `s` looks like one e-mail address: at most 254 bytes, one
 * '@' with text on both sides, a dot inside the domain, no space or
 * control byte. A cheap check against what SendGrid would refuse, not a
 * full RFC 5322 parser.
 */
bool fo_sendgrid__email_ok(const char *s);

/* What a request says, taken from the event (its `email` object, else its
 * title and body). The strings point into the event. */
typedef struct fo_sendgrid_content {
  const char *subject;
  const char *text;
  const char *html;
  const char *template_id;
  const json_t *template_data;  /* object, or NULL */
} fo_sendgrid_content;

/* Fills *c from `ev`. Returns FO_OK, or FO_EINVAL with a short reason in
 * `why` when the event gives neither a template nor a subject and a
 * body. */
int fo_sendgrid__content(const fo_event *ev, fo_sendgrid_content *c,
                         char *why, size_t whylen);

/*
 * Builds the JSON body of one request for `n` addresses. Returns a
 * string the caller frees with free(), or NULL when out of memory.
 */
char *fo_sendgrid__body(const fo_sendgrid_content *c, const char *from,
                        const char *const *to, size_t n);

/*
 * Reads SendGrid's error body ({"errors":[{"message","field"}]}): writes
 * the first message (or `fallback` when none) to `reason`, and for each
 * error whose field names one personalization ("personalizations.N..."),
 * sets bad[N] when N < n. Returns the number of errors whose field names
 * no personalization (1 when the body holds no error at all), so that 0
 * with some bad[] set means only those recipients were refused.
 */
size_t fo_sendgrid__errors(const char *body, size_t len, char *reason,
                           size_t reasonlen, const char *fallback,
                           bool *bad, size_t n);

/*
 * Splits `n` addresses into requests in which no address appears twice
 * (compared without case, as SendGrid does) and none has more than `max`:
 * writes each address's request number to group[i] and returns the
 * number of requests.
 */
size_t fo_sendgrid__split(const char *const *to, size_t n, size_t max,
                          size_t *group);

#endif /* FO_SENDGRID_H */
