/* SPDX-License-Identifier: MIT */
/*
 * A small HTTPS server for provider fakes: TLS with a certificate made at
 * start for 127.0.0.1 and localhost (its PEM written to a file that the
 * client trusts through its `ca_file`), and one handler that sees each
 * whole request. Built on libmicrohttpd.
 */
#ifndef FO_FAKEHTTP_H
#define FO_FAKEHTTP_H

#include <stddef.h>

typedef struct fake_http fake_http;

typedef struct fake_request {
  const char *method;
  const char *path;             /* without the query string */
  const char *query;            /* raw query string, "" when none */
  const char *body;
  size_t body_len;
  void *conn;                   /* for fake_header() */
} fake_request;

/* A request header (name compared without case), or NULL. */
const char *fake_header(const fake_request *r, const char *name);

typedef struct fake_response {
  int status;
  const char *content_type;     /* NULL: application/json */
  char *body;                   /* malloc'd; freed by the server; may be NULL */
  const char *headers[8];       /* "Name: value", NULL-terminated */
  int delay_ms;                 /* answer after this long (stall) */
  int drop;                     /* 1: close the connection, no answer */
} fake_response;

/* Fills *resp for `req`. Runs on one of the server's threads. */
typedef void (*fake_handler)(void *arg, const fake_request *req,
                             fake_response *resp);

/*
 * Starts an HTTPS server on 127.0.0.1:`port` (0: a free one) and writes
 * the certificate (PEM, the client's CA) to `ca_path`. Returns NULL on
 * failure with a line on stderr.
 */
fake_http *fake_http_start(int port, const char *ca_path, fake_handler h,
                           void *arg);
int fake_http_port(const fake_http *f);
/* TCP connections accepted since start (to check connection reuse). */
int fake_http_connections(const fake_http *f);
void fake_http_stop(fake_http *f);

#endif /* FO_FAKEHTTP_H */
