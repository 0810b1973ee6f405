/* SPDX-License-Identifier: MIT */
/*
 * The development Kafka broker: librdkafka's mock cluster, started inside
 * a process and reachable by any Kafka client on 127.0.0.1. fanoutd runs
 * it when `kafka.brokers = embedded`, and fanout-devbroker runs it alone
 * when it must outlive one fanoutd. Its data lives in memory and each
 * partition keeps only about 5 MB: it is for development and tests, never
 * for production.
 */
#ifndef FO_KAFKA_MOCK_H
#define FO_KAFKA_MOCK_H

#include <stddef.h>

typedef struct fo_kmock fo_kmock;

/*
 * Starts a one-broker cluster and creates `topics` (NULL-terminated) with
 * `partitions` partitions each. Returns FO_OK and sets *out, or FO_EKAFKA
 * with one line in `err`.
 */
int fo_kmock_start(const char *const *topics, int partitions,
                   fo_kmock **out, char *err, size_t errlen);

/* The bootstrap address ("127.0.0.1:PORT"); lives as long as `m`. */
const char *fo_kmock_bootstraps(const fo_kmock *m);

/*
 * Writes the bootstrap address and a newline to `path` atomically (a
 * temporary file renamed into place), creating its directory if needed.
 */
int fo_kmock_write_bootstrap(const fo_kmock *m, const char *path);

void fo_kmock_stop(fo_kmock *m);

#endif /* FO_KAFKA_MOCK_H */
