/* SPDX-License-Identifier: MIT */
/*
 * The admin API over real HTTP (libcurl and raw sockets) against a real
 * store in a database created for this run (and dropped after it), the
 * test Redis, and the embedded Kafka broker: authentication on every
 * route, the error statuses and their JSON shape, users, devices and
 * preferences end to end, events published and read back from Kafka,
 * delivery lookups, /healthz and /metrics, and slow or broken clients.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>

#include "admin.h"
#include "fanout/common.h"
#include "kafka_mock.h"
#include "limiter.h"
#include "log.h"
#include "publish.h"
#include "store.h"

#define TOKEN "itest-admin-token-0123456789"
#define AUTH "Bearer " TOKEN
#define MAX_BODY 16384
#define MAX_EVENT 8192
#define TOPIC "notifications"
#define JSON_CT "application/json"

static struct {
  char dbname[64];
  char *dsn;                    /* the run's own database */
  PGconn *pg;                   /* to look behind the API */
  fo_store *store;
  fo_limiter *limits;
  fo_kmock *kafka;
  fo_publish *pub;
  fo_admin *admin;
  int port;
  const char *host;             /* what the HTTP helpers talk to */
} g;

typedef struct resp {
  long status;
  char *body;
  size_t len;
  char hdr[8192];
  size_t hlen;
  json_t *json;
  CURLcode cc;
} resp;

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};

  nanosleep(&ts, NULL);
}

/* ---- the database of this run ---- */

/* `dsn` with its database replaced by `db`, as key=value conninfo. */
static char *dsn_with_db(const char *dsn, const char *db) {
  PQconninfoOption *opts = PQconninfoParse(dsn, NULL);
  size_t cap = 2048, used = 0;
  char *out = malloc(cap);

  if (opts == NULL || out == NULL) {
    PQconninfoFree(opts);
    free(out);
    return NULL;
  }
  out[0] = '\0';
  for (PQconninfoOption *o = opts; o->keyword != NULL; o++) {
    const char *v = strcmp(o->keyword, "dbname") == 0 ? db : o->val;

    if (v == NULL)
      continue;
    used += (size_t)snprintf(out + used, cap - used, "%s='", o->keyword);
    for (const char *p = v; *p != '\0' && used + 4 < cap; p++) {
      if (*p == '\'' || *p == '\\')
        out[used++] = '\\';
      out[used++] = *p;
    }
    used += (size_t)snprintf(out + used, cap - used, "' ");
  }
  PQconninfoFree(opts);
  return out;
}

static void quiet_notice(void *arg, const char *message) {
  (void)arg;
  (void)message;
}

static int admin_sql(const char *sql) {
  PGconn *c = PQconnectdb(getenv("FANOUT_POSTGRES_DSN"));
  PGresult *r;
  int rc = -1;

  if (PQstatus(c) == CONNECTION_OK) {
    PQsetNoticeProcessor(c, quiet_notice, NULL);
    r = PQexec(c, sql);
    if (PQresultStatus(r) == PGRES_COMMAND_OK)
      rc = 0;
    else
      fprintf(stderr, "itest_admin: %s: %s", sql, PQerrorMessage(c));
    PQclear(r);
  }
  PQfinish(c);
  return rc;
}

/* One integer from a query on the run's database; -1 on error. */
static long long sql_int(const char *sql, const char *param) {
  const char *p[] = {param};
  PGresult *r = PQexecParams(g.pg, sql, param != NULL ? 1 : 0, NULL, p,
                             NULL, NULL, 0);
  long long v = -1;

  if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1)
    v = atoll(PQgetvalue(r, 0, 0));
  else
    print_message("sql: %s\n", PQerrorMessage(g.pg));
  PQclear(r);
  return v;
}

/* ---- HTTP ---- */

static size_t on_body(char *p, size_t sz, size_t n, void *arg) {
  resp *r = arg;
  char *nb = realloc(r->body, r->len + sz * n + 1);

  if (nb == NULL)
    return 0;
  r->body = nb;
  memcpy(r->body + r->len, p, sz * n);
  r->len += sz * n;
  r->body[r->len] = '\0';
  return sz * n;
}

static size_t on_header(char *p, size_t sz, size_t n, void *arg) {
  resp *r = arg;

  /* Keep only the last response's headers (after a 100 Continue). */
  if (sz * n >= 5 && strncmp(p, "HTTP/", 5) == 0)
    r->hlen = 0;
  if (r->hlen + sz * n < sizeof(r->hdr)) {
    memcpy(r->hdr + r->hlen, p, sz * n);
    r->hlen += sz * n;
    r->hdr[r->hlen] = '\0';
  }
  return sz * n;
}

static void resp_free(resp *r) {
  free(r->body);
  json_decref(r->json);
  memset(r, 0, sizeof(*r));
}

/* The value of response header `name`, or NULL. */
static const char *header(resp *r, const char *name, char *out,
                          size_t cap) {
  size_t n = strlen(name);

  for (const char *line = r->hdr; *line != '\0';) {
    const char *end = strstr(line, "\r\n");
    size_t len = end != NULL ? (size_t)(end - line) : strlen(line);

    if (len > n && strncasecmp(line, name, n) == 0 && line[n] == ':') {
      const char *v = line + n + 1;

      while (*v == ' ')
        v++;
      snprintf(out, cap, "%.*s", (int)(len - (size_t)(v - line)), v);
      return out;
    }
    if (end == NULL)
      break;
    line = end + 2;
  }
  return NULL;
}

typedef struct chunked_src {
  size_t left;
} chunked_src;

static size_t chunked_read(char *buf, size_t sz, size_t n, void *arg) {
  chunked_src *src = arg;
  size_t k = sz * n < src->left ? sz * n : src->left;

  if (k > 1000)
    k = 1000;
  memset(buf, ' ', k);
  src->left -= k;
  return k;
}

typedef struct req_opts {
  const char *auth;             /* Authorization value; NULL: none */
  const char *ctype;            /* NULL with a body: no Content-Type */
  const char *body;             /* NULL: no body */
  size_t body_len;              /* 0 with a body: strlen */
  size_t chunked;               /* > 0: send that many bytes chunked */
  bool expect_continue;
} req_opts;

static void http_opts(resp *r, const char *method, const char *path,
                      const req_opts *o) {
  struct curl_slist *h = NULL;
  char url[8192], line[512];
  chunked_src src = {o->chunked};
  CURL *c = curl_easy_init();

  memset(r, 0, sizeof(*r));
  snprintf(url, sizeof(url), "http://%s:%d%s", g.host, g.port, path);
  curl_easy_setopt(c, CURLOPT_URL, url);
  curl_easy_setopt(c, CURLOPT_PATH_AS_IS, 1L);
  curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 15000L);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, r);
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, r);
  if (strcmp(method, "HEAD") == 0)
    curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
  else
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
  if (o->auth != NULL) {
    snprintf(line, sizeof(line), "Authorization: %s", o->auth);
    h = curl_slist_append(h, line);
  }
  if (o->body != NULL || o->chunked > 0) {
    snprintf(line, sizeof(line), "Content-Type:%s%s",
             o->ctype != NULL ? " " : "", o->ctype != NULL ? o->ctype : "");
    h = curl_slist_append(h, line);
    h = curl_slist_append(h, o->expect_continue ? "Expect: 100-continue"
                                                : "Expect:");
  }
  if (o->chunked > 0) {
    h = curl_slist_append(h, "Transfer-Encoding: chunked");
    curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(c, CURLOPT_READFUNCTION, chunked_read);
    curl_easy_setopt(c, CURLOPT_READDATA, &src);
  } else if (o->body != NULL) {
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, o->body);
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE,
                     (curl_off_t)(o->body_len > 0 ? o->body_len
                                                  : strlen(o->body)));
  }
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
  r->cc = curl_easy_perform(c);
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r->status);
  if (r->body != NULL)
    r->json = json_loadb(r->body, r->len, 0, NULL);
  curl_slist_free_all(h);
  curl_easy_cleanup(c);
}

/* An authenticated request with an optional JSON body. */
static void http(resp *r, const char *method, const char *path,
                 const char *json) {
  req_opts o = {.auth = AUTH, .ctype = JSON_CT, .body = json};

  http_opts(r, method, path, &o);
}

static const char *jstr(json_t *j, const char *path) {
  json_t *v = j;
  char buf[128];
  char *save = NULL;

  snprintf(buf, sizeof(buf), "%s", path);
  for (char *k = strtok_r(buf, ".", &save); k != NULL && v != NULL;
       k = strtok_r(NULL, ".", &save))
    v = json_object_get(v, k);
  return json_string_value(v);
}

/* Asserts the status, the JSON error shape, its code and its field
 * (NULL: no field expected). */
static void expect_error(resp *r, long status, const char *code,
                         const char *field) {
  char ct[128];
  json_t *err;

  if (r->status != status)
    print_message("got %ld: %s\n", r->status, r->body ? r->body : "");
  assert_int_equal(r->status, status);
  assert_non_null(header(r, "Content-Type", ct, sizeof(ct)));
  assert_string_equal(ct, JSON_CT);
  assert_non_null(r->json);
  err = json_object_get(r->json, "error");
  assert_true(json_is_object(err));
  assert_string_equal(jstr(err, "code"), code);
  assert_non_null(jstr(err, "message"));
  if (field != NULL) {
    assert_non_null(jstr(err, "field"));
    assert_string_equal(jstr(err, "field"), field);
  } else {
    assert_null(json_object_get(err, "field"));
  }
}

static void expect_status(resp *r, long status) {
  if (r->status != status)
    print_message("got %ld: %s\n", r->status, r->body ? r->body : "");
  assert_int_equal(r->status, status);
}

/* "/v1/users/<escaped id><suffix>" */
static void user_path(char *out, size_t cap, const char *id,
                      const char *suffix) {
  char *e = curl_easy_escape(NULL, id, (int)strlen(id));

  snprintf(out, cap, "/v1/users/%s%s", e, suffix);
  curl_free(e);
}

static void put_user(const char *id) {
  char path[512];
  resp r;

  user_path(path, sizeof(path), id, "");
  http(&r, "PUT", path, "{\"email\":\"a@example.com\"}");
  expect_status(&r, 200);
  resp_free(&r);
}

/* ---- Kafka ---- */

/* True when the topic holds a message with this key and exactly these
 * bytes as its value. */
static bool kafka_has(const char *key, const char *value, size_t len,
                      int timeout_ms) {
  rd_kafka_conf_t *conf = rd_kafka_conf_new();
  rd_kafka_topic_partition_list_t *list;
  int64_t deadline = fo_now_ms() + timeout_ms;
  bool found = false;
  rd_kafka_t *rk;
  char err[256];

  rd_kafka_conf_set(conf, "bootstrap.servers", fo_kmock_bootstraps(g.kafka),
                    err, sizeof(err));
  rd_kafka_conf_set(conf, "group.id", "itest-admin-reader", err,
                    sizeof(err));
  rd_kafka_conf_set(conf, "enable.auto.commit", "false", err, sizeof(err));
  rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof(err));
  if (rk == NULL)
    return false;
  list = rd_kafka_topic_partition_list_new(1);
  rd_kafka_topic_partition_list_add(list, TOPIC, 0)->offset =
      RD_KAFKA_OFFSET_BEGINNING;
  rd_kafka_assign(rk, list);
  rd_kafka_topic_partition_list_destroy(list);

  while (!found && fo_now_ms() < deadline) {
    rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);

    if (m == NULL)
      continue;
    found = m->err == RD_KAFKA_RESP_ERR_NO_ERROR && m->key_len ==
            strlen(key) && memcmp(m->key, key, m->key_len) == 0 &&
            m->len == len && memcmp(m->payload, value, len) == 0;
    rd_kafka_message_destroy(m);
  }
  rd_kafka_consumer_close(rk);
  rd_kafka_destroy(rk);
  return found;
}

/* ---- fixture ---- */

static int setup(void **state) {
  const char *topics[] = {TOPIC, NULL};
  const char *pg = getenv("FANOUT_POSTGRES_DSN");
  const char *redis = getenv("FANOUT_REDIS_URL");
  fo_admin_conf c = {.listen = "127.0.0.1:0",
                     .token = TOKEN,
                     .max_body = MAX_BODY,
                     .max_event_bytes = MAX_EVENT,
                     .timeout_s = 1,
                     .publish_timeout_ms = 5000};
  char sql[128], err[256];

  (void)state;
  if (pg == NULL || redis == NULL) {
    fprintf(stderr, "itest_admin: FANOUT_POSTGRES_DSN and FANOUT_REDIS_URL "
                    "must be set (scripts/services.sh start)\n");
    return -1;
  }
  curl_global_init(CURL_GLOBAL_DEFAULT);
  snprintf(g.dbname, sizeof(g.dbname), "fanout_itest_admin_%ld",
           (long)getpid());
  snprintf(sql, sizeof(sql), "DROP DATABASE IF EXISTS %s", g.dbname);
  admin_sql(sql);
  snprintf(sql, sizeof(sql), "CREATE DATABASE %s", g.dbname);
  if (admin_sql(sql) != 0)
    return -1;
  g.dsn = dsn_with_db(pg, g.dbname);
  if (g.dsn == NULL ||
      fo_store_open(g.dsn, 2, &g.store, err, sizeof(err)) != FO_OK) {
    fprintf(stderr, "itest_admin: store: %s\n", err);
    return -1;
  }
  g.pg = PQconnectdb(g.dsn);
  if (PQstatus(g.pg) != CONNECTION_OK ||
      fo_limiter_open(redis, false, &g.limits) != FO_OK ||
      fo_kmock_start(topics, 1, &g.kafka, err, sizeof(err)) != FO_OK ||
      fo_publish_new(fo_kmock_bootstraps(g.kafka), TOPIC, &g.pub, err,
                     sizeof(err)) != FO_OK) {
    fprintf(stderr, "itest_admin: setup: %s\n", err);
    return -1;
  }
  c.store = g.store;
  c.limits = g.limits;
  c.publish = g.pub;
  if (fo_admin_start(&c, &g.admin, err, sizeof(err)) != FO_OK) {
    fprintf(stderr, "itest_admin: admin: %s\n", err);
    return -1;
  }
  g.port = fo_admin_port(g.admin);
  g.host = "127.0.0.1";
  return g.port > 0 ? 0 : -1;
}

static int teardown(void **state) {
  char sql[128];

  (void)state;
  fo_admin_stop(g.admin);
  fo_publish_free(g.pub);
  fo_kmock_stop(g.kafka);
  fo_limiter_close(g.limits);
  if (g.pg != NULL)
    PQfinish(g.pg);
  fo_store_close(g.store);
  snprintf(sql, sizeof(sql), "DROP DATABASE IF EXISTS %s WITH (FORCE)",
           g.dbname);
  admin_sql(sql);
  free(g.dsn);
  curl_global_cleanup();
  return 0;
}

/* ---- open routes ---- */

static void test_healthz_and_metrics_need_no_token(void **state) {
  req_opts none = {.auth = NULL};
  char v[256];
  resp r;

  (void)state;
  http_opts(&r, "GET", "/healthz", &none);
  expect_status(&r, 200);
  assert_string_equal(jstr(r.json, "status"), "ok");
  assert_true(json_is_true(json_object_get(r.json, "kafka")));
  assert_true(json_is_true(json_object_get(r.json, "postgres")));
  assert_true(json_is_true(json_object_get(r.json, "redis")));
  assert_string_equal(header(&r, "Content-Type", v, sizeof(v)), JSON_CT);
  assert_non_null(header(&r, "Content-Length", v, sizeof(v)));
  assert_int_equal(atol(v), (long)r.len);
  resp_free(&r);

  http_opts(&r, "HEAD", "/healthz", &none);
  expect_status(&r, 200);
  assert_int_equal(r.len, 0);
  resp_free(&r);

  http_opts(&r, "GET", "/metrics", &none);
  expect_status(&r, 200);
  assert_string_equal(header(&r, "Content-Type", v, sizeof(v)),
                      "text/plain; version=0.0.4; charset=utf-8");
  assert_non_null(strstr(r.body, "fanout_admin_requests_total{route="
                                 "\"/healthz\",code=\"200\"}"));
  resp_free(&r);

  /* A wrong method on an open route is a 405, without a token too. */
  http_opts(&r, "PUT", "/healthz", &none);
  expect_error(&r, 405, "method_not_allowed", NULL);
  assert_string_equal(header(&r, "Allow", v, sizeof(v)), "GET, HEAD");
  resp_free(&r);
}

/* ---- authentication ---- */

static const struct {
  const char *method;
  const char *path;
  const char *body;
} routes_authed[] = {
    {"PUT", "/v1/users/auth-u1", "{}"},
    {"GET", "/v1/users/auth-u1", NULL},
    {"DELETE", "/v1/users/auth-u1", NULL},
    {"POST", "/v1/users/auth-u1/devices",
     "{\"platform\":\"fcm\",\"token\":\"t\"}"},
    {"GET", "/v1/users/auth-u1/devices", NULL},
    {"DELETE", "/v1/users/auth-u1/devices/t", NULL},
    {"GET", "/v1/users/auth-u1/preferences", NULL},
    {"PUT", "/v1/users/auth-u1/preferences", "{}"},
    {"PATCH", "/v1/users/auth-u1/preferences", "{}"},
    {"POST", "/v1/events",
     "{\"id\":\"auth-e1\",\"category\":\"c\",\"to\":[\"auth-u1\"]}"},
    {"GET", "/v1/events/auth-e1", NULL},
    /* Not served yet, unknown, or the wrong method: still 401 first. */
    {"GET", "/v1/users/auth-u1/inbox", NULL},
    {"POST", "/v1/conversations", "{\"members\":[\"a\",\"b\"]}"},
    {"GET", "/v1/conversations/c1/messages?after=0&limit=10", NULL},
    {"GET", "/v1/users/auth-u1/conversations", NULL},
    {"GET", "/nope", NULL},
    {"POST", "/v1/users/auth-u1", "{}"},
    {"HEAD", "/v1/users/auth-u1", NULL},
};

static void test_every_route_needs_the_token(void **state) {
  static const char *const bad[] = {
      NULL,                            /* no header */
      "Bearer wrong",                  /* wrong */
      "Bearer " TOKEN "x",             /* longer */
      "Bearer itest-admin-token-012345678", /* a prefix */
      "Bearer itest-admin-token-0123456788", /* same length */
      "Bearer ",                       /* empty */
      "Basic aXRlc3Q6eA==",            /* another scheme */
      TOKEN,                           /* no scheme */
  };
  char v[256];

  (void)state;
  for (size_t i = 0; i < sizeof(routes_authed) / sizeof(routes_authed[0]);
       i++) {
    for (size_t k = 0; k < sizeof(bad) / sizeof(bad[0]); k++) {
      req_opts o = {.auth = bad[k], .ctype = JSON_CT,
                    .body = routes_authed[i].body};
      resp r;

      http_opts(&r, routes_authed[i].method, routes_authed[i].path, &o);
      if (r.status != 401)
        print_message("%s %s with %s\n", routes_authed[i].method,
                      routes_authed[i].path, bad[k] ? bad[k] : "(none)");
      assert_int_equal(r.status, 401);
      assert_non_null(header(&r, "WWW-Authenticate", v, sizeof(v)));
      assert_true(strncmp(v, "Bearer", 6) == 0);
      if (strcmp(routes_authed[i].method, "HEAD") != 0)
        expect_error(&r, 401, "unauthorized", NULL);
      resp_free(&r);
    }
  }

  /* Nothing ran: the user was never created. */
  {
    resp r;

    http(&r, "GET", "/v1/users/auth-u1", NULL);
    expect_error(&r, 404, "not_found", NULL);
    resp_free(&r);
  }
  assert_int_equal(kafka_has("auth-e1", routes_authed[9].body,
                             strlen(routes_authed[9].body), 2000),
                   false);

  /* The scheme is case-insensitive. */
  {
    req_opts o = {.auth = "bearer " TOKEN};
    resp r;

    http_opts(&r, "GET", "/v1/users/auth-u1", &o);
    expect_error(&r, 404, "not_found", NULL);
    resp_free(&r);
  }
}

/* ---- routing errors ---- */

static void test_unknown_routes_are_404(void **state) {
  static const char *const paths[] = {
      "/", "/v1", "/v1/users", "/v1/users/u1/", "/v1/users/u1/x",
      "/v1/users/u1/devices/t/extra", "/v1/events/e1/x", "/healthz/x",
      "/v1/users/u1/inbox", "/v1/conversations",
      "/v1/conversations/c1/messages", "/v1/users/u1/conversations",
      "/a/b/c/d/e/f/g/h/i/j", "/V1/users/u1", "//v1/users/u1",
  };

  (void)state;
  for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
    resp r;

    http(&r, "GET", paths[i], NULL);
    if (r.status != 404)
      print_message("path %s\n", paths[i]);
    expect_error(&r, 404, "not_found", NULL);
    resp_free(&r);
  }
}

static void test_wrong_method_is_405_with_allow(void **state) {
  static const struct {
    const char *method, *path, *allow;
  } t[] = {
      {"POST", "/v1/users/u1", "GET, HEAD, PUT, DELETE"},
      {"PATCH", "/v1/users/u1", "GET, HEAD, PUT, DELETE"},
      {"PUT", "/v1/users/u1/devices", "GET, HEAD, POST"},
      {"GET", "/v1/users/u1/devices/t", "DELETE"},
      {"POST", "/v1/users/u1/preferences", "GET, HEAD, PUT, PATCH"},
      {"GET", "/v1/events", "POST"},
      {"DELETE", "/v1/events/e1", "GET, HEAD"},
      {"OPTIONS", "/v1/events", "POST"},
      {"POST", "/metrics", "GET, HEAD"},
  };
  char v[128];

  (void)state;
  for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
    resp r;

    http(&r, t[i].method, t[i].path, NULL);
    expect_error(&r, 405, "method_not_allowed", NULL);
    assert_non_null(header(&r, "Allow", v, sizeof(v)));
    assert_string_equal(v, t[i].allow);
    resp_free(&r);
  }
}

static void test_bad_ids_in_paths_are_400(void **state) {
  static const char *const ids[] = {
      "%ZZ", "%4", "%00", "%0A", "a%7Fb", "%FF", "%C2%85", "%ED%A0%80",
      "%2E%2E", ".", "..", "",
  };
  char path[512], longid[200];
  resp r;

  (void)state;
  for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++) {
    snprintf(path, sizeof(path), "/v1/users/%s", ids[i]);
    http(&r, "GET", path, NULL);
    if (r.status != 400)
      print_message("id %s\n", ids[i]);
    expect_error(&r, 400, "invalid_path", "id");
    resp_free(&r);

    snprintf(path, sizeof(path), "/v1/events/%s", ids[i]);
    http(&r, "GET", path, NULL);
    expect_error(&r, 400, "invalid_path", "id");
    resp_free(&r);
  }

  /* 128 bytes is an id; 129 is not. */
  memset(longid, 'a', 129);
  longid[128] = '\0';
  snprintf(path, sizeof(path), "/v1/users/%s", longid);
  http(&r, "GET", path, NULL);
  expect_error(&r, 404, "not_found", NULL);
  resp_free(&r);
  longid[128] = 'a';
  longid[129] = '\0';
  snprintf(path, sizeof(path), "/v1/users/%s", longid);
  http(&r, "GET", path, NULL);
  expect_error(&r, 400, "invalid_path", "id");
  resp_free(&r);

  /* Device tokens in paths are visible ASCII. */
  http(&r, "DELETE", "/v1/users/u1/devices/a%20b", NULL);
  expect_error(&r, 400, "invalid_path", "token");
  resp_free(&r);
  http(&r, "DELETE", "/v1/users/u1/devices/%C3%A9", NULL);
  expect_error(&r, 400, "invalid_path", "token");
  resp_free(&r);
}

/* ---- bodies ---- */

static void test_body_too_large_is_413(void **state) {
  char *big = malloc(MAX_BODY + 2);
  char *ev = malloc(MAX_EVENT + 100);
  req_opts o = {.auth = AUTH, .ctype = JSON_CT};
  resp r;
  int n;

  (void)state;
  put_user("big-u1");
  memset(big, ' ', MAX_BODY + 1);
  big[0] = '{';
  big[MAX_BODY - 1] = '}';
  big[MAX_BODY + 1] = '\0';

  /* From Content-Length, before the body is read: with and without
   * "Expect: 100-continue". */
  o.body = big;
  o.body_len = MAX_BODY + 1;
  o.expect_continue = true;
  http_opts(&r, "PUT", "/v1/users/big-u1", &o);
  expect_error(&r, 413, "too_large", NULL);
  resp_free(&r);
  o.expect_continue = false;
  http_opts(&r, "PUT", "/v1/users/big-u1/preferences", &o);
  expect_error(&r, 413, "too_large", NULL);
  resp_free(&r);

  /* Exactly the limit is fine (a valid object padded with spaces). */
  o.body_len = MAX_BODY;
  http_opts(&r, "PUT", "/v1/users/big-u1", &o);
  expect_status(&r, 200);
  resp_free(&r);

  /* Chunked, so the size shows only while it arrives. */
  o.body = NULL;
  o.body_len = 0;
  o.chunked = MAX_BODY + MAX_BODY / 2;
  http_opts(&r, "PUT", "/v1/users/big-u1", &o);
  expect_error(&r, 413, "too_large", NULL);
  resp_free(&r);

  /* Events have their own bound, the consumer's. */
  n = snprintf(ev, MAX_EVENT + 100,
               "{\"id\":\"big-e1\",\"category\":\"c\",\"to\":[\"u\"],"
               "\"body\":\"");
  memset(ev + n, 'x', MAX_EVENT);
  snprintf(ev + n + MAX_EVENT - 10, 10, "\"}");
  o.chunked = 0;
  o.body = ev;
  o.body_len = strlen(ev);
  assert_true(o.body_len > MAX_EVENT && o.body_len < MAX_BODY);
  http_opts(&r, "POST", "/v1/events", &o);
  expect_error(&r, 413, "too_large", NULL);
  resp_free(&r);

  /* The server is fine after all that. */
  http(&r, "GET", "/v1/users/big-u1", NULL);
  expect_status(&r, 200);
  resp_free(&r);
  free(big);
  free(ev);
}

static void test_media_type(void **state) {
  static const char body[] = "{\"locale\":\"fr-FR\"}";
  static const struct {
    const char *ctype;
    long status;
  } t[] = {
      {"text/plain", 415},
      {NULL, 415},
      {"application/x-www-form-urlencoded", 415},
      {"application/jsonx", 415},
      {"application/merge-patch+json", 415},
      {"application/json; charset=utf-8", 200},
      {"Application/JSON", 200},
  };

  (void)state;
  put_user("mt-u1");
  for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
    req_opts o = {.auth = AUTH, .ctype = t[i].ctype, .body = body};
    resp r;

    http_opts(&r, "PUT", "/v1/users/mt-u1", &o);
    if (t[i].status == 415)
      expect_error(&r, 415, "unsupported_media_type", NULL);
    else
      expect_status(&r, 200);
    resp_free(&r);
  }

  /* PATCH also takes the merge-patch media type; POST /v1/events does
   * not take text. */
  {
    req_opts o = {.auth = AUTH, .ctype = "application/merge-patch+json",
                  .body = "{\"channels\":{\"sms\":false}}"};
    resp r;

    http_opts(&r, "PATCH", "/v1/users/mt-u1/preferences", &o);
    expect_status(&r, 200);
    resp_free(&r);
    o.ctype = "text/plain";
    o.body = "{\"id\":\"mt-e1\",\"category\":\"c\",\"to\":[\"u\"]}";
    http_opts(&r, "POST", "/v1/events", &o);
    expect_error(&r, 415, "unsupported_media_type", NULL);
    resp_free(&r);
  }
}

/* ---- users ---- */

static void test_users(void **state) {
  static const struct {
    const char *body, *code, *field;
  } bad[] = {
      {"{\"timezone\":\"Mars/Base\"}", "invalid_field", "timezone"},
      {"{\"email\":\"a b@example.com\"}", "invalid_field", "email"},
      {"{\"email\":\"no-at.example.com\"}", "invalid_field", "email"},
      {"{\"email\":\"a@b@c\"}", "invalid_field", "email"},
      {"{\"email\":\"@example.com\"}", "invalid_field", "email"},
      {"{\"email\":5}", "invalid_field", "email"},
      {"{\"phone\":\"12345678\"}", "invalid_field", "phone"},
      {"{\"phone\":\"+0612345678\"}", "invalid_field", "phone"},
      {"{\"phone\":\"+336\"}", "invalid_field", "phone"},
      {"{\"phone\":\"+3361234567890123\"}", "invalid_field", "phone"},
      {"{\"locale\":\"fr FR\"}", "invalid_field", "locale"},
      {"{\"nickname\":\"x\"}", "invalid_field", "nickname"},
      {"[]", "not_object", NULL},
      {"\"x\"", "not_object", NULL},
  };
  resp r;

  (void)state;
  http(&r, "GET", "/v1/users/users-u1", NULL);
  expect_error(&r, 404, "not_found", NULL);
  resp_free(&r);

  http(&r, "PUT", "/v1/users/users-u1",
       "{\"email\":\"ann@example.com\",\"phone\":\"+33612345678\","
       "\"timezone\":\"Europe/Paris\",\"locale\":\"fr-FR\"}");
  expect_status(&r, 200);
  assert_string_equal(jstr(r.json, "id"), "users-u1");
  assert_string_equal(jstr(r.json, "email"), "ann@example.com");
  assert_string_equal(jstr(r.json, "timezone"), "Europe/Paris");
  resp_free(&r);

  http(&r, "GET", "/v1/users/users-u1", NULL);
  expect_status(&r, 200);
  assert_string_equal(jstr(r.json, "phone"), "+33612345678");
  assert_string_equal(jstr(r.json, "locale"), "fr-FR");
  resp_free(&r);

  /* PUT replaces: what is absent or null is cleared. */
  http(&r, "PUT", "/v1/users/users-u1",
       "{\"email\":null,\"timezone\":\"UTC\"}");
  expect_status(&r, 200);
  resp_free(&r);
  http(&r, "GET", "/v1/users/users-u1", NULL);
  expect_status(&r, 200);
  assert_true(json_is_null(json_object_get(r.json, "email")));
  assert_true(json_is_null(json_object_get(r.json, "phone")));
  assert_string_equal(jstr(r.json, "timezone"), "UTC");
  resp_free(&r);

  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    http(&r, "PUT", "/v1/users/users-u1", bad[i].body);
    if (r.status != 422)
      print_message("body %s\n", bad[i].body);
    expect_error(&r, 422, bad[i].code, bad[i].field);
    resp_free(&r);
  }
  /* The field is named in the message too. */
  http(&r, "PUT", "/v1/users/users-u1", "{\"timezone\":\"Mars/Base\"}");
  assert_non_null(strstr(jstr(r.json, "error.message"), "timezone"));
  assert_non_null(strstr(jstr(r.json, "error.message"), "Mars/Base"));
  resp_free(&r);

  /* A refused PUT changed nothing. */
  http(&r, "GET", "/v1/users/users-u1", NULL);
  assert_string_equal(jstr(r.json, "timezone"), "UTC");
  resp_free(&r);

  /* Broken JSON is a 400. */
  http(&r, "PUT", "/v1/users/users-u1", "{\"email\":");
  expect_error(&r, 400, "invalid_json", NULL);
  resp_free(&r);
  http(&r, "PUT", "/v1/users/users-u1",
       "{\"email\":\"a@b\",\"email\":\"c@d\"}");
  expect_error(&r, 400, "invalid_json", NULL);
  resp_free(&r);
  {
    req_opts o = {.auth = AUTH};

    http_opts(&r, "PUT", "/v1/users/users-u1", &o);
    expect_error(&r, 400, "invalid_json", NULL);
    resp_free(&r);
  }

  http(&r, "DELETE", "/v1/users/users-u1", NULL);
  expect_status(&r, 204);
  assert_int_equal(r.len, 0);
  resp_free(&r);
  http(&r, "DELETE", "/v1/users/users-u1", NULL);
  expect_error(&r, 404, "not_found", NULL);
  resp_free(&r);
}

/* Ids that would break naive SQL, paths or JSON are just ids. */
static void test_hostile_ids_round_trip(void **state) {
  static const char *const ids[] = {
      "x'); DROP TABLE users; --",
      "a/b",
      "../../etc/passwd",
      "100%",
      "sp ace+plus?q=1#frag",
      "quote\"back\\slash",
      "\xc3\xbc-\xe7\x94\xa8\xe6\x88\xb7",
      "<script>alert(1)</script>",
  };
  char path[1024];

  (void)state;
  for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++) {
    resp r;

    user_path(path, sizeof(path), ids[i], "");
    http(&r, "PUT", path, "{\"locale\":\"en\"}");
    expect_status(&r, 200);
    assert_string_equal(jstr(r.json, "id"), ids[i]);
    resp_free(&r);
    http(&r, "GET", path, NULL);
    expect_status(&r, 200);
    assert_string_equal(jstr(r.json, "id"), ids[i]);
    resp_free(&r);
    assert_int_equal(sql_int("SELECT count(*) FROM users WHERE id = $1",
                             ids[i]),
                     1);

    user_path(path, sizeof(path), ids[i], "/devices");
    http(&r, "POST", path, "{\"platform\":\"apns\",\"token\":\"hostile\"}");
    expect_status(&r, 201);
    resp_free(&r);
  }
  /* The tables are intact, and hold exactly what was written. */
  assert_int_equal(sql_int("SELECT count(*) FROM users WHERE id = ANY("
                           "$1::text[])",
                           "{\"x'); DROP TABLE users; --\",\"a/b\"}"),
                   2);
  assert_true(sql_int("SELECT count(*) FROM devices", NULL) >= 1);

  for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++) {
    resp r;

    user_path(path, sizeof(path), ids[i], "");
    http(&r, "DELETE", path, NULL);
    expect_status(&r, 204);
    resp_free(&r);
  }
}

/* ---- devices ---- */

static void test_devices_and_cascade(void **state) {
  static const struct {
    const char *body, *field;
  } bad[] = {
      {"{\"platform\":\"sms\",\"token\":\"t\"}", "platform"},
      {"{\"token\":\"t\"}", "platform"},
      {"{\"platform\":\"fcm\"}", "token"},
      {"{\"platform\":\"fcm\",\"token\":\"\"}", "token"},
      {"{\"platform\":\"fcm\",\"token\":\"a b\"}", "token"},
      {"{\"platform\":\"fcm\",\"token\":7}", "token"},
      {"{\"platform\":\"fcm\",\"token\":\"t\",\"app\":\"a b\"}", "app"},
      {"{\"platform\":\"fcm\",\"token\":\"t\",\"kind\":\"x\"}", "kind"},
  };
  json_t *list;
  resp r;

  (void)state;
  http(&r, "POST", "/v1/users/dev-u1/devices",
       "{\"platform\":\"apns\",\"token\":\"abc\"}");
  expect_error(&r, 404, "not_found", NULL);
  resp_free(&r);
  http(&r, "GET", "/v1/users/dev-u1/devices", NULL);
  expect_error(&r, 404, "not_found", NULL);
  resp_free(&r);

  put_user("dev-u1");
  http(&r, "GET", "/v1/users/dev-u1/devices", NULL);
  expect_status(&r, 200);
  assert_int_equal(json_array_size(r.json), 0);
  resp_free(&r);

  http(&r, "POST", "/v1/users/dev-u1/devices",
       "{\"platform\":\"apns\",\"token\":\"0a1b2c\"}");
  expect_status(&r, 201);
  assert_string_equal(jstr(r.json, "platform"), "apns");
  assert_string_equal(jstr(r.json, "token"), "0a1b2c");
  assert_string_equal(jstr(r.json, "app"), "default");
  resp_free(&r);
  http(&r, "POST", "/v1/users/dev-u1/devices",
       "{\"platform\":\"fcm\",\"token\":\"fcm:tok/en_1-2\",\"app\":\"ios.b\"}");
  expect_status(&r, 201);
  assert_string_equal(jstr(r.json, "app"), "ios.b");
  resp_free(&r);

  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    http(&r, "POST", "/v1/users/dev-u1/devices", bad[i].body);
    expect_error(&r, 422, "invalid_field", bad[i].field);
    resp_free(&r);
  }

  http(&r, "GET", "/v1/users/dev-u1/devices", NULL);
  expect_status(&r, 200);
  list = r.json;
  assert_int_equal(json_array_size(list), 2);
  for (size_t i = 0; i < 2; i++) {
    json_t *d = json_array_get(list, i);

    assert_non_null(json_object_get(d, "invalid_since"));
    assert_true(json_is_null(json_object_get(d, "invalid_since")));
  }
  resp_free(&r);

  /* A token with '/' and ':' is percent-encoded in the path. */
  http(&r, "DELETE", "/v1/users/dev-u1/devices/fcm%3Atok%2Fen_1-2", NULL);
  expect_status(&r, 204);
  resp_free(&r);
  http(&r, "DELETE", "/v1/users/dev-u1/devices/fcm%3Atok%2Fen_1-2", NULL);
  expect_error(&r, 404, "not_found", NULL);
  resp_free(&r);
  assert_int_equal(sql_int("SELECT count(*) FROM devices WHERE user_id = $1",
                           "dev-u1"),
                   1);

  /* Deleting the user takes its devices and preferences with it. */
  http(&r, "PUT", "/v1/users/dev-u1/preferences",
       "{\"channels\":{\"sms\":false}}");
  expect_status(&r, 200);
  resp_free(&r);
  assert_int_equal(sql_int("SELECT count(*) FROM preferences WHERE user_id "
                           "= $1",
                           "dev-u1"),
                   1);
  http(&r, "DELETE", "/v1/users/dev-u1", NULL);
  expect_status(&r, 204);
  resp_free(&r);
  assert_int_equal(sql_int("SELECT count(*) FROM devices WHERE user_id = $1",
                           "dev-u1"),
                   0);
  assert_int_equal(sql_int("SELECT count(*) FROM preferences WHERE user_id "
                           "= $1",
                           "dev-u1"),
                   0);
  http(&r, "GET", "/v1/users/dev-u1/devices", NULL);
  expect_error(&r, 404, "not_found", NULL);
  resp_free(&r);
  http(&r, "GET", "/v1/users/dev-u1", NULL);
  expect_error(&r, 404, "not_found", NULL);
  resp_free(&r);
}

/* ---- preferences ---- */

static void test_preferences(void **state) {
  static const struct {
    const char *body, *field;
  } bad[] = {
      {"{\"quiet_hours\":{\"start\":\"22:00\",\"end\":\"07:00\","
       "\"timezone\":\"Mars/Base\"}}",
       "quiet_hours.timezone"},
      {"{\"quiet_hours\":{\"start\":\"25:00\",\"end\":\"07:00\"}}",
       "quiet_hours.start"},
      {"{\"quiet_hours\":{\"start\":\"22:00\",\"end\":\"7h\"}}",
       "quiet_hours.end"},
      {"{\"channels\":{\"fax\":true}}", "channels.fax"},
      {"{\"caps\":{\"push\":{\"limit\":0,\"per\":\"hour\"}}}",
       "caps.push.limit"},
  };
  static const char full[] =
      "{\"channels\":{\"push\":true,\"email\":true,\"sms\":false},"
      "\"categories\":{\"marketing\":{\"email\":false}},"
      "\"quiet_hours\":{\"start\":\"22:00\",\"end\":\"07:00\","
      "\"timezone\":\"Europe/Paris\",\"channels\":[\"push\",\"sms\"]},"
      "\"caps\":{\"push\":{\"limit\":10,\"per\":\"hour\"},"
      "\"sms\":{\"limit\":3,\"per\":\"day\"}}}";
  json_t *j;
  resp r;

  (void)state;
  http(&r, "GET", "/v1/users/prefs-u1/preferences", NULL);
  expect_error(&r, 404, "not_found", NULL);
  resp_free(&r);
  http(&r, "PATCH", "/v1/users/prefs-u1/preferences", "{}");
  expect_error(&r, 404, "not_found", NULL);
  resp_free(&r);
  http(&r, "PUT", "/v1/users/prefs-u1/preferences", "{}");
  expect_error(&r, 404, "not_found", NULL);
  resp_free(&r);

  /* Nothing stored: the defaults, spelled out. */
  put_user("prefs-u1");
  http(&r, "GET", "/v1/users/prefs-u1/preferences", NULL);
  expect_status(&r, 200);
  assert_true(json_is_true(json_object_get(
      json_object_get(r.json, "channels"), "sms")));
  assert_null(json_object_get(r.json, "quiet_hours"));
  resp_free(&r);

  http(&r, "PUT", "/v1/users/prefs-u1/preferences", full);
  expect_status(&r, 200);
  assert_string_equal(jstr(r.json, "quiet_hours.start"), "22:00");
  resp_free(&r);
  http(&r, "GET", "/v1/users/prefs-u1/preferences", NULL);
  expect_status(&r, 200);
  assert_string_equal(jstr(r.json, "quiet_hours.timezone"), "Europe/Paris");
  assert_true(json_is_false(json_object_get(
      json_object_get(r.json, "channels"), "sms")));
  assert_int_equal(json_integer_value(json_object_get(
                       json_object_get(json_object_get(r.json, "caps"),
                                       "sms"),
                       "limit")),
                   3);
  resp_free(&r);

  /* Refused documents name the field, by PUT and by PATCH, and change
   * nothing. */
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    http(&r, "PUT", "/v1/users/prefs-u1/preferences", bad[i].body);
    expect_error(&r, 422, "invalid_field", bad[i].field);
    resp_free(&r);
    http(&r, "PATCH", "/v1/users/prefs-u1/preferences", bad[i].body);
    expect_error(&r, 422, "invalid_field", bad[i].field);
    resp_free(&r);
  }
  http(&r, "PATCH", "/v1/users/prefs-u1/preferences", "[1]");
  expect_status(&r, 422);
  resp_free(&r);
  http(&r, "GET", "/v1/users/prefs-u1/preferences", NULL);
  assert_string_equal(jstr(r.json, "quiet_hours.start"), "22:00");
  assert_int_equal(json_object_size(json_object_get(r.json, "caps")), 2);
  resp_free(&r);

  /* Merge patch: objects merge, null deletes, values replace. */
  http(&r, "PATCH", "/v1/users/prefs-u1/preferences",
       "{\"quiet_hours\":null,\"caps\":{\"push\":null,"
       "\"sms\":{\"limit\":5}},\"channels\":{\"sms\":true}}");
  expect_status(&r, 200);
  resp_free(&r);
  http(&r, "GET", "/v1/users/prefs-u1/preferences", NULL);
  expect_status(&r, 200);
  j = r.json;
  assert_null(json_object_get(j, "quiet_hours"));
  assert_null(json_object_get(json_object_get(j, "caps"), "push"));
  assert_int_equal(json_integer_value(json_object_get(
                       json_object_get(json_object_get(j, "caps"), "sms"),
                       "limit")),
                   5);
  assert_string_equal(jstr(j, "caps.sms.per"), "day");
  assert_true(json_is_true(json_object_get(json_object_get(j, "channels"),
                                           "sms")));
  assert_true(json_is_false(json_object_get(
      json_object_get(json_object_get(j, "categories"), "marketing"),
      "email")));
  resp_free(&r);

  /* What is stored is the merged document itself. */
  assert_int_equal(sql_int("SELECT count(*) FROM preferences WHERE user_id "
                           "= $1 AND NOT doc ? 'quiet_hours' AND "
                           "(doc->'caps'->'sms'->>'limit')::int = 5",
                           "prefs-u1"),
                   1);
}

/* ---- events ---- */

typedef struct post_job {
  char id[64];
  char body[256];
  long status;
  char got_id[64];
} post_job;

static void *post_event(void *arg) {
  post_job *j = arg;
  resp r;

  http(&r, "POST", "/v1/events", j->body);
  j->status = r.status;
  if (jstr(r.json, "id") != NULL)
    snprintf(j->got_id, sizeof(j->got_id), "%s", jstr(r.json, "id"));
  resp_free(&r);
  return NULL;
}

static void test_events_published(void **state) {
  static const struct {
    const char *body;
    long status;
    const char *code, *field;
  } bad[] = {
      {"{\"category\":\"c\",\"to\":[\"u\"]}", 422, "missing_field", "id"},
      {"{\"id\":\"e\",\"category\":\"c\"}", 422, "missing_field", "to"},
      {"{\"id\":\"e\",\"category\":\"Bad Cat\",\"to\":[\"u\"]}", 422,
       "invalid_field", "category"},
      {"{\"id\":\"e\",\"category\":\"c\",\"to\":[]}", 422, "invalid_field",
       "to"},
      {"{\"id\":\"e\",\"category\":\"c\",\"to\":[\"u\"],\"ttl\":\"60\"}",
       422, "invalid_field", "ttl"},
      {"[1,2]", 422, "not_object", NULL},
      {"{\"id\":", 400, "invalid_json", NULL},
  };
  static const char ev[] =
      "{\"id\": \"evt-pub-1\", \"category\": \"order_update\",\n"
      " \"to\": [\"u1\", \"u2\"], \"priority\": \"high\"}";
  enum { JOBS = 12 };
  post_job jobs[JOBS];
  pthread_t t[JOBS];
  resp r;

  (void)state;
  http(&r, "POST", "/v1/events", ev);
  expect_status(&r, 202);
  assert_string_equal(jstr(r.json, "id"), "evt-pub-1");
  resp_free(&r);
  /* In Kafka, keyed by the id, byte for byte as posted. */
  assert_true(kafka_has("evt-pub-1", ev, strlen(ev), 10000));

  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    http(&r, "POST", "/v1/events", bad[i].body);
    expect_error(&r, bad[i].status, bad[i].code, bad[i].field);
    resp_free(&r);
  }

  /* Concurrent posts each wait for their own acknowledgement. */
  for (int i = 0; i < JOBS; i++) {
    snprintf(jobs[i].id, sizeof(jobs[i].id), "evt-par-%d", i);
    snprintf(jobs[i].body, sizeof(jobs[i].body),
             "{\"id\":\"evt-par-%d\",\"category\":\"c\","
             "\"to\":[\"u%d\"]}",
             i, i);
    jobs[i].got_id[0] = '\0';
    assert_int_equal(pthread_create(&t[i], NULL, post_event, &jobs[i]), 0);
  }
  for (int i = 0; i < JOBS; i++)
    pthread_join(t[i], NULL);
  for (int i = 0; i < JOBS; i++) {
    assert_int_equal(jobs[i].status, 202);
    assert_string_equal(jobs[i].got_id, jobs[i].id);
    assert_true(kafka_has(jobs[i].id, jobs[i].body, strlen(jobs[i].body),
                          10000));
  }
}

static void test_event_lookup(void **state) {
  fo_dlog *dl = NULL;
  json_t *d;
  resp r;

  (void)state;
  http(&r, "GET", "/v1/events/lookup-e1", NULL);
  expect_error(&r, 404, "not_found", NULL);
  resp_free(&r);

  assert_int_equal(fo_dlog_start(g.store, 64, &dl), FO_OK);
  fo_dlog_record(dl, "lookup-e1", "lookup-u1", FO_CH_PUSH, FO_STATUS_SENT,
                 NULL, 1, "apns-1");
  fo_dlog_record(dl, "lookup-e1", "lookup-u2", FO_CH_EMAIL,
                 FO_STATUS_SUPPRESSED, "opted_out", 0, NULL);
  fo_dlog_record(dl, "lookup-other", "lookup-u1", FO_CH_SMS,
                 FO_STATUS_FAILED, "bad number", 3, NULL);
  assert_int_equal(fo_dlog_flush(dl, 5000), FO_OK);
  fo_dlog_stop(dl);

  http(&r, "GET", "/v1/events/lookup-e1", NULL);
  expect_status(&r, 200);
  assert_string_equal(jstr(r.json, "id"), "lookup-e1");
  assert_int_equal(json_array_size(json_object_get(r.json, "deliveries")),
                   2);
  d = json_array_get(json_object_get(r.json, "deliveries"), 0);
  assert_string_equal(jstr(d, "user"), "lookup-u1");
  assert_string_equal(jstr(d, "channel"), "push");
  assert_string_equal(jstr(d, "status"), "sent");
  assert_int_equal(json_integer_value(json_object_get(d, "attempts")), 1);
  assert_non_null(jstr(d, "updated_at"));
  d = json_array_get(json_object_get(r.json, "deliveries"), 1);
  assert_string_equal(jstr(d, "status"), "suppressed");
  assert_string_equal(jstr(d, "reason"), "opted_out");
  resp_free(&r);
}

/* ---- metrics ---- */

/* The value of one sample line of /metrics; -1 when absent. */
static long long metric(const char *series) {
  req_opts none = {.auth = NULL};
  long long v = -1;
  const char *p;
  resp r;

  http_opts(&r, "GET", "/metrics", &none);
  p = r.body != NULL ? strstr(r.body, series) : NULL;
  if (p != NULL && p[strlen(series)] == ' ')
    v = atoll(p + strlen(series) + 1);
  resp_free(&r);
  return v;
}

static void test_requests_are_counted(void **state) {
  static const char users200[] =
      "fanout_admin_requests_total{route=\"/v1/users/{id}\",code=\"200\"}";
  static const char unmatched401[] =
      "fanout_admin_requests_total{route=\"unmatched\",code=\"401\"}";
  req_opts none = {.auth = NULL};
  long long before, after;
  resp r;

  (void)state;
  put_user("metrics-u1");
  before = metric(users200);
  assert_true(before >= 1);
  http(&r, "GET", "/v1/users/metrics-u1", NULL);
  resp_free(&r);
  http(&r, "GET", "/v1/users/metrics-u1", NULL);
  resp_free(&r);
  after = metric(users200);
  assert_int_equal(after, before + 2);

  before = metric(unmatched401);
  http_opts(&r, "GET", "/no/such/route", &none);
  resp_free(&r);
  assert_int_equal(metric(unmatched401), before < 0 ? 1 : before + 1);

  assert_true(metric("fanout_admin_request_seconds_count{route="
                     "\"/v1/users/{id}\"}") >= 2);
}

/* ---- connections ---- */

static int raw_connect(void) {
  struct sockaddr_in sa = {.sin_family = AF_INET};
  int fd = socket(AF_INET, SOCK_STREAM, 0);

  sa.sin_port = htons((uint16_t)g.port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
    if (fd >= 0)
      close(fd);
    return -1;
  }
  return fd;
}

/* A client that stops halfway through its request line is dropped after
 * the idle timeout (1 s here), not kept forever. */
static void test_slow_client_is_dropped(void **state) {
  static const char half[] = "GET /v1/users/u1 HT";
  struct pollfd pfd;
  int64_t t0, took;
  char buf[256];
  ssize_t n;
  int fd;

  (void)state;
  fd = raw_connect();
  assert_true(fd >= 0);
  assert_int_equal(send(fd, half, sizeof(half) - 1, 0),
                   (ssize_t)sizeof(half) - 1);
  t0 = fo_now_ms();
  pfd.fd = fd;
  pfd.events = POLLIN;
  assert_int_equal(poll(&pfd, 1, 5000), 1);
  n = recv(fd, buf, sizeof(buf), 0);
  took = fo_now_ms() - t0;
  print_message("closed after %lld ms\n", (long long)took);
  assert_true(n == 0 || (n < 0 && errno == ECONNRESET));
  assert_true(took >= 800);
  assert_true(took < 4000);
  close(fd);

  /* The server still answers others. */
  {
    resp r;

    http(&r, "GET", "/healthz", NULL);
    expect_status(&r, 200);
    resp_free(&r);
  }
}

/* A raw request: the server's own answer to a request line that is not
 * what a browser would send. */
static void test_raw_request_paths(void **state) {
  static const char req[] =
      "GET /v1/users/a%2Fb/../x HTTP/1.1\r\nHost: x\r\n"
      "Authorization: " AUTH "\r\nConnection: close\r\n\r\n";
  char buf[2048];
  size_t got = 0;
  ssize_t n;
  int fd;

  (void)state;
  fd = raw_connect();
  assert_true(fd >= 0);
  assert_int_equal(send(fd, req, sizeof(req) - 1, 0),
                   (ssize_t)sizeof(req) - 1);
  while (got < sizeof(buf) - 1 &&
         (n = recv(fd, buf + got, sizeof(buf) - 1 - got, 0)) > 0)
    got += (size_t)n;
  buf[got] = '\0';
  close(fd);
  /* Five segments with a ".." in the middle match no route. */
  assert_true(strncmp(buf, "HTTP/1.1 404", 12) == 0);
  assert_non_null(strstr(buf, "\"not_found\""));
}

/* ---- failures of the dependencies ---- */

/* A listening socket on a free loopback port that never accepts: the
 * kernel completes handshakes, and nothing is ever answered. */
static int silent_listener(int *port) {
  struct sockaddr_in sa = {.sin_family = AF_INET};
  socklen_t len = sizeof(sa);
  int fd = socket(AF_INET, SOCK_STREAM, 0);

  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
      listen(fd, 16) != 0 ||
      getsockname(fd, (struct sockaddr *)&sa, &len) != 0) {
    if (fd >= 0)
      close(fd);
    return -1;
  }
  *port = ntohs(sa.sin_port);
  return fd;
}

/* The HTTP helpers go back to the main admin, even after a failure. */
static int restore_target(void **state) {
  (void)state;
  g.port = fo_admin_port(g.admin);
  g.host = "127.0.0.1";
  return 0;
}

static void test_degraded_dependencies(void **state) {
  fo_admin_conf c = {.listen = "[::1]:0",
                     .token = TOKEN,
                     .timeout_s = 2,
                     .publish_timeout_ms = 700};
  fo_publish *dead_pub = NULL;
  fo_limiter *dead_redis = NULL;
  fo_admin *a = NULL;
  int64_t t0, took;
  char err[256], url[64];
  int silent, silent_port = 0;
  resp r;

  (void)state;
  assert_int_equal(fo_publish_new("127.0.0.1:1", TOPIC, &dead_pub, err,
                                  sizeof(err)),
                   FO_OK);
  /* A Redis that accepts connections and never answers: the hardest
   * case for /healthz, which must not wait for it. */
  silent = silent_listener(&silent_port);
  assert_true(silent >= 0);
  snprintf(url, sizeof(url), "redis://127.0.0.1:%d", silent_port);
  assert_int_equal(fo_limiter_open(url, false, &dead_redis), FO_OK);
  c.store = g.store;
  c.limits = dead_redis;
  c.publish = dead_pub;
  g.host = "[::1]";
  if (fo_admin_start(&c, &a, err, sizeof(err)) != FO_OK) {
    /* No IPv6 loopback here: the same checks over IPv4. */
    print_message("no [::1]: %s\n", err);
    c.listen = "127.0.0.1:0";
    g.host = "127.0.0.1";
    assert_int_equal(fo_admin_start(&c, &a, err, sizeof(err)), FO_OK);
  }
  g.port = fo_admin_port(a);

  /* /healthz says what is down, quickly. */
  t0 = fo_now_ms();
  http(&r, "GET", "/healthz", NULL);
  took = fo_now_ms() - t0;
  print_message("degraded /healthz in %lld ms: %s\n", (long long)took,
                r.body);
  expect_status(&r, 503);
  assert_string_equal(jstr(r.json, "status"), "degraded");
  assert_true(json_is_false(json_object_get(r.json, "kafka")));
  assert_true(json_is_false(json_object_get(r.json, "redis")));
  assert_true(json_is_true(json_object_get(r.json, "postgres")));
  assert_true(took < 2600);
  resp_free(&r);

  /* An event Kafka never acknowledges is a 503 after the deadline, and
   * meanwhile the server answers others. */
  {
    post_job job = {.id = "dead-e1"};
    pthread_t t;

    snprintf(job.body, sizeof(job.body),
             "{\"id\":\"dead-e1\",\"category\":\"c\",\"to\":[\"u\"]}");
    t0 = fo_now_ms();
    assert_int_equal(pthread_create(&t, NULL, post_event, &job), 0);
    sleep_ms(100);
    http(&r, "GET", "/v1/events/dead-e1", NULL);
    expect_error(&r, 404, "not_found", NULL);
    assert_true(fo_now_ms() - t0 < 600);
    resp_free(&r);
    pthread_join(t, NULL);
    took = fo_now_ms() - t0;
    assert_int_equal(job.status, 503);
    assert_true(took >= 600 && took < 3000);
  }
  http(&r, "POST", "/v1/events",
       "{\"id\":\"dead-e2\",\"category\":\"c\",\"to\":[\"u\"]}");
  expect_error(&r, 503, "kafka_timeout", NULL);
  resp_free(&r);

  /* The synchronous send: same deadline, same outcome. */
  t0 = fo_now_ms();
  assert_int_equal(fo_publish_send(dead_pub, "k", "v", 1, 300),
                   FO_ETIMEDOUT);
  took = fo_now_ms() - t0;
  assert_true(took >= 250 && took < 2000);

  /* Stopping waits for a parked request, which ends by its deadline. */
  {
    post_job job = {.id = "dead-e3"};
    pthread_t t;

    snprintf(job.body, sizeof(job.body),
             "{\"id\":\"dead-e3\",\"category\":\"c\",\"to\":[\"u\"]}");
    assert_int_equal(pthread_create(&t, NULL, post_event, &job), 0);
    sleep_ms(200);
    t0 = fo_now_ms();
    fo_admin_stop(a);
    took = fo_now_ms() - t0;
    pthread_join(t, NULL);
    print_message("stop with a parked request took %lld ms, status %ld\n",
                  (long long)took, job.status);
    assert_int_equal(job.status, 503);
    assert_true(took < 3000);
  }
  restore_target(NULL);
  t0 = fo_now_ms();
  fo_publish_free(dead_pub);
  assert_true(fo_now_ms() - t0 < 5000);
  fo_limiter_close(dead_redis);
  close(silent);
}

/* The publisher on its own: a keyed send acknowledged by the broker, a
 * send without a key, and argument checks. */
static void test_publish_direct(void **state) {
  (void)state;
  assert_int_equal(fo_publish_send(g.pub, "direct-1", "{}", 2, 5000), FO_OK);
  assert_true(kafka_has("direct-1", "{}", 2, 10000));
  assert_int_equal(fo_publish_send(g.pub, "x", "v", 1, 0), FO_EINVAL);
  assert_int_equal(fo_publish_send(g.pub, NULL, "v", 1, 1000), FO_OK);
  assert_true(fo_publish_healthy(g.pub));
}

static void test_start_refuses_bad_config(void **state) {
  static const char *const listens[] = {
      "", "localhost", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000",
      "[::1:0", "::1:0", "[::1]0",
  };
  fo_admin_conf c = {.listen = "127.0.0.1:0", .token = ""};
  fo_admin *a = NULL;
  char err[256];

  (void)state;
  assert_int_equal(fo_admin_start(&c, &a, err, sizeof(err)), FO_ECONFIG);
  assert_non_null(strstr(err, "token"));
  c.token = TOKEN;
  for (size_t i = 0; i < sizeof(listens) / sizeof(listens[0]); i++) {
    c.listen = listens[i];
    err[0] = '\0';
    assert_int_equal(fo_admin_start(&c, &a, err, sizeof(err)), FO_ECONFIG);
    assert_null(strstr(err, TOKEN));
    assert_true(strlen(err) > 0);
  }
  /* A port in use. */
  {
    char listen[64];

    snprintf(listen, sizeof(listen), "127.0.0.1:%d", fo_admin_port(g.admin));
    c.listen = listen;
    assert_int_equal(fo_admin_start(&c, &a, err, sizeof(err)), FO_EIO);
  }
  assert_null(a);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_healthz_and_metrics_need_no_token),
      cmocka_unit_test(test_every_route_needs_the_token),
      cmocka_unit_test(test_unknown_routes_are_404),
      cmocka_unit_test(test_wrong_method_is_405_with_allow),
      cmocka_unit_test(test_bad_ids_in_paths_are_400),
      cmocka_unit_test(test_body_too_large_is_413),
      cmocka_unit_test(test_media_type),
      cmocka_unit_test(test_users),
      cmocka_unit_test(test_hostile_ids_round_trip),
      cmocka_unit_test(test_devices_and_cascade),
      cmocka_unit_test(test_preferences),
      cmocka_unit_test(test_events_published),
      cmocka_unit_test(test_event_lookup),
      cmocka_unit_test(test_requests_are_counted),
      cmocka_unit_test(test_slow_client_is_dropped),
      cmocka_unit_test(test_raw_request_paths),
      cmocka_unit_test_teardown(test_degraded_dependencies, restore_target),
      cmocka_unit_test(test_publish_direct),
      cmocka_unit_test(test_start_refuses_bad_config),
  };

  return cmocka_run_group_tests_name("admin", tests, setup, teardown);
}
