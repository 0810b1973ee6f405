/* SPDX-License-Identifier: MIT */
/*
 * An asynchronous HTTPS client for the provider channels, on libcurl's
 * multi interface: one thread per client runs every transfer of one
 * channel, over a few kept-alive connections; requests are queued from any
 * thread and their responses come back on the client's thread.
 */
#ifndef FO_HTTP_H
#define FO_HTTP_H

#include <stdbool.h>
#include <stddef.h>

typedef struct fo_http fo_http;

typedef struct fo_http_conf {
  const char *name;             /* for logs and metrics: "sendgrid" */
  const char *ca_file;          /* extra CA bundle (PEM), or NULL */
  int max_inflight;             /* requests queued or running, >= 1 */
  int max_connections;          /* per host */
  int tick_ms;                  /* period of the tick callback; 0: none */
  void (*tick)(void *arg);      /* runs on the client's thread */
  void *tick_arg;
} fo_http_conf;

typedef struct fo_http_request {
  const char *method;           /* "POST" */
  const char *url;
  const char *const *headers;   /* "Name: value", NULL-terminated, or NULL */
  const char *body;             /* may be NULL */
  size_t body_len;
  const char *userpwd;          /* HTTP basic auth "user:password", or NULL */
  int timeout_ms;               /* whole request; 0: 30 s */
} fo_http_request;

typedef struct fo_http_response fo_http_response;

/*
 * Called once per request that fo_http_send() accepted, on the client's
 * thread. `r` and everything it points to are valid during the call only.
 */
typedef void (*fo_http_done_fn)(void *arg, const fo_http_response *r);

/* Status code, or 0 when the request failed before a response (then
 * fo_http_error() says why: timeout, reset, TLS, refused). */
long fo_http_status(const fo_http_response *r);
const char *fo_http_error(const fo_http_response *r);
/* True when the failure was a timeout. */
bool fo_http_timed_out(const fo_http_response *r);
const char *fo_http_body(const fo_http_response *r, size_t *len);
/* A response header's value (name compared without case), or NULL. */
const char *fo_http_header(const fo_http_response *r, const char *name);

/* Starts the client's thread. Returns FO_OK and sets *out, or an error. */
int fo_http_new(const fo_http_conf *conf, fo_http **out);

/*
 * Queues a request; every field is copied, so `req` may go after the
 * call. Returns FO_OK (then `done` is called exactly once), FO_EFULL when
 * max_inflight requests are queued or running, or FO_ECLOSED after
 * fo_http_stop(); on an error `done` is never called.
 */
int fo_http_send(fo_http *h, const fo_http_request *req, fo_http_done_fn done,
                 void *arg);

/* Requests queued or running now. */
int fo_http_inflight(fo_http *h);

/*
 * Refuses new requests, lets running ones finish for at most
 * `timeout_ms`, then ends the rest (their callbacks see status 0 and the
 * error "shutdown"), and joins the thread. Every callback has run when it
 * returns.
 */
void fo_http_stop(fo_http *h, int timeout_ms);
void fo_http_free(fo_http *h);

#endif /* FO_HTTP_H */
