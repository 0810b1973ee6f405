/* SPDX-License-Identifier: MIT */
/*
 * A Kafka producer that tells its caller when one message is safely in
 * the broker: the admin API's POST /v1/events answers 202 only once the
 * event it was given has been acknowledged. The producer is idempotent
 * (broker-side deduplication of its own retries), and every message is
 * keyed by the event id, so retries of one event land in one partition.
 *
 * Threads: any thread may send. Completions (delivery reports, deadlines)
 * are served by one poll thread of the producer's own, which is also the
 * thread that runs asynchronous completion callbacks.
 */
#ifndef FO_PUBLISH_H
#define FO_PUBLISH_H

#include <stdbool.h>
#include <stddef.h>

typedef struct fo_publish fo_publish;

/*
 * Creates a producer for `topic` on the bootstrap servers `brokers` and
 * starts its poll thread. Strings are copied. Returns FO_OK and sets *out
 * (free with fo_publish_free()), or FO_EKAFKA / FO_ENOMEM with one line in
 * `err`. A broker that is down now is not an error: sends then fail or
 * time out until it is back.
 */
int fo_publish_new(const char *brokers, const char *topic, fo_publish **out,
                   char *err, size_t errlen);

/*
 * Called once per accepted asynchronous send with its outcome: FO_OK
 * (the broker acknowledged the message), FO_ETIMEDOUT (no acknowledgement
 * within the send's timeout; the message may still arrive later),
 * FO_EKAFKA (the broker or librdkafka refused it) or FO_ECLOSED (the
 * producer was freed first). Runs on the producer's poll thread, or on
 * the thread calling fo_publish_free(); it must not block for long.
 */
typedef void (*fo_publish_done_fn)(int rc, void *arg);

/*
 * Sends `len` bytes at `value` keyed by `key` (NUL-terminated; NULL for
 * no key) and returns at once. When it returns FO_OK, `done(rc, arg)` is
 * called exactly once later, at the latest about `timeout_ms` from now.
 * When it returns an error (FO_EKAFKA: the local queue refused the
 * message; FO_ECLOSED; FO_ENOMEM; FO_EINVAL), `done` is never called.
 * Copies `key` and `value`; does not take ownership of `arg`.
 */
int fo_publish_send_async(fo_publish *p, const char *key, const void *value,
                          size_t len, int timeout_ms,
                          fo_publish_done_fn done, void *arg);

/*
 * Sends one message and waits until the broker acknowledged that very
 * message. Returns FO_OK, FO_ETIMEDOUT (not acknowledged within
 * `timeout_ms`; it may still be delivered later, so a retry can
 * duplicate it), FO_EKAFKA, FO_ECLOSED, FO_ENOMEM or FO_EINVAL.
 * Copies `key` and `value`.
 */
int fo_publish_send(fo_publish *p, const char *key, const void *value,
                    size_t len, int timeout_ms);

/*
 * True when the cluster answers a metadata request for the topic within
 * half a second and the producer has no fatal error; blocks at most that
 * long (for /healthz).
 */
bool fo_publish_healthy(fo_publish *p);

/*
 * Waits up to about two seconds for messages still in flight, then
 * gives up on the rest: every pending send completes (FO_ECLOSED at
 * worst) before this returns. `p` is invalid after the call; NULL is
 * allowed.
 */
void fo_publish_free(fo_publish *p);

#endif /* FO_PUBLISH_H */
