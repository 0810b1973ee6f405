/* SPDX-License-Identifier: MIT */
/*
 * fake-twilio: a stand-in for Twilio's Messages API over HTTPS, for tests
 * and benchmarks. It checks HTTP basic auth and the form body the way
 * Twilio does, answers with Twilio's status codes and error documents,
 * treats a few magic numbers the way Twilio's test credentials do, and
 * records each message it accepted with the time it arrived. With
 * --callback-url it then POSTs a signed status callback ("delivered") to
 * the message's StatusCallback (or to that URL when the request named
 * none), as Twilio does once a carrier reports. A control API on the same
 * port scripts faults for the next requests and reads back what was
 * accepted:
 *
 *   fake-twilio --port P --ca FILE --account-sid AC... --auth-token T
 *               [--callback-url URL] [--callback-delay-ms N]
 *
 * Magic numbers: +15005550001 is invalid (21211), +15005550009 is not a
 * mobile (21614), +15005550004 has unsubscribed (21610).
 */
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>

#include <curl/curl.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "fakehttp.h"
#include "fanout/common.h"
#include "urlenc.h"

#define FTW_HEADERS 6
#define FTW_MAX_STEPS 100000
#define FTW_ERRORS "https://www.twilio.com/docs/errors/"

/* A status callback waiting for its time. */
typedef struct ftw_cb {
  struct ftw_cb *next;
  int64_t due_ms;               /* monotonic */
  char *url;
  char *sid;
  char *to;
  char *from;
  char *status;
  char *error_code;             /* NULL: none */
} ftw_cb;

typedef struct ftw {
  const char *sid;
  const char *token;
  const char *callback_url;     /* NULL: no callbacks */
  int callback_delay_ms;
  char basic[800];              /* the expected Authorization value */
  char path[512];               /* the Messages path of this account */

  pthread_mutex_t mu;
  pthread_cond_t cv;            /* the callback thread waits here */
  json_t *script;               /* steps still to run, in order */
  size_t next;
  json_t *items;                /* accepted messages */
  json_t *callbacks;            /* callbacks sent: sid, status, answer */
  unsigned long requests;
  ftw_cb *cbs;                  /* pending callbacks, by due time */
  bool stop;
} ftw;

/* Response header lines must outlive the handler: the server copies
 * them on the handler's thread right after it returns. */
static __thread char ftw_hdr[FTW_HEADERS][512];

static int64_t now_ms(void) {
  struct timespec ts;

  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t wall_ms(void) {
  struct timespec ts;

  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- Twilio's answers ---- */

static char *error_doc(int code, const char *message, int status) {
  char more[96];
  json_t *doc;
  char *s;

  snprintf(more, sizeof(more), FTW_ERRORS "%d", code);
  doc = json_pack("{s:i, s:s, s:s, s:i}", "code", code, "message", message,
                  "more_info", more, "status", status);
  s = json_dumps(doc, JSON_COMPACT);
  json_decref(doc);
  return s;
}

static void answer_error(fake_response *resp, int status, int code,
                         const char *message) {
  resp->status = status;
  resp->body = error_doc(code, message, status);
}

/* Twilio's document for a scripted status that came without a body. */
static char *default_body(int status) {
  switch (status) {
  case 400:
    return error_doc(21211, "The 'To' number is not a valid phone number.",
                     400);
  case 401:
    return error_doc(20003, "Authenticate", 401);
  case 404:
    return error_doc(20404, "The requested resource was not found", 404);
  case 429:
    return error_doc(20429, "Too Many Requests", 429);
  case 503:
    return error_doc(20503, "Service Unavailable", 503);
  default:
    if (status >= 500)
      return error_doc(20500, "An internal server error has occurred",
                       status);
    if (status >= 400)
      return error_doc(20001, "Bad request", status);
    return NULL;
  }
}

/* ---- forms ---- */

/* The form as a JSON object of strings; the last of a repeated name. */
static json_t *form_parse(const char *body, size_t len) {
  json_t *o = json_object();
  size_t i = 0;

  while (o != NULL && i < len) {
    const char *seg = body + i;
    const char *amp = memchr(seg, '&', len - i);
    size_t sl = amp != NULL ? (size_t)(amp - seg) : len - i;
    const char *eq = memchr(seg, '=', sl);
    size_t nl = eq != NULL ? (size_t)(eq - seg) : sl;
    char *name, *value;
    int rc = FO_OK;

    i += sl + 1;
    if (sl == 0)
      continue;
    /* A field that does not decode is left out, as if not sent. */
    name = fo_url_unescape(seg, nl, true, &rc);
    value = eq != NULL ? fo_url_unescape(eq + 1, sl - nl - 1, true, &rc)
                       : strdup("");
    if (name != NULL && value != NULL)
      json_object_set_new(o, name, json_string(value));
    free(name);
    free(value);
  }
  return o;
}

static const char *field(json_t *form, const char *name) {
  const char *v = json_string_value(json_object_get(form, name));

  return v != NULL && v[0] != '\0' ? v : NULL;
}

static bool e164(const char *s) {
  size_t d;

  if (s == NULL || s[0] != '+' || s[1] < '1' || s[1] > '9')
    return false;
  d = strspn(s + 1, "0123456789");
  return s[1 + d] == '\0' && d >= 7 && d <= 15;
}

/* ---- status callbacks ---- */

static int cmp_names(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Twilio's signature: base64(HMAC-SHA1(token, url + sorted name+value)),
 * written here on its own, apart from fanout's, so a shared mistake
 * cannot hide. */
static void sign(const char *token, const char *url, json_t *params,
                 char *out) {
  const char *names[16];
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int maclen = 0;
  size_t n = 0, len;
  const char *k;
  json_t *v;
  char *data;

  json_object_foreach(params, k, v) {
    if (n < 16)
      names[n++] = k;
  }
  qsort(names, n, sizeof(names[0]), cmp_names);
  len = strlen(url) + 1;
  for (size_t i = 0; i < n; i++)
    len += strlen(names[i]) +
           strlen(json_string_value(json_object_get(params, names[i])));
  data = malloc(len);
  out[0] = '\0';
  if (data == NULL)
    return;
  strcpy(data, url);
  for (size_t i = 0; i < n; i++) {
    strcat(data, names[i]);
    strcat(data, json_string_value(json_object_get(params, names[i])));
  }
  HMAC(EVP_sha1(), token, (int)strlen(token), (unsigned char *)data,
       strlen(data), mac, &maclen);
  EVP_EncodeBlock((unsigned char *)out, mac, (int)maclen);
  free(data);
}

static void cb_free(ftw_cb *c) {
  free(c->url);
  free(c->sid);
  free(c->to);
  free(c->from);
  free(c->status);
  free(c->error_code);
  free(c);
}

static size_t discard(char *p, size_t size, size_t n, void *arg) {
  (void)p;
  (void)arg;
  return size * n;
}

/* Sends one callback and records the answer's status (0: none). */
static void cb_send(ftw *f, const ftw_cb *c) {
  json_t *params = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s}",
                             "AccountSid", f->sid, "ApiVersion",
                             "2010-04-01", "From", c->from, "MessageSid",
                             c->sid, "MessageStatus", c->status, "SmsSid",
                             c->sid, "SmsStatus", c->status, "To", c->to);
  CURL *h = curl_easy_init();
  struct curl_slist *hdrs = NULL;
  char sig[64], line[128];
  char *body = NULL;
  long code = 0;
  size_t blen = 0;
  FILE *mem;
  const char *k;
  json_t *v;

  if (c->error_code != NULL)
    json_object_set_new(params, "ErrorCode", json_string(c->error_code));
  sign(f->token, c->url, params, sig);
  mem = open_memstream(&body, &blen);
  json_object_foreach(params, k, v) {
    char *ev = curl_easy_escape(h, json_string_value(v), 0);

    fprintf(mem, "%s%s=%s", ftell(mem) > 0 ? "&" : "", k, ev);
    curl_free(ev);
  }
  fclose(mem);
  snprintf(line, sizeof(line), "X-Twilio-Signature: %s", sig);
  hdrs = curl_slist_append(hdrs, line);
  hdrs = curl_slist_append(
      hdrs, "Content-Type: application/x-www-form-urlencoded");
  hdrs = curl_slist_append(hdrs, "User-Agent: TwilioProxy/1.1");
  curl_easy_setopt(h, CURLOPT_URL, c->url);
  curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, discard);
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 10000L);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  if (curl_easy_perform(h) == CURLE_OK)
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
  curl_slist_free_all(hdrs);
  curl_easy_cleanup(h);
  free(body);
  json_decref(params);

  pthread_mutex_lock(&f->mu);
  json_array_append_new(f->callbacks,
                        json_pack("{s:s, s:s, s:i}", "sid", c->sid,
                                  "status", c->status, "answer", (int)code));
  pthread_mutex_unlock(&f->mu);
}

static void *cb_thread(void *arg) {
  ftw *f = arg;

  pthread_mutex_lock(&f->mu);
  while (!f->stop) {
    ftw_cb *c = f->cbs;
    struct timespec ts;

    if (c != NULL && c->due_ms <= now_ms()) {
      f->cbs = c->next;
      pthread_mutex_unlock(&f->mu);
      cb_send(f, c);
      cb_free(c);
      pthread_mutex_lock(&f->mu);
      continue;
    }
    if (c == NULL) {
      pthread_cond_wait(&f->cv, &f->mu);
      continue;
    }
    ts.tv_sec = (time_t)(c->due_ms / 1000);
    ts.tv_nsec = (long)(c->due_ms % 1000) * 1000000;
    pthread_cond_timedwait(&f->cv, &f->mu, &ts);
  }
  pthread_mutex_unlock(&f->mu);
  return NULL;
}

/* Queues the callback of an accepted message; `over` may name another
 * status and error code (from the script). */
static void cb_queue(ftw *f, json_t *form, const char *sid, json_t *over) {
  const char *url = field(form, "StatusCallback");
  const char *st = json_string_value(json_object_get(over, "MessageStatus"));
  const char *err = json_string_value(json_object_get(over, "ErrorCode"));
  const char *from = field(form, "From");
  ftw_cb *c = calloc(1, sizeof(*c)), **p;

  if (c == NULL)
    return;
  c->url = strdup(url != NULL ? url : f->callback_url);
  c->sid = strdup(sid);
  c->to = strdup(field(form, "To"));
  c->from = strdup(from != NULL ? from : "");
  c->status = strdup(st != NULL ? st : "delivered");
  c->error_code = err != NULL ? strdup(err) : NULL;
  c->due_ms = now_ms() + f->callback_delay_ms;
  pthread_mutex_lock(&f->mu);
  for (p = &f->cbs; *p != NULL && (*p)->due_ms <= c->due_ms;
       p = &(*p)->next)
    ;
  c->next = *p;
  *p = c;
  pthread_cond_signal(&f->cv);
  pthread_mutex_unlock(&f->mu);
}

/* ---- the control API ---- */

/* POST /_fake/script: replaces the script; each step may repeat with
 * "count". */
static bool set_script(ftw *f, const fake_request *req) {
  json_t *doc = json_loadb(req->body, req->body_len, 0, NULL);
  json_t *steps = json_array(), *e;
  size_t i;
  bool ok = false;

  if (!json_is_array(doc) || steps == NULL)
    goto out;
  json_array_foreach(doc, i, e) {
    json_int_t count = json_integer_value(json_object_get(e, "count"));

    if (!json_is_object(e))
      goto out;
    if (count <= 0)
      count = 1;
    if ((json_int_t)json_array_size(steps) + count > FTW_MAX_STEPS)
      goto out;
    for (json_int_t k = 0; k < count; k++)
      json_array_append(steps, e);
  }
  pthread_mutex_lock(&f->mu);
  json_decref(f->script);
  f->script = steps;
  f->next = 0;
  pthread_mutex_unlock(&f->mu);
  steps = NULL;
  ok = true;

out:
  json_decref(steps);
  json_decref(doc);
  return ok;
}

static void control(ftw *f, const fake_request *req, fake_response *resp) {
  bool post = strcmp(req->method, "POST") == 0;

  resp->status = 200;
  if (strcmp(req->path, "/_fake/script") == 0 && post) {
    bool ok = set_script(f, req);

    resp->status = ok ? 200 : 400;
    resp->body = strdup(ok ? "{\"ok\":true}"
                           : "{\"error\":\"expected a JSON array of "
                             "step objects\"}");
  } else if (strcmp(req->path, "/_fake/accepted") == 0 &&
             strcmp(req->method, "GET") == 0) {
    json_t *doc;

    pthread_mutex_lock(&f->mu);
    doc = json_pack("{s:I, s:O, s:I, s:O}", "count",
                    (json_int_t)json_array_size(f->items), "items", f->items,
                    "requests", (json_int_t)f->requests, "callbacks",
                    f->callbacks);
    resp->body = json_dumps(doc, JSON_COMPACT);
    pthread_mutex_unlock(&f->mu);
    json_decref(doc);
  } else if (strcmp(req->path, "/_fake/reset") == 0 && post) {
    pthread_mutex_lock(&f->mu);
    json_array_clear(f->script);
    f->next = 0;
    json_array_clear(f->items);
    json_array_clear(f->callbacks);
    f->requests = 0;
    pthread_mutex_unlock(&f->mu);
    resp->body = strdup("{\"ok\":true}");
  } else {
    resp->status = 404;
    resp->body = strdup("{\"error\":\"no such control route\"}");
  }
}

/* ---- the Messages API ---- */

/* Answers as a scripted step says; false when the step only stalls or
 * names a callback, and the request is then handled as usual. */
static bool scripted(json_t *step, fake_response *resp) {
  int status = (int)json_integer_value(json_object_get(step, "status"));
  json_t *body = json_object_get(step, "body");
  json_t *hdrs = json_object_get(step, "headers");
  size_t n = 0;
  const char *k;
  json_t *v;

  resp->delay_ms = (int)json_integer_value(json_object_get(step, "delay_ms"));
  resp->drop = json_is_true(json_object_get(step, "drop")) ? 1 : 0;
  if (status == 0 && !resp->drop)
    return false;
  resp->status = status;
  if (json_is_string(body))
    resp->body = strdup(json_string_value(body));
  else if (body != NULL)
    resp->body = json_dumps(body, JSON_COMPACT);
  else
    resp->body = default_body(status);
  json_object_foreach(hdrs, k, v) {
    if (n == FTW_HEADERS - 1 || !json_is_string(v))
      break;
    snprintf(ftw_hdr[n], sizeof(ftw_hdr[n]), "%s: %s", k,
             json_string_value(v));
    resp->headers[n] = ftw_hdr[n];
    n++;
  }
  resp->headers[n] = NULL;
  return true;
}

static void new_sid(char *out) {
  unsigned char r[16];
  static const char hex[] = "0123456789abcdef";

  if (getrandom(r, sizeof(r), 0) != (ssize_t)sizeof(r))
    memset(r, 0x5a, sizeof(r));
  out[0] = 'S';
  out[1] = 'M';
  for (int i = 0; i < 16; i++) {
    out[2 + 2 * i] = hex[r[i] >> 4];
    out[3 + 2 * i] = hex[r[i] & 15];
  }
  out[34] = '\0';
}

/* The refusals of Twilio's test numbers and of bad input; NULL when the
 * message is acceptable. */
static bool refuse(json_t *form, fake_response *resp) {
  const char *to = field(form, "To");

  if (to == NULL) {
    answer_error(resp, 400, 21604, "A 'To' phone number is required.");
  } else if (field(form, "From") == NULL &&
             field(form, "MessagingServiceSid") == NULL) {
    answer_error(resp, 400, 21603, "A 'From' phone number is required.");
  } else if (field(form, "Body") == NULL) {
    answer_error(resp, 400, 21602, "Message body is required.");
  } else if (!e164(to) || strcmp(to, "+15005550001") == 0) {
    answer_error(resp, 400, 21211,
                 "The 'To' number is not a valid phone number.");
  } else if (strcmp(to, "+15005550009") == 0) {
    answer_error(resp, 400, 21614, "'To' number is not a valid mobile "
                                   "number");
  } else if (strcmp(to, "+15005550004") == 0) {
    answer_error(resp, 400, 21610, "Attempt to send to unsubscribed "
                                   "recipient");
  } else {
    return false;
  }
  return true;
}

static void messages(ftw *f, const fake_request *req, fake_response *resp) {
  const char *auth = fake_header(req, "Authorization");
  json_t *step = NULL, *form = NULL, *msg;
  char sid[40], date[64];
  time_t now = time(NULL);
  struct tm tm;

  pthread_mutex_lock(&f->mu);
  f->requests++;
  if (f->next < json_array_size(f->script))
    step = json_incref(json_array_get(f->script, f->next++));
  pthread_mutex_unlock(&f->mu);
  if (step != NULL && scripted(step, resp))
    goto out;

  if (auth == NULL || strcmp(auth, f->basic) != 0) {
    answer_error(resp, 401, 20003, "Authenticate");
    resp->headers[0] = "WWW-Authenticate: Basic realm=\"Twilio API\"";
    resp->headers[1] = NULL;
    goto out;
  }
  if (strcmp(req->path, f->path) != 0) {
    answer_error(resp, 404, 20404, "The requested resource was not found");
    goto out;
  }
  form = form_parse(req->body != NULL ? req->body : "", req->body_len);
  if (form == NULL) {
    answer_error(resp, 500, 20500, "out of memory");
    goto out;
  }
  if (refuse(form, resp))
    goto out;

  new_sid(sid);
  gmtime_r(&now, &tm);
  strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S +0000", &tm);
  msg = json_pack(
      "{s:s, s:s, s:s, s:s, s:s, s:n, s:s, s:s, s:n, s:n, s:s, s:s, s:s, "
      "s:n, s:s, s:s, s:s, s:s}",
      "account_sid", f->sid, "api_version", "2010-04-01", "body",
      field(form, "Body"), "date_created", date, "date_updated", date,
      "date_sent", "direction", "outbound-api", "from",
      field(form, "From") != NULL ? field(form, "From") : "", "error_code",
      "error_message", "num_segments", "1", "num_media", "0", "sid", sid,
      "price", "price_unit", "USD", "status", "queued", "to",
      field(form, "To"), "uri", req->path);
  if (field(form, "MessagingServiceSid") != NULL)
    json_object_set_new(msg, "messaging_service_sid",
                        json_string(field(form, "MessagingServiceSid")));
  else
    json_object_set_new(msg, "messaging_service_sid", json_null());
  resp->status = 201;
  resp->body = json_dumps(msg, JSON_COMPACT);
  json_decref(msg);

  pthread_mutex_lock(&f->mu);
  json_array_append_new(
      f->items,
      json_pack("{s:s, s:O, s:O, s:O, s:O, s:O, s:I}", "sid", sid, "to",
                json_object_get(form, "To"), "from",
                json_object_get(form, "From") != NULL
                    ? json_object_get(form, "From")
                    : json_null(),
                "messaging_service_sid",
                json_object_get(form, "MessagingServiceSid") != NULL
                    ? json_object_get(form, "MessagingServiceSid")
                    : json_null(),
                "body", json_object_get(form, "Body"), "status_callback",
                json_object_get(form, "StatusCallback") != NULL
                    ? json_object_get(form, "StatusCallback")
                    : json_null(),
                "ts_ms", (json_int_t)wall_ms()));
  pthread_mutex_unlock(&f->mu);
  if (f->callback_url != NULL)
    cb_queue(f, form, sid, json_object_get(step, "callback"));

out:
  json_decref(form);
  json_decref(step);
}

static void handle(void *arg, const fake_request *req, fake_response *resp) {
  ftw *f = arg;

  if (strncmp(req->path, "/_fake/", 7) == 0) {
    control(f, req, resp);
  } else if (strncmp(req->path, "/2010-04-01/Accounts/", 21) == 0 &&
             strcmp(req->method, "POST") == 0) {
    messages(f, req, resp);
  } else {
    answer_error(resp, 404, 20404, "The requested resource was not found");
  }
}

static void usage(void) {
  fprintf(stderr, "usage: fake-twilio --port P --ca FILE --account-sid SID "
                  "--auth-token TOKEN [--callback-url URL] "
                  "[--callback-delay-ms N]\n");
}

int main(int argc, char **argv) {
  const char *ca = NULL;
  int port = -1, sig, rc = 1;
  fake_http *srv = NULL;
  pthread_t cbt;
  char userpwd[512];
  sigset_t set;
  ftw f;

  memset(&f, 0, sizeof(f));
  f.callback_delay_ms = 1000;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "--port") == 0)
      port = atoi(argv[i + 1]);
    else if (strcmp(argv[i], "--ca") == 0)
      ca = argv[i + 1];
    else if (strcmp(argv[i], "--account-sid") == 0)
      f.sid = argv[i + 1];
    else if (strcmp(argv[i], "--auth-token") == 0)
      f.token = argv[i + 1];
    else if (strcmp(argv[i], "--callback-url") == 0)
      f.callback_url = argv[i + 1];
    else if (strcmp(argv[i], "--callback-delay-ms") == 0)
      f.callback_delay_ms = atoi(argv[i + 1]);
  }
  if (port < 0 || ca == NULL || f.sid == NULL || f.token == NULL ||
      argc % 2 == 0 || strlen(f.sid) + strlen(f.token) > 200) {
    usage();
    return 2;
  }
  snprintf(userpwd, sizeof(userpwd), "%s:%s", f.sid, f.token);
  memcpy(f.basic, "Basic ", 6);
  EVP_EncodeBlock((unsigned char *)f.basic + 6, (unsigned char *)userpwd,
                  (int)strlen(userpwd));
  snprintf(f.path, sizeof(f.path), "/2010-04-01/Accounts/%s/Messages.json",
           f.sid);
  f.script = json_array();
  f.items = json_array();
  f.callbacks = json_array();
  pthread_mutex_init(&f.mu, NULL);
  {
    pthread_condattr_t ca_attr;

    pthread_condattr_init(&ca_attr);
    pthread_condattr_setclock(&ca_attr, CLOCK_MONOTONIC);
    pthread_cond_init(&f.cv, &ca_attr);
    pthread_condattr_destroy(&ca_attr);
  }
  curl_global_init(CURL_GLOBAL_DEFAULT);

  /* Signals go to this thread alone, through sigwait. */
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  signal(SIGPIPE, SIG_IGN);

  if (pthread_create(&cbt, NULL, cb_thread, &f) != 0)
    goto out;
  srv = fake_http_start(port, ca, handle, &f);
  if (srv != NULL) {
    printf("listening port=%d\n", fake_http_port(srv));
    fflush(stdout);
    sigwait(&set, &sig);
    fake_http_stop(srv);
    rc = 0;
  }
  pthread_mutex_lock(&f.mu);
  f.stop = true;
  pthread_cond_signal(&f.cv);
  pthread_mutex_unlock(&f.mu);
  pthread_join(cbt, NULL);

out:
  while (f.cbs != NULL) {
    ftw_cb *c = f.cbs;

    f.cbs = c->next;
    cb_free(c);
  }
  json_decref(f.script);
  json_decref(f.items);
  json_decref(f.callbacks);
  pthread_cond_destroy(&f.cv);
  pthread_mutex_destroy(&f.mu);
  curl_global_cleanup();
  return rc;
}
