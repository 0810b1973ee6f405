/* SPDX-License-Identifier: MIT */
/*
 * The SMS channel on Twilio's Messages API, and the pieces of Twilio's
 * wire format the admin API shares with it: form bodies and the request
 * signature of status callbacks (X-Twilio-Signature).
 */
#ifndef FO_TWILIO_H
#define FO_TWILIO_H

#include <stdbool.h>
#include <stddef.h>

#include "fanout/channel.h"
#include "limiter.h"
#include "store.h"

typedef struct fo_twilio_conf {
  const char *url;              /* API base, e.g. https://api.twilio.com */
  const char *account_sid;
  const char *auth_token;       /* secret: never logged */
  const char *from;             /* sender number (E.164), or NULL */
  const char *messaging_service_sid;  /* used instead of `from` if set */
  const char *ca_file;          /* extra CA bundle (PEM), or NULL */
  const char *status_callback_url;    /* StatusCallback, or NULL */
  int max_inflight;             /* deliveries accepted, not completed */
  int timeout_ms;               /* one request; 0: 30 s */
  int rate_per_second;          /* sends per second per sender; 0: none */
  fo_store *store;              /* for refused numbers; may be NULL */
  fo_limiter *limits;            /* the shared rate; may be NULL */
} fo_twilio_conf;

/*
 * Creates the channel. Strings of `c` are copied; `store` and `limits`
 * are not owned and must outlive the channel. Returns FO_OK and sets
 * *out (freed through its ops: shutdown, then destroy), or FO_ECONFIG
 * (a required key is missing: url, account_sid, auth_token, and from or
 * messaging_service_sid), FO_ENOMEM or FO_EIO, with one line in `err`
 * that never holds the auth token.
 */
int fo_twilio_new(const fo_twilio_conf *c, fo_channel **out, char *err,
                  size_t errlen);

/* True when `phone` is an E.164 number: "+", a non-zero digit, then 6 to
 * 14 more digits. */
bool fo_twilio_e164(const char *phone);

/*
 * A decoded application/x-www-form-urlencoded body: `n` pairs, names at
 * even and values at odd indexes of `kv`, in body order.
 */
typedef struct fo_twilio_form {
  size_t n;
  char **kv;
} fo_twilio_form;

/*
 * Decodes `len` bytes of a form body ('+' is a space, %XX a byte).
 * Returns FO_OK and fills *out (release with fo_twilio_form_clear()),
 * FO_EINVAL for a malformed escape or a NUL byte, or FO_ENOMEM.
 */
int fo_twilio_form_parse(const char *body, size_t len,
                         fo_twilio_form *out);
void fo_twilio_form_clear(fo_twilio_form *f);

/* The value of the first pair named `name`, or NULL. The pointer lives
 * as long as `f`. */
const char *fo_twilio_form_get(const fo_twilio_form *f, const char *name);

/*
 * Twilio's request signature: base64(HMAC-SHA1(auth_token, url followed
 * by every parameter, sorted by name, as name then value)). Writes it
 * NUL-terminated to `out` (29 bytes are enough). Returns FO_OK,
 * FO_EINVAL when `cap` is too small, or FO_ENOMEM.
 */
int fo_twilio_signature(const char *auth_token, const char *url,
                        const fo_twilio_form *f, char *out, size_t cap);

/* True when `header` (NULL: missing) is the signature of the request;
 * compared in constant time. */
bool fo_twilio_signature_ok(const char *auth_token, const char *url,
                            const fo_twilio_form *f, const char *header);

#endif /* FO_TWILIO_H */
