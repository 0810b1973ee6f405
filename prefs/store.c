/* SPDX-License-Identifier: MIT */
/*
 * The PostgreSQL store: a small pool of libpq connections, the users,
 * devices and preferences the REST API edits, the policy's one-query
 * view of a recipient, the change listener that keeps the policy's cache
 * fresh, deferred deliveries and reads of the delivery log. Every value
 * travels as a statement parameter; SQL text is constant.
 *
 * Most changes are one statement whose data-modifying CTEs also call
 * pg_notify(), so the change and its notification commit together.
 */
#include "store_priv.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fanout/common.h"
#include "log.h"

#define POOL_MAX 64
#define LISTEN_POLL_MS 100
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000
/* After a failed reconnection, borrowers of a dead connection fail at
 * once for this long rather than each waiting on a connect attempt. */
#define RECONNECT_HOLD_MS 500

/* Advisory lock class of device registration; the second key is a hash
 * of the token ("fo" then 1). */
#define DEVICE_LOCK_CLASS "1718550529"

struct fo_store {
  char *dsn;
  int n;
  PGconn **conns;
  bool *busy;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  atomic_int_fast64_t retry_at_ms;  /* monotonic; 0: no hold */

  /* The change listener. */
  pthread_mutex_t lmu;
  pthread_cond_t lcv;
  bool listening;
  bool lstop;
  pthread_t lthread;
  PGconn *lconn;
  fo_store_change_fn cb;
  void *cb_arg;
};

static fo_ratelimit rl_lost;
static fo_ratelimit rl_sql;
static fo_ratelimit rl_prefs;

/* ---- connections ---- */

static void on_notice(void *arg, const char *message) {
  (void)arg;
  fo_log_debug(FO_STORE_MOD, "server notice", "notice=\"%.*s\"",
               (int)strcspn(message, "\n"), message);
}

PGconn *fo_pg_connect(const char *dsn, const char *app, char *err,
                      size_t errlen) {
  /* Our defaults come before the DSN, so its own settings win. */
  const char *keys[] = {"connect_timeout",  "keepalives",
                        "keepalives_idle",  "keepalives_interval",
                        "keepalives_count", "application_name",
                        "dbname",           NULL};
  const char *vals[] = {"5", "1", "30", "10", "3", app, dsn, NULL};
  PQconninfoOption *opts;
  char *perr = NULL;
  PGconn *c;

  /* A DSN that does not parse could be echoed in libpq's message,
   * password included, so the message is ours. */
  opts = PQconninfoParse(dsn, &perr);
  if (opts == NULL) {
    PQfreemem(perr);
    snprintf(err, errlen, "the PostgreSQL DSN does not parse");
    return NULL;
  }
  PQconninfoFree(opts);
  c = PQconnectdbParams(keys, vals, 1);
  if (c == NULL) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  if (PQstatus(c) != CONNECTION_OK) {
    const char *m = PQerrorMessage(c);

    snprintf(err, errlen, "%.*s", (int)strcspn(m, "\n"), m);
    return c;
  }
  PQsetNoticeProcessor(c, on_notice, NULL);
  return c;
}

/*
 * True when an idle connection can no longer be used. The server says
 * nothing on an idle connection unless it is going away, so readable
 * data here is usually its farewell; reading it finds the end of file.
 */
static bool conn_stale(PGconn *c) {
  for (int i = 0; i < 4; i++) {
    struct pollfd p = {.fd = PQsocket(c), .events = POLLIN};

    if (PQstatus(c) != CONNECTION_OK || p.fd < 0)
      return true;
    if (poll(&p, 1, 0) <= 0)
      return false;
    if (!PQconsumeInput(c))
      return true;
  }
  return PQstatus(c) != CONNECTION_OK;
}

static int reset(PGconn *c) {
  PQreset(c);
  if (PQstatus(c) != CONNECTION_OK) {
    const char *m = PQerrorMessage(c);

    fo_log_rl(&rl_lost, 5000, FO_LOG_WARN, FO_STORE_MOD,
              "database unreachable", "error=\"%.*s\"",
              (int)strcspn(m, "\n"), m);
    return FO_EIO;
  }
  PQsetNoticeProcessor(c, on_notice, NULL);
  fo_log_info(FO_STORE_MOD, "database connection reset", "host=%s port=%s",
              PQhost(c), PQport(c));
  return FO_OK;
}

int fo_pool_get(fo_store *s, PGconn **out) {
  PGconn *c = NULL;
  int i;

  pthread_mutex_lock(&s->mu);
  for (;;) {
    for (i = 0; i < s->n && s->busy[i]; i++)
      ;
    if (i < s->n)
      break;
    pthread_cond_wait(&s->cv, &s->mu);
  }
  s->busy[i] = true;
  c = s->conns[i];
  pthread_mutex_unlock(&s->mu);

  if (conn_stale(c)) {
    int64_t now = fo_now_ms();
    bool held = now < atomic_load(&s->retry_at_ms);

    if (held || reset(c) != FO_OK) {
      if (!held)
        atomic_store(&s->retry_at_ms, now + RECONNECT_HOLD_MS);
      fo_pool_put(s, c);
      return FO_EIO;
    }
    atomic_store(&s->retry_at_ms, 0);
  }
  *out = c;
  return FO_OK;
}

void fo_pool_put(fo_store *s, PGconn *c) {
  PGTransactionStatusType ts = PQtransactionStatus(c);

  /* An early exit from a transaction leaves it open: end it here so the
   * next borrower starts clean. */
  if (ts == PQTRANS_INTRANS || ts == PQTRANS_INERROR)
    PQclear(PQexec(c, "ROLLBACK"));
  pthread_mutex_lock(&s->mu);
  for (int i = 0; i < s->n; i++) {
    if (s->conns[i] == c) {
      s->busy[i] = false;
      break;
    }
  }
  pthread_cond_signal(&s->cv);
  pthread_mutex_unlock(&s->mu);
}

static bool conn_lost(PGconn *c, const PGresult *r) {
  const char *st;

  if (r == NULL || PQstatus(c) == CONNECTION_BAD)
    return true;
  st = PQresultErrorField(r, PG_DIAG_SQLSTATE);
  if (st == NULL)
    return true;
  /* Connection exceptions, and the server shutting down or dropping
   * the database under us. */
  return strncmp(st, "08", 2) == 0 || strncmp(st, "57P0", 4) == 0;
}

static int sql_error(const PGresult *r) {
  const char *st = PQresultErrorField(r, PG_DIAG_SQLSTATE);
  const char *m = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);

  if (strcmp(st, "23503") == 0)
    return FO_ENOENT;
  /* Data exceptions, integrity violations, and cardinality violations
   * (an upsert given the same key twice) all come from the input. */
  if (strncmp(st, "21", 2) == 0 || strncmp(st, "22", 2) == 0 ||
      strncmp(st, "23", 2) == 0)
    return FO_EINVAL;
  /* Only the primary message: the detail may quote values (tokens). */
  fo_log_rl(&rl_sql, 1000, FO_LOG_ERROR, FO_STORE_MOD, "statement failed",
            "sqlstate=%s error=\"%s\"", st, m != NULL ? m : "");
  return FO_EIO;
}

static bool has_state(const PGresult *r, const char *state) {
  const char *st;

  if (r == NULL || PQresultStatus(r) != PGRES_FATAL_ERROR)
    return false;
  st = PQresultErrorField(r, PG_DIAG_SQLSTATE);
  return st != NULL && strcmp(st, state) == 0;
}

/* A named statement is prepared on its first use on a connection, and
 * again after a reset, which forgets it. */
static PGresult *run(PGconn *c, const char *name, const char *sql, int n,
                     const char *const *p) {
  PGresult *r;

  if (name == NULL)
    return PQexecParams(c, sql, n, NULL, p, NULL, NULL, 0);
  r = PQexecPrepared(c, name, n, p, NULL, NULL, 0);
  if (!has_state(r, "26000"))   /* invalid_sql_statement_name */
    return r;
  PQclear(r);
  r = PQprepare(c, name, sql, n, NULL);
  if (r == NULL || PQresultStatus(r) != PGRES_COMMAND_OK)
    return r;
  PQclear(r);
  return PQexecPrepared(c, name, n, p, NULL, NULL, 0);
}

static int exec(PGconn *c, const char *name, const char *sql, int nparams,
                const char *const *params, bool retry, PGresult **out) {
  for (int attempt = 0;; attempt++) {
    PGresult *r = run(c, name, sql, nparams, params);
    ExecStatusType st = r != NULL ? PQresultStatus(r) : PGRES_FATAL_ERROR;
    int rc;

    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
      if (out != NULL)
        *out = r;
      else
        PQclear(r);
      return FO_OK;
    }
    if (conn_lost(c, r)) {
      PQclear(r);
      fo_log_rl(&rl_lost, 5000, FO_LOG_WARN, FO_STORE_MOD,
                "database connection lost", "host=%s port=%s", PQhost(c),
                PQport(c));
      if (reset(c) == FO_OK && retry && attempt == 0)
        continue;
      return FO_EIO;
    }
    rc = sql_error(r);
    PQclear(r);
    return rc;
  }
}

int fo_pg_exec(PGconn *c, const char *sql, int nparams,
               const char *const *params, bool retry, PGresult **out) {
  return exec(c, NULL, sql, nparams, params, retry, out);
}

int fo_pg_exec_prepared(PGconn *c, const char *name, const char *sql,
                        int nparams, const char *const *params, bool retry,
                        PGresult **out) {
  return exec(c, name, sql, nparams, params, retry, out);
}

const char *fo_pg_value(const PGresult *r, int row, int col) {
  if (PQgetisnull(r, row, col))
    return NULL;
  return PQgetvalue(r, row, col);
}

/* One statement on a borrowed connection; `name` as for
 * fo_pg_exec_prepared(), or NULL. */
static int query_named(fo_store *s, const char *name, const char *sql,
                       int n, const char *const *p, bool retry,
                       PGresult **out) {
  PGconn *c;
  int rc = fo_pool_get(s, &c);

  if (rc != FO_OK)
    return rc;
  rc = exec(c, name, sql, n, p, retry, out);
  fo_pool_put(s, c);
  return rc;
}

static int query(fo_store *s, const char *sql, int n, const char *const *p,
                 bool retry, PGresult **out) {
  return query_named(s, NULL, sql, n, p, retry, out);
}

/* Runs a statement that finds, changes or deletes at most a few rows:
 * FO_OK when it returned or touched one, FO_ENOENT when none, or the
 * error. */
static int query_hit(fo_store *s, const char *name, const char *sql, int n,
                     const char *const *p, bool retry) {
  PGresult *r = NULL;
  const char *touched;
  int rc = query_named(s, name, sql, n, p, retry, &r);

  if (rc != FO_OK)
    return rc;
  touched = PQcmdTuples(r);
  rc = PQntuples(r) > 0 || (touched[0] != '\0' && strcmp(touched, "0") != 0)
           ? FO_OK
           : FO_ENOENT;
  PQclear(r);
  return rc;
}

/* BEGIN may always run twice: nothing has happened yet. */
static int tx_begin(fo_store *s, PGconn **c) {
  int rc = fo_pool_get(s, c);

  if (rc != FO_OK)
    return rc;
  rc = fo_pg_exec(*c, "BEGIN", 0, NULL, true, NULL);
  if (rc != FO_OK)
    fo_pool_put(s, *c);
  return rc;
}

/* Commits when rc is FO_OK (else the pool rolls back); returns the
 * outcome. */
static int tx_end(fo_store *s, PGconn *c, int rc) {
  if (rc == FO_OK)
    rc = fo_pg_exec(c, "COMMIT", 0, NULL, false, NULL);
  fo_pool_put(s, c);
  return rc;
}

static int json_of(const char *text, json_t **out) {
  json_t *j;

  if (text == NULL)
    return FO_EIO;
  j = json_loads(text, JSON_DECODE_ANY, NULL);
  if (j == NULL)
    return FO_ENOMEM;
  *out = j;
  return FO_OK;
}

/* The first column of a one-row result as JSON; FO_ENOENT when no row. */
static int json_result(const PGresult *r, int col, json_t **out) {
  json_t *j;
  int rc;

  if (PQntuples(r) == 0)
    return FO_ENOENT;
  rc = json_of(fo_pg_value(r, 0, col), &j);
  if (rc != FO_OK)
    return rc;
  if (out != NULL)
    *out = j;
  else
    json_decref(j);
  return FO_OK;
}

static bool id_ok(const char *id) {
  return id != NULL && id[0] != '\0';
}

/* ---- open, close, ping ---- */

int fo_store_open(const char *dsn, int pool, fo_store **out, char *err,
                  size_t errlen) {
  fo_store *s;
  int rc = FO_ENOMEM;

  snprintf(err, errlen, "out of memory");
  if (dsn == NULL || pool < 1 || pool > POOL_MAX) {
    snprintf(err, errlen, "the pool size must be 1 to %d", POOL_MAX);
    return FO_EINVAL;
  }
  s = calloc(1, sizeof(*s));
  if (s == NULL)
    return FO_ENOMEM;
  pthread_mutex_init(&s->mu, NULL);
  pthread_cond_init(&s->cv, NULL);
  atomic_init(&s->retry_at_ms, 0);
  pthread_mutex_init(&s->lmu, NULL);
  pthread_cond_init(&s->lcv, NULL);
  s->dsn = strdup(dsn);
  s->conns = calloc((size_t)pool, sizeof(*s->conns));
  s->busy = calloc((size_t)pool, sizeof(*s->busy));
  if (s->dsn == NULL || s->conns == NULL || s->busy == NULL)
    goto fail;
  s->n = pool;
  for (int i = 0; i < pool; i++) {
    s->conns[i] = fo_pg_connect(dsn, "fanoutd", err, errlen);
    if (s->conns[i] == NULL || PQstatus(s->conns[i]) != CONNECTION_OK) {
      rc = FO_EIO;
      goto fail;
    }
  }
  if ((rc = fo_store_migrate(s->conns[0], err, errlen)) != FO_OK)
    goto fail;
  fo_log_info(FO_STORE_MOD, "connected", "host=%s port=%s db=%s pool=%d",
              PQhost(s->conns[0]), PQport(s->conns[0]), PQdb(s->conns[0]),
              pool);
  *out = s;
  return FO_OK;

fail:
  fo_store_close(s);
  return rc;
}

static void listen_stop(fo_store *s) {
  pthread_mutex_lock(&s->lmu);
  if (!s->listening) {
    pthread_mutex_unlock(&s->lmu);
    return;
  }
  s->lstop = true;
  pthread_cond_broadcast(&s->lcv);
  pthread_mutex_unlock(&s->lmu);
  pthread_join(s->lthread, NULL);
  s->listening = false;
}

/* The delivery log writer borrows the pool: stop it first. */
void fo_store_close(fo_store *s) {
  if (s == NULL)
    return;
  listen_stop(s);
  if (s->lconn != NULL)
    PQfinish(s->lconn);
  for (int i = 0; s->conns != NULL && i < s->n; i++) {
    if (s->conns[i] != NULL)
      PQfinish(s->conns[i]);
  }
  pthread_mutex_destroy(&s->mu);
  pthread_cond_destroy(&s->cv);
  pthread_mutex_destroy(&s->lmu);
  pthread_cond_destroy(&s->lcv);
  free(s->conns);
  free(s->busy);
  free(s->dsn);
  free(s);
}

bool fo_store_ping(fo_store *s) {
  return query(s, "SELECT 1", 0, NULL, true, NULL) == FO_OK;
}

/* ---- users ---- */

/* Times as RFC 3339 UTC with milliseconds. */
#define TS(col)                                                         \
  "to_char(" col " AT TIME ZONE 'UTC', "                                \
  "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"

/* A wall-clock time in milliseconds since the epoch, as a parameter. */
#define MS_TS(p) "(timestamptz 'epoch' + " p "::bigint * interval '1 ms')"

/* A timestamptz as whole milliseconds since the epoch. */
#define TS_MS(col) "floor(extract(epoch FROM " col ") * 1000)::bigint"

#define USER_JSON(t)                                                    \
  "json_build_object('id', " t ".id, 'email', " t ".email, "            \
  "'phone', " t ".phone, 'timezone', " t ".timezone, "                  \
  "'locale', " t ".locale, "                                            \
  "'created_at', " TS(t ".created_at") ", "                             \
  "'updated_at', " TS(t ".updated_at") ")::text"

#define DEVICE_JSON(t)                                                  \
  "json_build_object('platform', " t ".platform, 'token', " t ".token, " \
  "'app', " t ".app, 'registered_at', " TS(t ".registered_at") ", "     \
  "'invalid_since', " TS(t ".invalid_since") ")"

/* xmax is zero on a row this statement inserted, and set on one it
 * updated: the one way an upsert tells which it did. A new phone number
 * is usable again by SMS. */
static const char sql_user_put[] =
    "WITH u AS ("
    " INSERT INTO users AS t (id, email, phone, timezone, locale)"
    " VALUES ($1, $2, $3, $4, $5)"
    " ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email,"
    "  phone = EXCLUDED.phone, timezone = EXCLUDED.timezone,"
    "  locale = EXCLUDED.locale, updated_at = now(),"
    "  sms_unusable_since = CASE WHEN t.phone IS NOT DISTINCT FROM"
    "   EXCLUDED.phone THEN t.sms_unusable_since END"
    " RETURNING t.xmax = 0 AS created, " USER_JSON("t") " AS doc, t.id)"
    " SELECT u.created, u.doc, pg_notify('fanout_user', u.id) FROM u";

int fo_store_user_put(fo_store *s, const char *id, const char *email,
                      const char *phone, const char *timezone,
                      const char *locale, json_t **out, bool *created) {
  const char *p[] = {id, email, phone, timezone, locale};
  PGresult *r = NULL;
  int rc;

  if (!id_ok(id) || strlen(id) > FO_EVENT_USER_MAX)
    return FO_EINVAL;
  rc = query(s, sql_user_put, 5, p, true, &r);
  if (rc != FO_OK)
    return rc;
  rc = json_result(r, 1, out);
  if (rc == FO_ENOENT)
    rc = FO_EIO;
  if (rc == FO_OK && created != NULL)
    *created = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
  PQclear(r);
  return rc;
}

int fo_store_user_get(fo_store *s, const char *id, json_t **out) {
  const char *p[] = {id};
  PGresult *r = NULL;
  int rc;

  if (!id_ok(id))
    return FO_ENOENT;
  rc = query(s, "SELECT " USER_JSON("u") " FROM users u WHERE u.id = $1",
             1, p, true, &r);
  if (rc != FO_OK)
    return rc;
  rc = json_result(r, 0, out);
  PQclear(r);
  return rc;
}

/* The cascade takes devices, preferences and inbox; deferred rows have
 * no foreign key (they outlive nothing) and go explicitly. */
int fo_store_user_delete(fo_store *s, const char *id) {
  const char *p[] = {id};

  if (!id_ok(id))
    return FO_ENOENT;
  return query_hit(s, NULL,
                   "WITH u AS (DELETE FROM users WHERE id = $1 RETURNING id),"
                   " d AS (DELETE FROM deferred WHERE user_id = $1)"
                   " SELECT pg_notify('fanout_user', u.id) FROM u",
                   1, p, false);
}

/* ---- devices ---- */

/* A token is one device: registering it for a user takes it away from
 * whoever had it, and both users hear of it. */
static const char sql_device_add[] =
    "WITH moved AS ("
    " DELETE FROM devices WHERE platform = $2 AND token = $3"
    "  AND user_id <> $1 RETURNING user_id),"
    " d AS ("
    " INSERT INTO devices AS d (user_id, platform, token, app)"
    " VALUES ($1, $2, $3, COALESCE($4, 'default'))"
    " ON CONFLICT (user_id, token) DO UPDATE SET"
    "  platform = EXCLUDED.platform, app = EXCLUDED.app,"
    "  registered_at = now(), invalid_since = NULL"
    " RETURNING " DEVICE_JSON("d") "::text AS doc)"
    " SELECT d.doc,"
    "  (SELECT count(*) FROM moved m, pg_notify('fanout_user', m.user_id)),"
    "  pg_notify('fanout_user', $1)"
    " FROM d";

int fo_store_device_add(fo_store *s, const char *user, const char *platform,
                        const char *token, const char *app, json_t **out) {
  const char *p[] = {user, platform, token, app};
  PGresult *r = NULL;
  PGconn *c;
  int rc;

  if (!id_ok(user))
    return FO_ENOENT;
  if (platform == NULL ||
      (strcmp(platform, "apns") != 0 && strcmp(platform, "fcm") != 0) ||
      !id_ok(token) || (app != NULL && app[0] == '\0'))
    return FO_EINVAL;
  if ((rc = tx_begin(s, &c)) != FO_OK)
    return rc;
  /* Serialises registrations of one token, so two users registering it
   * at once cannot both keep it. */
  rc = fo_pg_exec(c,
                  "SELECT pg_advisory_xact_lock(" DEVICE_LOCK_CLASS
                  ", hashtext($1))",
                  1, &token, false, NULL);
  if (rc == FO_OK)
    rc = fo_pg_exec(c, sql_device_add, 4, p, false, &r);
  rc = tx_end(s, c, rc);
  if (rc == FO_OK)
    rc = json_result(r, 0, out);
  PQclear(r);
  return rc;
}

int fo_store_device_list(fo_store *s, const char *user, json_t **out) {
  const char *p[] = {user};
  PGresult *r = NULL;
  int rc;

  if (!id_ok(user))
    return FO_ENOENT;
  rc = query(s,
             "SELECT COALESCE((SELECT json_agg(" DEVICE_JSON("d")
             " ORDER BY d.registered_at, d.token) FROM devices d"
             " WHERE d.user_id = u.id), '[]')::text"
             " FROM users u WHERE u.id = $1",
             1, p, true, &r);
  if (rc != FO_OK)
    return rc;
  rc = json_result(r, 0, out);
  PQclear(r);
  return rc;
}

int fo_store_device_delete(fo_store *s, const char *user,
                           const char *token) {
  const char *p[] = {user, token};

  if (!id_ok(user) || token == NULL)
    return FO_ENOENT;
  return query_hit(s, NULL,
                   "WITH d AS (DELETE FROM devices WHERE user_id = $1"
                   " AND token = $2 RETURNING user_id)"
                   " SELECT pg_notify('fanout_user', d.user_id) FROM d",
                   2, p, false);
}

/* FO_ENOENT when no valid registration older than `at_ms` has the
 * token: unknown, already invalid, or registered again since. The
 * update runs the same twice, so a lost connection retries it. */
int fo_store_device_invalidate(fo_store *s, const char *platform,
                               const char *token, int64_t at_ms) {
  char at[24];
  const char *p[] = {platform, token, at};

  if (platform == NULL || token == NULL)
    return FO_EINVAL;
  snprintf(at, sizeof(at), "%lld", (long long)at_ms);
  return query_hit(s, NULL,
                   "WITH d AS (UPDATE devices SET invalid_since = " MS_TS("$3")
                   " WHERE platform = $1 AND token = $2"
                   " AND invalid_since IS NULL"
                   " AND registered_at <= " MS_TS("$3") " RETURNING user_id)"
                   " SELECT pg_notify('fanout_user', d.user_id) FROM d",
                   3, p, true);
}

/* ---- preferences ---- */

#define SQL_PREFS_UPSERT                                                 \
  "WITH p AS (INSERT INTO preferences (user_id, doc)"                   \
  " VALUES ($1, $2::jsonb) ON CONFLICT (user_id) DO UPDATE"             \
  " SET doc = EXCLUDED.doc, updated_at = now()"                         \
  " RETURNING user_id, doc)"                                            \
  " SELECT p.doc::text, pg_notify('fanout_user', p.user_id) FROM p"

int fo_store_prefs_get(fo_store *s, const char *user, json_t **out) {
  const char *p[] = {user};
  PGresult *r = NULL;
  int rc;

  if (!id_ok(user))
    return FO_ENOENT;
  rc = query(s,
             "SELECT COALESCE(p.doc, '{}'::jsonb)::text FROM users u"
             " LEFT JOIN preferences p ON p.user_id = u.id"
             " WHERE u.id = $1",
             1, p, true, &r);
  if (rc != FO_OK)
    return rc;
  rc = json_result(r, 0, out);
  PQclear(r);
  return rc;
}

int fo_store_prefs_put(fo_store *s, const char *user, const json_t *doc) {
  char *text;
  PGresult *r = NULL;
  int rc;

  if (!id_ok(user))
    return FO_ENOENT;
  if (!json_is_object(doc))
    return FO_EINVAL;
  text = json_dumps(doc, JSON_COMPACT);
  if (text == NULL)
    return FO_ENOMEM;
  {
    const char *p[] = {user, text};

    rc = query(s, SQL_PREFS_UPSERT, 2, p, true, &r);
  }
  free(text);
  PQclear(r);
  return rc;
}

/*
 * The users row is locked rather than the preferences row, so a user
 * with no preferences yet serialises too; NO KEY UPDATE leaves device
 * inserts (which take KEY SHARE on the user) free to proceed. The
 * document is read by a second statement: a statement's snapshot is
 * taken before it waits for the lock, so reading in the locking one
 * would see the document as it was before the holder's change.
 */
int fo_store_prefs_update(fo_store *s, const char *user,
                          fo_prefs_update_fn fn, void *arg, json_t **out) {
  const char *p[] = {user, NULL};
  PGresult *r = NULL;
  json_t *cur = NULL, *next = NULL;
  char *text = NULL;
  PGconn *c;
  int rc, fn_rc = FO_OK;

  if (!id_ok(user))
    return FO_ENOENT;
  if (fn == NULL)
    return FO_EINVAL;
  if ((rc = tx_begin(s, &c)) != FO_OK)
    return rc;
  rc = fo_pg_exec(c, "SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE",
                  1, p, false, &r);
  if (rc == FO_OK && PQntuples(r) == 0)
    rc = FO_ENOENT;
  PQclear(r);
  r = NULL;
  if (rc != FO_OK)
    goto out;
  rc = fo_pg_exec(c,
                  "SELECT COALESCE((SELECT doc FROM preferences"
                  " WHERE user_id = $1), '{}'::jsonb)::text",
                  1, p, false, &r);
  if (rc != FO_OK)
    goto out;
  rc = json_result(r, 0, &cur);
  PQclear(r);
  r = NULL;
  if (rc != FO_OK)
    goto out;

  next = fn(cur, arg, &fn_rc);
  if (next == NULL) {
    rc = fn_rc != FO_OK ? fn_rc : FO_EINVAL;
    goto out;
  }
  if (!json_is_object(next)) {
    rc = FO_EINVAL;
    goto out;
  }
  text = json_dumps(next, JSON_COMPACT);
  if (text == NULL) {
    rc = FO_ENOMEM;
    goto out;
  }
  p[1] = text;
  rc = fo_pg_exec(c, SQL_PREFS_UPSERT, 2, p, false, &r);

out:
  rc = tx_end(s, c, rc);
  if (rc == FO_OK)
    rc = json_result(r, 0, out);
  PQclear(r);
  free(text);
  json_decref(cur);
  json_decref(next);
  return rc;
}

/* ---- recipients ---- */

static void recipient_free(fo_recipient *r, bool prefs_loaded) {
  for (size_t i = 0; i < r->ndevices; i++) {
    free(r->devices[i].token);
    free(r->devices[i].app);
  }
  free(r->devices);
  if (prefs_loaded)
    fo_prefs_clear(&r->prefs);
  free(r->id);
  free(r->email);
  free(r->phone);
  free(r->timezone);
  free(r->locale);
  free(r);
}

static int dup_opt(const char *v, char **out) {
  if (v == NULL)
    return FO_OK;
  *out = strdup(v);
  return *out != NULL ? FO_OK : FO_ENOMEM;
}

static int load_devices(const char *text, fo_recipient *r) {
  json_t *a, *e;
  size_t i;
  int rc = FO_OK;

  if (text == NULL)
    return FO_OK;
  a = json_loads(text, 0, NULL);
  if (!json_is_array(a)) {
    json_decref(a);
    return FO_EIO;
  }
  r->devices = calloc(json_array_size(a) + 1, sizeof(*r->devices));
  if (r->devices == NULL) {
    rc = FO_ENOMEM;
    goto out;
  }
  json_array_foreach(a, i, e) {
    const char *plat = json_string_value(json_array_get(e, 0));
    const char *tok = json_string_value(json_array_get(e, 1));
    const char *app = json_string_value(json_array_get(e, 2));
    json_t *inv = json_array_get(e, 3);
    fo_device *d = &r->devices[r->ndevices];

    if (plat == NULL || tok == NULL || app == NULL) {
      rc = FO_EIO;
      goto out;
    }
    d->token = strdup(tok);
    d->app = strdup(app);
    r->ndevices++;
    if (d->token == NULL || d->app == NULL) {
      rc = FO_ENOMEM;
      goto out;
    }
    d->kind = FO_CH_PUSH;
    d->apns = strcmp(plat, "apns") == 0;
    d->invalid_since_ms = json_is_integer(inv) ? json_integer_value(inv) : 0;
  }
out:
  json_decref(a);
  return rc;
}

/* A stored document that no longer parses (the rules tightened since it
 * was written) must not stop deliveries: the user gets the defaults. */
static int load_prefs(const char *user, const char *text, fo_prefs *out) {
  fo_prefs_error e = {{0}, {0}};
  json_t *doc;
  int rc;

  if (text == NULL) {
    fo_prefs_init_default(out);
    return FO_OK;
  }
  doc = json_loads(text, 0, NULL);
  rc = doc != NULL ? fo_prefs_parse(doc, out, &e) : FO_EINVAL;
  json_decref(doc);
  if (rc == FO_ENOMEM)
    return rc;
  if (rc != FO_OK) {
    fo_log_rl(&rl_prefs, 10000, FO_LOG_WARN, FO_STORE_MOD,
              "stored preferences do not parse; using the defaults",
              "user=\"%s\" field=\"%s\" error=\"%s\"", user, e.field,
              e.message);
    fo_prefs_init_default(out);
  }
  return FO_OK;
}

/* The user, the preferences document and the devices as
 * [[platform, token, app, invalid_since_ms|null]] in one round trip. A
 * phone the SMS provider refused (sms_unusable_since) is no address: the
 * policy then ends SMS deliveries `no_address` without a request, until
 * the number is changed. */
static const char sql_recipient[] =
    "SELECT u.email,"
    " CASE WHEN u.sms_unusable_since IS NULL THEN u.phone END,"
    " u.timezone, u.locale,"
    " (SELECT p.doc::text FROM preferences p WHERE p.user_id = u.id),"
    " (SELECT json_agg(json_build_array(d.platform, d.token, d.app, "
    TS_MS("d.invalid_since") ") ORDER BY d.registered_at, d.token)::text"
    "  FROM devices d WHERE d.user_id = u.id)"
    " FROM users u WHERE u.id = $1";

int fo_store_load_recipient(fo_store *s, const char *user,
                            fo_recipient **out) {
  const char *p[] = {user};
  fo_recipient *rec = NULL;
  PGresult *r = NULL;
  bool prefs_loaded = false;
  int rc;

  if (!id_ok(user))
    return FO_ENOENT;
  rc = query_named(s, "fo_recipient", sql_recipient, 1, p, true, &r);
  if (rc != FO_OK)
    return rc;
  if (PQntuples(r) == 0) {
    rc = FO_ENOENT;
    goto out;
  }
  rec = calloc(1, sizeof(*rec));
  if (rec == NULL) {
    rc = FO_ENOMEM;
    goto out;
  }
  atomic_init(&rec->refs, 1);
  rec->id = strdup(user);
  if (rec->id == NULL ||
      (rc = dup_opt(fo_pg_value(r, 0, 0), &rec->email)) != FO_OK ||
      (rc = dup_opt(fo_pg_value(r, 0, 1), &rec->phone)) != FO_OK ||
      (rc = dup_opt(fo_pg_value(r, 0, 2), &rec->timezone)) != FO_OK ||
      (rc = dup_opt(fo_pg_value(r, 0, 3), &rec->locale)) != FO_OK) {
    rc = FO_ENOMEM;
    goto out;
  }
  if ((rc = load_devices(fo_pg_value(r, 0, 5), rec)) != FO_OK)
    goto out;
  if ((rc = load_prefs(user, fo_pg_value(r, 0, 4), &rec->prefs)) != FO_OK)
    goto out;
  prefs_loaded = true;
  *out = rec;
  rec = NULL;

out:
  if (rec != NULL)
    recipient_free(rec, prefs_loaded);
  PQclear(r);
  return rc;
}

void fo_recipient_ref(fo_recipient *r) {
  atomic_fetch_add_explicit(&r->refs, 1, memory_order_relaxed);
}

void fo_recipient_unref(fo_recipient *r) {
  if (r == NULL)
    return;
  if (atomic_fetch_sub_explicit(&r->refs, 1, memory_order_acq_rel) != 1)
    return;
  recipient_free(r, true);
}

/* ---- change listener ---- */

/* Connects and subscribes; NULL when the database is not reachable. */
static PGconn *listen_connect(fo_store *s) {
  char err[256];
  PGconn *c = fo_pg_connect(s->dsn, "fanoutd-listen", err, sizeof(err));

  if (c == NULL || PQstatus(c) != CONNECTION_OK) {
    fo_log_rl(&rl_lost, 5000, FO_LOG_WARN, FO_STORE_MOD,
              "change listener cannot connect", "error=\"%s\"", err);
    if (c != NULL)
      PQfinish(c);
    return NULL;
  }
  if (fo_pg_exec(c, "LISTEN fanout_user", 0, NULL, false, NULL) != FO_OK) {
    PQfinish(c);
    return NULL;
  }
  return c;
}

/* Sleeps up to `ms` unless asked to stop; returns true to go on. */
static bool listen_sleep(fo_store *s, int ms) {
  struct timespec ts;
  bool stop;

  clock_gettime(CLOCK_REALTIME, &ts);
  ts.tv_sec += ms / 1000;
  ts.tv_nsec += (long)(ms % 1000) * 1000000;
  if (ts.tv_nsec >= 1000000000) {
    ts.tv_sec++;
    ts.tv_nsec -= 1000000000;
  }
  pthread_mutex_lock(&s->lmu);
  while (!s->lstop && pthread_cond_timedwait(&s->lcv, &s->lmu, &ts) == 0)
    ;
  stop = s->lstop;
  pthread_mutex_unlock(&s->lmu);
  return !stop;
}

static bool listen_stopping(fo_store *s) {
  bool stop;

  pthread_mutex_lock(&s->lmu);
  stop = s->lstop;
  pthread_mutex_unlock(&s->lmu);
  return stop;
}

static void *listen_main(void *arg) {
  fo_store *s = arg;
  int backoff = BACKOFF_MIN_MS;

  while (!listen_stopping(s)) {
    struct pollfd pfd;
    PGnotify *n;

    if (s->lconn == NULL) {
      if (!listen_sleep(s, backoff))
        break;
      s->lconn = listen_connect(s);
      if (s->lconn == NULL) {
        backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS
                                                : backoff * 2;
        continue;
      }
      backoff = BACKOFF_MIN_MS;
      fo_log_info(FO_STORE_MOD, "change listener reconnected", "");
      /* Changes made while we were away were not heard. */
      s->cb(NULL, s->cb_arg);
    }

    pfd.fd = PQsocket(s->lconn);
    pfd.events = POLLIN;
    pfd.revents = 0;
    if (pfd.fd < 0 ||
        (poll(&pfd, 1, LISTEN_POLL_MS) < 0 && errno != EINTR) ||
        (pfd.revents != 0 && !PQconsumeInput(s->lconn))) {
      fo_log_warn(FO_STORE_MOD, "change listener lost its connection", "");
      PQfinish(s->lconn);
      s->lconn = NULL;
      continue;
    }
    while ((n = PQnotifies(s->lconn)) != NULL) {
      s->cb(n->extra, s->cb_arg);
      PQfreemem(n);
    }
  }
  return NULL;
}

/* Subscribes before returning, so no change after the call is missed
 * while the database is up; when it is down the thread keeps trying. */
int fo_store_listen(fo_store *s, fo_store_change_fn cb, void *arg) {
  if (cb == NULL || s->listening)
    return FO_EINVAL;
  s->cb = cb;
  s->cb_arg = arg;
  s->lstop = false;
  s->lconn = listen_connect(s);
  if (pthread_create(&s->lthread, NULL, listen_main, s) != 0) {
    if (s->lconn != NULL)
      PQfinish(s->lconn);
    s->lconn = NULL;
    return FO_ENOMEM;
  }
  s->listening = true;
  return FO_OK;
}

/* ---- deferred deliveries ---- */

int fo_store_defer(fo_store *s, const char *event_json, const char *user,
                   fo_channel_kind channel, int64_t due_ms,
                   int64_t expires_ms) {
  char due[24], exp[24];
  const char *p[] = {event_json, user, fo_channel_name(channel), due, exp};

  if (event_json == NULL || !id_ok(user) || (unsigned)channel >= FO_CH_COUNT)
    return FO_EINVAL;
  snprintf(due, sizeof(due), "%lld", (long long)due_ms);
  snprintf(exp, sizeof(exp), "%lld", (long long)expires_ms);
  return query(s,
               "INSERT INTO deferred"
               " (event, user_id, channel, due_at, expires_at)"
               " VALUES ($1::jsonb, $2, $3, " MS_TS("$4") ", " MS_TS("$5")
               ")"
               " ON CONFLICT ((event->>'id'), user_id, channel) DO NOTHING",
               5, p, true, NULL);
}

void fo_deferred_free(fo_deferred *rows, int n) {
  for (int i = 0; rows != NULL && i < n; i++) {
    free(rows[i].event_json);
    free(rows[i].user);
  }
  free(rows);
}

int fo_store_claim_due(fo_store *s, int max, int64_t lease_ms,
                       fo_deferred **out) {
  char lim[16], lease[24];
  const char *p[] = {lim, lease};
  fo_deferred *rows = NULL;
  PGresult *r = NULL;
  int rc, n = 0;

  *out = NULL;
  if (max <= 0)
    return 0;
  if (lease_ms <= 0)
    return FO_EINVAL;
  snprintf(lim, sizeof(lim), "%d", max);
  snprintf(lease, sizeof(lease), "%lld", (long long)lease_ms);
  rc = query(s,
             "UPDATE deferred SET lease_until ="
             " now() + $2::bigint * interval '1 ms'"
             " WHERE id IN (SELECT id FROM deferred WHERE due_at <= now()"
             "  AND (lease_until IS NULL OR lease_until < now())"
             "  ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
             " RETURNING id, event::text, user_id, channel, "
             TS_MS("expires_at"),
             2, p, false, &r);
  if (rc != FO_OK)
    return rc;
  rows = calloc((size_t)PQntuples(r) + 1, sizeof(*rows));
  if (rows == NULL) {
    rc = FO_ENOMEM;
    goto fail;
  }
  for (int i = 0; i < PQntuples(r); i++) {
    fo_deferred *d = &rows[n];
    fo_channel_kind ch;

    /* Only this module writes the table; a channel it cannot name
     * would come back after every lease, so it is said once per claim. */
    if (fo_channel_parse(PQgetvalue(r, i, 3), &ch) != FO_OK) {
      fo_log_error(FO_STORE_MOD, "deferred row names an unknown channel",
                   "id=%s", PQgetvalue(r, i, 0));
      continue;
    }
    d->id = strtoll(PQgetvalue(r, i, 0), NULL, 10);
    d->event_json = strdup(PQgetvalue(r, i, 1));
    d->user = strdup(PQgetvalue(r, i, 2));
    d->channel = ch;
    d->expires_ms = strtoll(PQgetvalue(r, i, 4), NULL, 10);
    n++;
    if (d->event_json == NULL || d->user == NULL) {
      rc = FO_ENOMEM;
      goto fail;
    }
  }
  PQclear(r);
  *out = rows;
  return n;

fail:
  /* The claimed rows come back when their lease ends. */
  fo_deferred_free(rows, n);
  PQclear(r);
  return rc;
}

/* Deleting a row by id runs the same twice, so a lost connection
 * retries it; FO_ENOENT when the row is gone already. */
int fo_store_deferred_done(fo_store *s, int64_t id) {
  char v[24];
  const char *p[] = {v};

  snprintf(v, sizeof(v), "%lld", (long long)id);
  return query_hit(s, NULL, "DELETE FROM deferred WHERE id = $1", 1, p, true);
}

/* ---- delivery log reads ---- */

int fo_store_event_get(fo_store *s, const char *event_id, json_t **out) {
  const char *p[] = {event_id};
  PGresult *r = NULL;
  int rc;

  if (event_id == NULL)
    return FO_ENOENT;
  rc = query(s,
             "SELECT json_build_object('id', $1::text, 'deliveries',"
             " json_agg(json_build_object('user', user_id,"
             "  'channel', channel, 'status', status, 'reason', reason,"
             "  'attempts', attempts, 'provider_id', provider_id,"
             "  'updated_at', " TS("updated_at") ")"
             "  ORDER BY user_id COLLATE \"C\", channel COLLATE \"C\"))::text"
             " FROM delivery_log WHERE event_id = $1 HAVING count(*) > 0",
             1, p, true, &r);
  if (rc != FO_OK)
    return rc;
  rc = json_result(r, 0, out);
  PQclear(r);
  return rc;
}

/* `delivered` and `undelivered` are what a provider's status callback
 * made of a `sent` row: the message went out all the same. */
int fo_store_delivery_sent(fo_store *s, const char *event_id,
                           const char *user, fo_channel_kind channel) {
  const char *p[] = {event_id, user, fo_channel_name(channel)};

  if (event_id == NULL || user == NULL)
    return FO_ENOENT;
  return query_hit(s, "fo_delivery_sent",
                   "SELECT 1 FROM delivery_log WHERE event_id = $1"
                   " AND user_id = $2 AND channel = $3"
                   " AND status IN ('sent', 'delivered', 'undelivered')",
                   3, p, true);
}

/* ---- provider feedback (SMS) ---- */

/* Only while the user still has that number: a number changed since the
 * send is a new address, usable until its own refusal. */
int fo_store_phone_unusable(fo_store *s, const char *user,
                            const char *phone, int64_t at_ms) {
  char at[24];
  const char *p[] = {user, phone, at};

  if (!id_ok(user) || phone == NULL)
    return FO_ENOENT;
  snprintf(at, sizeof(at), "%lld", (long long)at_ms);
  return query_hit(s, NULL,
                   "WITH u AS (UPDATE users SET sms_unusable_since = "
                   MS_TS("$3") " WHERE id = $1 AND phone = $2"
                   " AND sms_unusable_since IS NULL RETURNING id)"
                   " SELECT pg_notify('fanout_user', u.id) FROM u",
                   3, p, true);
}

static json_t *channel_off_apply(const json_t *current, void *arg,
                                 int *fn_rc) {
  const char *name = arg;
  json_t *doc = current != NULL ? json_deep_copy(current) : json_object();
  json_t *chans;

  if (doc == NULL) {
    *fn_rc = FO_ENOMEM;
    return NULL;
  }
  chans = json_object_get(doc, "channels");
  if (!json_is_object(chans)) {
    chans = json_object();
    if (chans == NULL || json_object_set_new(doc, "channels", chans) != 0)
      goto oom;
  }
  if (json_object_set_new(chans, name, json_false()) != 0)
    goto oom;
  return doc;

oom:
  json_decref(doc);
  *fn_rc = FO_ENOMEM;
  return NULL;
}

/* Through the same locked read-modify-write as PATCH, so a concurrent
 * edit of another preference is kept, and its NOTIFY drops the user from
 * every instance's cache. */
int fo_store_channel_off(fo_store *s, const char *user,
                         fo_channel_kind channel) {
  json_t *out = NULL;
  int rc;

  if ((unsigned)channel >= FO_CH_COUNT)
    return FO_EINVAL;
  rc = fo_store_prefs_update(s, user, channel_off_apply,
                             (void *)fo_channel_name(channel), &out);
  json_decref(out);
  return rc;
}

int fo_store_delivery_update_by_provider(fo_store *s,
                                         fo_channel_kind channel,
                                         const char *provider_id,
                                         const char *status,
                                         const char *reason) {
  const char *p[] = {fo_channel_name(channel), provider_id, status, reason};

  if ((unsigned)channel >= FO_CH_COUNT || status == NULL ||
      status[0] == '\0')
    return FO_EINVAL;
  if (provider_id == NULL || provider_id[0] == '\0')
    return FO_ENOENT;
  return query_hit(s, NULL,
                   "UPDATE delivery_log SET status = $3, reason = $4,"
                   " updated_at = now()"
                   " WHERE channel = $1 AND provider_id = $2",
                   4, p, true);
}
