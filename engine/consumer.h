/* SPDX-License-Identifier: MIT */
/*
 * Kafka input: a consumer in a consumer group that decodes each event,
 * dead-letters what is not valid, pushes the rest into the queue, pauses
 * its partitions while the queue is full, and commits per partition only
 * offsets below the oldest event that still has unfinished work.
 *
 * Threads: the consumer runs its own thread between start and stop;
 * fo_consumer_event_done() is called from dispatcher or channel threads.
 */
#ifndef FO_CONSUMER_H
#define FO_CONSUMER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fanout/event.h"
#include "queue.h"

typedef struct fo_consumer fo_consumer;

typedef struct fo_consumer_conf {
  const char *brokers;          /* bootstrap servers */
  const char *group;
  const char *topic;
  const char *dlq_topic;
  int session_timeout_ms;
  size_t max_event_bytes;
  int commit_interval_ms;
} fo_consumer_conf;

typedef struct fo_consumer_stats {
  uint64_t consumed;            /* messages read */
  uint64_t dead_lettered;       /* invalid events sent to the DLQ */
  uint64_t commits;
  uint64_t pauses;
  bool paused;
} fo_consumer_stats;

/*
 * Creates the consumer and its dead-letter producer. Strings in `conf` are
 * copied. Does not take ownership of `q`, which must outlive it. Returns
 * FO_OK and sets *out, or FO_EKAFKA / FO_ENOMEM with one line in `err`.
 */
int fo_consumer_new(const fo_consumer_conf *conf, fo_queue *q,
                    fo_consumer **out, char *err, size_t errlen);

/* Subscribes and starts the consumer thread. */
int fo_consumer_start(fo_consumer *c);

/* Stops reading new messages and joins the thread; events already in the
 * queue keep running. */
void fo_consumer_stop(fo_consumer *c);

/*
 * After the dispatcher has drained: waits for dead-letter deliveries (at
 * most `timeout_ms`), commits what finished, and leaves the group.
 */
int fo_consumer_finish(fo_consumer *c, int timeout_ms);

void fo_consumer_free(fo_consumer *c);

/*
 * The dispatcher's done callback (fo_dispatch_done_fn): marks the event's
 * offset finished when `finished`, and frees the event. `arg` is unused.
 */
void fo_consumer_event_done(fo_event *ev, bool finished, void *arg);

void fo_consumer_get_stats(fo_consumer *c, fo_consumer_stats *out);

#endif /* FO_CONSUMER_H */
