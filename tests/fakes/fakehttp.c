/* SPDX-License-Identifier: MIT */
/*
 * The HTTPS server under the provider fakes, on libmicrohttpd with a
 * thread per connection: a handler that stalls (delay_ms) holds only its
 * own connection. The certificate is made at start with OpenSSL (an EC
 * P-256 key, self-signed, CA:TRUE so that a client can trust it as its own
 * CA, valid for 127.0.0.1 and localhost), handed to libmicrohttpd as PEM
 * and written to the caller's CA file. The raw request URI is taken from
 * libmicrohttpd's URI log callback, so the query string reaches the
 * handler exactly as sent (a request signature covers those bytes).
 */
#include "fakehttp.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <microhttpd.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

/* Bodies the fakes accept are small; a bigger one ends the connection. */
#define FAKE_BODY_MAX (16 * 1024 * 1024)

struct fake_http {
  struct MHD_Daemon *d;
  fake_handler handler;
  void *arg;
  int port;
  char *key_pem;
  char *cert_pem;
  atomic_int connections;
  atomic_bool starting;         /* libmicrohttpd's log is shown only then */

  /* Wakes stalled handlers at stop, so that stop never waits them out. */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  bool stopping;
};

/* One request, from its URI to its completion. */
typedef struct fake_state {
  char *uri;                    /* as sent, with the query string */
  char *body;
  size_t len;
  size_t cap;
  bool started;
} fake_state;

const char *fake_header(const fake_request *r, const char *name) {
  return MHD_lookup_connection_value((struct MHD_Connection *)r->conn,
                                     MHD_HEADER_KIND, name);
}

int fake_http_port(const fake_http *f) {
  return f->port;
}

int fake_http_connections(const fake_http *f) {
  return atomic_load(&f->connections);
}

/* ---- certificate ---- */

static char *fake_bio_string(BIO *bio) {
  char *data, *s;
  long n = BIO_get_mem_data(bio, &data);

  if (n <= 0)
    return NULL;
  s = malloc((size_t)n + 1);
  if (s == NULL)
    return NULL;
  memcpy(s, data, (size_t)n);
  s[n] = '\0';
  return s;
}

static int fake_add_ext(X509 *x, int nid, const char *value) {
  X509V3_CTX ctx;
  X509_EXTENSION *ext;
  int ok;

  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, x, x, NULL, NULL, 0);
  ext = X509V3_EXT_conf_nid(NULL, &ctx, nid, value);
  if (ext == NULL)
    return -1;
  ok = X509_add_ext(x, ext, -1);
  X509_EXTENSION_free(ext);
  return ok == 1 ? 0 : -1;
}

/* Makes a key and a self-signed certificate, both as PEM strings the
 * caller frees. Returns 0, or -1 with nothing allocated. */
static int fake_make_cert(char **key_pem, char **cert_pem) {
  EVP_PKEY *key = NULL;
  X509 *x = NULL;
  X509_NAME *name;
  BIO *kb = NULL, *cb = NULL;
  uint64_t serial = 0;
  int rc = -1;

  key = EVP_EC_gen("P-256");
  x = X509_new();
  kb = BIO_new(BIO_s_mem());
  cb = BIO_new(BIO_s_mem());
  if (key == NULL || x == NULL || kb == NULL || cb == NULL)
    goto out;
  if (RAND_bytes((unsigned char *)&serial, sizeof(serial)) != 1)
    goto out;
  serial = (serial >> 1) | 1;
  if (X509_set_version(x, 2) != 1 ||
      ASN1_INTEGER_set_uint64(X509_get_serialNumber(x), serial) != 1 ||
      X509_gmtime_adj(X509_getm_notBefore(x), -3600) == NULL ||
      X509_gmtime_adj(X509_getm_notAfter(x), 86400) == NULL ||
      X509_set_pubkey(x, key) != 1)
    goto out;
  name = X509_get_subject_name(x);
  if (X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                                 (const unsigned char *)"localhost", -1, -1,
                                 0) != 1 ||
      X509_set_issuer_name(x, name) != 1)
    goto out;
  if (fake_add_ext(x, NID_basic_constraints, "critical,CA:TRUE") != 0 ||
      fake_add_ext(x, NID_key_usage,
                   "critical,digitalSignature,keyCertSign") != 0 ||
      fake_add_ext(x, NID_subject_key_identifier, "hash") != 0 ||
      fake_add_ext(x, NID_subject_alt_name,
                   "IP:127.0.0.1,DNS:localhost") != 0)
    goto out;
  if (X509_sign(x, key, EVP_sha256()) <= 0)
    goto out;
  if (PEM_write_bio_PrivateKey(kb, key, NULL, NULL, 0, NULL, NULL) != 1 ||
      PEM_write_bio_X509(cb, x) != 1)
    goto out;
  *key_pem = fake_bio_string(kb);
  *cert_pem = fake_bio_string(cb);
  if (*key_pem == NULL || *cert_pem == NULL) {
    free(*key_pem);
    free(*cert_pem);
    goto out;
  }
  rc = 0;

out:
  BIO_free(kb);
  BIO_free(cb);
  X509_free(x);
  EVP_PKEY_free(key);
  return rc;
}

static int fake_write_file(const char *path, const char *text) {
  FILE *fp = fopen(path, "w");
  int rc = 0;

  if (fp == NULL)
    return -1;
  if (fputs(text, fp) == EOF)
    rc = -1;
  if (fclose(fp) != 0)
    rc = -1;
  return rc;
}

/* ---- requests ---- */

static void fake_state_free(fake_state *st) {
  if (st == NULL)
    return;
  free(st->uri);
  free(st->body);
  free(st);
}

static fake_state *fake_state_new(const char *uri) {
  fake_state *st = calloc(1, sizeof(*st));

  if (st == NULL)
    return NULL;
  st->uri = strdup(uri != NULL ? uri : "/");
  st->body = malloc(1);
  if (st->uri == NULL || st->body == NULL) {
    fake_state_free(st);
    return NULL;
  }
  st->body[0] = '\0';
  st->cap = 1;
  return st;
}

/* Runs first for every request, before the headers are parsed; what it
 * returns is the request's state in the access handler. */
static void *fake_on_uri(void *cls, const char *uri,
                         struct MHD_Connection *conn) {
  (void)cls;
  (void)conn;
  return fake_state_new(uri);
}

static void fake_on_completed(void *cls, struct MHD_Connection *conn,
                              void **req_cls,
                              enum MHD_RequestTerminationCode toe) {
  (void)cls;
  (void)conn;
  (void)toe;
  fake_state_free(*req_cls);
  *req_cls = NULL;
}

static void fake_on_connection(void *cls, struct MHD_Connection *conn,
                               void **socket_context,
                               enum MHD_ConnectionNotificationCode toe) {
  fake_http *f = cls;

  (void)conn;
  (void)socket_context;
  if (toe == MHD_CONNECTION_NOTIFY_STARTED)
    atomic_fetch_add(&f->connections, 1);
}

static void fake_mhd_log(void *cls, const char *fmt, va_list ap) {
  fake_http *f = cls;

  if (!atomic_load(&f->starting))
    return;
  fputs("fakehttp: ", stderr);
  vfprintf(stderr, fmt, ap);
}

static int fake_append(fake_state *st, const char *data, size_t n) {
  size_t cap = st->cap;
  char *p;

  if (n > FAKE_BODY_MAX - st->len)
    return -1;
  while (cap < st->len + n + 1)
    cap *= 2;
  if (cap != st->cap) {
    p = realloc(st->body, cap);
    if (p == NULL)
      return -1;
    st->body = p;
    st->cap = cap;
  }
  memcpy(st->body + st->len, data, n);
  st->len += n;
  st->body[st->len] = '\0';
  return 0;
}

/* Sleeps `ms` unless the server stops first; false when it stopped. */
static bool fake_stall(fake_http *f, int ms) {
  struct timespec ts;
  bool stopping;

  clock_gettime(CLOCK_MONOTONIC, &ts);
  ts.tv_sec += ms / 1000;
  ts.tv_nsec += (long)(ms % 1000) * 1000000L;
  if (ts.tv_nsec >= 1000000000L) {
    ts.tv_sec++;
    ts.tv_nsec -= 1000000000L;
  }
  pthread_mutex_lock(&f->mu);
  while (!f->stopping) {
    if (pthread_cond_timedwait(&f->cv, &f->mu, &ts) != 0)
      break;
  }
  stopping = f->stopping;
  pthread_mutex_unlock(&f->mu);
  return !stopping;
}

/* Adds "Name: value" to `resp`; a line without a colon is skipped. */
static enum MHD_Result fake_add_header(struct MHD_Response *resp,
                                       const char *line) {
  char buf[1024];
  char *colon, *v;

  if (snprintf(buf, sizeof(buf), "%s", line) >= (int)sizeof(buf))
    return MHD_NO;
  colon = strchr(buf, ':');
  if (colon == NULL)
    return MHD_YES;
  *colon = '\0';
  v = colon + 1;
  while (*v == ' ' || *v == '\t')
    v++;
  return MHD_add_response_header(resp, buf, v);
}

/* The whole request is in: asks the handler, then answers or drops. */
static enum MHD_Result fake_answer(fake_http *f, struct MHD_Connection *conn,
                                   const char *method, fake_state *st) {
  fake_request req;
  fake_response out;
  struct MHD_Response *resp = NULL;
  char *query;
  enum MHD_Result ret = MHD_NO;
  size_t i;

  /* The path is cut from the URI in place, before the '?'. */
  query = strchr(st->uri, '?');
  if (query != NULL)
    *query++ = '\0';
  memset(&req, 0, sizeof(req));
  req.method = method;
  req.path = st->uri;
  req.query = query != NULL ? query : "";
  req.body = st->body;
  req.body_len = st->len;
  req.conn = conn;
  memset(&out, 0, sizeof(out));
  out.status = 200;
  f->handler(f->arg, &req, &out);

  if (out.drop || (out.delay_ms > 0 && !fake_stall(f, out.delay_ms)))
    goto out;
  if (out.body != NULL) {
    resp = MHD_create_response_from_buffer(strlen(out.body), out.body,
                                           MHD_RESPMEM_MUST_FREE);
    if (resp != NULL)
      out.body = NULL;
  } else {
    resp = MHD_create_response_from_buffer(0, (void *)"",
                                           MHD_RESPMEM_PERSISTENT);
  }
  if (resp == NULL)
    goto out;
  if (MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                              out.content_type != NULL
                                  ? out.content_type
                                  : "application/json") != MHD_YES)
    goto out;
  for (i = 0; i < 8 && out.headers[i] != NULL; i++) {
    if (fake_add_header(resp, out.headers[i]) != MHD_YES)
      goto out;
  }
  if (out.status < 100 || out.status > 999)
    out.status = 500;
  ret = MHD_queue_response(conn, (unsigned int)out.status, resp);

out:
  if (resp != NULL)
    MHD_destroy_response(resp);
  free(out.body);
  return ret;
}

static enum MHD_Result fake_access(void *cls, struct MHD_Connection *conn,
                                   const char *url, const char *method,
                                   const char *version,
                                   const char *upload_data,
                                   size_t *upload_data_size, void **req_cls) {
  fake_http *f = cls;
  fake_state *st = *req_cls;

  (void)version;
  if (st == NULL) {
    st = fake_state_new(url);
    if (st == NULL)
      return MHD_NO;
    *req_cls = st;
  }
  /* The first call has the headers only; the body comes in later calls,
   * and a call with no data says it is complete. */
  if (!st->started) {
    st->started = true;
    return MHD_YES;
  }
  if (*upload_data_size > 0) {
    if (fake_append(st, upload_data, *upload_data_size) != 0)
      return MHD_NO;
    *upload_data_size = 0;
    return MHD_YES;
  }
  return fake_answer(f, conn, method, st);
}

/* ---- start and stop ---- */

static void fake_free(fake_http *f) {
  free(f->key_pem);
  free(f->cert_pem);
  pthread_cond_destroy(&f->cv);
  pthread_mutex_destroy(&f->mu);
  free(f);
}

static int fake_sync_init(fake_http *f) {
  pthread_condattr_t ca;
  int rc;

  if (pthread_condattr_init(&ca) != 0)
    return -1;
  rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  if (rc == 0)
    rc = pthread_cond_init(&f->cv, &ca);
  pthread_condattr_destroy(&ca);
  if (rc != 0)
    return -1;
  if (pthread_mutex_init(&f->mu, NULL) != 0) {
    pthread_cond_destroy(&f->cv);
    return -1;
  }
  return 0;
}

fake_http *fake_http_start(int port, const char *ca_path, fake_handler h,
                           void *arg) {
  fake_http *f;
  struct sockaddr_in sa;
  const union MHD_DaemonInfo *info;
  unsigned int flags = MHD_USE_TLS | MHD_USE_THREAD_PER_CONNECTION |
                       MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG;

  if (port < 0 || port > 65535 || ca_path == NULL || h == NULL) {
    fprintf(stderr, "fakehttp: bad arguments\n");
    return NULL;
  }
  f = calloc(1, sizeof(*f));
  if (f == NULL || fake_sync_init(f) != 0) {
    fprintf(stderr, "fakehttp: out of memory\n");
    free(f);
    return NULL;
  }
  f->handler = h;
  f->arg = arg;
  if (fake_make_cert(&f->key_pem, &f->cert_pem) != 0) {
    fprintf(stderr, "fakehttp: cannot make a certificate\n");
    goto fail;
  }
  if (fake_write_file(ca_path, f->cert_pem) != 0) {
    fprintf(stderr, "fakehttp: cannot write %s\n", ca_path);
    goto fail;
  }

  memset(&sa, 0, sizeof(sa));
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  /* The logger goes first so that it sees what the other options say;
   * it is quiet after start, where a client's failed handshake (a test
   * of certificate checks) is expected, not news. */
  atomic_store(&f->starting, true);
  f->d = MHD_start_daemon(
      flags, (uint16_t)port, NULL, NULL, fake_access, f,
      MHD_OPTION_EXTERNAL_LOGGER, fake_mhd_log, f, MHD_OPTION_SOCK_ADDR,
      (struct sockaddr *)&sa, MHD_OPTION_HTTPS_MEM_KEY, f->key_pem,
      MHD_OPTION_HTTPS_MEM_CERT, f->cert_pem, MHD_OPTION_URI_LOG_CALLBACK,
      fake_on_uri, f, MHD_OPTION_NOTIFY_COMPLETED, fake_on_completed, f,
      MHD_OPTION_NOTIFY_CONNECTION, fake_on_connection, f,
      MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)120, MHD_OPTION_END);
  atomic_store(&f->starting, false);
  if (f->d == NULL) {
    fprintf(stderr, "fakehttp: cannot listen on 127.0.0.1:%d\n", port);
    goto fail;
  }
  info = MHD_get_daemon_info(f->d, MHD_DAEMON_INFO_BIND_PORT);
  f->port = info != NULL ? (int)info->port : port;
  return f;

fail:
  fake_free(f);
  return NULL;
}

void fake_http_stop(fake_http *f) {
  if (f == NULL)
    return;
  pthread_mutex_lock(&f->mu);
  f->stopping = true;
  pthread_cond_broadcast(&f->cv);
  pthread_mutex_unlock(&f->mu);
  MHD_stop_daemon(f->d);
  fake_free(f);
}
