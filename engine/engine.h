/* SPDX-License-Identifier: MIT */
/*
 * The pipeline assembled: Kafka consumer, bounded queue, dispatcher and
 * channels, built from a loaded configuration. fanoutd and the pipeline
 * benchmark both run it.
 *
 * Threads: call every function from one controlling thread.
 */
#ifndef FO_ENGINE_H
#define FO_ENGINE_H

#include <stddef.h>

#include "config.h"
#include "fanout/channel.h"

typedef struct fo_engine fo_engine;

/*
 * Builds the pipeline from `cfg`, reading Kafka from `brokers` (the
 * bootstrap list in use, which may be the embedded broker's address).
 * Does not take ownership of `cfg`, which must outlive the engine.
 * Returns FO_OK and sets *out, or an error with one line in `err`.
 */
int fo_engine_new(const fo_config *cfg, const char *brokers,
                  fo_engine **out, char *err, size_t errlen);

/*
 * Routes a channel kind to `ch` (NULL: off). Call before start. Does not
 * take ownership of `ch`: the caller destroys it after fo_engine_free().
 */
void fo_engine_set_channel(fo_engine *e, fo_channel_kind kind,
                           fo_channel *ch);

int fo_engine_start(fo_engine *e);

/* Logs the one-line summary of counters and rates since the last one. */
void fo_engine_log_summary(fo_engine *e);

/*
 * Graceful stop: stops consuming, lets in-flight work finish for at most
 * `drain_ms`, shuts the channels down, commits what finished and leaves
 * the consumer group. Returns FO_OK when everything finished in time,
 * FO_ETIMEDOUT when some work was left for a replay after restart.
 */
int fo_engine_stop(fo_engine *e, int drain_ms);

void fo_engine_free(fo_engine *e);

/* The user store and Redis limits the engine opened (NULL when
 * [postgres] dsn is not set), for the admin API. Owned by the engine. */
struct fo_store *fo_engine_store(fo_engine *e);
struct fo_limiter *fo_engine_limits(fo_engine *e);

#endif /* FO_ENGINE_H */
