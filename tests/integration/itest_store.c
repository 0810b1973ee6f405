/* SPDX-License-Identifier: MIT */
/*
 * Integration tests of the PostgreSQL store against a real server: each
 * run creates a database of its own from FANOUT_POSTGRES_DSN (the admin
 * DSN) and drops it at the end, so runs never collide. Covers the
 * migrations, every call of the store, the change listener and its
 * reconnection, deferred claims under concurrency and the delivery log
 * writer (batching, duplicates, hostile strings, database outages).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <libpq-fe.h>

#include "fanout/common.h"
#include "metrics.h"
#include "store.h"
#include "store_priv.h"

static char db_name[64];
static char db_dsn[2048];
static PGconn *admin;             /* the admin DSN's database */
static PGconn *raw;               /* the test database, for checks */
static fo_store *st;              /* pool of 4 on the test database */

/* ---- helpers ---- */

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};

  nanosleep(&ts, NULL);
}

/* Runs constant SQL on `c` and fails the test unless it succeeds. */
static PGresult *sql_on(PGconn *c, const char *q) {
  PGresult *r = PQexec(c, q);
  ExecStatusType s = PQresultStatus(r);

  if (s != PGRES_COMMAND_OK && s != PGRES_TUPLES_OK)
    fail_msg("%s: %s", q, PQresultErrorMessage(r));
  return r;
}

static void sql(const char *q) {
  PQclear(sql_on(raw, q));
}

/* The first value of a one-parameter query as an integer. */
static long long sql_int1(const char *q, const char *p1) {
  const char *p[] = {p1};
  PGresult *r = PQexecParams(raw, q, p1 != NULL ? 1 : 0, NULL,
                             p1 != NULL ? p : NULL, NULL, NULL, 0);
  long long v;

  if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) < 1)
    fail_msg("%s: %s", q, PQresultErrorMessage(r));
  v = atoll(PQgetvalue(r, 0, 0));
  PQclear(r);
  return v;
}

static long long sql_int(const char *q) {
  return sql_int1(q, NULL);
}

/* A keyword/value DSN equal to `dsn` but naming database `db`. */
static void dsn_for(const char *dsn, const char *db, char *out,
                    size_t cap) {
  PQconninfoOption *o = PQconninfoParse(dsn, NULL);
  size_t len = 0;

  assert_non_null(o);
  out[0] = '\0';
  for (PQconninfoOption *i = o; i->keyword != NULL; i++) {
    const char *v = strcmp(i->keyword, "dbname") == 0 ? db : i->val;

    if (v == NULL)
      continue;
    len += (size_t)snprintf(out + len, cap - len, "%s='", i->keyword);
    for (; *v != '\0' && len + 4 < cap; v++) {
      if (*v == '\'' || *v == '\\')
        out[len++] = '\\';
      out[len++] = *v;
    }
    len += (size_t)snprintf(out + len, cap - len, "' ");
    assert_true(len < cap);
  }
  PQconninfoFree(o);
}

static void create_db(const char *name, char *dsn, size_t cap) {
  char q[256];

  snprintf(q, sizeof(q), "DROP DATABASE IF EXISTS %s WITH (FORCE)", name);
  PQclear(sql_on(admin, q));
  snprintf(q, sizeof(q), "CREATE DATABASE %s", name);
  PQclear(sql_on(admin, q));
  dsn_for(getenv("FANOUT_POSTGRES_DSN"), name, dsn, cap);
}

static void drop_db(const char *name) {
  char q[256];

  snprintf(q, sizeof(q), "DROP DATABASE IF EXISTS %s WITH (FORCE)", name);
  PQclear(PQexec(admin, q));
}

static uint64_t counter(const char *name) {
  return fo_counter_value(fo_metrics_counter(name, "", NULL));
}

static bool is_rfc3339_ms(const char *s) {
  regex_t re;
  bool ok;

  assert_int_equal(
      regcomp(&re,
              "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
              "\\.[0-9]{3}Z$",
              REG_EXTENDED | REG_NOSUB),
      0);
  ok = s != NULL && regexec(&re, s, 0, NULL, 0) == 0;
  regfree(&re);
  return ok;
}

static void put_user(const char *id) {
  assert_int_equal(
      fo_store_user_put(st, id, NULL, NULL, NULL, NULL, NULL, NULL), FO_OK);
}

/* ---- what the listener heard ---- */

static struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  char *ids[8192];
  size_t n;
  int resets;
} heard = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, {0}, 0, 0};

static void on_change(const char *user, void *arg) {
  (void)arg;
  pthread_mutex_lock(&heard.mu);
  if (user == NULL)
    heard.resets++;
  else if (heard.n < sizeof(heard.ids) / sizeof(heard.ids[0]))
    heard.ids[heard.n++] = strdup(user);
  pthread_cond_broadcast(&heard.cv);
  pthread_mutex_unlock(&heard.mu);
}

static void heard_clear(void) {
  pthread_mutex_lock(&heard.mu);
  for (size_t i = 0; i < heard.n; i++)
    free(heard.ids[i]);
  heard.n = 0;
  pthread_mutex_unlock(&heard.mu);
}

static int resets_now(void) {
  int n;

  pthread_mutex_lock(&heard.mu);
  n = heard.resets;
  pthread_mutex_unlock(&heard.mu);
  return n;
}

static void deadline_in(struct timespec *ts, int ms) {
  clock_gettime(CLOCK_REALTIME, ts);
  ts->tv_sec += ms / 1000;
  ts->tv_nsec += (long)(ms % 1000) * 1000000;
  if (ts->tv_nsec >= 1000000000) {
    ts->tv_sec++;
    ts->tv_nsec -= 1000000000;
  }
}

/* Waits until `user` was heard (and forgets it); false after `ms`. */
static bool wait_heard(const char *user, int ms) {
  struct timespec ts;
  bool found = false;

  deadline_in(&ts, ms);
  pthread_mutex_lock(&heard.mu);
  for (;;) {
    for (size_t i = 0; i < heard.n && !found; i++) {
      if (strcmp(heard.ids[i], user) == 0) {
        free(heard.ids[i]);
        heard.ids[i] = heard.ids[--heard.n];
        found = true;
      }
    }
    if (found || pthread_cond_timedwait(&heard.cv, &heard.mu, &ts) != 0)
      break;
  }
  pthread_mutex_unlock(&heard.mu);
  return found;
}

static bool wait_resets(int above, int ms) {
  struct timespec ts;
  bool ok;

  deadline_in(&ts, ms);
  pthread_mutex_lock(&heard.mu);
  while (heard.resets <= above &&
         pthread_cond_timedwait(&heard.cv, &heard.mu, &ts) == 0)
    ;
  ok = heard.resets > above;
  pthread_mutex_unlock(&heard.mu);
  return ok;
}

/* ---- setup ---- */

/* "database ... does not exist, skipping" is expected noise. */
static void quiet_notice(void *arg, const char *message) {
  (void)arg;
  (void)message;
}

static int group_setup(void **state) {
  const char *dsn = getenv("FANOUT_POSTGRES_DSN");
  char err[256];

  (void)state;
  if (dsn == NULL) {
    fprintf(stderr, "FANOUT_POSTGRES_DSN is not set "
                    "(scripts/services.sh start, then tests/run.sh)\n");
    return -1;
  }
  admin = PQconnectdb(dsn);
  if (PQstatus(admin) != CONNECTION_OK) {
    fprintf(stderr, "cannot connect: %s", PQerrorMessage(admin));
    return -1;
  }
  PQsetNoticeProcessor(admin, quiet_notice, NULL);
  snprintf(db_name, sizeof(db_name), "fanout_itest_store_%d", (int)getpid());
  create_db(db_name, db_dsn, sizeof(db_dsn));
  raw = PQconnectdb(db_dsn);
  if (PQstatus(raw) != CONNECTION_OK)
    return -1;
  if (fo_store_open(db_dsn, 4, &st, err, sizeof(err)) != FO_OK) {
    fprintf(stderr, "fo_store_open: %s\n", err);
    return -1;
  }
  if (fo_store_listen(st, on_change, NULL) != FO_OK)
    return -1;
  return 0;
}

static int group_teardown(void **state) {
  char q[160];

  (void)state;
  fo_store_close(st);
  PQfinish(raw);
  snprintf(q, sizeof(q), "ALTER DATABASE %s ALLOW_CONNECTIONS true",
           db_name);
  PQclear(PQexec(admin, q));
  drop_db(db_name);
  PQfinish(admin);
  heard_clear();
  return 0;
}

/* ---- array literals ---- */

static void test_array_literal(void **state) {
  static const char *const hostile[] = {
      "", "NULL", "null", "a,b", "{x}", "{", "}", "\"", "\\", "\\\"",
      "a\"b\\c", " lead", "trail ", "tab\there", "new\nline",
      "\xc3\xbcnic\xc3\xb6" "de", "'; DROP TABLE users; --", "ARRAY[1]",
      "\\N", "{\"a\",\"b\"}", ",,,", "\"NULL\"", NULL};
  const size_t n = sizeof(hostile) / sizeof(hostile[0]);
  fo_buf b = FO_BUF_INIT;
  const char *p[1];
  PGresult *r;

  (void)state;
  fo_pg_array_open(&b);
  fo_pg_array_elem(&b, "a");
  fo_pg_array_elem(&b, NULL);
  fo_pg_array_elem(&b, "b\"c\\");
  fo_pg_array_close(&b);
  assert_string_equal(b.p, "{\"a\",NULL,\"b\\\"c\\\\\"}");
  free(b.p);

  memset(&b, 0, sizeof(b));
  fo_pg_array_open(&b);
  for (size_t i = 0; i < n; i++)
    fo_pg_array_elem(&b, hostile[i]);
  fo_pg_array_close(&b);
  assert_false(b.oom);
  p[0] = b.p;
  r = PQexecParams(raw,
                   "SELECT x FROM unnest($1::text[]) WITH ORDINALITY"
                   " AS t(x, i) ORDER BY i",
                   1, NULL, p, NULL, NULL, 0);
  assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
  assert_int_equal(PQntuples(r), (int)n);
  for (size_t i = 0; i < n; i++) {
    if (hostile[i] == NULL) {
      assert_true(PQgetisnull(r, (int)i, 0));
    } else {
      assert_false(PQgetisnull(r, (int)i, 0));
      assert_string_equal(PQgetvalue(r, (int)i, 0), hostile[i]);
    }
  }
  PQclear(r);
  free(b.p);

  /* An empty array is an empty list. */
  memset(&b, 0, sizeof(b));
  fo_pg_array_open(&b);
  fo_pg_array_close(&b);
  assert_string_equal(b.p, "{}");
  free(b.p);
}

/* ---- migrations ---- */

static void test_migrations_idempotent(void **state) {
  fo_store *again = NULL;
  char err[256];
  char v[16];

  (void)state;
  assert_int_equal(fo_store_open(db_dsn, 1, &again, err, sizeof(err)),
                   FO_OK);
  fo_store_close(again);
  assert_int_equal(sql_int("SELECT count(*) FROM schema_migrations"),
                   fo_store_schema_version());
  assert_int_equal(sql_int("SELECT max(version) FROM schema_migrations"),
                   fo_store_schema_version());
  snprintf(v, sizeof(v), "%d", fo_store_schema_version());
  assert_int_equal(sql_int1("SELECT count(*) FROM schema_migrations"
                            " WHERE version = $1::int", v),
                   1);
}

typedef struct opener {
  const char *dsn;
  pthread_barrier_t *go;
  int rc;
  char err[256];
} opener;

static void *open_thread(void *arg) {
  opener *o = arg;
  fo_store *s = NULL;

  pthread_barrier_wait(o->go);
  o->rc = fo_store_open(o->dsn, 1, &s, o->err, sizeof(o->err));
  if (o->rc == FO_OK)
    fo_store_close(s);
  return NULL;
}

static void test_migrations_concurrent(void **state) {
  enum { N = 4 };
  char name[80], dsn[2048];
  pthread_barrier_t go;
  pthread_t t[N];
  opener o[N];
  PGconn *c;
  PGresult *r;

  (void)state;
  snprintf(name, sizeof(name), "%s_mig", db_name);
  create_db(name, dsn, sizeof(dsn));
  pthread_barrier_init(&go, NULL, N);
  for (int i = 0; i < N; i++) {
    o[i] = (opener){.dsn = dsn, .go = &go};
    assert_int_equal(pthread_create(&t[i], NULL, open_thread, &o[i]), 0);
  }
  for (int i = 0; i < N; i++)
    pthread_join(t[i], NULL);
  pthread_barrier_destroy(&go);
  for (int i = 0; i < N; i++) {
    if (o[i].rc != FO_OK)
      fail_msg("opener %d: %s", i, o[i].err);
  }

  c = PQconnectdb(dsn);
  assert_int_equal(PQstatus(c), CONNECTION_OK);
  r = sql_on(c, "SELECT count(*), count(DISTINCT version), max(version)"
                " FROM schema_migrations");
  assert_int_equal(atoi(PQgetvalue(r, 0, 0)), fo_store_schema_version());
  assert_int_equal(atoi(PQgetvalue(r, 0, 1)), fo_store_schema_version());
  assert_int_equal(atoi(PQgetvalue(r, 0, 2)), fo_store_schema_version());
  PQclear(r);
  r = sql_on(c, "SELECT to_regclass('users') IS NOT NULL"
                " AND to_regclass('devices') IS NOT NULL"
                " AND to_regclass('preferences') IS NOT NULL"
                " AND to_regclass('deferred') IS NOT NULL"
                " AND to_regclass('delivery_log') IS NOT NULL"
                " AND to_regclass('inbox') IS NOT NULL");
  assert_string_equal(PQgetvalue(r, 0, 0), "t");
  PQclear(r);
  PQfinish(c);
  drop_db(name);
}

static void test_open_errors(void **state) {
  fo_store *s = NULL;
  char err[256];

  (void)state;
  /* Nothing listens on port 1; the password must not reach the message. */
  assert_int_equal(fo_store_open("postgresql://u:sekret@127.0.0.1:1/x", 1,
                                 &s, err, sizeof(err)),
                   FO_EIO);
  assert_null(s);
  assert_true(err[0] != '\0');
  assert_null(strstr(err, "sekret"));
  assert_int_equal(fo_store_open("host=x password=sekret%% bogus", 1, &s,
                                 err, sizeof(err)),
                   FO_EIO);
  assert_null(strstr(err, "sekret"));
  assert_int_equal(fo_store_open(db_dsn, 0, &s, err, sizeof(err)),
                   FO_EINVAL);
  assert_true(fo_store_ping(st));
}

/* ---- users ---- */

static void test_users(void **state) {
  json_t *u = NULL;
  bool created = false;
  const char *keys[] = {"id", "email", "phone", "timezone", "locale",
                        "created_at", "updated_at"};

  (void)state;
  assert_int_equal(fo_store_user_put(st, "users-1", "a@example.com",
                                     "+33600000000", "Europe/Paris", "fr",
                                     &u, &created),
                   FO_OK);
  assert_true(created);
  assert_int_equal(json_object_size(u), 7);
  for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
    assert_non_null(json_object_get(u, keys[i]));
  assert_string_equal(json_string_value(json_object_get(u, "email")),
                      "a@example.com");
  assert_true(is_rfc3339_ms(
      json_string_value(json_object_get(u, "created_at"))));
  json_decref(u);

  /* Replacing: NULL fields are stored NULL. */
  assert_int_equal(fo_store_user_put(st, "users-1", NULL, "+33611111111",
                                     NULL, "en", NULL, &created),
                   FO_OK);
  assert_false(created);
  assert_int_equal(fo_store_user_get(st, "users-1", &u), FO_OK);
  assert_string_equal(json_string_value(json_object_get(u, "id")),
                      "users-1");
  assert_true(json_is_null(json_object_get(u, "email")));
  assert_true(json_is_null(json_object_get(u, "timezone")));
  assert_string_equal(json_string_value(json_object_get(u, "phone")),
                      "+33611111111");
  assert_string_equal(json_string_value(json_object_get(u, "locale")),
                      "en");
  assert_true(is_rfc3339_ms(
      json_string_value(json_object_get(u, "updated_at"))));
  assert_true(strcmp(json_string_value(json_object_get(u, "updated_at")),
                     json_string_value(json_object_get(u, "created_at"))) >=
              0);
  json_decref(u);

  u = NULL;
  assert_int_equal(fo_store_user_get(st, "users-missing", &u), FO_ENOENT);
  assert_null(u);
  assert_int_equal(
      fo_store_user_put(st, "", NULL, NULL, NULL, NULL, NULL, NULL),
      FO_EINVAL);
  {
    char long_id[FO_EVENT_USER_MAX + 2];

    memset(long_id, 'u', sizeof(long_id) - 1);
    long_id[sizeof(long_id) - 1] = '\0';
    assert_int_equal(fo_store_user_put(st, long_id, NULL, NULL, NULL, NULL,
                                       NULL, NULL),
                     FO_EINVAL);
    long_id[FO_EVENT_USER_MAX] = '\0';
    assert_int_equal(fo_store_user_put(st, long_id, NULL, NULL, NULL, NULL,
                                       NULL, NULL),
                     FO_OK);
    assert_int_equal(fo_store_user_delete(st, long_id), FO_OK);
  }
  assert_int_equal(fo_store_user_delete(st, "users-1"), FO_OK);
  assert_int_equal(fo_store_user_delete(st, "users-1"), FO_ENOENT);
  assert_int_equal(fo_store_user_get(st, "users-1", &u), FO_ENOENT);
  /* Invalid UTF-8 is refused by the database, as bad input. */
  assert_int_equal(fo_store_user_put(st, "users-\xff", NULL, NULL, NULL,
                                     NULL, NULL, NULL),
                   FO_EINVAL);
}

static void test_user_delete_erases(void **state) {
  json_t *doc = json_pack("{s:{s:b}}", "channels", "sms", 0);

  (void)state;
  put_user("erase-1");
  put_user("erase-2");
  for (int i = 1; i <= 2; i++) {
    char u[32], tok[32];

    snprintf(u, sizeof(u), "erase-%d", i);
    snprintf(tok, sizeof(tok), "erase-tok-%d", i);
    assert_int_equal(fo_store_device_add(st, u, "fcm", tok, NULL, NULL),
                     FO_OK);
    assert_int_equal(fo_store_prefs_put(st, u, doc), FO_OK);
    assert_int_equal(fo_store_defer(st, "{\"id\":\"e\"}", u, FO_CH_PUSH,
                                    fo_wall_ms() + 3600000,
                                    fo_wall_ms() + 7200000),
                     FO_OK);
  }
  sql("INSERT INTO inbox (user_id, event_id, payload) VALUES"
      " ('erase-1', 'e', '{}'), ('erase-2', 'e', '{}')");

  assert_int_equal(fo_store_user_delete(st, "erase-1"), FO_OK);
  assert_int_equal(sql_int("SELECT (SELECT count(*) FROM devices"
                           " WHERE user_id = 'erase-1')"
                           " + (SELECT count(*) FROM preferences"
                           " WHERE user_id = 'erase-1')"
                           " + (SELECT count(*) FROM inbox"
                           " WHERE user_id = 'erase-1')"
                           " + (SELECT count(*) FROM deferred"
                           " WHERE user_id = 'erase-1')"),
                   0);
  /* The other user keeps everything. */
  assert_int_equal(sql_int("SELECT (SELECT count(*) FROM devices"
                           " WHERE user_id = 'erase-2')"
                           " + (SELECT count(*) FROM preferences"
                           " WHERE user_id = 'erase-2')"
                           " + (SELECT count(*) FROM inbox"
                           " WHERE user_id = 'erase-2')"
                           " + (SELECT count(*) FROM deferred"
                           " WHERE user_id = 'erase-2')"),
                   4);
  assert_int_equal(fo_store_user_delete(st, "erase-2"), FO_OK);
  json_decref(doc);
}

/* ---- devices ---- */

static void test_devices(void **state) {
  json_t *d = NULL, *l = NULL, *e;

  (void)state;
  assert_int_equal(
      fo_store_device_add(st, "dev-missing", "apns", "t1", NULL, &d),
      FO_ENOENT);
  assert_null(d);
  put_user("dev-1");
  assert_int_equal(fo_store_device_add(st, "dev-1", "mqtt", "t1", NULL, &d),
                   FO_EINVAL);
  assert_int_equal(fo_store_device_add(st, "dev-1", "apns", "", NULL, &d),
                   FO_EINVAL);
  assert_int_equal(fo_store_device_add(st, "dev-1", NULL, "t1", NULL, &d),
                   FO_EINVAL);

  assert_int_equal(fo_store_device_add(st, "dev-1", "apns", "t1", NULL, &d),
                   FO_OK);
  assert_string_equal(json_string_value(json_object_get(d, "platform")),
                      "apns");
  assert_string_equal(json_string_value(json_object_get(d, "token")), "t1");
  assert_string_equal(json_string_value(json_object_get(d, "app")),
                      "default");
  assert_true(is_rfc3339_ms(
      json_string_value(json_object_get(d, "registered_at"))));
  assert_true(json_is_null(json_object_get(d, "invalid_since")));
  assert_int_equal(json_object_size(d), 5);
  json_decref(d);
  assert_int_equal(
      fo_store_device_add(st, "dev-1", "fcm", "t2", "com.example", NULL),
      FO_OK);

  assert_int_equal(fo_store_device_list(st, "dev-1", &l), FO_OK);
  assert_int_equal(json_array_size(l), 2);
  e = json_array_get(l, 1);
  assert_string_equal(json_string_value(json_object_get(e, "token")), "t2");
  assert_string_equal(json_string_value(json_object_get(e, "app")),
                      "com.example");
  assert_string_equal(json_string_value(json_object_get(e, "platform")),
                      "fcm");
  json_decref(l);

  assert_int_equal(fo_store_device_delete(st, "dev-1", "t1"), FO_OK);
  assert_int_equal(fo_store_device_delete(st, "dev-1", "t1"), FO_ENOENT);
  assert_int_equal(fo_store_device_delete(st, "dev-missing", "t2"),
                   FO_ENOENT);
  assert_int_equal(fo_store_device_list(st, "dev-1", &l), FO_OK);
  assert_int_equal(json_array_size(l), 1);
  json_decref(l);
  assert_int_equal(fo_store_device_list(st, "dev-missing", &l), FO_ENOENT);

  /* A user with no device lists an empty array. */
  put_user("dev-2");
  assert_int_equal(fo_store_device_list(st, "dev-2", &l), FO_OK);
  assert_true(json_is_array(l));
  assert_int_equal(json_array_size(l), 0);
  json_decref(l);
}

static void test_device_moves(void **state) {
  json_t *l = NULL;

  (void)state;
  put_user("move-a");
  put_user("move-b");
  heard_clear();
  assert_int_equal(
      fo_store_device_add(st, "move-a", "apns", "move-tok", NULL, NULL),
      FO_OK);
  assert_true(wait_heard("move-a", 1000));
  assert_int_equal(
      fo_store_device_add(st, "move-b", "apns", "move-tok", NULL, NULL),
      FO_OK);
  assert_true(wait_heard("move-a", 1000));
  assert_true(wait_heard("move-b", 1000));

  assert_int_equal(fo_store_device_list(st, "move-a", &l), FO_OK);
  assert_int_equal(json_array_size(l), 0);
  json_decref(l);
  assert_int_equal(fo_store_device_list(st, "move-b", &l), FO_OK);
  assert_int_equal(json_array_size(l), 1);
  json_decref(l);
  assert_int_equal(sql_int("SELECT count(*) FROM devices"
                           " WHERE token = 'move-tok'"),
                   1);
}

/* Registrations racing for one token: only one user keeps it. */
typedef struct racer {
  const char *user;
  int rc;
} racer;

static void *race_thread(void *arg) {
  racer *r = arg;

  for (int i = 0; i < 20 && r->rc == FO_OK; i++)
    r->rc = fo_store_device_add(st, r->user, "fcm", "race-tok", NULL, NULL);
  return NULL;
}

static void test_device_race(void **state) {
  racer r[2] = {{"race-a", FO_OK}, {"race-b", FO_OK}};
  pthread_t t[2];

  (void)state;
  put_user("race-a");
  put_user("race-b");
  for (int i = 0; i < 2; i++)
    pthread_create(&t[i], NULL, race_thread, &r[i]);
  for (int i = 0; i < 2; i++)
    pthread_join(t[i], NULL);
  assert_int_equal(r[0].rc, FO_OK);
  assert_int_equal(r[1].rc, FO_OK);
  assert_int_equal(sql_int("SELECT count(*) FROM devices"
                           " WHERE token = 'race-tok'"),
                   1);
}

static void test_invalidate(void **state) {
  fo_recipient *r = NULL;
  json_t *l = NULL;
  int64_t at;

  (void)state;
  put_user("inv-1");
  assert_int_equal(
      fo_store_device_add(st, "inv-1", "apns", "inv-tok", NULL, NULL),
      FO_OK);
  sleep_ms(20);
  at = fo_wall_ms();
  assert_int_equal(fo_store_device_invalidate(st, "apns", "inv-tok", at),
                   FO_OK);
  /* Already invalid, wrong platform, unknown token. */
  assert_int_equal(
      fo_store_device_invalidate(st, "apns", "inv-tok", at + 1000),
      FO_ENOENT);
  assert_int_equal(fo_store_device_invalidate(st, "fcm", "inv-tok", at),
                   FO_ENOENT);
  assert_int_equal(fo_store_device_invalidate(st, "apns", "nope", at),
                   FO_ENOENT);

  assert_int_equal(fo_store_device_list(st, "inv-1", &l), FO_OK);
  assert_true(is_rfc3339_ms(json_string_value(
      json_object_get(json_array_get(l, 0), "invalid_since"))));
  json_decref(l);
  assert_int_equal(fo_store_load_recipient(st, "inv-1", &r), FO_OK);
  assert_int_equal(r->ndevices, 1);
  assert_int_equal(r->devices[0].invalid_since_ms, at);
  fo_recipient_unref(r);

  /* Registered again: valid, and a failure reported for a send made
   * before the new registration does not kill it. */
  sleep_ms(20);
  assert_int_equal(
      fo_store_device_add(st, "inv-1", "apns", "inv-tok", NULL, NULL),
      FO_OK);
  assert_int_equal(fo_store_load_recipient(st, "inv-1", &r), FO_OK);
  assert_int_equal(r->devices[0].invalid_since_ms, 0);
  fo_recipient_unref(r);
  assert_int_equal(
      fo_store_device_invalidate(st, "apns", "inv-tok", at + 10),
      FO_ENOENT);
  assert_int_equal(fo_store_device_list(st, "inv-1", &l), FO_OK);
  assert_true(json_is_null(
      json_object_get(json_array_get(l, 0), "invalid_since")));
  json_decref(l);
  sleep_ms(5);
  assert_int_equal(
      fo_store_device_invalidate(st, "apns", "inv-tok", fo_wall_ms()),
      FO_OK);
}

/* ---- preferences ---- */

typedef struct patch_arg {
  const json_t *patch;
  int calls;
  int fail_rc;                  /* non-zero: abort with it */
} patch_arg;

static json_t *apply_patch(const json_t *cur, void *arg, int *fn_rc) {
  patch_arg *a = arg;

  a->calls++;
  if (a->fail_rc != 0) {
    *fn_rc = a->fail_rc;
    return NULL;
  }
  return fo_json_merge_patch(json_deep_copy(cur), a->patch);
}

static void test_prefs(void **state) {
  json_t *doc = json_loads("{\"channels\":{\"sms\":false},"
                           "\"caps\":{\"push\":{\"limit\":3,"
                           "\"per\":\"hour\"}}}",
                           0, NULL);
  json_t *patch = json_loads("{\"channels\":{\"email\":false},"
                             "\"caps\":null}",
                             0, NULL);
  json_t *got = NULL, *want;
  patch_arg pa = {patch, 0, 0};

  (void)state;
  assert_int_equal(fo_store_prefs_get(st, "prefs-missing", &got),
                   FO_ENOENT);
  assert_int_equal(fo_store_prefs_put(st, "prefs-missing", doc), FO_ENOENT);
  assert_int_equal(
      fo_store_prefs_update(st, "prefs-missing", apply_patch, &pa, &got),
      FO_ENOENT);
  assert_int_equal(pa.calls, 0);

  put_user("prefs-1");
  assert_int_equal(fo_store_prefs_get(st, "prefs-1", &got), FO_OK);
  assert_true(json_is_object(got));
  assert_int_equal(json_object_size(got), 0);
  json_decref(got);

  want = json_integer(1);
  assert_int_equal(fo_store_prefs_put(st, "prefs-1", want), FO_EINVAL);
  json_decref(want);
  assert_int_equal(fo_store_prefs_put(st, "prefs-1", doc), FO_OK);
  assert_int_equal(fo_store_prefs_get(st, "prefs-1", &got), FO_OK);
  assert_true(json_equal(got, doc));
  json_decref(got);

  got = NULL;
  assert_int_equal(
      fo_store_prefs_update(st, "prefs-1", apply_patch, &pa, &got), FO_OK);
  assert_int_equal(pa.calls, 1);
  want = json_loads("{\"channels\":{\"sms\":false,\"email\":false}}", 0,
                    NULL);
  assert_true(json_equal(got, want));
  json_decref(got);
  assert_int_equal(fo_store_prefs_get(st, "prefs-1", &got), FO_OK);
  assert_true(json_equal(got, want));
  json_decref(got);

  /* An aborted update returns fn's code and changes nothing. */
  pa.fail_rc = FO_EINVAL;
  got = NULL;
  assert_int_equal(
      fo_store_prefs_update(st, "prefs-1", apply_patch, &pa, &got),
      FO_EINVAL);
  assert_null(got);
  assert_int_equal(fo_store_prefs_get(st, "prefs-1", &got), FO_OK);
  assert_true(json_equal(got, want));
  json_decref(got);
  json_decref(want);

  /* The pool is left clean: the next calls work on every connection. */
  for (int i = 0; i < 8; i++) {
    assert_int_equal(fo_store_prefs_get(st, "prefs-1", &got), FO_OK);
    json_decref(got);
  }

  /* A user without preferences patches from {}. */
  put_user("prefs-2");
  pa.fail_rc = 0;
  assert_int_equal(
      fo_store_prefs_update(st, "prefs-2", apply_patch, &pa, NULL), FO_OK);
  assert_int_equal(fo_store_prefs_get(st, "prefs-2", &got), FO_OK);
  assert_true(json_is_false(
      json_object_get(json_object_get(got, "channels"), "email")));
  assert_null(json_object_get(got, "caps"));
  json_decref(got);
  json_decref(doc);
  json_decref(patch);
}

/* Increments {"n"} under prefs_update: lost updates show as a short
 * count. The user starts with no preferences row at all. */
static json_t *increment(const json_t *cur, void *arg, int *fn_rc) {
  json_t *next = json_deep_copy(cur);

  (void)arg;
  (void)fn_rc;
  json_object_set_new(
      next, "n",
      json_integer(json_integer_value(json_object_get(cur, "n")) + 1));
  return next;
}

static void *increment_thread(void *arg) {
  int *rc = arg;

  for (int i = 0; i < 25 && *rc == FO_OK; i++)
    *rc = fo_store_prefs_update(st, "prefs-count", increment, NULL, NULL);
  return NULL;
}

static void test_prefs_update_serialises(void **state) {
  pthread_t t[4];
  int rc[4] = {0};
  json_t *got = NULL;

  (void)state;
  put_user("prefs-count");
  for (int i = 0; i < 4; i++)
    pthread_create(&t[i], NULL, increment_thread, &rc[i]);
  for (int i = 0; i < 4; i++)
    pthread_join(t[i], NULL);
  for (int i = 0; i < 4; i++)
    assert_int_equal(rc[i], FO_OK);
  assert_int_equal(fo_store_prefs_get(st, "prefs-count", &got), FO_OK);
  assert_int_equal(json_integer_value(json_object_get(got, "n")), 100);
  json_decref(got);
}

/* ---- recipients ---- */

static void test_load_recipient(void **state) {
  json_t *doc = json_loads(
      "{\"channels\":{\"sms\":false},\"quiet_hours\":{\"start\":\"22:00\","
      "\"end\":\"07:00\",\"timezone\":\"Europe/Paris\"}}",
      0, NULL);
  fo_recipient *r = NULL;
  int64_t *lat;
  const int rounds = 2000;
  int64_t sum = 0;

  (void)state;
  assert_int_equal(fo_store_load_recipient(st, "rcpt-missing", &r),
                   FO_ENOENT);
  assert_null(r);
  assert_int_equal(fo_store_user_put(st, "rcpt-1", "r@example.com", NULL,
                                     "Asia/Tokyo", "ja", NULL, NULL),
                   FO_OK);

  /* No devices and no preferences: the defaults. */
  assert_int_equal(fo_store_load_recipient(st, "rcpt-1", &r), FO_OK);
  assert_string_equal(r->id, "rcpt-1");
  assert_string_equal(r->email, "r@example.com");
  assert_null(r->phone);
  assert_string_equal(r->timezone, "Asia/Tokyo");
  assert_string_equal(r->locale, "ja");
  assert_int_equal(r->ndevices, 0);
  assert_int_equal(r->prefs.channels_on, FO_CH_MASK_ALL);
  assert_false(r->prefs.quiet.enabled);
  fo_recipient_unref(r);

  assert_int_equal(
      fo_store_device_add(st, "rcpt-1", "apns", "rcpt-a", "ios", NULL),
      FO_OK);
  sleep_ms(2);
  assert_int_equal(
      fo_store_device_add(st, "rcpt-1", "fcm", "rcpt-f", NULL, NULL),
      FO_OK);
  sleep_ms(2);
  assert_int_equal(
      fo_store_device_add(st, "rcpt-1", "fcm", "rcpt-dead", NULL, NULL),
      FO_OK);
  sleep_ms(2);
  assert_int_equal(fo_store_device_invalidate(st, "fcm", "rcpt-dead",
                                              1700000000123 + 86400000LL *
                                                  365 * 10),
                   FO_OK);
  assert_int_equal(fo_store_prefs_put(st, "rcpt-1", doc), FO_OK);

  assert_int_equal(fo_store_load_recipient(st, "rcpt-1", &r), FO_OK);
  assert_int_equal(r->ndevices, 3);
  assert_string_equal(r->devices[0].token, "rcpt-a");
  assert_string_equal(r->devices[0].app, "ios");
  assert_true(r->devices[0].apns);
  assert_int_equal(r->devices[0].kind, FO_CH_PUSH);
  assert_int_equal(r->devices[0].invalid_since_ms, 0);
  assert_string_equal(r->devices[1].token, "rcpt-f");
  assert_string_equal(r->devices[1].app, "default");
  assert_false(r->devices[1].apns);
  assert_string_equal(r->devices[2].token, "rcpt-dead");
  assert_int_equal(r->devices[2].invalid_since_ms,
                   1700000000123 + 86400000LL * 365 * 10);
  assert_int_equal(r->prefs.channels_on & (1u << FO_CH_SMS), 0);
  assert_true((r->prefs.channels_on & (1u << FO_CH_PUSH)) != 0);
  assert_true(r->prefs.quiet.enabled);
  assert_int_equal(r->prefs.quiet.start_min, 22 * 60);
  assert_int_equal(r->prefs.quiet.end_min, 7 * 60);
  assert_string_equal(r->prefs.quiet.timezone, "Europe/Paris");

  /* References: the recipient outlives the loader's reference. */
  fo_recipient_ref(r);
  fo_recipient_unref(r);
  assert_string_equal(r->devices[0].token, "rcpt-a");
  fo_recipient_unref(r);

  /* A stored document the rules now refuse: defaults, no failure. */
  sql("UPDATE preferences SET doc = '{\"channels\": 5, \"x\": []}'"
      " WHERE user_id = 'rcpt-1'");
  assert_int_equal(fo_store_load_recipient(st, "rcpt-1", &r), FO_OK);
  assert_int_equal(r->prefs.channels_on, FO_CH_MASK_ALL);
  assert_int_equal(r->ndevices, 3);
  fo_recipient_unref(r);
  assert_int_equal(fo_store_prefs_put(st, "rcpt-1", doc), FO_OK);

  /* Latency of the one round trip, three devices and preferences. */
  lat = calloc((size_t)rounds, sizeof(*lat));
  assert_non_null(lat);
  for (int i = 0; i < rounds; i++) {
    int64_t t0 = fo_now_us();

    assert_int_equal(fo_store_load_recipient(st, "rcpt-1", &r), FO_OK);
    lat[i] = fo_now_us() - t0;
    sum += lat[i];
    fo_recipient_unref(r);
  }
  for (int i = 1; i < rounds; i++) {
    for (int j = i; j > 0 && lat[j - 1] > lat[j]; j--) {
      int64_t t = lat[j];

      lat[j] = lat[j - 1];
      lat[j - 1] = t;
    }
  }
  printf("load_recipient: %d loads, mean %lld us, p50 %lld us, "
         "p99 %lld us\n",
         rounds, (long long)(sum / rounds), (long long)lat[rounds / 2],
         (long long)lat[rounds * 99 / 100]);
  free(lat);
  json_decref(doc);
}

/* ---- change notifications ---- */

static void test_listen_each_change(void **state) {
  json_t *doc = json_pack("{s:{s:b}}", "channels", "email", 0);
  json_t *patch = json_pack("{s:{s:b}}", "channels", "push", 0);
  patch_arg pa = {patch, 0, 0};

  (void)state;
  heard_clear();
  put_user("ln-user");
  assert_true(wait_heard("ln-user", 1000));
  assert_int_equal(
      fo_store_user_put(st, "ln-user", "x@y", NULL, NULL, NULL, NULL, NULL),
      FO_OK);
  assert_true(wait_heard("ln-user", 1000));

  assert_int_equal(
      fo_store_device_add(st, "ln-user", "fcm", "ln-tok", NULL, NULL),
      FO_OK);
  assert_true(wait_heard("ln-user", 1000));
  sleep_ms(5);
  assert_int_equal(
      fo_store_device_invalidate(st, "fcm", "ln-tok", fo_wall_ms()), FO_OK);
  assert_true(wait_heard("ln-user", 1000));
  assert_int_equal(fo_store_device_delete(st, "ln-user", "ln-tok"), FO_OK);
  assert_true(wait_heard("ln-user", 1000));

  assert_int_equal(fo_store_prefs_put(st, "ln-user", doc), FO_OK);
  assert_true(wait_heard("ln-user", 1000));
  assert_int_equal(
      fo_store_prefs_update(st, "ln-user", apply_patch, &pa, NULL), FO_OK);
  assert_true(wait_heard("ln-user", 1000));

  assert_int_equal(fo_store_user_delete(st, "ln-user"), FO_OK);
  assert_true(wait_heard("ln-user", 1000));

  /* Failed calls change nothing and notify nothing. */
  assert_int_equal(fo_store_user_delete(st, "ln-user"), FO_ENOENT);
  pa.fail_rc = FO_EINVAL;
  put_user("ln-user2");
  assert_true(wait_heard("ln-user2", 1000));
  assert_int_equal(
      fo_store_prefs_update(st, "ln-user2", apply_patch, &pa, NULL),
      FO_EINVAL);
  assert_false(wait_heard("ln-user", 300));
  assert_false(wait_heard("ln-user2", 1));
  json_decref(doc);
  json_decref(patch);
}

static void test_listen_reconnects(void **state) {
  int before = resets_now();
  PGresult *r;

  (void)state;
  r = sql_on(raw, "SELECT pg_terminate_backend(pid, 5000)"
                  " FROM pg_stat_activity"
                  " WHERE datname = current_database()"
                  " AND application_name = 'fanoutd-listen'");
  assert_int_equal(PQntuples(r), 1);
  assert_string_equal(PQgetvalue(r, 0, 0), "t");
  PQclear(r);
  assert_true(wait_resets(before, 3000));
  heard_clear();
  put_user("ln-after");
  assert_true(wait_heard("ln-after", 1000));
}

/* Pool connections killed under the store: the next calls, deletes
 * included, find them dead before use and reconnect. */
static void test_pool_reconnects(void **state) {
  json_t *u = NULL;
  PGresult *r;

  (void)state;
  put_user("pool-1");
  r = sql_on(raw, "SELECT pg_terminate_backend(pid, 5000)"
                  " FROM pg_stat_activity"
                  " WHERE datname = current_database()"
                  " AND application_name = 'fanoutd'");
  assert_true(PQntuples(r) >= 4);
  PQclear(r);
  assert_int_equal(fo_store_user_delete(st, "pool-1"), FO_OK);
  for (int i = 0; i < 6; i++) {
    assert_int_equal(fo_store_user_get(st, "pool-1", &u), FO_ENOENT);
  }
  assert_true(fo_store_ping(st));
}

/* ---- deferred ---- */

static void test_deferred(void **state) {
  fo_deferred *rows = NULL;
  int64_t now = fo_wall_ms();
  int n;

  (void)state;
  sql("DELETE FROM deferred");
  assert_int_equal(fo_store_defer(st, "{\"id\":\"d1\"}", "def-u",
                                  FO_CH_SMS, now - 1000, now + 60000),
                   FO_OK);
  assert_int_equal(fo_store_defer(st, "{\"id\":\"d2\"}", "def-u",
                                  FO_CH_PUSH, now - 500, now + 60000),
                   FO_OK);
  assert_int_equal(fo_store_defer(st, "{\"id\":\"later\"}", "def-u",
                                  FO_CH_EMAIL, now + 3600000, now + 7200000),
                   FO_OK);
  assert_int_equal(fo_store_defer(st, "{not json", "def-u", FO_CH_SMS, now,
                                  now + 1000),
                   FO_EINVAL);
  assert_int_equal(fo_store_defer(st, "{}", "def-u", (fo_channel_kind)9,
                                  now, now + 1000),
                   FO_EINVAL);

  n = fo_store_claim_due(st, 10, 60000, &rows);
  assert_int_equal(n, 2);
  for (int i = 0; i < n; i++) {
    json_t *ev = json_loads(rows[i].event_json, 0, NULL);
    const char *id = json_string_value(json_object_get(ev, "id"));

    assert_non_null(id);
    assert_string_equal(rows[i].user, "def-u");
    assert_int_equal(rows[i].expires_ms, now + 60000);
    if (strcmp(id, "d1") == 0)
      assert_int_equal(rows[i].channel, FO_CH_SMS);
    else
      assert_int_equal(rows[i].channel, FO_CH_PUSH);
    json_decref(ev);
  }
  /* Leased: a second claim gets nothing. */
  {
    fo_deferred *none = NULL;

    assert_int_equal(fo_store_claim_due(st, 10, 60000, &none), 0);
    fo_deferred_free(none, 0);
  }
  assert_int_equal(fo_store_deferred_done(st, rows[0].id), FO_OK);
  assert_int_equal(fo_store_deferred_done(st, rows[0].id), FO_ENOENT);
  assert_int_equal(fo_store_deferred_done(st, rows[1].id), FO_OK);
  fo_deferred_free(rows, n);

  /* A lease that runs out gives the row back. */
  assert_int_equal(fo_store_defer(st, "{\"id\":\"d3\"}", "def-u",
                                  FO_CH_INAPP, now - 10, now + 60000),
                   FO_OK);
  n = fo_store_claim_due(st, 10, 200, &rows);
  assert_int_equal(n, 1);
  fo_deferred_free(rows, n);
  n = fo_store_claim_due(st, 10, 200, &rows);
  assert_int_equal(n, 0);
  fo_deferred_free(rows, n);
  sleep_ms(300);
  n = fo_store_claim_due(st, 10, 60000, &rows);
  assert_int_equal(n, 1);
  assert_int_equal(rows[0].channel, FO_CH_INAPP);
  assert_int_equal(fo_store_deferred_done(st, rows[0].id), FO_OK);
  fo_deferred_free(rows, n);
  assert_int_equal(fo_store_claim_due(st, 0, 1000, &rows), 0);
  assert_int_equal(fo_store_claim_due(st, 5, 0, &rows), FO_EINVAL);
  sql("DELETE FROM deferred");
}

typedef struct claimer {
  int64_t *ids;
  int n;
  int err;
} claimer;

static void *claim_thread(void *arg) {
  claimer *c = arg;
  int empty = 0;

  while (empty < 3) {
    fo_deferred *rows = NULL;
    int n = fo_store_claim_due(st, 25, 600000, &rows);

    if (n < 0) {
      c->err = n;
      return NULL;
    }
    empty = n == 0 ? empty + 1 : 0;
    for (int i = 0; i < n; i++)
      c->ids[c->n++] = rows[i].id;
    fo_deferred_free(rows, n);
  }
  return NULL;
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

  return x < y ? -1 : x > y;
}

static void test_deferred_concurrent_claims(void **state) {
  enum { ROWS = 2000 };
  claimer c[2];
  pthread_t t[2];
  int64_t *all = calloc(ROWS * 2, sizeof(*all));
  int total = 0;

  (void)state;
  assert_non_null(all);
  sql("DELETE FROM deferred");
  sql("INSERT INTO deferred (event, user_id, channel, due_at, expires_at)"
      " SELECT jsonb_build_object('id', 'c' || g), 'claim-u', 'push',"
      " now() - interval '1 minute', now() + interval '1 hour'"
      " FROM generate_series(1, 2000) g");
  for (int i = 0; i < 2; i++) {
    c[i] = (claimer){calloc(ROWS, sizeof(int64_t)), 0, 0};
    pthread_create(&t[i], NULL, claim_thread, &c[i]);
  }
  for (int i = 0; i < 2; i++)
    pthread_join(t[i], NULL);
  for (int i = 0; i < 2; i++) {
    assert_int_equal(c[i].err, 0);
    memcpy(all + total, c[i].ids, (size_t)c[i].n * sizeof(int64_t));
    total += c[i].n;
    free(c[i].ids);
  }
  printf("claims: %d and %d rows\n", c[0].n, c[1].n);
  assert_int_equal(total, ROWS);
  qsort(all, (size_t)total, sizeof(*all), cmp_i64);
  for (int i = 1; i < total; i++)
    assert_true(all[i] != all[i - 1]);
  assert_true(c[0].n > 0 && c[1].n > 0);
  free(all);
  sql("DELETE FROM deferred");
}

/* ---- delivery log ---- */

static void test_dlog_batches(void **state) {
  enum { N = 10000 };
  uint64_t b0 = counter("fanout_delivery_log_batches_total");
  uint64_t w0 = counter("fanout_delivery_log_written_total");
  uint64_t d0 = counter("fanout_delivery_log_dropped_total");
  fo_dlog *l = NULL;
  int64_t t0, took;

  (void)state;
  assert_int_equal(fo_dlog_start(st, 20000, &l), FO_OK);
  t0 = fo_now_us();
  for (int i = 0; i < N; i++) {
    char ev[32];

    snprintf(ev, sizeof(ev), "batch-%05d", i);
    fo_dlog_record(l, ev, "batch-user", (fo_channel_kind)(i % 4),
                   FO_STATUS_SENT, NULL, 1, "pid");
  }
  assert_int_equal(fo_dlog_flush(l, 30000), FO_OK);
  took = fo_now_us() - t0;
  fo_dlog_stop(l);

  assert_int_equal(sql_int("SELECT count(*) FROM delivery_log"
                           " WHERE event_id LIKE 'batch-%'"),
                   N);
  assert_int_equal(counter("fanout_delivery_log_written_total") - w0, N);
  assert_int_equal(counter("fanout_delivery_log_dropped_total") - d0, 0);
  printf("dlog: %d records in %lld ms (%.0f records/s), %llu batches\n", N,
         (long long)(took / 1000), N * 1e6 / (double)took,
         (unsigned long long)(counter("fanout_delivery_log_batches_total") -
                              b0));
  assert_true(counter("fanout_delivery_log_batches_total") - b0 <= 100);
  assert_true(counter("fanout_delivery_log_batches_total") - b0 >= 5);
}

static void test_dlog_duplicates(void **state) {
  fo_dlog *l = NULL;
  PGconn *held[4];
  uint64_t b0;
  PGresult *r;

  (void)state;
  assert_int_equal(fo_dlog_start(st, 1000, &l), FO_OK);
  /* Park the writer on a blocker record while it waits for a
   * connection, so the next records surely share one batch. */
  for (int i = 0; i < 4; i++)
    assert_int_equal(fo_pool_get(st, &held[i]), FO_OK);
  b0 = counter("fanout_delivery_log_batches_total");
  fo_dlog_record(l, "dup-blocker", "dup-u", FO_CH_PUSH, FO_STATUS_SENT, NULL,
                 1, NULL);
  sleep_ms(400);
  fo_dlog_record(l, "dup-1", "dup-u", FO_CH_PUSH, FO_STATUS_DEFERRED,
                 "quiet_hours", 1, "first-id");
  fo_dlog_record(l, "dup-1", "dup-v", FO_CH_PUSH, FO_STATUS_FAILED, "x", 1,
                 NULL);
  fo_dlog_record(l, "dup-1", "dup-u", FO_CH_PUSH, FO_STATUS_SENT, NULL, 2,
                 NULL);
  fo_dlog_record(l, "dup-1", "dup-u", FO_CH_SMS, FO_STATUS_SENT, "", 3,
                 "sms-id");
  for (int i = 0; i < 4; i++)
    fo_pool_put(st, held[i]);
  assert_int_equal(fo_dlog_flush(l, 5000), FO_OK);
  /* The blocker's batch and one for the four (or all five together,
   * should the writer have been slow to wake): collapsed, never retried
   * one row per statement. */
  assert_in_range(counter("fanout_delivery_log_batches_total") - b0, 1, 2);

  r = sql_on(raw, "SELECT user_id, channel, status, reason, attempts,"
                  " provider_id FROM delivery_log WHERE event_id = 'dup-1'"
                  " ORDER BY user_id, channel");
  assert_int_equal(PQntuples(r), 3);
  /* The later outcome wins; a provider id already known is kept. */
  assert_string_equal(PQgetvalue(r, 0, 1), "push");
  assert_string_equal(PQgetvalue(r, 0, 2), "sent");
  assert_true(PQgetisnull(r, 0, 3));
  assert_string_equal(PQgetvalue(r, 0, 4), "2");
  assert_true(PQgetisnull(r, 0, 5));
  assert_string_equal(PQgetvalue(r, 1, 1), "sms");
  assert_true(PQgetisnull(r, 1, 3));
  assert_string_equal(PQgetvalue(r, 1, 5), "sms-id");
  assert_string_equal(PQgetvalue(r, 2, 0), "dup-v");
  PQclear(r);

  /* Across batches the provider id survives an update without one. */
  fo_dlog_record(l, "dup-1", "dup-u", FO_CH_SMS, FO_STATUS_FAILED, "late",
                 4, NULL);
  assert_int_equal(fo_dlog_flush(l, 5000), FO_OK);
  r = sql_on(raw, "SELECT status, reason, attempts, provider_id"
                  " FROM delivery_log WHERE event_id = 'dup-1'"
                  " AND user_id = 'dup-u' AND channel = 'sms'");
  assert_string_equal(PQgetvalue(r, 0, 0), "failed");
  assert_string_equal(PQgetvalue(r, 0, 1), "late");
  assert_string_equal(PQgetvalue(r, 0, 2), "4");
  assert_string_equal(PQgetvalue(r, 0, 3), "sms-id");
  PQclear(r);
  fo_dlog_stop(l);
}

static void test_dlog_hostile_strings(void **state) {
  static const char *const s[] = {
      "NULL", "null", "\"", "\\", "\\\\\"", "a,b", "{x}", "{", "}",
      "a\"b\\c{,}", " sp ", "tab\tnl\n", "\xc3\xa9t\xc3\xa9 \xe2\x82\xac",
      "'; DROP TABLE delivery_log; --", "$1", "\\N", "ARRAY['x']"};
  const int n = (int)(sizeof(s) / sizeof(s[0]));
  fo_dlog *l = NULL;

  (void)state;
  assert_int_equal(fo_dlog_start(st, 1000, &l), FO_OK);
  for (int i = 0; i < n; i++) {
    fo_dlog_record(l, s[i], s[(i + 1) % n], FO_CH_EMAIL, FO_STATUS_FAILED,
                   s[(i + 2) % n], (uint32_t)i, s[(i + 3) % n]);
  }
  /* Invalid UTF-8 (a reason cut mid-character) is stored repaired. */
  fo_dlog_record(l, "utf8-evt", "utf8-u", FO_CH_SMS, FO_STATUS_FAILED,
                 "caf\xc3", 1, "\xff\xfe" "ok");
  assert_int_equal(fo_dlog_flush(l, 5000), FO_OK);
  fo_dlog_stop(l);

  for (int i = 0; i < n; i++) {
    const char *p[] = {s[i]};
    PGresult *r = PQexecParams(raw,
                               "SELECT user_id, reason, attempts,"
                               " provider_id FROM delivery_log"
                               " WHERE event_id = $1",
                               1, NULL, p, NULL, NULL, 0);

    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    assert_int_equal(PQntuples(r), 1);
    assert_string_equal(PQgetvalue(r, 0, 0), s[(i + 1) % n]);
    assert_string_equal(PQgetvalue(r, 0, 1), s[(i + 2) % n]);
    assert_int_equal(atoi(PQgetvalue(r, 0, 2)), i);
    assert_string_equal(PQgetvalue(r, 0, 3), s[(i + 3) % n]);
    PQclear(r);
  }
  {
    PGresult *r = sql_on(raw, "SELECT reason, provider_id FROM delivery_log"
                              " WHERE event_id = 'utf8-evt'");

    assert_string_equal(PQgetvalue(r, 0, 0), "caf?");
    assert_string_equal(PQgetvalue(r, 0, 1), "??ok");
    PQclear(r);
  }
  assert_true(sql_int("SELECT count(*) FROM delivery_log") > 0);
}

/* A row the database refuses is dropped alone: the batch falls back to
 * one statement per row, and the others land. */
static void test_dlog_refused_row(void **state) {
  uint64_t d0 = counter("fanout_delivery_log_dropped_total");
  fo_dlog *l = NULL;

  (void)state;
  sql("ALTER TABLE delivery_log ADD CONSTRAINT itest_refuse"
      " CHECK (reason IS DISTINCT FROM 'refuse-me')");
  assert_int_equal(fo_dlog_start(st, 100, &l), FO_OK);
  fo_dlog_record(l, "refuse-1", "u", FO_CH_PUSH, FO_STATUS_SENT, NULL, 1,
                 NULL);
  fo_dlog_record(l, "refuse-2", "u", FO_CH_PUSH, FO_STATUS_FAILED,
                 "refuse-me", 1, NULL);
  fo_dlog_record(l, "refuse-3", "u", FO_CH_PUSH, FO_STATUS_SENT, NULL,
                 UINT32_MAX, NULL);
  assert_int_equal(fo_dlog_flush(l, 5000), FO_OK);
  fo_dlog_stop(l);
  sql("ALTER TABLE delivery_log DROP CONSTRAINT itest_refuse");
  assert_int_equal(counter("fanout_delivery_log_dropped_total") - d0, 1);
  assert_int_equal(sql_int("SELECT count(*) FROM delivery_log"
                           " WHERE event_id LIKE 'refuse-%'"),
                   2);
  /* Attempts beyond the column's range are clamped, not refused. */
  assert_int_equal(sql_int("SELECT attempts FROM delivery_log"
                           " WHERE event_id = 'refuse-3'"),
                   INT32_MAX);
}

/* The database refuses connections: the ring keeps the newest records,
 * counts the dropped ones, and writes the rest once it is back. */
static void test_dlog_database_down(void **state) {
  fo_store *s2 = NULL;
  fo_dlog *l = NULL;
  PGconn *c;
  char err[256], q[256], pid[16];
  uint64_t d0 = counter("fanout_delivery_log_dropped_total");

  (void)state;
  assert_int_equal(fo_store_open(db_dsn, 1, &s2, err, sizeof(err)), FO_OK);
  assert_int_equal(fo_pool_get(s2, &c), FO_OK);
  snprintf(pid, sizeof(pid), "%d", PQbackendPID(c));
  fo_pool_put(s2, c);
  assert_int_equal(fo_dlog_start(s2, 100, &l), FO_OK);

  snprintf(q, sizeof(q), "ALTER DATABASE %s ALLOW_CONNECTIONS false",
           db_name);
  PQclear(sql_on(admin, q));
  assert_int_equal(
      sql_int1("SELECT pg_terminate_backend($1::int, 5000)::int", pid), 1);
  for (int i = 0; i < 150; i++) {
    char ev[32];

    snprintf(ev, sizeof(ev), "down-%03d", i);
    fo_dlog_record(l, ev, "down-u", FO_CH_PUSH, FO_STATUS_SENT, NULL, 1,
                   NULL);
  }
  assert_false(fo_store_ping(s2));
  assert_int_equal(fo_dlog_flush(l, 500), FO_ETIMEDOUT);
  assert_int_equal(sql_int("SELECT count(*) FROM delivery_log"
                           " WHERE event_id LIKE 'down-%'"),
                   0);

  snprintf(q, sizeof(q), "ALTER DATABASE %s ALLOW_CONNECTIONS true",
           db_name);
  PQclear(sql_on(admin, q));
  assert_int_equal(fo_dlog_flush(l, 15000), FO_OK);
  assert_int_equal(counter("fanout_delivery_log_dropped_total") - d0, 50);
  assert_int_equal(sql_int("SELECT count(*) FROM delivery_log"
                           " WHERE event_id LIKE 'down-%'"),
                   100);
  assert_int_equal(sql_int("SELECT count(*) FROM delivery_log"
                           " WHERE event_id >= 'down-050'"
                           " AND event_id LIKE 'down-%'"),
                   100);
  assert_true(fo_store_ping(s2));
  fo_dlog_stop(l);
  fo_store_close(s2);
}

static void test_event_get(void **state) {
  fo_dlog *l = NULL;
  json_t *e = NULL, *d;

  (void)state;
  assert_int_equal(fo_dlog_start(st, 100, &l), FO_OK);
  fo_dlog_record(l, "eg-1", "zed", FO_CH_PUSH, FO_STATUS_SENT, NULL, 1,
                 "apns-123");
  fo_dlog_record(l, "eg-1", "amy", FO_CH_SMS, FO_STATUS_SUPPRESSED,
                 "opted_out", 0, NULL);
  fo_dlog_record(l, "eg-1", "amy", FO_CH_EMAIL, FO_STATUS_FAILED,
                 "550 mailbox", 3, NULL);
  fo_dlog_record(l, "eg-2", "amy", FO_CH_EMAIL, FO_STATUS_SENT, NULL, 1,
                 NULL);
  assert_int_equal(fo_dlog_flush(l, 5000), FO_OK);
  fo_dlog_stop(l);

  assert_int_equal(fo_store_event_get(st, "eg-missing", &e), FO_ENOENT);
  assert_int_equal(fo_store_event_get(st, "eg-1", &e), FO_OK);
  assert_string_equal(json_string_value(json_object_get(e, "id")), "eg-1");
  d = json_object_get(e, "deliveries");
  assert_int_equal(json_array_size(d), 3);
  /* By user, then channel. */
  assert_string_equal(
      json_string_value(json_object_get(json_array_get(d, 0), "user")),
      "amy");
  assert_string_equal(
      json_string_value(json_object_get(json_array_get(d, 0), "channel")),
      "email");
  assert_string_equal(
      json_string_value(json_object_get(json_array_get(d, 0), "status")),
      "failed");
  assert_string_equal(
      json_string_value(json_object_get(json_array_get(d, 0), "reason")),
      "550 mailbox");
  assert_int_equal(
      json_integer_value(json_object_get(json_array_get(d, 0), "attempts")),
      3);
  assert_true(json_is_null(
      json_object_get(json_array_get(d, 0), "provider_id")));
  assert_string_equal(
      json_string_value(json_object_get(json_array_get(d, 1), "channel")),
      "sms");
  assert_string_equal(
      json_string_value(json_object_get(json_array_get(d, 1), "reason")),
      "opted_out");
  assert_string_equal(
      json_string_value(json_object_get(json_array_get(d, 2), "user")),
      "zed");
  assert_true(json_is_null(json_object_get(json_array_get(d, 2), "reason")));
  assert_string_equal(json_string_value(json_object_get(
                          json_array_get(d, 2), "provider_id")),
                      "apns-123");
  assert_true(is_rfc3339_ms(json_string_value(
      json_object_get(json_array_get(d, 2), "updated_at"))));
  assert_int_equal(json_object_size(json_array_get(d, 2)), 7);
  json_decref(e);

  assert_int_equal(fo_store_delivery_sent(st, "eg-1", "zed", FO_CH_PUSH),
                   FO_OK);
  assert_int_equal(fo_store_delivery_sent(st, "eg-1", "amy", FO_CH_EMAIL),
                   FO_ENOENT);
  assert_int_equal(fo_store_delivery_sent(st, "eg-1", "zed", FO_CH_SMS),
                   FO_ENOENT);
  assert_int_equal(fo_store_delivery_sent(st, "eg-9", "zed", FO_CH_PUSH),
                   FO_ENOENT);
}

static void test_injection(void **state) {
  static const char *const evil[] = {
      "x'); DROP TABLE users; --", "\"; DELETE FROM devices; --",
      "' OR '1'='1", "1; TRUNCATE delivery_log", "$1::text", "\\'; --"};
  const size_t n = sizeof(evil) / sizeof(evil[0]);
  long long users_before, log_before;
  json_t *u = NULL;
  fo_dlog *l = NULL;

  (void)state;
  put_user("inj-keep");
  assert_int_equal(
      fo_store_device_add(st, "inj-keep", "fcm", "inj-keep-tok", NULL, NULL),
      FO_OK);
  users_before = sql_int("SELECT count(*) FROM users");
  log_before = sql_int("SELECT count(*) FROM delivery_log");
  assert_int_equal(fo_dlog_start(st, 100, &l), FO_OK);
  for (size_t i = 0; i < n; i++) {
    assert_int_equal(fo_store_user_get(st, evil[i], &u), FO_ENOENT);
    assert_int_equal(fo_store_user_put(st, evil[i], evil[i], NULL, NULL,
                                       NULL, NULL, NULL),
                     FO_OK);
    assert_int_equal(fo_store_user_get(st, evil[i], &u), FO_OK);
    assert_string_equal(json_string_value(json_object_get(u, "id")),
                        evil[i]);
    assert_string_equal(json_string_value(json_object_get(u, "email")),
                        evil[i]);
    json_decref(u);
    assert_int_equal(
        fo_store_device_add(st, evil[i], "apns", evil[i], evil[i], NULL),
        FO_OK);
    assert_int_equal(fo_store_device_invalidate(st, "apns", evil[i],
                                                fo_wall_ms() + 1000),
                     FO_OK);
    assert_int_equal(fo_store_device_delete(st, evil[i], evil[i]), FO_OK);
    assert_int_equal(fo_store_event_get(st, evil[i], &u), FO_ENOENT);
    assert_int_equal(
        fo_store_delivery_sent(st, evil[i], evil[i], FO_CH_PUSH), FO_ENOENT);
    fo_dlog_record(l, evil[i], evil[i], FO_CH_PUSH, FO_STATUS_SENT, evil[i],
                   1, evil[i]);
  }
  assert_int_equal(fo_dlog_flush(l, 5000), FO_OK);
  fo_dlog_stop(l);
  for (size_t i = 0; i < n; i++) {
    assert_int_equal(fo_store_event_get(st, evil[i], &u), FO_OK);
    assert_string_equal(json_string_value(json_object_get(u, "id")),
                        evil[i]);
    json_decref(u);
    assert_int_equal(
        fo_store_delivery_sent(st, evil[i], evil[i], FO_CH_PUSH), FO_OK);
    assert_int_equal(fo_store_user_delete(st, evil[i]), FO_OK);
  }
  assert_int_equal(sql_int("SELECT count(*) FROM users"), users_before);
  assert_int_equal(sql_int("SELECT count(*) FROM delivery_log"),
                   log_before + (long long)n);
  assert_int_equal(sql_int("SELECT count(*) FROM devices"
                           " WHERE token = 'inj-keep-tok'"),
                   1);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_array_literal),
      cmocka_unit_test(test_migrations_idempotent),
      cmocka_unit_test(test_migrations_concurrent),
      cmocka_unit_test(test_open_errors),
      cmocka_unit_test(test_users),
      cmocka_unit_test(test_user_delete_erases),
      cmocka_unit_test(test_devices),
      cmocka_unit_test(test_device_moves),
      cmocka_unit_test(test_device_race),
      cmocka_unit_test(test_invalidate),
      cmocka_unit_test(test_prefs),
      cmocka_unit_test(test_prefs_update_serialises),
      cmocka_unit_test(test_load_recipient),
      cmocka_unit_test(test_listen_each_change),
      cmocka_unit_test(test_listen_reconnects),
      cmocka_unit_test(test_pool_reconnects),
      cmocka_unit_test(test_deferred),
      cmocka_unit_test(test_deferred_concurrent_claims),
      cmocka_unit_test(test_dlog_batches),
      cmocka_unit_test(test_dlog_duplicates),
      cmocka_unit_test(test_dlog_hostile_strings),
      cmocka_unit_test(test_dlog_refused_row),
      cmocka_unit_test(test_dlog_database_down),
      cmocka_unit_test(test_event_get),
      cmocka_unit_test(test_injection),
  };

  return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
