/* SPDX-License-Identifier: MIT */
/*
 * The provider channels' HTTPS client, on libcurl's multi interface. Each
 * client owns one thread that runs every transfer: other threads only
 * append copied requests to a mutex-protected queue, and wake the thread
 * with curl_multi_wakeup() when it is waiting. Easy handles are kept on a
 * free list and the multi handle keeps the connection cache, so a busy
 * channel sends over a few kept-alive connections (HTTP/2 multiplexed
 * where the server offers it) and resumes TLS sessions through a share
 * handle. A request's timeout counts its wait for a free connection.
 *
 * Known limitation: libcurl sends a request again, once, when a reused
 * connection closes before any byte of the answer, so a server that
 * drops the connection after reading a request may see it twice.
 * Known limitation: a response body is cut at 1 MiB and response header
 * fields beyond 64 are dropped, without a flag saying so.
 *
 * Thread affinity: fo_http_new(), fo_http_stop() and fo_http_free() run on
 * the owner's thread (never on the client's thread, which they join);
 * fo_http_send() and fo_http_inflight() run on any thread, including from
 * a done or tick callback; everything that touches curl runs on the
 * client's thread only.
 */
#include "http.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <curl/curl.h>

#include "fanout/common.h"
#include "log.h"
#include "metrics.h"

/* Provider answers are small JSON documents: a bigger body is cut here
 * rather than letting one odd response take memory without bound. */
#define FO_HTTP_BODY_MAX (1024 * 1024)
#define FO_HTTP_HEADERS_MAX 64
#define FO_HTTP_HEADER_BYTES_MAX (64 * 1024)
#define FO_HTTP_TIMEOUT_MS 30000
#define FO_HTTP_CONNECT_MS 10000
#define FO_HTTP_POLL_MS 1000
#define FO_HTTP_CONNS 8
#define FO_HTTP_STATUS_MAX 600

typedef struct fo_http_hdr {
  char *name;                   /* one allocation: "name\0value\0" */
  char *value;
} fo_http_hdr;

struct fo_http_response {
  long status;
  bool timed_out;
  const char *error;            /* "" on success */
  char errtext[CURL_ERROR_SIZE + 96];
  char *body;                   /* NUL-terminated beyond body_len */
  size_t body_len;
  size_t body_cap;
  bool body_oom;
  fo_http_hdr *hdrs;
  size_t nhdrs;
  size_t hdr_cap;
  size_t hdr_bytes;
};

/* One accepted request, from fo_http_send() until its callback returns. */
typedef struct fo_http_xfer {
  struct fo_http_xfer *next;    /* pending queue, then active list */
  struct fo_http_xfer *prev;    /* active list only */
  CURL *easy;                   /* set while in the multi handle */
  char *method;
  char *url;
  char *body;
  size_t body_len;
  char *userpwd;
  struct curl_slist *headers;
  long timeout_ms;
  fo_http_done_fn done;
  void *arg;
  char errbuf[CURL_ERROR_SIZE];
  fo_http_response resp;
} fo_http_xfer;

struct fo_http {
  char *name;
  char *ca_file;
  int max_inflight;
  int max_connections;
  int tick_ms;
  void (*tick)(void *arg);
  void *tick_arg;

  CURLM *multi;
  CURLSH *share;
  pthread_t thread;
  bool started;
  bool joined;

  /* Guarded by mu: shared between senders and the client's thread. */
  pthread_mutex_t mu;
  fo_http_xfer *pend_head;
  fo_http_xfer *pend_tail;
  int inflight;
  bool closed;
  int64_t stop_deadline_ms;
  bool polling;                 /* the thread is in (or entering) a poll */
  bool woken;                   /* a wakeup is pending for that poll */

  /* The client's thread only. */
  fo_http_xfer *active;
  CURL **spare;                 /* free easy handles */
  int nspare;
  fo_counter *m_status[FO_HTTP_STATUS_MAX];
  fo_counter *m_error;
};

/* ---- response accessors ---- */

long fo_http_status(const fo_http_response *r) {
  return r->status;
}

/* Never NULL: "" when the request got a response. */
const char *fo_http_error(const fo_http_response *r) {
  return r->error;
}

bool fo_http_timed_out(const fo_http_response *r) {
  return r->timed_out;
}

/* The body is always NUL-terminated at `*len`, so a JSON parser may take
 * it as a string; "" when there was none. */
const char *fo_http_body(const fo_http_response *r, size_t *len) {
  if (len != NULL)
    *len = r->body_len;
  return r->body != NULL ? r->body : "";
}

const char *fo_http_header(const fo_http_response *r, const char *name) {
  size_t i;

  if (name == NULL)
    return NULL;
  for (i = 0; i < r->nhdrs; i++) {
    if (strcasecmp(r->hdrs[i].name, name) == 0)
      return r->hdrs[i].value;
  }
  return NULL;
}

/* ---- transfers ---- */

static void fo_http_clear_headers(fo_http_response *r) {
  size_t i;

  for (i = 0; i < r->nhdrs; i++)
    free(r->hdrs[i].name);
  r->nhdrs = 0;
  r->hdr_bytes = 0;
}

static void fo_http_xfer_free(fo_http_xfer *x) {
  if (x == NULL)
    return;
  fo_http_clear_headers(&x->resp);
  free(x->resp.hdrs);
  free(x->resp.body);
  curl_slist_free_all(x->headers);
  free(x->method);
  free(x->url);
  free(x->body);
  free(x->userpwd);
  free(x);
}

/* Header fields are one line each, so a CR or LF inside one could smuggle
 * a second field or request; such input is refused. */
static bool fo_http_has_crlf(const char *s) {
  return s != NULL && strpbrk(s, "\r\n") != NULL;
}

static char *fo_http_strdup(const char *s) {
  return s != NULL ? strdup(s) : NULL;
}

/* Copies `req` into a new transfer; FO_EINVAL or FO_ENOMEM on failure. */
static int fo_http_xfer_new(const fo_http_request *req, fo_http_xfer **out) {
  fo_http_xfer *x;
  struct curl_slist *l;
  size_t i;

  if (req->url == NULL || req->method == NULL || req->method[0] == '\0' ||
      (req->body == NULL && req->body_len > 0) || req->timeout_ms < 0 ||
      fo_http_has_crlf(req->url) || fo_http_has_crlf(req->method) ||
      fo_http_has_crlf(req->userpwd))
    return FO_EINVAL;
  for (i = 0; req->headers != NULL && req->headers[i] != NULL; i++) {
    if (fo_http_has_crlf(req->headers[i]))
      return FO_EINVAL;
  }

  x = calloc(1, sizeof(*x));
  if (x == NULL)
    return FO_ENOMEM;
  x->method = strdup(req->method);
  x->url = strdup(req->url);
  x->userpwd = fo_http_strdup(req->userpwd);
  x->body = malloc(req->body_len + 1);
  if (x->method == NULL || x->url == NULL || x->body == NULL ||
      (req->userpwd != NULL && x->userpwd == NULL))
    goto out;
  if (req->body_len > 0)
    memcpy(x->body, req->body, req->body_len);
  x->body[req->body_len] = '\0';
  x->body_len = req->body_len;
  x->timeout_ms = req->timeout_ms > 0 ? req->timeout_ms : FO_HTTP_TIMEOUT_MS;

  for (i = 0; req->headers != NULL && req->headers[i] != NULL; i++) {
    l = curl_slist_append(x->headers, req->headers[i]);
    if (l == NULL)
      goto out;
    x->headers = l;
  }
  /* An empty Expect: keeps libcurl from waiting for "100 Continue" before
   * a large body; providers answer at once anyway. */
  l = curl_slist_append(x->headers, "Expect:");
  if (l == NULL)
    goto out;
  x->headers = l;
  x->resp.error = "";
  *out = x;
  return FO_OK;

out:
  fo_http_xfer_free(x);
  return FO_ENOMEM;
}

static size_t fo_http_on_body(char *buf, size_t size, size_t n, void *arg) {
  fo_http_xfer *x = arg;
  fo_http_response *r = &x->resp;
  size_t len = size * n;
  size_t room, cap;
  char *p;

  if (r->body_len >= FO_HTTP_BODY_MAX)
    return len;
  room = FO_HTTP_BODY_MAX - r->body_len;
  if (len > room)
    len = room;
  if (r->body_len + len + 1 > r->body_cap) {
    cap = r->body_cap > 0 ? r->body_cap : 1024;
    while (cap < r->body_len + len + 1)
      cap *= 2;
    p = realloc(r->body, cap);
    if (p == NULL) {
      /* A cut body would read as a different answer: fail the transfer. */
      r->body_oom = true;
      return 0;
    }
    r->body = p;
    r->body_cap = cap;
  }
  memcpy(r->body + r->body_len, buf, len);
  r->body_len += len;
  r->body[r->body_len] = '\0';
  return size * n;
}

/* Keeps the fields of the last response only: a status line (an interim
 * 1xx, or the next response after a redirect) starts the list again. */
static size_t fo_http_on_header(char *buf, size_t size, size_t n,
                                void *arg) {
  fo_http_xfer *x = arg;
  fo_http_response *r = &x->resp;
  size_t total = size * n, len = total, nlen, vlen;
  const char *colon, *v;
  fo_http_hdr *hdrs;
  char *p;

  while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r'))
    len--;
  if (len >= 5 && memcmp(buf, "HTTP/", 5) == 0) {
    fo_http_clear_headers(r);
    return total;
  }
  colon = len > 0 ? memchr(buf, ':', len) : NULL;
  if (colon == NULL || buf[0] == ' ' || buf[0] == '\t')
    return total;
  nlen = (size_t)(colon - buf);
  v = colon + 1;
  while (v < buf + len && (*v == ' ' || *v == '\t'))
    v++;
  vlen = (size_t)(buf + len - v);
  while (vlen > 0 && (v[vlen - 1] == ' ' || v[vlen - 1] == '\t'))
    vlen--;
  if (r->nhdrs >= FO_HTTP_HEADERS_MAX ||
      r->hdr_bytes + nlen + vlen > FO_HTTP_HEADER_BYTES_MAX)
    return total;

  if (r->nhdrs == r->hdr_cap) {
    hdrs = realloc(r->hdrs, (r->hdr_cap + 8) * sizeof(*hdrs));
    if (hdrs == NULL)
      return total;
    r->hdrs = hdrs;
    r->hdr_cap += 8;
  }
  p = malloc(nlen + vlen + 2);
  if (p == NULL)
    return total;
  memcpy(p, buf, nlen);
  p[nlen] = '\0';
  memcpy(p + nlen + 1, v, vlen);
  p[nlen + 1 + vlen] = '\0';
  r->hdrs[r->nhdrs].name = p;
  r->hdrs[r->nhdrs].value = p + nlen + 1;
  r->nhdrs++;
  r->hdr_bytes += nlen + vlen;
  return total;
}

#define FO_HTTP_SETOPT(e, rc, opt, val)                                    \
  do {                                                                     \
    if ((rc) == CURLE_OK)                                                  \
      (rc) = curl_easy_setopt((e), (opt), (val));                          \
  } while (0)

/* Sets every option of `x` on its easy handle, which has just been reset
 * or made: nothing of an earlier transfer is left but its connections and
 * caches. */
static CURLcode fo_http_setup(fo_http *h, fo_http_xfer *x) {
  CURL *e = x->easy;
  CURLcode rc = CURLE_OK;
  long connect_ms = x->timeout_ms < FO_HTTP_CONNECT_MS ? x->timeout_ms
                                                       : FO_HTTP_CONNECT_MS;

  x->errbuf[0] = '\0';
  FO_HTTP_SETOPT(e, rc, CURLOPT_URL, x->url);
  FO_HTTP_SETOPT(e, rc, CURLOPT_PROTOCOLS_STR, "http,https");
  FO_HTTP_SETOPT(e, rc, CURLOPT_PRIVATE, (void *)x);
  FO_HTTP_SETOPT(e, rc, CURLOPT_ERRORBUFFER, x->errbuf);
  FO_HTTP_SETOPT(e, rc, CURLOPT_NOSIGNAL, 1L);
  FO_HTTP_SETOPT(e, rc, CURLOPT_WRITEFUNCTION, fo_http_on_body);
  FO_HTTP_SETOPT(e, rc, CURLOPT_WRITEDATA, (void *)x);
  FO_HTTP_SETOPT(e, rc, CURLOPT_HEADERFUNCTION, fo_http_on_header);
  FO_HTTP_SETOPT(e, rc, CURLOPT_HEADERDATA, (void *)x);
  FO_HTTP_SETOPT(e, rc, CURLOPT_HTTPHEADER, x->headers);
  FO_HTTP_SETOPT(e, rc, CURLOPT_TIMEOUT_MS, x->timeout_ms);
  FO_HTTP_SETOPT(e, rc, CURLOPT_CONNECTTIMEOUT_MS, connect_ms);
  FO_HTTP_SETOPT(e, rc, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
  /* A new transfer waits for a connection that may multiplex it instead
   * of opening one more; on HTTP/1.1 it stops waiting once it knows. */
  FO_HTTP_SETOPT(e, rc, CURLOPT_PIPEWAIT, 1L);
  FO_HTTP_SETOPT(e, rc, CURLOPT_TCP_KEEPALIVE, 1L);
  FO_HTTP_SETOPT(e, rc, CURLOPT_TCP_KEEPIDLE, 60L);
  FO_HTTP_SETOPT(e, rc, CURLOPT_TCP_KEEPINTVL, 30L);
  if (h->ca_file != NULL)
    FO_HTTP_SETOPT(e, rc, CURLOPT_CAINFO, h->ca_file);
  if (x->userpwd != NULL) {
    FO_HTTP_SETOPT(e, rc, CURLOPT_HTTPAUTH, (long)CURLAUTH_BASIC);
    FO_HTTP_SETOPT(e, rc, CURLOPT_USERPWD, x->userpwd);
  }

  if (strcmp(x->method, "GET") == 0 && x->body_len == 0) {
    FO_HTTP_SETOPT(e, rc, CURLOPT_HTTPGET, 1L);
  } else if (strcmp(x->method, "HEAD") == 0) {
    FO_HTTP_SETOPT(e, rc, CURLOPT_NOBODY, 1L);
  } else {
    /* The body is ours until the callback, so curl need not copy it. */
    FO_HTTP_SETOPT(e, rc, CURLOPT_POSTFIELDSIZE_LARGE,
                   (curl_off_t)x->body_len);
    FO_HTTP_SETOPT(e, rc, CURLOPT_POSTFIELDS, x->body);
    if (strcmp(x->method, "POST") != 0)
      FO_HTTP_SETOPT(e, rc, CURLOPT_CUSTOMREQUEST, x->method);
  }
  return rc;
}

/* Counts one answer; the series are looked up once per status code, on
 * the client's thread, to keep the registry's lock off the hot path. */
static void fo_http_count(fo_http *h, long status) {
  char labels[160];

  if (status <= 0 || status >= FO_HTTP_STATUS_MAX) {
    if (h->m_error == NULL) {
      snprintf(labels, sizeof(labels), "client=\"%s\",code=\"error\"",
               h->name);
      h->m_error = fo_metrics_counter(
          "fanout_http_requests_total",
          "HTTP requests to providers by client and status code", labels);
    }
    fo_counter_add(h->m_error, 1);
    return;
  }
  if (h->m_status[status] == NULL) {
    snprintf(labels, sizeof(labels), "client=\"%s\",code=\"%ld\"", h->name,
             status);
    h->m_status[status] = fo_metrics_counter(
        "fanout_http_requests_total",
        "HTTP requests to providers by client and status code", labels);
  }
  fo_counter_add(h->m_status[status], 1);
}

static void fo_http_active_unlink(fo_http *h, fo_http_xfer *x) {
  if (x->prev != NULL)
    x->prev->next = x->next;
  else
    h->active = x->next;
  if (x->next != NULL)
    x->next->prev = x->prev;
  x->next = NULL;
  x->prev = NULL;
}

/* Hands the easy handle back for the next transfer, or frees it when the
 * free list is full (it never holds more than max_inflight). */
static void fo_http_release_easy(fo_http *h, fo_http_xfer *x) {
  if (x->easy == NULL)
    return;
  curl_multi_remove_handle(h->multi, x->easy);
  if (h->nspare < h->max_inflight) {
    curl_easy_reset(x->easy);
    h->spare[h->nspare++] = x->easy;
  } else {
    curl_easy_cleanup(x->easy);
  }
  x->easy = NULL;
}

/* Fills the response from `rc` and `fixed` (an error of our own, or
 * NULL), releases the handle, runs the callback and frees the transfer.
 * `x` is not on any list. */
static void fo_http_finish(fo_http *h, fo_http_xfer *x, CURLcode rc,
                           const char *fixed) {
  fo_http_response *r = &x->resp;
  long status = 0;

  if (fixed != NULL) {
    r->error = fixed;
  } else if (rc == CURLE_OK) {
    curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
    r->status = status;
  } else {
    r->timed_out = rc == CURLE_OPERATION_TIMEDOUT;
    if (r->body_oom)
      snprintf(r->errtext, sizeof(r->errtext), "out of memory");
    else if (x->errbuf[0] != '\0')
      snprintf(r->errtext, sizeof(r->errtext), "%s (%s)",
               curl_easy_strerror(rc), x->errbuf);
    else
      snprintf(r->errtext, sizeof(r->errtext), "%s",
               curl_easy_strerror(rc));
    r->error = r->errtext;
  }
  if (r->status == 0) {
    /* A failed transfer's partial answer must not look like a response. */
    fo_http_clear_headers(r);
    r->body_len = 0;
    if (r->body != NULL)
      r->body[0] = '\0';
    fo_log_debug("http", "request failed", "client=%s error=\"%s\"",
                 h->name, r->error);
  }
  fo_http_count(h, r->status);
  fo_http_release_easy(h, x);

  /* Counted out before the callback, so that it may queue a follow-up. */
  pthread_mutex_lock(&h->mu);
  h->inflight--;
  pthread_mutex_unlock(&h->mu);
  x->done(x->arg, r);
  fo_http_xfer_free(x);
}

/* Moves a batch of queued transfers into the multi handle. */
static void fo_http_start_batch(fo_http *h, fo_http_xfer *batch) {
  fo_http_xfer *x, *next;
  CURLMcode mrc;
  CURLcode rc;

  for (x = batch; x != NULL; x = next) {
    next = x->next;
    x->next = NULL;
    if (h->nspare > 0) {
      x->easy = h->spare[--h->nspare];
    } else {
      x->easy = curl_easy_init();
      /* A reset keeps the share, so it is set on new handles only. */
      if (x->easy != NULL && h->share != NULL)
        curl_easy_setopt(x->easy, CURLOPT_SHARE, h->share);
    }
    if (x->easy == NULL) {
      fo_http_finish(h, x, CURLE_OK, "out of memory");
      continue;
    }
    rc = fo_http_setup(h, x);
    if (rc != CURLE_OK) {
      fo_http_finish(h, x, rc, NULL);
      continue;
    }
    mrc = curl_multi_add_handle(h->multi, x->easy);
    if (mrc != CURLM_OK) {
      snprintf(x->resp.errtext, sizeof(x->resp.errtext), "%s",
               curl_multi_strerror(mrc));
      fo_http_finish(h, x, CURLE_OK, x->resp.errtext);
      continue;
    }
    x->next = h->active;
    if (h->active != NULL)
      h->active->prev = x;
    h->active = x;
  }
}

/* Completes every transfer that curl says is done. */
static void fo_http_reap(fo_http *h) {
  CURLMsg *msg;
  int left;
  fo_http_xfer *x;
  char *priv;

  while ((msg = curl_multi_info_read(h->multi, &left)) != NULL) {
    if (msg->msg != CURLMSG_DONE)
      continue;
    priv = NULL;
    curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &priv);
    x = (fo_http_xfer *)(void *)priv;
    if (x == NULL)
      continue;
    fo_http_active_unlink(h, x);
    fo_http_finish(h, x, msg->data.result, NULL);
  }
}

/* Ends what is still running when the stop deadline has passed. */
static void fo_http_abort_all(fo_http *h) {
  fo_http_xfer *x;

  while ((x = h->active) != NULL) {
    fo_http_active_unlink(h, x);
    fo_http_finish(h, x, CURLE_OK, "shutdown");
  }
}

static int fo_http_poll_ms(const fo_http *h, int64_t now, int64_t next_tick,
                           bool closed, int64_t deadline) {
  int64_t t = FO_HTTP_POLL_MS;

  if (h->tick != NULL && next_tick - now < t)
    t = next_tick - now;
  if (closed && deadline - now < t)
    t = deadline - now;
  return t > 0 ? (int)t : 0;
}

static void fo_http_sleep_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

  nanosleep(&ts, NULL);
}

/* Waits for socket activity, a timeout or a wakeup. Senders wake the
 * thread only while it polls, and only once per poll: under load the
 * thread is busy and finds new requests on its next round without a
 * wakeup's system calls. */
static void fo_http_wait(fo_http *h, int timeout_ms) {
  static fo_ratelimit rl;
  CURLMcode mrc;

  pthread_mutex_lock(&h->mu);
  if (h->pend_head != NULL)
    timeout_ms = 0;
  h->polling = true;
  pthread_mutex_unlock(&h->mu);

  mrc = curl_multi_poll(h->multi, NULL, 0, timeout_ms, NULL);
  if (mrc != CURLM_OK) {
    /* Not seen in practice; the pause keeps a broken poll from spinning
     * while the transfers' own timeouts end them. */
    fo_log_rl(&rl, 10000, FO_LOG_WARN, "http", "poll failed",
              "client=%s error=\"%s\"", h->name, curl_multi_strerror(mrc));
    fo_http_sleep_ms(10);
  }

  pthread_mutex_lock(&h->mu);
  h->polling = false;
  h->woken = false;
  pthread_mutex_unlock(&h->mu);
}

static void *fo_http_main(void *arg) {
  static fo_ratelimit rl;
  fo_http *h = arg;
  CURLMcode mrc;
  int64_t now = fo_now_ms(), next_tick = now + h->tick_ms, deadline;
  fo_http_xfer *batch;
  bool closed;
  int running, inflight;

  for (;;) {
    /* Reading `closed` with the batch means nothing more can arrive once
     * it is seen set: the queue is empty from then on. */
    pthread_mutex_lock(&h->mu);
    batch = h->pend_head;
    h->pend_head = NULL;
    h->pend_tail = NULL;
    closed = h->closed;
    deadline = h->stop_deadline_ms;
    pthread_mutex_unlock(&h->mu);

    fo_http_start_batch(h, batch);
    mrc = curl_multi_perform(h->multi, &running);
    if (mrc != CURLM_OK)
      fo_log_rl(&rl, 10000, FO_LOG_WARN, "http", "transfers failed",
                "client=%s error=\"%s\"", h->name,
                curl_multi_strerror(mrc));
    fo_http_reap(h);

    now = fo_now_ms();
    if (h->tick != NULL && now >= next_tick) {
      h->tick(h->tick_arg);
      now = fo_now_ms();
      next_tick = now + h->tick_ms;
    }
    if (closed) {
      pthread_mutex_lock(&h->mu);
      inflight = h->inflight;
      pthread_mutex_unlock(&h->mu);
      if (inflight == 0)
        break;
      if (now >= deadline) {
        fo_http_abort_all(h);
        break;
      }
    }
    fo_http_wait(h, fo_http_poll_ms(h, now, next_tick, closed, deadline));
  }
  return NULL;
}

/* ---- public ---- */

int fo_http_new(const fo_http_conf *conf, fo_http **out) {
  fo_http *h;
  int rc = FO_ENOMEM;

  if (conf == NULL || out == NULL || conf->max_inflight < 1 ||
      conf->tick_ms < 0 || (conf->tick != NULL && conf->tick_ms == 0))
    return FO_EINVAL;
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
    return FO_EIO;

  h = calloc(1, sizeof(*h));
  if (h == NULL) {
    curl_global_cleanup();
    return FO_ENOMEM;
  }
  h->max_inflight = conf->max_inflight;
  h->max_connections =
      conf->max_connections > 0 ? conf->max_connections : FO_HTTP_CONNS;
  h->tick_ms = conf->tick_ms;
  h->tick = conf->tick_ms > 0 ? conf->tick : NULL;
  h->tick_arg = conf->tick_arg;
  if (pthread_mutex_init(&h->mu, NULL) != 0) {
    free(h);
    curl_global_cleanup();
    return FO_ENOMEM;
  }
  h->joined = true;
  h->name = strdup(conf->name != NULL ? conf->name : "http");
  h->ca_file = fo_http_strdup(conf->ca_file);
  h->spare = calloc((size_t)h->max_inflight, sizeof(*h->spare));
  h->multi = curl_multi_init();
  if (h->name == NULL || h->spare == NULL || h->multi == NULL ||
      (conf->ca_file != NULL && h->ca_file == NULL))
    goto out;

  if (curl_multi_setopt(h->multi, CURLMOPT_PIPELINING,
                        (long)CURLPIPE_MULTIPLEX) != CURLM_OK ||
      curl_multi_setopt(h->multi, CURLMOPT_MAX_HOST_CONNECTIONS,
                        (long)h->max_connections) != CURLM_OK) {
    rc = FO_EIO;
    goto out;
  }
  /* Sessions and DNS answers shared between the easy handles: a second
   * connection resumes the first one's TLS session. Only the client's
   * thread uses the share, so it needs no lock callbacks. A failed share
   * costs only full handshakes, so it is not an error. */
  h->share = curl_share_init();
  if (h->share != NULL &&
      (curl_share_setopt(h->share, CURLSHOPT_SHARE,
                         CURL_LOCK_DATA_SSL_SESSION) != CURLSHE_OK ||
       curl_share_setopt(h->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS) !=
           CURLSHE_OK)) {
    curl_share_cleanup(h->share);
    h->share = NULL;
  }

  if (pthread_create(&h->thread, NULL, fo_http_main, h) != 0) {
    rc = FO_EIO;
    goto out;
  }
  h->started = true;
  h->joined = false;
  *out = h;
  return FO_OK;

out:
  fo_http_free(h);
  return rc;
}

int fo_http_send(fo_http *h, const fo_http_request *req, fo_http_done_fn done,
                 void *arg) {
  fo_http_xfer *x = NULL;
  int rc;

  if (h == NULL || req == NULL || done == NULL)
    return FO_EINVAL;
  pthread_mutex_lock(&h->mu);
  if (h->closed)
    rc = FO_ECLOSED;
  else if (h->inflight >= h->max_inflight)
    rc = FO_EFULL;
  else
    rc = FO_OK;
  pthread_mutex_unlock(&h->mu);
  if (rc != FO_OK)
    return rc;

  /* Copied outside the lock; the checks are made again below, since
   * another sender may have taken the last place meanwhile. */
  rc = fo_http_xfer_new(req, &x);
  if (rc != FO_OK)
    return rc;
  x->done = done;
  x->arg = arg;

  pthread_mutex_lock(&h->mu);
  if (h->closed) {
    rc = FO_ECLOSED;
  } else if (h->inflight >= h->max_inflight) {
    rc = FO_EFULL;
  } else {
    h->inflight++;
    if (h->pend_tail != NULL)
      h->pend_tail->next = x;
    else
      h->pend_head = x;
    h->pend_tail = x;
    x = NULL;
    /* Waking under the lock keeps the multi handle alive, since the
     * thread cannot finish while this request is counted. */
    if (h->polling && !h->woken) {
      curl_multi_wakeup(h->multi);
      h->woken = true;
    }
  }
  pthread_mutex_unlock(&h->mu);
  fo_http_xfer_free(x);
  return rc;
}

int fo_http_inflight(fo_http *h) {
  int n;

  pthread_mutex_lock(&h->mu);
  n = h->inflight;
  pthread_mutex_unlock(&h->mu);
  return n;
}

void fo_http_stop(fo_http *h, int timeout_ms) {
  if (h == NULL)
    return;
  pthread_mutex_lock(&h->mu);
  if (!h->closed) {
    h->closed = true;
    h->stop_deadline_ms = fo_now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
  }
  if (h->started && !h->joined)
    curl_multi_wakeup(h->multi);
  pthread_mutex_unlock(&h->mu);

  /* From a callback, the join would wait for itself: the thread ends
   * after the callback returns, with the deadline set above. */
  if (h->started && !h->joined &&
      pthread_equal(pthread_self(), h->thread)) {
    fo_log_error("http", "stop called on the client's own thread",
                 "client=%s", h->name);
    return;
  }
  if (h->started && !h->joined) {
    pthread_join(h->thread, NULL);
    h->joined = true;
  }
}

void fo_http_free(fo_http *h) {
  int i;

  if (h == NULL)
    return;
  fo_http_stop(h, 0);
  if (h->started && !h->joined)
    return;                     /* misuse, logged by stop: leak, not crash */
  for (i = 0; i < h->nspare; i++)
    curl_easy_cleanup(h->spare[i]);
  if (h->multi != NULL)
    curl_multi_cleanup(h->multi);
  if (h->share != NULL)
    curl_share_cleanup(h->share);
  pthread_mutex_destroy(&h->mu);
  free(h->spare);
  free(h->name);
  free(h->ca_file);
  free(h);
  curl_global_cleanup();
}
