/* SPDX-License-Identifier: MIT */
/*
 * fake-sendgrid: a stand-in for SendGrid's v3 Mail Send API over HTTPS,
 * for tests and benchmarks. It checks the bearer key and the request body
 * the way SendGrid does and answers with SendGrid's status codes, headers
 * and error shape; it records each personalization it accepted. A control
 * API on the same port scripts faults (statuses, stalls, dropped
 * connections) for the next requests and reads back what was accepted.
 *
 *   fake-sendgrid --port P --ca FILE --api-key KEY
 */
#include <ctype.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>

#include <jansson.h>

#include "fakehttp.h"

#define FSG_MAX_PERSONALIZATIONS 1000
#define FSG_HEADERS 8

/* One scripted answer. */
typedef struct fsg_step {
  int status;                   /* 0: handle the request normally */
  int delay_ms;
  bool drop;
  char *body;                   /* NULL: SendGrid's body for the status */
  char *headers[FSG_HEADERS - 2];
} fsg_step;

typedef struct fsg {
  const char *api_key;
  pthread_mutex_t mu;
  fsg_step *script;
  size_t nscript, next;
  json_t *items;                /* accepted personalizations */
  unsigned long requests;       /* Mail Send requests seen */
} fsg;

/* Response header lines live here: the server copies them on the
 * handler's own thread, right after the handler returns (a stall
 * included), before that thread takes another request. */
static __thread char fsg_hdr[FSG_HEADERS][512];

static void step_free(fsg_step *s) {
  free(s->body);
  for (size_t i = 0; i < FSG_HEADERS - 2; i++)
    free(s->headers[i]);
}

static void script_clear(fsg *f) {
  for (size_t i = 0; i < f->nscript; i++)
    step_free(&f->script[i]);
  free(f->script);
  f->script = NULL;
  f->nscript = f->next = 0;
}

static char *dup_str(const char *s) {
  return s != NULL ? strdup(s) : NULL;
}

/* ---- SendGrid's answers ---- */

static void add_error(json_t *errs, const char *field, const char *msg) {
  json_array_append_new(
      errs, json_pack("{s:o, s:s, s:n}", "field",
                      field != NULL ? json_string(field) : json_null(),
                      "message", msg, "help"));
}

static char *errors_body(json_t *errs) {
  json_t *doc = json_pack("{s:O}", "errors", errs);
  char *s = json_dumps(doc, JSON_COMPACT);

  json_decref(doc);
  return s;
}

static char *one_error(const char *field, const char *msg) {
  json_t *errs = json_array();
  char *s;

  add_error(errs, field, msg);
  s = errors_body(errs);
  json_decref(errs);
  return s;
}

/* SendGrid's body for a scripted status that came without one. */
static char *default_body(int status) {
  switch (status) {
  case 401:
    return one_error(NULL, "The provided authorization grant is invalid, "
                           "expired, or revoked");
  case 403:
    return one_error(NULL, "access forbidden");
  case 413:
    return one_error(NULL, "The request body is too large.");
  case 429:
    return one_error(NULL, "too many requests");
  default:
    if (status >= 500)
      return one_error(NULL, "internal server error");
    if (status >= 400)
      return one_error(NULL, "Bad Request");
    return NULL;
  }
}

/* The same rough address rule as SendGrid: one '@', text on both
 * sides, a dot in the domain, nothing blank. */
static bool address_ok(const char *s) {
  const char *at;

  if (s == NULL || s[0] == '\0' || strlen(s) > 320 ||
      strpbrk(s, " \t\r\n<>,;\"") != NULL)
    return false;
  at = strchr(s, '@');
  return at != NULL && at != s && strchr(at + 1, '@') == NULL &&
         strchr(at + 1, '.') != NULL && at[1] != '.' &&
         s[strlen(s) - 1] != '.';
}

static bool nonempty(const json_t *v) {
  return json_is_string(v) && json_string_length(v) > 0;
}

/* Checks the personalizations; adds SendGrid's errors to `errs`. */
static void check_personalizations(const json_t *ps, json_t *errs,
                                   bool *all_subjects) {
  json_t *seen = json_object();
  char field[96], msg[512];
  size_t i, j;
  json_t *p, *t;

  *all_subjects = true;
  if (!json_is_array(ps) || json_array_size(ps) == 0) {
    add_error(errs, "personalizations",
              "The personalizations field is required and must have at "
              "least one personalization.");
    goto out;
  }
  if (json_array_size(ps) > FSG_MAX_PERSONALIZATIONS) {
    add_error(errs, "personalizations",
              "The personalization block is limited to 1000 "
              "personalizations per API request.");
    goto out;
  }
  json_array_foreach(ps, i, p) {
    const json_t *to = json_object_get(p, "to");

    if (!nonempty(json_object_get(p, "subject")))
      *all_subjects = false;
    if (!json_is_array(to) || json_array_size(to) == 0) {
      snprintf(field, sizeof(field), "personalizations.%zu.to", i);
      add_error(errs, field,
                "The to array is required for all personalization "
                "objects, and must have at least one email object with a "
                "valid email address.");
      continue;
    }
    json_array_foreach(to, j, t) {
      const char *email = json_string_value(json_object_get(t, "email"));
      char lower[330];
      size_t k;

      if (!address_ok(email)) {
        snprintf(field, sizeof(field), "personalizations.%zu.to.%zu.email",
                 i, j);
        add_error(errs, field, "Does not contain a valid address.");
        continue;
      }
      for (k = 0; email[k] != '\0' && k + 1 < sizeof(lower); k++)
        lower[k] = (char)tolower((unsigned char)email[k]);
      lower[k] = '\0';
      if (json_object_get(seen, lower) != NULL) {
        snprintf(field, sizeof(field), "personalizations.%zu.to", i);
        snprintf(msg, sizeof(msg),
                 "Each email address in the personalization block should "
                 "be unique between to, cc, and bcc. We found the first "
                 "duplicate instance of [%s] in the personalizations.%zu.to "
                 "field.",
                 email, i);
        add_error(errs, field, msg);
        continue;
      }
      json_object_set_new(seen, lower, json_true());
    }
  }

out:
  json_decref(seen);
}

static void check_content(const json_t *content, json_t *errs) {
  size_t i;
  json_t *c;

  if (!json_is_array(content) || json_array_size(content) == 0) {
    add_error(errs, "content",
              "Unless a valid template_id is provided, the content "
              "parameter is required. There must be at least one defined "
              "content block. We typically suggest both text/plain and "
              "text/html blocks are included, but only one block is "
              "required.");
    return;
  }
  json_array_foreach(content, i, c) {
    const char *type = json_string_value(json_object_get(c, "type"));
    char field[64];

    if (!nonempty(json_object_get(c, "value"))) {
      snprintf(field, sizeof(field), "content.%zu.value", i);
      add_error(errs, field, "The content value must be a string at least "
                             "one character in length.");
    }
    if (type == NULL || type[0] == '\0') {
      snprintf(field, sizeof(field), "content.%zu.type", i);
      add_error(errs, field, "The content type cannot contain ';', or CRLF "
                             "characters.");
    } else if (i > 0 && strcmp(type, "text/plain") == 0) {
      snprintf(field, sizeof(field), "content.%zu.type", i);
      add_error(errs, field, "If present, text/plain content must be first, "
                             "followed by text/html, followed by any other "
                             "content.");
    }
  }
}

/* Validates a Mail Send body; returns NULL when SendGrid would take it,
 * else the 400 body. */
static char *validate(const json_t *doc) {
  json_t *errs = json_array();
  const json_t *from = json_object_get(doc, "from");
  const json_t *tid = json_object_get(doc, "template_id");
  bool all_subjects;
  char *out = NULL;

  if (!json_is_object(doc)) {
    json_decref(errs);
    return one_error(NULL, "Bad Request");
  }
  check_personalizations(json_object_get(doc, "personalizations"), errs,
                         &all_subjects);
  if (!json_is_object(from))
    add_error(errs, "from",
              "The from object must be provided for every email send. It "
              "is an object that requires the email parameter, but may "
              "also contain a name parameter.");
  else if (!address_ok(json_string_value(json_object_get(from, "email"))))
    add_error(errs, "from.email",
              "The from email does not contain a valid address.");
  if (tid != NULL && !nonempty(tid))
    add_error(errs, "template_id", "The template_id must be a string.");
  if (tid == NULL) {
    if (!nonempty(json_object_get(doc, "subject")) && !all_subjects)
      add_error(errs, "subject",
                "The subject is required. You can get around this "
                "requirement if you use a template with a subject defined "
                "or if every personalization has a subject defined.");
    check_content(json_object_get(doc, "content"), errs);
  }
  if (json_array_size(errs) > 0)
    out = errors_body(errs);
  json_decref(errs);
  return out;
}

/* 22 characters of [A-Za-z0-9_-], like SendGrid's message ids. */
static void message_id(char *out) {
  static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrs"
                            "tuvwxyz0123456789-_";
  unsigned char r[22];

  if (getrandom(r, sizeof(r), 0) != (ssize_t)sizeof(r))
    for (size_t i = 0; i < sizeof(r); i++)
      r[i] = (unsigned char)rand();
  for (size_t i = 0; i < sizeof(r); i++)
    out[i] = abc[r[i] % 64];
  out[sizeof(r)] = '\0';
}

/* Records every personalization of an accepted body. Called with f->mu
 * held. */
static void record(fsg *f, const json_t *doc, const char *id) {
  const json_t *subject = json_object_get(doc, "subject");
  const json_t *tid = json_object_get(doc, "template_id");
  size_t i;
  json_t *p;

  json_array_foreach(json_object_get(doc, "personalizations"), i, p) {
    const json_t *to = json_array_get(json_object_get(p, "to"), 0);
    const json_t *psub = json_object_get(p, "subject");
    const json_t *data = json_object_get(p, "dynamic_template_data");
    json_t *item = json_pack("{s:O, s:O, s:s}", "to",
                             json_object_get(to, "email"), "subject",
                             psub != NULL ? psub
                             : subject != NULL ? subject
                                               : json_null(),
                             "message_id", id);

    if (item == NULL)
      continue;
    if (tid != NULL)
      json_object_set(item, "template_id", (json_t *)tid);
    if (data != NULL)
      json_object_set(item, "template_data", (json_t *)data);
    json_array_append_new(f->items, item);
  }
}

/* ---- the control API ---- */

static int parse_step(const json_t *e, fsg_step *s) {
  const json_t *body = json_object_get(e, "body");
  const json_t *hs = json_object_get(e, "headers");
  const char *name;
  json_t *v;
  size_t n = 0;

  memset(s, 0, sizeof(*s));
  if (!json_is_object(e))
    return -1;
  s->status = (int)json_integer_value(json_object_get(e, "status"));
  s->delay_ms = (int)json_integer_value(json_object_get(e, "delay_ms"));
  s->drop = json_is_true(json_object_get(e, "drop"));
  if (json_is_string(body))
    s->body = strdup(json_string_value(body));
  else if (body != NULL)
    s->body = json_dumps(body, JSON_COMPACT | JSON_ENCODE_ANY);
  json_object_foreach((json_t *)hs, name, v) {
    if (n == FSG_HEADERS - 2 || !json_is_string(v))
      return -1;
    if (asprintf(&s->headers[n], "%s: %s", name, json_string_value(v)) < 0)
      return -1;
    n++;
  }
  return 0;
}

/* POST /_fake/script: replaces the script with the given steps. */
static int set_script(fsg *f, const fake_request *req) {
  json_t *doc = json_loadb(req->body, req->body_len, 0, NULL);
  fsg_step *steps = NULL;
  size_t n = 0, i;
  json_t *e;
  int rc = -1;

  if (!json_is_array(doc))
    goto out;
  json_array_foreach(doc, i, e) {
    json_int_t count = json_integer_value(json_object_get(e, "count"));
    fsg_step one;

    if (count <= 0)
      count = 1;
    if (count > 1000000 || parse_step(e, &one) != 0) {
      step_free(&one);
      goto out;
    }
    for (json_int_t k = 0; k < count; k++) {
      fsg_step *grown = realloc(steps, (n + 1) * sizeof(*steps));

      if (grown == NULL)
        break;
      steps = grown;
      steps[n] = one;
      steps[n].body = dup_str(one.body);
      for (size_t h = 0; h < FSG_HEADERS - 2; h++)
        steps[n].headers[h] = dup_str(one.headers[h]);
      n++;
    }
    step_free(&one);
  }
  pthread_mutex_lock(&f->mu);
  script_clear(f);
  f->script = steps;
  f->nscript = n;
  pthread_mutex_unlock(&f->mu);
  steps = NULL;
  n = 0;
  rc = 0;

out:
  for (i = 0; i < n; i++)
    step_free(&steps[i]);
  free(steps);
  json_decref(doc);
  return rc;
}

static void control(fsg *f, const fake_request *req, fake_response *resp) {
  if (strcmp(req->path, "/_fake/script") == 0 &&
      strcmp(req->method, "POST") == 0) {
    bool ok = set_script(f, req) == 0;

    resp->status = ok ? 200 : 400;
    resp->body = strdup(ok ? "{\"ok\":true}"
                           : "{\"error\":\"expected a JSON array of steps\"}");
  } else if (strcmp(req->path, "/_fake/accepted") == 0 &&
             strcmp(req->method, "GET") == 0) {
    json_t *doc;

    pthread_mutex_lock(&f->mu);
    doc = json_pack("{s:I, s:O, s:I}", "count",
                    (json_int_t)json_array_size(f->items), "items", f->items,
                    "requests", (json_int_t)f->requests);
    resp->body = json_dumps(doc, JSON_COMPACT);
    pthread_mutex_unlock(&f->mu);
    json_decref(doc);
    resp->status = 200;
  } else if (strcmp(req->path, "/_fake/reset") == 0 &&
             strcmp(req->method, "POST") == 0) {
    pthread_mutex_lock(&f->mu);
    script_clear(f);
    json_array_clear(f->items);
    f->requests = 0;
    pthread_mutex_unlock(&f->mu);
    resp->status = 200;
    resp->body = strdup("{\"ok\":true}");
  } else {
    resp->status = 404;
    resp->body = strdup("{\"error\":\"no such control route\"}");
  }
}

/* ---- Mail Send ---- */

/* Answers with a scripted step; called with f->mu held. */
static void scripted(fsg_step *s, fake_response *resp) {
  size_t i;

  resp->status = s->status;
  resp->body = s->body != NULL ? strdup(s->body) : default_body(s->status);
  for (i = 0; i < FSG_HEADERS - 2 && s->headers[i] != NULL; i++) {
    snprintf(fsg_hdr[i], sizeof(fsg_hdr[i]), "%s", s->headers[i]);
    resp->headers[i] = fsg_hdr[i];
  }
  resp->headers[i] = NULL;
}

static void mail_send(fsg *f, const fake_request *req, fake_response *resp) {
  const char *auth = fake_header(req, "Authorization");
  char want[512], id[32];
  fsg_step step;
  bool have_step = false;
  json_t *doc;
  char *bad;

  pthread_mutex_lock(&f->mu);
  f->requests++;
  if (f->next < f->nscript) {
    step = f->script[f->next++];
    have_step = true;
  }
  if (have_step) {
    resp->delay_ms = step.delay_ms;
    resp->drop = step.drop ? 1 : 0;
    if (step.status != 0 || step.drop) {
      scripted(&step, resp);
      pthread_mutex_unlock(&f->mu);
      return;
    }
  }
  pthread_mutex_unlock(&f->mu);

  /* A delay alone stalls, then answers as usual. */
  snprintf(want, sizeof(want), "Bearer %s", f->api_key);
  if (auth == NULL || strcmp(auth, want) != 0) {
    resp->status = 401;
    resp->body = default_body(401);
    return;
  }
  doc = json_loadb(req->body, req->body_len, 0, NULL);
  bad = validate(doc);
  if (bad != NULL) {
    resp->status = 400;
    resp->body = bad;
    json_decref(doc);
    return;
  }

  message_id(id);
  pthread_mutex_lock(&f->mu);
  record(f, doc, id);
  pthread_mutex_unlock(&f->mu);
  snprintf(fsg_hdr[0], sizeof(fsg_hdr[0]), "X-Message-Id: %s", id);
  resp->headers[0] = fsg_hdr[0];
  resp->headers[1] = NULL;
  json_decref(doc);
  resp->status = 202;
  resp->body = NULL;
}

static void handle(void *arg, const fake_request *req, fake_response *resp) {
  fsg *f = arg;

  if (strncmp(req->path, "/_fake/", 7) == 0) {
    control(f, req, resp);
  } else if (strcmp(req->path, "/v3/mail/send") == 0) {
    if (strcmp(req->method, "POST") != 0) {
      resp->status = 405;
      resp->body = one_error(NULL, "method not allowed");
      return;
    }
    mail_send(f, req, resp);
  } else {
    resp->status = 404;
    resp->body = one_error(NULL, "resource not found");
  }
}

static void usage(void) {
  fprintf(stderr,
          "usage: fake-sendgrid --port P --ca FILE --api-key KEY\n");
}

int main(int argc, char **argv) {
  const char *ca = NULL, *key = NULL;
  int port = -1, sig, rc = 1;
  fake_http *srv;
  sigset_t set;
  fsg f;

  for (int i = 1; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "--port") == 0)
      port = atoi(argv[i + 1]);
    else if (strcmp(argv[i], "--ca") == 0)
      ca = argv[i + 1];
    else if (strcmp(argv[i], "--api-key") == 0)
      key = argv[i + 1];
  }
  if (port < 0 || ca == NULL || key == NULL || argc % 2 == 0) {
    usage();
    return 2;
  }

  memset(&f, 0, sizeof(f));
  f.api_key = key;
  f.items = json_array();
  pthread_mutex_init(&f.mu, NULL);

  /* Signals go to this thread alone, through sigwait. */
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  signal(SIGPIPE, SIG_IGN);

  srv = fake_http_start(port, ca, handle, &f);
  if (srv == NULL)
    goto out;
  printf("listening port=%d\n", fake_http_port(srv));
  fflush(stdout);
  sigwait(&set, &sig);
  fake_http_stop(srv);
  rc = 0;

out:
  script_clear(&f);
  json_decref(f.items);
  pthread_mutex_destroy(&f.mu);
  return rc;
}
