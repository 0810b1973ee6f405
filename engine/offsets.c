/* SPDX-License-Identifier: MIT */
/*
 * Per-partition offset tracker: a ring of consumed offsets in increasing
 * order, each with a done flag. Finishing an offset is a binary search;
 * the head advances past finished offsets, so the head is always the
 * oldest unfinished one, which is the commit point.
 */
#include "offsets.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>

#include "fanout/common.h"

typedef struct slot {
  int64_t offset;
  bool done;
} slot;

struct fo_offsets {
  pthread_mutex_t lock;
  atomic_int refs;
  int32_t partition;
  slot *ring;
  uint64_t cap;            /* power of two */
  uint64_t head;           /* index of the oldest slot */
  uint64_t len;            /* slots in the ring, finished ones included */
  uint64_t unfinished;
  int64_t last_added;      /* -1 before the first add */
};

fo_offsets *fo_offsets_new(int32_t partition) {
  fo_offsets *t = calloc(1, sizeof(*t));

  if (t == NULL)
    return NULL;
  t->cap = 64;
  t->ring = malloc(t->cap * sizeof(*t->ring));
  if (t->ring == NULL) {
    free(t);
    return NULL;
  }
  pthread_mutex_init(&t->lock, NULL);
  atomic_init(&t->refs, 1);
  t->partition = partition;
  t->last_added = -1;
  return t;
}

void fo_offsets_ref(fo_offsets *t) {
  atomic_fetch_add_explicit(&t->refs, 1, memory_order_relaxed);
}

void fo_offsets_unref(fo_offsets *t) {
  if (t == NULL)
    return;
  if (atomic_fetch_sub_explicit(&t->refs, 1, memory_order_acq_rel) != 1)
    return;
  pthread_mutex_destroy(&t->lock);
  free(t->ring);
  free(t);
}

int32_t fo_offsets_partition(const fo_offsets *t) {
  return t->partition;
}

static slot *at(fo_offsets *t, uint64_t i) {
  return &t->ring[(t->head + i) & (t->cap - 1)];
}

static int grow(fo_offsets *t) {
  uint64_t ncap = t->cap * 2;
  slot *n = malloc(ncap * sizeof(*n));

  if (n == NULL)
    return FO_ENOMEM;
  for (uint64_t i = 0; i < t->len; i++)
    n[i] = *at(t, i);
  free(t->ring);
  t->ring = n;
  t->cap = ncap;
  t->head = 0;
  return FO_OK;
}

int fo_offsets_add(fo_offsets *t, int64_t offset) {
  int rc = FO_OK;

  pthread_mutex_lock(&t->lock);
  if (offset <= t->last_added) {
    rc = FO_EINVAL;
    goto out;
  }
  if (t->len == t->cap && (rc = grow(t)) != FO_OK)
    goto out;

  *at(t, t->len) = (slot){.offset = offset, .done = false};
  t->len++;
  t->unfinished++;
  t->last_added = offset;
  atomic_fetch_add_explicit(&t->refs, 1, memory_order_relaxed);

out:
  pthread_mutex_unlock(&t->lock);
  return rc;
}

void fo_offsets_done(fo_offsets *t, int64_t offset) {
  uint64_t lo = 0, hi;
  bool found = false;

  pthread_mutex_lock(&t->lock);
  hi = t->len;
  while (lo < hi) {
    uint64_t mid = lo + (hi - lo) / 2;
    slot *s = at(t, mid);

    if (s->offset == offset) {
      found = !s->done;
      s->done = true;
      if (found)
        t->unfinished--;
      break;
    }
    if (s->offset < offset)
      lo = mid + 1;
    else
      hi = mid;
  }

  /* The head only moves past finished work, so it stays the oldest
   * unfinished offset. */
  while (t->len > 0 && at(t, 0)->done) {
    t->head = (t->head + 1) & (t->cap - 1);
    t->len--;
  }
  pthread_mutex_unlock(&t->lock);

  if (found)
    fo_offsets_unref(t);
}

int64_t fo_offsets_commit_point(fo_offsets *t) {
  int64_t point;

  pthread_mutex_lock(&t->lock);
  if (t->len > 0)
    point = at(t, 0)->offset;
  else if (t->last_added >= 0)
    point = t->last_added + 1;
  else
    point = -1;
  pthread_mutex_unlock(&t->lock);
  return point;
}

uint64_t fo_offsets_unfinished(fo_offsets *t) {
  uint64_t n;

  pthread_mutex_lock(&t->lock);
  n = t->unfinished;
  pthread_mutex_unlock(&t->lock);
  return n;
}
