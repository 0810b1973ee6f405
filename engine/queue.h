/* SPDX-License-Identifier: MIT */
/*
 * The bounded priority queue between the Kafka consumer and the
 * dispatcher. It holds whole events and expands each lazily into its
 * (user, channel) work items as they are popped, so an event with 10,000
 * recipients costs one entry, not 40,000.
 *
 * Bounds: the queue refuses an event (FO_EFULL) when its items or the
 * event count would pass the limits given at creation, except that an
 * empty queue always takes one event, so no event is too big to ever run.
 * The consumer pauses its Kafka partitions on FO_EFULL and resumes when
 * fo_queue_has_room() says so.
 *
 * Order: items are popped by weighted round robin over the four levels
 * (critical 8, high 4, normal 2, low 1 pops per round while each has work),
 * so a higher level goes first but a lower one is never starved.
 * Within a level, events are first in, first out; within an event, items
 * go user by user, channel by channel.
 *
 * Thread-safe: one mutex; any number of pushers and poppers.
 */
#ifndef FO_QUEUE_H
#define FO_QUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fanout/event.h"

typedef struct fo_queue fo_queue;

/* One work item: the event stays owned by whoever pushed it. */
typedef struct fo_work {
  fo_event *event;
  uint32_t user;               /* index into event->to */
  fo_channel_kind channel;
} fo_work;

typedef struct fo_queue_stats {
  uint64_t items;              /* items not yet popped */
  uint64_t events;             /* events with items not yet popped */
  uint64_t max_items;
  uint64_t max_events;
  uint64_t items_by_prio[FO_PRIO_COUNT];
} fo_queue_stats;

/* Returns NULL when out of memory. Both limits must be at least 1. */
fo_queue *fo_queue_new(uint64_t max_items, uint64_t max_events);

/* Frees the queue; events still in it are not freed (the pusher owns
 * them). */
void fo_queue_free(fo_queue *q);

/*
 * Adds an event with all its items (fo_event_items(ev)), at the event's
 * priority. Never blocks. Does not take ownership of `ev`; it must stay
 * valid until its last item has been popped and completed.
 * Returns FO_OK, FO_EFULL (no room now), or FO_ECLOSED.
 * An event with no items is refused with FO_EINVAL.
 */
int fo_queue_push(fo_queue *q, fo_event *ev);

/* True when an event of `items` items would be accepted now. */
bool fo_queue_has_room(fo_queue *q, uint64_t items);

/*
 * Takes the next item. Blocks up to `timeout_ms` (-1: no limit) while the
 * queue is empty. Returns FO_OK, FO_ETIMEDOUT, or FO_ECLOSED once the
 * queue is closed and empty.
 */
int fo_queue_pop(fo_queue *q, fo_work *out, int timeout_ms);

/* Takes up to `cap` items at once under one lock (same order as pop);
 * returns how many, 0 on timeout or when closed and empty. */
size_t fo_queue_pop_many(fo_queue *q, fo_work *out, size_t cap,
                         int timeout_ms);

/* Refuses further pushes and wakes every popper; items already queued
 * can still be popped. */
void fo_queue_close(fo_queue *q);

void fo_queue_get_stats(fo_queue *q, fo_queue_stats *out);

#endif /* FO_QUEUE_H */
