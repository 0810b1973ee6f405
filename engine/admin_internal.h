/* SPDX-License-Identifier: MIT */
/*
 * What the admin API's request core (admin.c) and its route handlers
 * (admin_routes.c) share: the route table, the per-request state and the
 * helpers that build replies. Not for use outside the admin module.
 */
#ifndef FO_ADMIN_INTERNAL_H
#define FO_ADMIN_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "admin.h"

#define FO_ADMIN_MAX_SEGS 6
#define FO_ADMIN_MAX_PARAMS 2
#define FO_ADMIN_MAX_METHODS 4
#define FO_ADMIN_PROBES 3        /* kafka, postgres, redis */

typedef struct fo_admin_req fo_admin_req;

/* A handler either set the reply (DONE) or started work that completes
 * the request later (WAIT: the core parks the connection). */
typedef enum fo_admin_next { FO_ADMIN_DONE = 0, FO_ADMIN_WAIT } fo_admin_next;

typedef fo_admin_next (*fo_admin_handler)(fo_admin *a, fo_admin_req *r);

/* Method flags. */
#define FO_ADMIN_BODY 1u         /* takes a JSON body */
#define FO_ADMIN_EVENT_BODY 2u   /* bounded by max_event_bytes */
#define FO_ADMIN_MERGE_PATCH 4u  /* also accepts merge-patch+json */
#define FO_ADMIN_FORM_BODY 8u    /* the body is form-encoded, not JSON */

typedef struct fo_admin_method {
  const char *name;             /* NULL ends the list */
  fo_admin_handler fn;
  unsigned flags;
} fo_admin_method;

/*
 * One path template. `segs` holds the segments after the leading "/",
 * NULL-terminated; "{id}" is a user or event id and "{token}" a device
 * token, both percent-decoded and checked before any handler runs.
 */
typedef struct fo_admin_route {
  const char *tmpl;             /* metric label and log field */
  const char *segs[FO_ADMIN_MAX_SEGS + 1];
  bool open;                    /* no bearer token needed */
  const char *allow;            /* the Allow header of a 405 */
  fo_admin_method methods[FO_ADMIN_MAX_METHODS + 1];
} fo_admin_route;

extern const fo_admin_route fo_admin__routes[];
extern const size_t fo_admin__nroutes;

struct fo_admin {
  struct MHD_Daemon *d;
  fo_store *store;
  fo_limiter *limits;
  fo_publish *publish;
  size_t max_body;
  size_t max_event_bytes;
  int publish_timeout_ms;
  unsigned char token_sha256[32];
  char listen[300];
  char *twilio_auth_token;      /* secret; NULL: no Twilio callbacks */
  char *twilio_callback_url;

  /* Requests that published, counted until libmicrohttpd is done with
   * them: stop waits for them, as libmicrohttpd must not stop with a
   * connection suspended, and their answers are owed. */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  unsigned inflight;
  bool stopping;

  /* /healthz probes: at most one thread per dependency at a time, each
   * counting its results in probe_gen. Guarded by hmu; hcv runs on the
   * monotonic clock. */
  pthread_mutex_t hmu;
  pthread_cond_t hcv;
  bool probing[FO_ADMIN_PROBES];
  bool probe_ok[FO_ADMIN_PROBES];
  uint64_t probe_gen[FO_ADMIN_PROBES];
  unsigned probes;              /* probe threads running */
};

enum fo_admin_pub_state {
  FO_ADMIN_PUB_NONE = 0,
  FO_ADMIN_PUB_WAITING,
  FO_ADMIN_PUB_DONE
};

struct fo_admin_req {
  fo_admin *a;
  struct MHD_Connection *conn;
  const fo_admin_route *route;  /* NULL: no route matched */
  const fo_admin_method *method;
  char method_name[16];         /* as the client sent it (truncated) */
  char *params[FO_ADMIN_MAX_PARAMS];  /* decoded, in path order */
  int64_t start_us;

  /* The body, as received. */
  char *body;
  size_t body_len;
  size_t body_cap;
  size_t body_limit;
  bool keep_body;               /* else received bytes are dropped */
  bool too_large;
  size_t dropped;

  /* The reply; `resp` is malloc'd and handed to libmicrohttpd. */
  bool replied;
  unsigned status;
  char *resp;
  size_t resp_len;
  const char *ctype;            /* static */
  const char *allow;            /* static, for 405 */
  bool www_authenticate;

  /* POST /v1/events; pub_state and suspended are guarded by a->mu. */
  int pub_state;
  int pub_rc;
  bool suspended;
  char *event_id;
};

/* Sets a JSON reply; takes ownership of `body` (NULL: out of memory,
 * which becomes a 500). */
void fo_admin__reply_json(fo_admin_req *r, unsigned status, json_t *body);

/* Sets a reply of `len` bytes; takes ownership of `buf` (free()). */
void fo_admin__reply_raw(fo_admin_req *r, unsigned status,
                         const char *ctype, char *buf, size_t len);

/* Sets an empty reply (204). */
void fo_admin__reply_empty(fo_admin_req *r, unsigned status);

/*
 * Sets {"error": {"code", "message", "field"}}; `field` may be NULL (left
 * out). Bytes that are not valid UTF-8 in the message or field are shown
 * as '?', so echoing input can never produce invalid JSON.
 */
void fo_admin__error(fo_admin_req *r, unsigned status, const char *code,
                     const char *field, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* Maps a store return code that is not FO_OK to its reply; `what` names
 * the missing thing for FO_ENOENT ("user", "device", "event"). */
void fo_admin__store_error(fo_admin_req *r, int rc, const char *what);

/*
 * Parses the request body as one JSON text (duplicate keys refused).
 * Returns the value (caller decrefs), or NULL after setting a 400 reply.
 */
json_t *fo_admin__body_json(fo_admin_req *r);

/*
 * Starts publishing `len` bytes keyed by `key` for this request. On FO_OK
 * the handler returns FO_ADMIN_WAIT, and is called again with pub_state
 * FO_ADMIN_PUB_DONE and pub_rc set. Returns FO_ECLOSED while stopping.
 */
int fo_admin__publish(fo_admin_req *r, const char *key, const void *value,
                      size_t len);

/* True when `n` bytes at `s` are valid UTF-8 (no overlongs, no
 * surrogates). */
bool fo_admin__utf8_valid(const char *s, size_t n);

#endif /* FO_ADMIN_INTERNAL_H */
