/* SPDX-License-Identifier: MIT */
/*
 * The bounded priority queue between the consumer and the dispatcher. Each
 * priority level is a FIFO of small nodes, one per queued event, and the
 * head node of a level carries the expansion cursor (the user index and
 * the channels still to hand out for that user), so popping an item is a
 * few bit operations and never allocates. Nodes are recycled through a
 * free list, so in the steady state pushing does not allocate either; the
 * event limit bounds how many nodes ever exist.
 *
 * Locking a default mutex cannot fail short of memory corruption, so the
 * results of lock and unlock are not checked here.
 */
#include "queue.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

#include "fanout/common.h"

/* Pops per round for each level, indexed by fo_priority. */
static const unsigned fo_queue_weights[FO_PRIO_COUNT] = {8, 4, 2, 1};

#define FO_QUEUE_LEVELS_ALL ((1u << FO_PRIO_COUNT) - 1u)

typedef struct fo_queue_node {
  struct fo_queue_node *next;
  fo_event *ev;
  uint32_t user;       /* the user whose items are being handed out */
  uint32_t to_count;   /* read once at push time */
  unsigned mask;       /* the event's channel bits */
  unsigned rem;        /* channel bits still to hand out for `user` */
} fo_queue_node;

typedef struct fo_queue_level {
  fo_queue_node *head;
  fo_queue_node *tail;
  uint64_t items;
} fo_queue_level;

struct fo_queue {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  fo_queue_level levels[FO_PRIO_COUNT];
  fo_queue_node *free_nodes;
  uint64_t items;
  uint64_t events;
  uint64_t max_items;
  uint64_t max_events;
  unsigned credits[FO_PRIO_COUNT];
  unsigned work_mask;    /* bit per level that holds items */
  unsigned credit_mask;  /* bit per level with credits left this round */
  unsigned waiters;
  bool closed;
};

/*
 * Items an event expands into. Computed here rather than taken from
 * fo_event_items() so the count always matches what the cursor below
 * hands out, and the queue needs nothing from the decoder.
 */
static uint64_t fo_queue_event_items(const fo_event *ev) {
  unsigned mask = ev->channels & FO_CH_MASK_ALL;

  return (uint64_t)ev->to_count * (uint64_t)__builtin_popcount(mask);
}

fo_queue *fo_queue_new(uint64_t max_items, uint64_t max_events) {
  fo_queue *q = NULL;
  pthread_condattr_t attr;
  bool attr_ok = false;
  bool mu_ok = false;

  if (max_items == 0 || max_events == 0) {
    return NULL;
  }
  q = calloc(1, sizeof(*q));
  if (q == NULL) {
    goto fail;
  }
  if (pthread_mutex_init(&q->mu, NULL) != 0) {
    goto fail;
  }
  mu_ok = true;
  if (pthread_condattr_init(&attr) != 0) {
    goto fail;
  }
  attr_ok = true;
  /* Timeouts must not jump when the wall clock is set. */
  if (pthread_condattr_setclock(&attr, CLOCK_MONOTONIC) != 0) {
    goto fail;
  }
  if (pthread_cond_init(&q->cv, &attr) != 0) {
    goto fail;
  }
  pthread_condattr_destroy(&attr);

  q->max_items = max_items;
  q->max_events = max_events;
  for (int i = 0; i < FO_PRIO_COUNT; i++) {
    q->credits[i] = fo_queue_weights[i];
  }
  q->credit_mask = FO_QUEUE_LEVELS_ALL;
  return q;

fail:
  if (attr_ok) {
    pthread_condattr_destroy(&attr);
  }
  if (mu_ok) {
    pthread_mutex_destroy(&q->mu);
  }
  free(q);
  return NULL;
}

static void fo_queue_free_list(fo_queue_node *n) {
  while (n != NULL) {
    fo_queue_node *next = n->next;

    free(n);
    n = next;
  }
}

void fo_queue_free(fo_queue *q) {
  if (q == NULL) {
    return;
  }
  for (int i = 0; i < FO_PRIO_COUNT; i++) {
    fo_queue_free_list(q->levels[i].head);
  }
  fo_queue_free_list(q->free_nodes);
  pthread_cond_destroy(&q->cv);
  pthread_mutex_destroy(&q->mu);
  free(q);
}

/* The admission rule shared by push and has_room; called locked. */
static bool fo_queue_fits(const fo_queue *q, uint64_t items) {
  if (q->closed || items == 0) {
    return false;
  }
  if (q->events == 0) {
    return true;
  }
  if (q->events >= q->max_events) {
    return false;
  }
  /* items can exceed max_items after an oversize event was let in. */
  return q->items <= q->max_items && items <= q->max_items - q->items;
}

int fo_queue_push(fo_queue *q, fo_event *ev) {
  fo_queue_node *n;
  fo_queue_level *lv;
  uint64_t items;
  int rc = FO_OK;

  if (q == NULL || ev == NULL || (unsigned)ev->priority >= FO_PRIO_COUNT) {
    return FO_EINVAL;
  }
  items = fo_queue_event_items(ev);
  if (items == 0) {
    return FO_EINVAL;
  }

  pthread_mutex_lock(&q->mu);
  if (q->closed) {
    rc = FO_ECLOSED;
    goto out;
  }
  if (!fo_queue_fits(q, items)) {
    rc = FO_EFULL;
    goto out;
  }
  n = q->free_nodes;
  if (n != NULL) {
    q->free_nodes = n->next;
  } else {
    n = malloc(sizeof(*n));
    if (n == NULL) {
      rc = FO_ENOMEM;
      goto out;
    }
  }
  n->next = NULL;
  n->ev = ev;
  n->user = 0;
  n->to_count = ev->to_count;
  n->mask = ev->channels & FO_CH_MASK_ALL;
  n->rem = n->mask;

  lv = &q->levels[ev->priority];
  if (lv->tail != NULL) {
    lv->tail->next = n;
  } else {
    lv->head = n;
  }
  lv->tail = n;
  lv->items += items;
  q->items += items;
  q->events++;
  q->work_mask |= 1u << ev->priority;

  /* One item can feed one popper; more may feed all of them. */
  if (q->waiters > 0) {
    if (items == 1) {
      pthread_cond_signal(&q->cv);
    } else {
      pthread_cond_broadcast(&q->cv);
    }
  }

out:
  pthread_mutex_unlock(&q->mu);
  return rc;
}

bool fo_queue_has_room(fo_queue *q, uint64_t items) {
  bool ok;

  if (q == NULL) {
    return false;
  }
  pthread_mutex_lock(&q->mu);
  ok = fo_queue_fits(q, items);
  pthread_mutex_unlock(&q->mu);
  return ok;
}

/*
 * Hands out one item; called locked with q->items > 0. The level is the
 * highest one that has both work and credits left in this round; when no
 * level with work has credits left, a new round starts.
 */
static void fo_queue_take(fo_queue *q, fo_work *out) {
  unsigned avail = q->work_mask & q->credit_mask;
  unsigned lvl;
  fo_queue_level *lv;
  fo_queue_node *n;

  if (avail == 0) {
    for (int i = 0; i < FO_PRIO_COUNT; i++) {
      q->credits[i] = fo_queue_weights[i];
    }
    q->credit_mask = FO_QUEUE_LEVELS_ALL;
    avail = q->work_mask;
  }
  lvl = (unsigned)__builtin_ctz(avail);
  q->credits[lvl]--;
  if (q->credits[lvl] == 0) {
    q->credit_mask &= ~(1u << lvl);
  }

  lv = &q->levels[lvl];
  n = lv->head;
  out->event = n->ev;
  out->user = n->user;
  out->channel = (fo_channel_kind)__builtin_ctz(n->rem);
  n->rem &= n->rem - 1u;
  lv->items--;
  q->items--;
  if (n->rem != 0) {
    return;
  }

  /* Channels are done for this user: move on to the next one. */
  n->user++;
  n->rem = n->mask;
  if (n->user < n->to_count) {
    return;
  }
  lv->head = n->next;
  if (lv->head == NULL) {
    lv->tail = NULL;
    q->work_mask &= ~(1u << lvl);
  }
  q->events--;
  n->ev = NULL;
  n->next = q->free_nodes;
  q->free_nodes = n;
}

/*
 * Waits, locked, until there is an item or the queue is closed. Returns
 * FO_OK when an item is there, FO_ECLOSED when closed and empty, or
 * FO_ETIMEDOUT.
 */
static int fo_queue_wait(fo_queue *q, int timeout_ms) {
  struct timespec deadline;
  int rc = FO_OK;

  if (q->items == 0 && !q->closed && timeout_ms > 0) {
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
      deadline.tv_sec++;
      deadline.tv_nsec -= 1000000000L;
    }
  }
  while (q->items == 0 && !q->closed) {
    if (timeout_ms == 0 || rc == FO_ETIMEDOUT) {
      return FO_ETIMEDOUT;
    }
    q->waiters++;
    if (timeout_ms < 0) {
      pthread_cond_wait(&q->cv, &q->mu);
    } else if (pthread_cond_timedwait(&q->cv, &q->mu, &deadline) ==
               ETIMEDOUT) {
      /* Look once more: an item may have come with the deadline. */
      rc = FO_ETIMEDOUT;
    }
    q->waiters--;
  }
  return q->items > 0 ? FO_OK : FO_ECLOSED;
}

int fo_queue_pop(fo_queue *q, fo_work *out, int timeout_ms) {
  int rc;

  if (q == NULL || out == NULL) {
    return FO_EINVAL;
  }
  pthread_mutex_lock(&q->mu);
  rc = fo_queue_wait(q, timeout_ms);
  if (rc == FO_OK) {
    fo_queue_take(q, out);
  }
  pthread_mutex_unlock(&q->mu);
  return rc;
}

size_t fo_queue_pop_many(fo_queue *q, fo_work *out, size_t cap,
                         int timeout_ms) {
  size_t n = 0;

  if (q == NULL || out == NULL || cap == 0) {
    return 0;
  }
  pthread_mutex_lock(&q->mu);
  if (fo_queue_wait(q, timeout_ms) == FO_OK) {
    while (n < cap && q->items > 0) {
      fo_queue_take(q, &out[n]);
      n++;
    }
    /* Leftovers may feed another popper that is still asleep. */
    if (q->items > 0 && q->waiters > 0) {
      pthread_cond_signal(&q->cv);
    }
  }
  pthread_mutex_unlock(&q->mu);
  return n;
}

void fo_queue_close(fo_queue *q) {
  if (q == NULL) {
    return;
  }
  pthread_mutex_lock(&q->mu);
  q->closed = true;
  pthread_cond_broadcast(&q->cv);
  pthread_mutex_unlock(&q->mu);
}

void fo_queue_get_stats(fo_queue *q, fo_queue_stats *out) {
  if (q == NULL || out == NULL) {
    return;
  }
  pthread_mutex_lock(&q->mu);
  out->items = q->items;
  out->events = q->events;
  out->max_items = q->max_items;
  out->max_events = q->max_events;
  for (int i = 0; i < FO_PRIO_COUNT; i++) {
    out->items_by_prio[i] = q->levels[i].items;
  }
  pthread_mutex_unlock(&q->mu);
}
