/* SPDX-License-Identifier: MIT */
/*
 * Internals shared by the PostgreSQL store's source files (store.c,
 * migrations.c and dlog.c): the connection pool, the statement runner
 * that resets a lost connection, and the array literal encoder the
 * delivery log uses for its batches. Not part of the store's interface.
 */
#ifndef FO_STORE_PRIV_H
#define FO_STORE_PRIV_H

#include <stdbool.h>
#include <stddef.h>

#include <libpq-fe.h>

#include "buf.h"
#include "store.h"

/* Log module name of the store's records. */
#define FO_STORE_MOD "store"

/*
 * Connects with the store's defaults (connect timeout, TCP keepalives,
 * application name) under `dsn`, whose own settings win. Returns a
 * connection the caller must PQfinish() even when its status is bad, or
 * NULL when out of memory. On failure `err` gets one line that never
 * quotes the DSN.
 */
PGconn *fo_pg_connect(const char *dsn, const char *app, char *err,
                      size_t errlen);

/*
 * Borrows a pooled connection, waiting for one to be free; a connection
 * found dead is reset first. Returns FO_OK and *out, or FO_EIO when the
 * database cannot be reached (nothing is then borrowed).
 */
int fo_pool_get(fo_store *s, PGconn **out);
/* Gives a connection back; an open transaction on it is rolled back. */
void fo_pool_put(fo_store *s, PGconn *c);

/*
 * Runs one parameterised statement (text parameters and results). On a
 * lost connection the connection is reset and, when `retry` is set (the
 * statement is safe to run twice), the statement runs once more.
 * Returns FO_OK with the result in *out (PQclear it; `out` may be NULL),
 * FO_EIO (connection lost, or a server-side failure), FO_EINVAL (the data
 * was refused: SQLSTATE classes 21, 22 and 23) or FO_ENOENT (a foreign
 * key names a missing row).
 */
int fo_pg_exec(PGconn *c, const char *sql, int nparams,
               const char *const *params, bool retry, PGresult **out);

/*
 * fo_pg_exec() for a statement of the hot path, kept prepared on each
 * connection under `name` (prepared on first use, and again after a
 * reset). Not inside a transaction: the first use on a connection is a
 * failed statement, which would abort it.
 */
int fo_pg_exec_prepared(PGconn *c, const char *name, const char *sql,
                        int nparams, const char *const *params, bool retry,
                        PGresult **out);

/* Text of field (row, col), NULL when the value is SQL NULL. */
const char *fo_pg_value(const PGresult *r, int row, int col);

/* Applies the pending schema migrations; FO_OK or FO_EIO with `err`. */
int fo_store_migrate(PGconn *c, char *err, size_t errlen);

/* Number of migrations this build knows (the schema version it wants). */
int fo_store_schema_version(void);

/*
 * PostgreSQL array literal writer: open, one call per element, close.
 * Every non-NULL element is double-quoted with `"` and `\` escaped, so
 * any byte string (commas, braces, spaces, the text "NULL") survives; a
 * NULL pointer is the SQL NULL element.
 */
void fo_pg_array_open(fo_buf *b);
void fo_pg_array_elem(fo_buf *b, const char *v);
void fo_pg_array_close(fo_buf *b);

#endif /* FO_STORE_PRIV_H */
