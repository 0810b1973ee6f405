/* SPDX-License-Identifier: MIT */
/*
 * The store's schema as numbered migrations. Each runs once, recorded in
 * schema_migrations, inside one transaction that holds an advisory lock,
 * so instances that start together serialise and the later ones find
 * the work done. A migration is never edited once released: a change is
 * a new entry at the end of the list.
 */
#include "store_priv.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fanout/common.h"
#include "log.h"

typedef struct migration {
  int version;
  const char *sql;
} migration;

static const migration migrations[] = {
  {1,
   "CREATE TABLE users ("
   " id text PRIMARY KEY,"
   " email text,"
   " phone text,"
   " timezone text,"
   " locale text,"
   " sms_unusable_since timestamptz,"
   " created_at timestamptz NOT NULL DEFAULT now(),"
   " updated_at timestamptz NOT NULL DEFAULT now());"
   "CREATE TABLE devices ("
   " user_id text NOT NULL REFERENCES users(id) ON DELETE CASCADE,"
   " platform text NOT NULL CHECK (platform IN ('apns', 'fcm')),"
   " token text NOT NULL,"
   " app text NOT NULL DEFAULT 'default',"
   " invalid_since timestamptz,"
   " registered_at timestamptz NOT NULL DEFAULT now(),"
   " PRIMARY KEY (user_id, token));"
   "CREATE INDEX devices_platform_token_idx ON devices (platform, token);"
   "CREATE TABLE preferences ("
   " user_id text PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,"
   " doc jsonb NOT NULL,"
   " updated_at timestamptz NOT NULL DEFAULT now());"
   "CREATE TABLE deferred ("
   " id bigserial PRIMARY KEY,"
   " event jsonb NOT NULL,"
   " user_id text NOT NULL,"
   " channel text NOT NULL,"
   " due_at timestamptz NOT NULL,"
   " expires_at timestamptz NOT NULL,"
   " lease_until timestamptz,"
   " created_at timestamptz NOT NULL DEFAULT now());"
   "CREATE INDEX deferred_due_at_idx ON deferred (due_at);"
   /* One row per delivery: an event replayed from Kafka defers nothing
    * twice. */
   "CREATE UNIQUE INDEX deferred_delivery_idx"
   " ON deferred ((event->>'id'), user_id, channel);"
   /* Erasing a user deletes their deferred rows too. */
   "CREATE INDEX deferred_user_id_idx ON deferred (user_id);"
   "CREATE TABLE delivery_log ("
   " event_id text NOT NULL,"
   " user_id text NOT NULL,"
   " channel text NOT NULL,"
   " status text NOT NULL,"
   " reason text,"
   " attempts int NOT NULL DEFAULT 0,"
   " provider_id text,"
   " updated_at timestamptz NOT NULL DEFAULT now(),"
   " PRIMARY KEY (event_id, user_id, channel));"
   "CREATE TABLE inbox ("
   " id bigserial PRIMARY KEY,"
   " user_id text NOT NULL REFERENCES users(id) ON DELETE CASCADE,"
   " event_id text NOT NULL,"
   " payload jsonb NOT NULL,"
   " created_at timestamptz NOT NULL DEFAULT now());"
   /* The inbox is read per user, newest first. */
   "CREATE INDEX inbox_user_id_idx ON inbox (user_id, id);"},
  /* Status callbacks find their delivery by the provider's message id. */
  {2,
   "CREATE INDEX delivery_log_provider_idx ON delivery_log"
   " (channel, provider_id) WHERE provider_id IS NOT NULL;"},
};

#define NMIGRATIONS ((int)(sizeof(migrations) / sizeof(migrations[0])))

/* The advisory lock key of the migrations: 0x66616e6f75740001, the
 * bytes of "fanout" then 1. */
#define MIGRATION_LOCK_KEY "7377299089600544769"

int fo_store_schema_version(void) {
  return migrations[NMIGRATIONS - 1].version;
}

static bool applied(const PGresult *r, int version) {
  for (int i = 0; i < PQntuples(r); i++) {
    const char *v = fo_pg_value(r, i, 0);

    if (v != NULL && atoi(v) == version)
      return true;
  }
  return false;
}

/* Runs a constant multi-statement script; PQexecParams takes only one
 * statement, and a migration needs no parameters. */
static int run_script(PGconn *c, const char *sql, char *err,
                      size_t errlen) {
  PGresult *r = PQexec(c, sql);
  int rc = FO_OK;

  if (r == NULL || PQresultStatus(r) != PGRES_COMMAND_OK) {
    const char *m =
        r != NULL ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;

    snprintf(err, errlen, "%s",
             m != NULL ? m : "connection lost during a migration");
    rc = FO_EIO;
  }
  PQclear(r);
  return rc;
}

int fo_store_migrate(PGconn *c, char *err, size_t errlen) {
  const char *lock_key[] = {MIGRATION_LOCK_KEY};
  PGresult *have = NULL;
  int rc, newest = 0, count = 0;

  if ((rc = fo_pg_exec(c, "BEGIN", 0, NULL, false, NULL)) != FO_OK) {
    snprintf(err, errlen, "cannot begin the migration transaction");
    return FO_EIO;
  }
  /* Held to the end of the transaction: a second instance waits here
   * and then sees the versions this one recorded. */
  rc = fo_pg_exec(c, "SELECT pg_advisory_xact_lock($1::bigint)", 1,
                  lock_key, false, NULL);
  if (rc != FO_OK) {
    snprintf(err, errlen, "cannot take the migration lock");
    goto fail;
  }
  rc = run_script(c,
                  "CREATE TABLE IF NOT EXISTS schema_migrations ("
                  " version int PRIMARY KEY,"
                  " applied_at timestamptz NOT NULL DEFAULT now())",
                  err, errlen);
  if (rc != FO_OK)
    goto fail;
  rc = fo_pg_exec(c, "SELECT version FROM schema_migrations", 0, NULL,
                  false, &have);
  if (rc != FO_OK) {
    snprintf(err, errlen, "cannot read schema_migrations");
    goto fail;
  }
  for (int i = 0; i < PQntuples(have); i++) {
    const char *v = fo_pg_value(have, i, 0);

    if (v != NULL && atoi(v) > newest)
      newest = atoi(v);
  }

  for (int i = 0; i < NMIGRATIONS; i++) {
    const migration *m = &migrations[i];
    char ver[16];
    const char *params[] = {ver};
    char why[200];

    if (applied(have, m->version))
      continue;
    if (run_script(c, m->sql, why, sizeof(why)) != FO_OK) {
      snprintf(err, errlen, "migration %d failed: %s", m->version, why);
      rc = FO_EIO;
      goto fail;
    }
    snprintf(ver, sizeof(ver), "%d", m->version);
    rc = fo_pg_exec(c, "INSERT INTO schema_migrations (version) VALUES ($1)",
                    1, params, false, NULL);
    if (rc != FO_OK) {
      snprintf(err, errlen, "cannot record migration %d", m->version);
      goto fail;
    }
    count++;
  }
  if (fo_pg_exec(c, "COMMIT", 0, NULL, false, NULL) != FO_OK) {
    snprintf(err, errlen, "cannot commit the migrations");
    rc = FO_EIO;
    goto out;
  }
  if (count > 0)
    fo_log_info(FO_STORE_MOD, "schema migrated", "applied=%d version=%d",
                count, fo_store_schema_version());
  /* A newer release has run here already: its extra migrations only
   * add, so this one keeps working with the schema it knows. */
  if (newest > fo_store_schema_version())
    fo_log_warn(FO_STORE_MOD, "schema is newer than this build",
                "schema=%d build=%d", newest, fo_store_schema_version());
  rc = FO_OK;
  goto out;

fail:
  rc = FO_EIO;
  (void)fo_pg_exec(c, "ROLLBACK", 0, NULL, false, NULL);
out:
  PQclear(have);
  return rc;
}
