/* SPDX-License-Identifier: MIT */
/*
 * Support for integration tests: start fanoutd and the development broker
 * as real processes in a private working folder, produce and consume
 * through the real Kafka protocol, and read what the record channel
 * wrote.
 */
#ifndef FO_ITEST_H
#define FO_ITEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <jansson.h>

/* Monotonic milliseconds, and a sleep of `ms` milliseconds. */
int64_t itest_now_ms(void);
void itest_sleep_ms(int ms);

/* A process started by a test, with its own working folder. */
typedef struct itest_proc {
  pid_t pid;
  char dir[512];               /* its working folder */
  char log[600];               /* its stdout and stderr */
} itest_proc;

/* Makes a fresh folder under the test build tree; returns 0 or -1. */
int itest_tmpdir(const char *name, char *out, size_t cap);

/* Path of a binary of the build under test ($FANOUT_TEST_BUILD). */
const char *itest_bin(const char *name);

/*
 * Starts `argv[0]` (a path) in `dir` with the current environment, less
 * FANOUT_POSTGRES_DSN and FANOUT_REDIS_URL, plus `env` (NULL-terminated
 * "K=V" list, may be NULL), output to dir/NAME.log.
 */
int itest_spawn(itest_proc *p, const char *dir, const char *name,
                char *const argv[], char *const env[]);

/* Sends `sig` and waits up to `timeout_ms`; returns the exit status as
 * from waitpid, or -1 on timeout (the process is then killed). */
int itest_stop(itest_proc *p, int sig, int timeout_ms);

/* True while the process runs. */
bool itest_alive(itest_proc *p);

/* Waits until `path` exists and is not empty; 0, or -1 on timeout. */
int itest_wait_file(const char *path, int timeout_ms);

/* Reads a whole file into a NUL-terminated buffer (free()); NULL if
 * none. */
char *itest_slurp(const char *path, size_t *len);

/* Waits until the process's log contains `needle`; 0 or -1. */
int itest_wait_log(itest_proc *p, const char *needle, int timeout_ms);

/* Number of lines of `path` that contain `needle` (all if NULL). */
size_t itest_count_lines(const char *path, const char *needle);

/* Starts the development broker in `dir`; its address lands in
 * dir/var/kafka.bootstrap and in `bootstrap`. */
int itest_start_broker(itest_proc *p, const char *dir, int partitions,
                       char *bootstrap, size_t cap);

/*
 * Writes dir/fanout.ini with the given extra INI text appended to a base
 * that sets the test secrets, a record file at dir/deliveries.jsonl and
 * short Kafka timeouts; `brokers` is "embedded" or an address.
 */
int itest_write_config(const char *dir, const char *brokers,
                       const char *extra);

/* Starts fanoutd with dir/fanout.ini and the extra environment `env`
 * (may be NULL), and waits until it has joined its consumer group (the
 * "partitions assigned" log line). */
int itest_start_fanoutd(itest_proc *p, const char *dir, char *const env[],
                        int timeout_ms);

/* Produces `n` messages to `topic`, waiting for every acknowledgement. */
int itest_produce(const char *bootstrap, const char *topic,
                  const char *const *values, size_t n);

/* A consumed message, with its headers as "name=value" lines. */
typedef struct itest_msg {
  char *value;
  size_t len;
  char *headers;
} itest_msg;

/*
 * Reads `topic` from the beginning until `want` messages arrived or the
 * timeout passed; returns how many it got (array in *out, free with
 * itest_msgs_free).
 */
size_t itest_consume(const char *bootstrap, const char *topic, size_t want,
                     int timeout_ms, itest_msg **out);
void itest_msgs_free(itest_msg *m, size_t n);

/* The committed offset sum of `group` on `topic` (all partitions). */
int64_t itest_committed(const char *bootstrap, const char *group,
                        const char *topic);


/* ---- services (PostgreSQL, HTTP) ---- */

/*
 * Creates a fresh, empty database named after `name` and this process on
 * the server of $FANOUT_POSTGRES_DSN, and writes its DSN to `dsn`.
 * Returns 0, or -1 when the services are not there.
 */
int itest_db_create(const char *name, char *dsn, size_t cap);

/* Drops the database made by itest_db_create(). */
void itest_db_drop(const char *dsn);

/* Runs one SQL statement on `dsn`; returns the first column of the first
 * row as a number (0 when none), or -1 on error. */
long itest_sql(const char *dsn, const char *sql);

/* A free TCP port on 127.0.0.1 at the time of the call. */
int itest_free_port(void);

/*
 * One HTTP request to `url`, HTTPS verified against the CA file `ca`
 * (NULL: the system's), with the header lines `headers` (NULL-terminated,
 * may be NULL) and `body` (NULL: none). Returns the status (or -1) and
 * the body in *resp (free()) when `resp` is not NULL.
 */
long itest_http_raw(const char *method, const char *url, const char *ca,
                    const char *const *headers, const char *body,
                    char **resp);

/*
 * One HTTP request with a bearer token (NULL: none) and a JSON body (NULL:
 * none). Returns the status (or -1) and the body in *resp (free()).
 */
int itest_http(const char *method, const char *url, const char *token,
               const char *body, char **resp);

/* ---- a fanoutd node and its admin API ---- */

/* The admin token of the base configuration of itest_write_config(). */
#define ITEST_ADMIN_TOKEN "test-admin-token-0123456789"

/* A fanoutd started by itest_node_start(). */
typedef struct itest_node {
  itest_proc proc;
  char dir[512];               /* its working folder */
  int port;                    /* its admin API on 127.0.0.1 */
} itest_node;

/*
 * Starts fanoutd in a fresh folder `name` on the broker `bootstrap`, with
 * PostgreSQL at `dsn`, Redis at `redis` (NULL: $FANOUT_REDIS_URL) and the
 * admin API on `port` (0: a free one). `extra` (may be NULL) is INI text
 * that follows the [admin] section. Waits until the node has joined its
 * consumer group and the admin API listens; returns 0 or -1.
 */
int itest_node_start(itest_node *n, const char *name, int port,
                     const char *bootstrap, const char *dsn,
                     const char *redis, const char *extra);

/* One admin API request with the test token; as itest_http(). */
int itest_api(const itest_node *n, const char *method, const char *path,
              const char *body, char **resp);

/* The delivery log entry of (event, user, channel), full ids, as
 * GET /v1/events/{id} shows it: a new reference, or NULL when none. */
json_t *itest_delivery(const itest_node *n, const char *event,
                       const char *user, const char *channel);

/* "status", or "status:reason" when the entry has a reason. */
void itest_outcome(const json_t *d, char *out, size_t cap);

/*
 * Polls the delivery log until the entry's outcome (as itest_outcome())
 * is `want`, or starts with it when `prefix`, for up to `timeout_ms`.
 * Returns the entry (new reference), or NULL with the last outcome seen
 * ("(none)" if no entry) in `got`.
 */
json_t *itest_wait_outcome(const itest_node *n, const char *event,
                           const char *user, const char *channel,
                           const char *want, bool prefix, int timeout_ms,
                           char *got, size_t cap);

/* ---- provider fakes ---- */

/* A provider fake serving HTTPS with a certificate of a CA of its own. */
typedef struct itest_fake {
  itest_proc proc;
  char url[64];                /* https://127.0.0.1:PORT */
  char ca[600];                /* the CA file, in its working folder */
} itest_fake;

/*
 * Starts the build's fake `bin` (e.g. "fake-twilio") in a fresh folder
 * `name` as `bin --port 0 --ca CA` and the arguments `args`
 * (NULL-terminated, may be NULL), and waits until it says its port.
 * Returns 0 or -1.
 */
int itest_fake_start(itest_fake *f, const char *bin, const char *name,
                     const char *const *args);

/* One request to `path` of the fake; as itest_http_raw(). */
long itest_fake_call(const itest_fake *f, const char *method,
                     const char *path, const char *body, char **resp);

#endif /* FO_ITEST_H */
